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
from typing import Any, Callable, Iterable, Sequence

import torch

__all__ = [
    "check_callable",
    "check_choice",
    "check_flag",
    "check_instance",
    "check_integer",
    "check_mapping",
    "check_mask",
    "check_names",
    "check_number",
    "check_options",
    "check_schedule",
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


def _accepted(low: float, allow_low: bool, high: float, allow_high: bool, none_ok: bool) -> str:
    lower = f"{'>=' if allow_low else '>'} {low:g}" if low != -math.inf else ""
    upper = f"{'<=' if allow_high else '<'} {high:g}" if high != math.inf else ""
    return "a finite number" + (f" {lower}" if lower else "") + (" and" if lower and upper else "") + (
        f" {upper}" if upper else "") + (" or None" if none_ok else "")


def check_number(name: str, value: Any, *, low: float = 0.0, allow_low: bool = False, high: float = math.inf,
                 allow_high: bool = False, none_ok: bool = False) -> float | None:
    """``value`` as a finite ``float`` in the range ``(low, high)`` (ends included as asked), or a
    ``ValueError`` naming ``name`` and the accepted range. ``None`` passes with ``none_ok``."""
    if type(value) is float:  # the common case, without building any message
        number = value
    elif value is None and none_ok:
        return None
    else:
        scalar = _scalar(value)
        if not is_number(scalar):
            raise ValueError(f"Invalid {name}: {_describe(value)} "
                             f"(must be {_accepted(low, allow_low, high, allow_high, none_ok)})")
        try:
            number = float(scalar)
        except OverflowError:
            raise ValueError(f"Invalid {name}: {_describe(value)} (must be "
                             f"{_accepted(low, allow_low, high, allow_high, none_ok)}; this one overflows a float)"
                             ) from None
    if low < number < high or ((number == low and allow_low or number == high and allow_high)
                               and math.isfinite(number)):
        return number
    raise ValueError(f"Invalid {name}: {_describe(value)} (must be {_accepted(low, allow_low, high, allow_high, none_ok)})")


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
    """The one of ``choices`` that ``value`` is: a string equal to it, ``None``, or a bool
    (``True``/``False``, or a NumPy bool) for ``True``/``False``; nothing else is compared, so a
    tensor or a number is never taken for a choice."""
    choices = list(choices)
    for choice in choices:
        if value is choice:
            return choice
        if isinstance(choice, str) and isinstance(value, str) and value == choice:
            return choice
        if type(choice) is bool and type(value).__name__ == "bool_" and bool(value) == choice:
            return choice
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


def check_names(name: str, value: Any) -> Any:
    """``value`` if it is ``None`` or a collection (a list, a tuple, a set) of names or tensors; a
    lone string or tensor is refused, since iterating it would read a name letter by letter."""
    if value is None or (hasattr(value, "__iter__") and not isinstance(value, (str, bytes, torch.Tensor))):
        return value
    raise ValueError(f"Invalid {name}: {_describe(value)} (must be a list of names or tensors, or None for all)")


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


def check_schedule(name: str, schedule: Callable[[int], Any], step: int,
                   check: Callable[[str, Any], Any] = check_number) -> Any:
    """The value of a schedule ``step -> value`` at ``step``, checked by ``check(name, value)``
    (the message says which step returned it)."""
    value = schedule(step)
    try:
        return check(name, value)
    except ValueError as error:
        raise ValueError(f"{error} [returned by the {name} schedule at step {step}]") from None


def check_instance(name: str, value: Any, kind: type | tuple[type, ...], *, what: str, none_ok: bool = False) -> Any:
    """``value`` if it is an instance of ``kind`` (or ``None`` with ``none_ok``), else a
    ``TypeError`` naming ``name`` and ``what`` is accepted."""
    if (value is None and none_ok) or isinstance(value, kind):
        return value
    raise TypeError(f"Invalid {name}: {_describe(value)} (must be {what}" + (" or None)" if none_ok else ")"))


def check_mask(name: str, mask: Any, params: Sequence[torch.Tensor]) -> list[torch.Tensor] | None:
    """A mask as one 0/1 tensor per parameter, in the parameter's dtype and device: ``None`` (no
    mask), one tensor (for a single parameter) or a list with one entry per parameter, each a
    tensor (or anything ``torch.as_tensor`` takes, or ``None`` for all ones) shaped like it."""
    if mask is None:
        return None
    if isinstance(mask, torch.Tensor):
        mask = [mask]
    if not isinstance(mask, (list, tuple)) or len(mask) != len(params):
        raise ValueError(
            f"Invalid {name}: expected a list of {len(params)} tensors (one per parameter of the group, "
            f"or None), got {type(mask).__name__}" + (f" of length {len(mask)}" if hasattr(mask, "__len__") else "")
        )
    out = []
    for i, (m, p) in enumerate(zip(mask, params)):
        if m is None:
            out.append(torch.ones_like(p, memory_format=torch.contiguous_format).detach())
            continue
        try:
            m = torch.as_tensor(m)
        except (TypeError, ValueError, RuntimeError, OverflowError):
            raise ValueError(f"Invalid {name}[{i}]: {_describe(m)} (must be a 0/1 tensor shaped like its parameter, "
                             f"{tuple(p.shape)})") from None
        if m.shape != p.shape:
            raise ValueError(
                f"Invalid {name}[{i}]: shape {tuple(m.shape)} does not match its parameter's shape {tuple(p.shape)}"
            )
        if m.is_complex() or not bool(((m == 0) | (m == 1)).all()):
            raise ValueError(f"Invalid {name}[{i}]: entries must be 0/1 or boolean")
        out.append(m.detach().to(device=p.device, dtype=p.dtype))
    return out
