"""Install a wrapper around a fairseq function exactly once per process.

The plugin adjusts a handful of fairseq 0.12 functions (checkpoint reading, dataset loading, ``--help``,
checkpoint copies). ``--user-dir`` imports it once, but the same process can import it again (tests that build
models through fairseq's parser, hydra's ``common.user_dir``), and a wrapper applied twice would run its checks
twice and, worse, hide the first wrapper's marker. Each patch therefore marks its wrapper and is skipped when
the attribute already carries that mark. :class:`Patch` is one row of the table that says which functions
are patched (:mod:`t2r_fairseq.registry`).
"""

from __future__ import annotations

import functools
import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional


def patch_once(owner: Any, name: str, make_wrapper: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    """Replace ``owner.name`` by ``make_wrapper(original)`` unless this same patch is already installed.

    The mark is named after ``make_wrapper``, so two different patches of one function (both wrap fairseq's
    ``load_checkpoint``, for instance) do not mistake each other's wrapper for their own; ``functools.wraps``
    carries the inner mark outwards, which is what keeps the inner patch from being applied again.
    A ``staticmethod`` stays a ``staticmethod``.
    """
    mark = f"_t2r_patched_{make_wrapper.__name__}"
    original = getattr(owner, name)
    if getattr(original, mark, False):
        return
    wrapper = functools.wraps(original)(make_wrapper(original))
    setattr(wrapper, mark, True)
    if isinstance(inspect.getattr_static(owner, name), staticmethod):
        wrapper = staticmethod(wrapper)
    setattr(owner, name, wrapper)


@dataclass(frozen=True)
class Patch:
    """One row of the plugin's table of fairseq patches (:data:`t2r_fairseq.registry.PATCHES`).

    ``owner`` is where the attribute lives, ``"module"`` or ``"module:Class"`` (resolved when applied, so the
    table can be read without importing fairseq); ``target`` the attribute; ``wrapper`` makes the replacement
    from the original. ``fairseq`` is the fairseq release whose code the wrapper was written against: its
    signature and the way fairseq calls it, the first thing to re-read when fairseq changes. ``always`` rows are
    the plugin's own features, applied even when ``T2R_FAIRSEQ_UNPATCHED`` leaves fairseq's functions alone;
    ``replace`` rows swap a non-function attribute outright (no ``functools.wraps``, no mark); ``then`` runs
    after the row is applied.
    """

    owner: str
    target: str
    wrapper: Callable[[Any], Any]
    fairseq: str
    why: str
    always: bool = False
    replace: bool = False
    then: Optional[Callable[[], None]] = None

    def resolve_owner(self) -> Any:
        """The module or class whose attribute this row replaces."""
        module, _, cls = self.owner.partition(":")
        found = importlib.import_module(module)
        return getattr(found, cls) if cls else found

    def apply(self) -> None:
        """Install this row (once per process for wrappers: :func:`patch_once`)."""
        owner = self.resolve_owner()
        if self.replace:
            setattr(owner, self.target, self.wrapper(getattr(owner, self.target)))
        else:
            patch_once(owner, self.target, self.wrapper)
        if self.then is not None:
            self.then()
