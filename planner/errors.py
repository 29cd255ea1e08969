"""The one exception family. The CLI turns these into a message and exit code 1."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MegacppError(Exception):
    """Base of every error a user can cause. The message is one line: what, the value, the fix."""


class SpecError(MegacppError):
    """The spec (YAML, overrides, pattern) is malformed or inconsistent."""


class PlanError(MegacppError):
    """The spec is well formed but cannot be planned (no legal layout, bad plan file)."""


class LaunchError(MegacppError):
    """A plan cannot be rendered or launched."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
