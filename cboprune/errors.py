"""The one exception type users see: the CLI prints its message as a single line and exits 2."""

from __future__ import annotations


class CBOPruneError(Exception):
    """A problem with the user's input or environment; the message says what to do."""
