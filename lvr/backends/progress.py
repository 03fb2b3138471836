"""A Rich progress bar for backend runs that shows failures and cache hits as they happen."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from lvr.backends.base import Response


@contextmanager
def progress_bar(
    label: str, total: int, enabled: bool = True
) -> Iterator[Callable[[Response], None]]:
    """Yield `advance(response)`, which moves a Rich bar and counts errors and cache hits.

    Args:
        label: Shown left of the bar (backend:model).
        total: Number of requests.
        enabled: False yields a no-op (tests, nested runs).

    Yields:
        The callback to call once per finished response.
    """
    if not enabled or total == 0:
        yield lambda _resp: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    counts = {"err": 0, "hit": 0}
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("errors {task.fields[err]} cached {task.fields[hit]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(label, total=total, err=0, hit=0)

        def advance(resp: Response) -> None:
            counts["err"] += resp.error is not None
            counts["hit"] += resp.cached
            bar.update(task, advance=1, err=counts["err"], hit=counts["hit"])

        yield advance
