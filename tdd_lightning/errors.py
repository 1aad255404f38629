"""The one error type for problems the user can fix (a config value, a missing file, a broken checkpoint).

Every entry point (train.py, sample.py, ``python -m tdd_lightning.*``) prints a ``UserError`` as one line
``error: <message>`` on stderr and exits with code 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

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
