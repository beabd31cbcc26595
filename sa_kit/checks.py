"""Input checks shared by the whole kit: each names the argument and what is allowed.

Errors a learner can cause (a class out of range, a negative lambda, an unknown name) raise a
``ValueError`` or ``TypeError`` whose message says which argument, which value, and what would
have been accepted -- the same sentence from the API, the widgets and the command lines.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, TypeVar

T = TypeVar("T")

__all__ = ["check_weight", "check_positive_int", "check_class", "check_choice",
           "check_positive_float", "check_count"]


def check_weight(name: str, value: Any) -> float:
    """A loss weight, guidance scale or other finite number ``>= 0`` (e.g. ``lmbda``, ``gamma``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number >= 0, got {type(value).__name__} {value!r}")
    if not (0 <= value < math.inf):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return float(value)


def check_positive_float(name: str, value: Any) -> float:
    """A finite number ``> 0`` (e.g. a learning rate)."""
    value = check_weight(name, value)
    if value == 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def check_positive_int(name: str, value: Any) -> int:
    """An int ``> 0`` (steps, batch sizes, sample counts)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_count(name: str, value: Any, most: int) -> int:
    """An int in ``1..most``."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
        raise ValueError(f"{name} must be an integer in 1..{most}, got {value!r}")
    return value


def check_class(name: str, value: Any, num_classes: int) -> int:
    """A class index in ``0..num_classes-1``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int class index in 0..{num_classes - 1}, "
                        f"got {type(value).__name__} {value!r}")
    if not 0 <= value < num_classes:
        raise ValueError(f"{name} must be in 0..{num_classes - 1}, got {value}")
    return value


def check_choice(name: str, value: T, allowed: Iterable[T]) -> T:
    """One of ``allowed`` (names such as a train method, a profile, an estimator)."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value
