"""The one error type for problems the user can fix (a config value, a missing file, a broken checkpoint).

Every entry point (train.py, sample.py, ``python -m tdd_lightning.*``) prints a ``UserError`` as one line
``error: <message>`` on stderr and exits with code 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class UserError(RuntimeError):
    """A problem with the user's config, files or arguments: reported as one line, exit code 1."""


class ConfigError(UserError, ValueError):
    """A config value outside its allowed range or of the wrong type; ``key`` names it.

    Strategies raise it with their own key (``s_ratio``); whoever builds them adds the group prefix
    (``target_selection.s_ratio``) with ``with_prefix``.
    """

    def __init__(self, key: str, value, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r} is invalid: {allowed}")

    def with_prefix(self, prefix: str) -> ConfigError:
        return ConfigError(f"{prefix}.{self.key}" if prefix else self.key, self.value, self.allowed)


def check(ok: bool, key: str, value, allowed: str) -> None:
    """Raise ConfigError(key, value, allowed) unless ``ok``."""
    if not ok:
        raise ConfigError(key, value, allowed)


def is_int(v) -> bool:
    """An integer (not a bool, not a float with an integral value)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v, finite: bool = False) -> bool:
    """An int or float (not a bool); with ``finite``, neither inf nor nan."""
    ok = isinstance(v, (int, float)) and not isinstance(v, bool)
    return ok and (not finite or math.isfinite(v))


def check_int(key: str, value, minimum: int = 1) -> int:
    """An integer >= minimum (not a float, not a bool), or ConfigError naming ``key``."""
    check(is_int(value) and value >= minimum, key, value, f"must be an integer >= {minimum}")
    return value


def check_ints(key: str, values, minimum: int = 1) -> list[int]:
    """A non-empty list of integers >= minimum."""
    items = [values] if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__") else list(values)
    ok = bool(items) and all(is_int(v) and v >= minimum for v in items)
    check(ok, key, values, f"must be a non-empty list of integers >= {minimum}")
    return items


def check_number(key: str, value, low: float | None = None, high: float | None = None) -> float:
    """A finite number in [low, high] (either bound may be open-ended), or ConfigError naming ``key``."""
    ok = is_number(value, finite=True) and (low is None or value >= low) and (high is None or value <= high)
    words = {(True, True): f"in [{low}, {high}]", (True, False): f">= {low}", (False, True): f"<= {high}"}
    bounds = words.get((low is not None, high is not None), "")
    check(ok, key, value, f"must be a finite number {bounds}".rstrip())
    return float(value)


def report(error: BaseException) -> None:
    """The one-line form of a user error on stderr."""
    print(f"error: {error}", file=sys.stderr)


def exit_on_user_error(fn: Callable[[], T]) -> T:
    """Run ``fn``; a UserError becomes one line on stderr and exit code 1 (other errors propagate)."""
    try:
        return fn()
    except UserError as e:
        report(e)
        sys.exit(1)
