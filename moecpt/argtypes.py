"""argparse ``type=`` helpers shared by every area's ``cli.py`` (and the benchmarks).

They live at the bottom of the package graph, beside :mod:`moecpt.errors`, so that a command module never imports
the ``moecpt.cli`` dispatcher that imports it (docs/design.md, rule A2).
"""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a zero or negative count is a user error, not a default)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def int_at_least(low: int):
    """argparse type factory: an integer >= ``low`` (counts where 0 or 1 would make a run meaningless)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be at least {low}")
        return value

    return parse
