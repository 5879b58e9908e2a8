"""A module's call inputs, by parameter name, handed to a callback from a forward hook.

Calibration (which captures one layer's teacher-exact q/k) and attention transfer (which recomputes each swapped
layer's attention from the inputs it was called with) both need the same thing: the ``query``, ``key``,
``key_padding_mask``, ... of each forward call, however the caller passed them (fairseq's layers pass some
positionally, some by keyword). Written twice, the two bound ``inspect.signature`` on every call; here the
forward's parameter names are read once per class and each call is a ``zip``.
"""

from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Any, Callable, Dict, Tuple

from torch import nn
from torch.utils.hooks import RemovableHandle

CallHandler = Callable[[nn.Module, Dict[str, Any]], None]


@lru_cache(maxsize=None)
def positional_names(forward: Callable[..., Any]) -> Tuple[str, ...]:
    """Names of ``forward``'s positional parameters after ``self``, in order (read once per function)."""
    params = list(inspect.signature(forward).parameters.values())[1:]
    return tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def call_arguments(names: Tuple[str, ...], args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """The arguments of one call by name (only those passed, as ``Signature.bind(...).arguments``; no defaults)."""
    if len(args) > len(names):
        raise TypeError(f"forward takes {len(names)} positional arguments, the call passed {len(args)}")
    call = dict(zip(names, args))
    twice = call.keys() & kwargs.keys()
    if twice:
        raise TypeError(f"forward got multiple values for {sorted(twice)}")
    call.update(kwargs)
    return call


def on_call(module: nn.Module, handler: CallHandler) -> RemovableHandle:
    """After each forward of ``module``, call ``handler(module, arguments_by_name)``; remove the returned handle
    to stop. An exception raised by ``handler`` propagates out of the forward (calibration stops a forward so)."""
    names = positional_names(type(module).forward)

    def hook(mod: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], output: Any) -> None:
        handler(mod, call_arguments(names, args, kwargs))

    return module.register_forward_hook(hook, with_kwargs=True)
