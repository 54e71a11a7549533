"""The one exception type users see: the CLI prints its message as a single line and exits 2."""

from __future__ import annotations


class CBOPruneError(Exception):
    """A problem with the user's input or environment; the message says what to do."""


class DivergedError(CBOPruneError):
    """A computation whose loss stopped being a number (a heal that blew up). Where a diverged
    configuration is a legitimate outcome (a study healing a catastrophic removal) the caller
    records it as "diverged"; elsewhere it is an error like any other."""
