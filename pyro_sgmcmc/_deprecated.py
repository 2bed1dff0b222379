"""Old import paths that keep working, with a ``DeprecationWarning``, for one release."""

from __future__ import annotations

import importlib
import warnings
from typing import Any, Callable


def moved_module(old: str, new: str) -> Callable[[str], Any]:
    """A module ``__getattr__`` (PEP 562) for the module ``old`` whose contents moved to ``new``:
    each attribute is taken from ``new``, with a warning naming the new path."""

    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        value = getattr(importlib.import_module(new), name)
        warnings.warn(f"{old}.{name} is deprecated and will be removed in the next release; "
                      f"use {new}.{name}", DeprecationWarning, stacklevel=2)
        return value

    return __getattr__
