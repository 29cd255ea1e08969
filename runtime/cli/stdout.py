"""Plain output on stdout, as it is: JSON documents and YAML text. Kept apart from console.py so
that `--json` runs never import rich."""

from __future__ import annotations

import sys


def print_json(text: str) -> None:
    sys.stdout.write(text + "\n")


def print_text(text: str) -> None:
    """Plain text on stdout, as it is (a spec YAML): no markup, no wrapping."""
    sys.stdout.write(text)
