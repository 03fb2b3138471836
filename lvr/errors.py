"""The one base class for user-facing errors.

Anything raised as :class:`LvrError` is a user mistake or bad input (a wrong config key, an
unreadable video, a table with the wrong schema, an unreachable endpoint). The CLI prints its
message on one line and exits with status 2 instead of showing a traceback.
"""

from __future__ import annotations


class LvrError(Exception):
    """Base class of errors whose message is the whole, actionable story for the user."""
