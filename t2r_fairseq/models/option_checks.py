"""The one way the plugin checks its options: T2R model options, top-k options and the transfer criterion's.

fairseq builds the model and the criterion before it trains or writes anything, so a value out of range is
refused there with one line naming the option, its range and what it means. Values are checked as given, never
cast: ``int(2.5)`` would silently run ``--topk-k 2``, ``float('1e-3')`` would accept a string from a config that
fairseq itself would not. Each family raises its own subclass of :class:`OptionError` (``T2ROptionError``,
``TopkOptionError``, ``TransferOptionError``) so its message says which part of the plugin refused it.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional, Type

from fairseq.utils import safe_getattr


class OptionError(ValueError):
    """A plugin option is out of range; raised when the model or criterion is built."""


def read_option(args: Any, name: str, default: Any) -> Any:
    """``args.name`` from a namespace / dataclass config / DictConfig, ``default`` when absent or ``None``."""
    value = safe_getattr(args, name, default)
    return default if value is None else value


def _meaning(meaning: str) -> str:
    return f" ({meaning})" if meaning else ""


def check_int(option: str, value: Any, low: int, meaning: str = "", error: Type[OptionError] = OptionError) -> int:
    """``value`` if it is an integer (not a bool, not a float) ``>= low``; else one ``error`` line."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise error(f"{option} must be an integer >= {low}{_meaning(meaning)}, got {value!r}")
    return value


def check_number(
    option: str,
    value: Any,
    meaning: str = "",
    *,
    above: Optional[float] = None,
    at_least: Optional[float] = None,
    at_most: Optional[float] = None,
    below: Optional[float] = None,
    error: Type[OptionError] = OptionError,
) -> float:
    """``value`` if it is a finite real number (int or float, not a bool or a string) within the given bounds."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (above is None or value > above) and (at_least is None or value >= at_least)
    ok = ok and (at_most is None or value <= at_most) and (below is None or value < below)
    if ok:
        return float(value)
    lower = (f"({above:g}" if above is not None else f"[{at_least:g}") if (above, at_least) != (None, None) else None
    upper = (f"{below:g})" if below is not None else f"{at_most:g}]") if (below, at_most) != (None, None) else None
    if lower and upper:
        where = f"in {lower}, {upper}"
    elif lower:
        where = f"a finite number {'>' if above is not None else '>='} {lower[1:]}"
    elif upper:
        where = f"a finite number {'<' if below is not None else '<='} {upper[:-1]}"
    else:
        where = "a finite number"
    raise error(f"{option} must be {where}{_meaning(meaning)}, got {value!r}")


def check_choice(option: str, value: Any, choices: Iterable[str], error: Type[OptionError] = OptionError) -> str:
    """``str(value)`` if it is one of ``choices`` (fairseq's ChoiceEnum values compare by their string)."""
    choices = list(choices)
    if str(value) not in choices:
        raise error(f"{option} must be one of {', '.join(choices)}, got {value!r}")
    return str(value)
