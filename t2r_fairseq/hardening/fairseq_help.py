"""``fairseq-train ... --help`` that lists the options of the chosen model, task and criterion, with defaults.

fairseq 0.12 acts on ``--help`` in the first of its two parses, before it has added the options of ``--arch``,
``--task`` and ``--criterion``, so the help a user asks for never shows them (for fairseq's own models neither).
See :func:`help_after_all_options` and :func:`print_help_in_progress` for how the plugin prints the complete
parser instead.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, List

HELP_FLAGS = ("-h", "--help")


class _DefaultsHelpFormatter(argparse.HelpFormatter):
    """fairseq's help with each option's default appended, unless its help already speaks of one (or it has none)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, argparse.SUPPRESS) or "default" in text.lower() or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


def _show_model_defaults(parser: argparse.ArgumentParser, input_args: List[str]) -> None:
    """Give the model options of ``--arch`` their effective defaults, for the help only.

    fairseq adds model options without defaults (``argparse.SUPPRESS``) so that
    the ``--arch`` preset fills them after parsing; the values a run would get
    are the preset's, then the model dataclass's, which is what is shown.
    """
    import dataclasses

    from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_NAME_REGISTRY, MODEL_DATACLASS_REGISTRY

    arch = next((a.split("=", 1)[1] for a in input_args if a.startswith("--arch=")), None)
    for flag in ("--arch", "-a"):
        if arch is None and flag in input_args[:-1]:
            arch = input_args[input_args.index(flag) + 1]
    if arch not in ARCH_CONFIG_REGISTRY:
        return
    defaults = argparse.Namespace()
    try:
        ARCH_CONFIG_REGISTRY[arch](defaults)
    except Exception:  # noqa: BLE001 - a preset that needs more than defaults: show what the dataclass says
        defaults = argparse.Namespace()
    model = ARCH_MODEL_NAME_REGISTRY.get(arch)
    if model in MODEL_DATACLASS_REGISTRY:
        for f in dataclasses.fields(MODEL_DATACLASS_REGISTRY[model]):
            if not hasattr(defaults, f.name) and f.default is not dataclasses.MISSING:
                setattr(defaults, f.name, f.default)
    for action in parser._actions:
        if action.default is argparse.SUPPRESS and hasattr(defaults, action.dest):
            value = getattr(defaults, action.dest)
            action.default = value if isinstance(value, (bool, int, float, str)) or value is None else str(value)


def _help_after_all_options(parse_args_and_arch: Any, parser: Any, input_args: Any, modify_parser: Any) -> None:
    """Run fairseq's ``parse_args_and_arch`` without the help flag and print the help once every option is added.

    fairseq calls ``modify_parser`` twice: before its first parse and after it
    has added the model's, task's, criterion's (...) options. The second call is
    the moment the parser is complete, so the help is printed there.
    """
    calls = 0

    def print_complete_help(p: Any) -> None:
        nonlocal calls
        calls += 1
        if modify_parser is not None:
            modify_parser(p)
        if calls == 2:
            _show_model_defaults(p, input_args)
            p.formatter_class = _DefaultsHelpFormatter
            p.print_help()
            p.exit()

    args = [a for a in input_args if a not in HELP_FLAGS]
    parse_args_and_arch(parser, input_args=args, parse_known=True, modify_parser=print_complete_help)


def help_after_all_options(original: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``fairseq.options.parse_args_and_arch``: ``fairseq-train ... --arch A --criterion C --help`` lists A's
    and C's options, with defaults and help.

    fairseq 0.12's ``options.parse_args_and_arch`` parses the command line once
    to learn ``--arch``/``--task``/``--criterion``, then adds their options and
    parses again; ``--help`` is acted on in that first parse, so the help never
    shows model, task or criterion options (fairseq's own models' neither). A
    call that asks for help runs fairseq's function again without the help flag
    and prints the help when every option is in. Nothing changes for a command
    line without ``-h``/``--help``. The call already in progress when the plugin
    is imported is :func:`print_help_in_progress`'s.
    """

    def parse_args_and_arch(parser: Any, input_args: Any = None, parse_known: bool = False,
                            suppress_defaults: bool = False, modify_parser: Any = None) -> Any:
        given = sys.argv[1:] if input_args is None else list(input_args)
        if any(a in HELP_FLAGS for a in given) and not suppress_defaults:
            _help_after_all_options(original, parser, given, modify_parser)
        return original(parser, input_args, parse_known, suppress_defaults, modify_parser)

    return parse_args_and_arch


def print_help_in_progress() -> None:
    """Print the complete ``--help`` of the ``parse_args_and_arch`` call that is importing the plugin, if it asked.

    fairseq imports the user directory inside that very call, just before its first parse, so the wrapper
    (:func:`help_after_all_options`, applied after this call began) does not see it: this is the one moment a
    plugin can act. We find the call's parser and arguments on the stack and print the help once every model
    and criterion is registered.
    """
    from fairseq import options

    original = getattr(options.parse_args_and_arch, "__wrapped__", options.parse_args_and_arch)
    frame = sys._getframe(1)
    while frame is not None and frame.f_code is not original.__code__:
        frame = frame.f_back
    if frame is None:
        return
    local = frame.f_locals
    given = sys.argv[1:] if local.get("input_args") is None else list(local["input_args"])
    if any(a in HELP_FLAGS for a in given):
        _help_after_all_options(original, local["parser"], given, local.get("modify_parser"))
