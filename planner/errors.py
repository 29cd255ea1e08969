"""The one exception family. The CLI turns these into a message and exit code 1."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

# a quoted value or library message inside an error; a whole error line is allowed more, since it
# may quote several such parts beside its own words
MAX_MESSAGE_CHARS = 300
MAX_ERROR_CHARS = 1000
# a key or id this long is not a typo of a known one, and difflib's cost grows with its length
MAX_SUGGESTED_CHARS = 100


def printable(text: str, limit: int) -> str:
    """`text` cut to `limit` characters, each control character (newline, escape...) written as
    repr() writes it, so input can neither break a message's line nor drive the terminal."""
    head = text[:limit]
    shown = head if head.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in head)
    return shown if len(shown) <= limit and len(text) <= limit else shown[: limit - 3] + "..."


def one_line(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`text` as one readable line of at most `limit` characters: runs of whitespace become one
    space, other control characters are escaped."""
    return printable(" ".join(text.split()), limit)


class MegacppError(Exception):
    """Base of every error a user can cause. The message is one line: what, the value, the fix.

    Every message is made printable and bounded here, the one place all of them pass, so a key or
    value quoted from hostile input reaches stderr, `validate` output or a ::error line as one
    line of bounded length."""

    def __init__(self, message: object = "") -> None:
        super().__init__(printable(str(message), MAX_ERROR_CHARS))


class SpecError(MegacppError):
    """The spec (YAML, overrides, pattern) is malformed or inconsistent."""


class PlanError(MegacppError):
    """The spec is well formed but cannot be planned (no legal layout, bad plan file)."""


class LaunchError(MegacppError):
    """A plan cannot be rendered or launched."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    if len(word) > MAX_SUGGESTED_CHARS:
        return ""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
