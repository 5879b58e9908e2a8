"""Install a wrapper around a fairseq function exactly once per process.

The plugin adjusts a handful of fairseq 0.12 functions (checkpoint reading, dataset loading, ``--help``,
checkpoint copies). ``--user-dir`` imports it once, but the same process can import it again (tests that build
models through fairseq's parser, hydra's ``common.user_dir``), and a wrapper applied twice would run its checks
twice and, worse, hide the first wrapper's marker. Each patch therefore marks its wrapper and is skipped when
the attribute already carries that mark.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable


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
