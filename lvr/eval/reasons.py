"""Error messages grouped by reason (moved to :mod:`lvr.reasons`, shared with ``lvr datagen``)."""

from __future__ import annotations

from lvr.reasons import error_reason, group_errors, summarize_errors

__all__ = ["error_reason", "group_errors", "summarize_errors"]
