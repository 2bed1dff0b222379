"""The one place where arguments are checked, for every layer (samplers, Pyro adapters, kernels,
collectors, schedules): numbers, flags, integers, choices, callables, mappings and option names.

Every message has the form ``Invalid <argument>: <value> (must be <what is accepted>)``, so a
user sees which argument was wrong and what would be right. Numbers may be Python, NumPy or
0-d tensor scalars; each check returns the value as a plain Python number, so that what is
stored (e.g. in ``param_groups``) is one type whatever was given. Values too large for a float
(``10**400``) are refused here, not deep inside torch.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Mapping
from typing import Any, Callable, Iterable

__all__ = [
    "check_callable",
    "check_choice",
    "check_flag",
    "check_integer",
    "check_mapping",
    "check_number",
    "check_options",
    "closest",
    "is_number",
]


def _scalar(value: Any) -> Any:
    """A 0-d tensor (or NumPy 0-d array) as its Python scalar; anything else unchanged."""
    if hasattr(value, "dim") and callable(value.dim) and hasattr(value, "item"):  # torch.Tensor
        return value.item() if value.dim() == 0 else value
    if type(value).__module__ == "numpy" and getattr(value, "shape", None) == ():
        return value.item()
    return value


def is_number(value: Any) -> bool:
    """A real number (Python, NumPy or 0-d tensor), not a bool."""
    value = _scalar(value)
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and type(value).__name__ != "bool_"


def _describe(value: Any) -> str:
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"a {type(value).__name__} of shape {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_number(name: str, value: Any, *, low: float = 0.0, allow_low: bool = False, high: float = math.inf,
                 allow_high: bool = False, none_ok: bool = False) -> float | None:
    """``value`` as a finite ``float`` in the range ``(low, high)`` (ends included as asked), or a
    ``ValueError`` naming ``name`` and the accepted range. ``None`` passes with ``none_ok``."""
    if value is None and none_ok:
        return None
    lower = f"{'>=' if allow_low else '>'} {low:g}" if low != -math.inf else ""
    upper = f"{'<=' if allow_high else '<'} {high:g}" if high != math.inf else ""
    accepted = "a finite number" + (f" {lower}" if lower else "") + (" and" if lower and upper else "") + (
        f" {upper}" if upper else "") + (" or None" if none_ok else "")
    scalar = _scalar(value)
    if not is_number(scalar):
        raise ValueError(f"Invalid {name}: {_describe(value)} (must be {accepted})")
    try:
        number = float(scalar)
    except OverflowError:
        raise ValueError(f"Invalid {name}: {_describe(value)} (must be {accepted}; this one overflows a float)") from None
    if not math.isfinite(number) or number < low or (number == low and not allow_low) or number > high or (
            number == high and not allow_high):
        raise ValueError(f"Invalid {name}: {_describe(value)} (must be {accepted})")
    return number


def check_integer(name: str, value: Any, *, low: int = 0, none_ok: bool = False) -> int | None:
    """``value`` as an ``int >= low`` (Python, NumPy or 0-d integer tensor; not a bool or a float)."""
    if value is None and none_ok:
        return None
    scalar = _scalar(value)
    if not isinstance(scalar, numbers.Integral) or isinstance(scalar, bool) or type(scalar).__name__ == "bool_" \
            or scalar < low:
        raise ValueError(f"Invalid {name}: {_describe(value)} (must be an integer >= {low}"
                         + (" or None)" if none_ok else ")"))
    return int(scalar)


def check_flag(name: str, value: Any) -> bool:
    """``value`` as a ``bool``: only ``True`` or ``False`` (a truthy string such as ``"no"`` is
    refused rather than read as ``True``)."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    raise ValueError(f"Invalid {name}: {_describe(value)} (must be True or False)")


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """``value`` if it is one of ``choices``."""
    choices = list(choices)
    if isinstance(value, str) and value in choices:
        return value
    if not isinstance(value, str) and any(value is c or (not isinstance(c, str) and value == c) for c in choices):
        return value
    listed = ", ".join(repr(c) for c in choices)
    hint = closest(value, [c for c in choices if isinstance(c, str)]) if isinstance(value, str) else None
    raise ValueError(f"Invalid {name}: {_describe(value)} (must be one of {listed})"
                     + (f"; did you mean {hint!r}?" if hint else ""))


def check_callable(name: str, value: Any, *, what: str = "a callable", none_ok: bool = False) -> Any:
    """``value`` if it is callable (or ``None`` with ``none_ok``)."""
    if (value is None and none_ok) or callable(value):
        return value
    raise ValueError(f"Invalid {name}: {_describe(value)} (must be {what}" + (" or None)" if none_ok else ")"))


def check_mapping(name: str, value: Any, *, what: str = "a dict", none_ok: bool = False) -> Any:
    """``value`` if it is a mapping (or ``None`` with ``none_ok``)."""
    if (value is None and none_ok) or isinstance(value, Mapping):
        return value
    raise ValueError(f"Invalid {name}: {_describe(value)} (must be {what}" + (" or None)" if none_ok else ")"))


def closest(word: str, candidates: Iterable[str]) -> str | None:
    """The candidate closest to ``word`` (case-insensitive), if any is close."""
    candidates = list(candidates)
    lowered = {c.lower(): c for c in candidates}
    match = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.6)
    return lowered[match[0]] if match else None


def check_options(given: Mapping[str, Any], accepted: Iterable[str], where: str,
                  hints: Mapping[str, str] | None = None) -> None:
    """Refuse option names not in ``accepted``: each unknown one is named with the closest valid
    option (a misspelling) or with ``hints[name]`` (an option of another library that has an
    equivalent here, e.g. HMC's ``target_accept_prob``)."""
    accepted = sorted(set(accepted))
    hints = hints or {}
    for key in given:
        if key in accepted:
            continue
        if not isinstance(key, str):
            raise ValueError(f"Invalid option {key!r} of {where} (option names are strings)")
        if key in hints:
            raise ValueError(f"Invalid option {key!r} of {where}: {hints[key]}")
        suggestion = closest(key, accepted)
        raise ValueError(f"Invalid option {key!r} of {where}"
                         + (f": did you mean {suggestion!r}?" if suggestion else "")
                         + f" (valid options: {', '.join(accepted)})")


def check_callable_schedule(name: str, schedule: Callable[[int], Any], step: int, **range_: Any) -> float:
    """The value of a schedule ``step -> number`` at ``step``, checked as :func:`check_number`
    checks a number (the message says which step returned it)."""
    value = schedule(step)
    try:
        return check_number(name, value, **range_)
    except ValueError as error:
        raise ValueError(f"{error} [returned by the {name} schedule at step {step}]") from None
