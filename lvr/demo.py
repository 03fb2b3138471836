"""``lvr demo`` (placeholder)."""

from __future__ import annotations


def demo() -> None:
    """Run the whole chain on built-in synthetic data (not built yet)."""
    raise SystemExit("lvr demo is not built yet")
