"""User-facing errors.

Anything a user can cause (bad config, missing file, wrong checkpoint) raises :class:`MoecptError` with a one-line
message that says what is wrong and how to fix it. The CLI prints it as ``moecpt: error: ...`` and exits with
status 2; programming errors keep their traceback.
"""

from __future__ import annotations


class MoecptError(Exception):
    """An error caused by user input; its message is one line saying what is wrong and what to do."""
