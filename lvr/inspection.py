"""``lvr inspect``: summarize any run, stage, table folder or Parquet file with DuckDB.

Each table is exposed to ``--sql`` as a view named after the table (``clips``, ``qa``, ...), so
``lvr inspect runs/demo --sql "SELECT category, count(*) FROM qa GROUP BY 1"`` just works.

Model-call usage recorded in the stage manifests (requests, cache hits, attempts, retries,
failures, prompt / completion tokens and cost per stage, machine and model) is printed as a
"model calls" table and exposed as the ``usage`` view.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
from rich.console import Console
from rich.table import Table

from lvr.artifacts import SCHEMAS, table_name_of
from lvr.errors import LvrError

# Columns whose value distribution is worth printing whenever a table has them.
_DISTRIBUTION_COLUMNS = ("category", "format", "split", "answer", "benchmark", "method", "backend")


@dataclass
class TableRef:
    """One logical table found under the inspected path."""

    name: str
    files: list[Path]

    @property
    def glob(self) -> str:
        return (
            str(self.files[0]) if len(self.files) == 1 else str(self.files[0].parent / "*.parquet")
        )


def find_tables(path: Path) -> list[TableRef]:
    """All tables under ``path`` (a file, a table folder, a stage folder or a run folder)."""
    if not path.exists():
        raise LvrError(f"{path} does not exist")
    if path.is_file():
        if path.suffix != ".parquet":
            raise LvrError(f"{path} is not a Parquet file")
        return [TableRef(table_name_of(path) or path.stem, [path])]
    groups: dict[Path, list[Path]] = {}
    for f in sorted(path.rglob("*.parquet")):
        if not f.name.startswith("."):
            groups.setdefault(f.parent, []).append(f)
    if not groups and not usage_rows(path):
        raise LvrError(f"{path} holds no Parquet files")
    refs = []
    for folder, files in groups.items():
        name = table_name_of(files[0]) or folder.name
        refs.append(TableRef(_unique(name, folder, refs), files))
    return refs


def _unique(name: str, folder: Path, taken: list[TableRef]) -> str:
    names = {r.name for r in taken}
    return name if name not in names else f"{folder.parent.name}_{name}"


def connect(
    tables: list[TableRef], usage: list[dict[str, Any]] | None = None
) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with one view per table, plus ``usage`` when manifests recorded calls."""
    con = duckdb.connect()
    for ref in tables:
        files = ", ".join(f"'{f}'" for f in ref.files)
        con.execute(f'CREATE VIEW "{ref.name}" AS SELECT * FROM read_parquet([{files}])')
    if usage and "usage" not in {t.name for t in tables}:
        con.register("usage", pa.Table.from_pylist(usage, schema=_USAGE_SCHEMA))
    return con


_USAGE_COUNTS = ("requests", "cache_hits", "sent", "attempts", "retries", "failures",
                 "prompt_tokens", "completion_tokens")  # fmt: skip
_USAGE_SCHEMA = pa.schema(
    [("stage", pa.string()), ("manifest", pa.string()), ("model", pa.string()),
     *[(c, pa.int64()) for c in _USAGE_COUNTS], ("cost", pa.float64())]
)  # fmt: skip


def usage_rows(path: Path) -> list[dict[str, Any]]:
    """One row per (stage manifest, model) with the calls made into this run folder.

    Reads ``usage_total`` of every ``manifest*.json`` under ``path`` (all invocations, all
    machines; cache hits are counted but cost nothing).
    """
    if not path.is_dir():
        return []
    rows = []
    for manifest in sorted(path.rglob("manifest*.json")):
        try:
            info = json.loads(manifest.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        usage = info.get("usage_total") if isinstance(info, dict) else None
        for model, counts in (usage or {}).items():
            row = {"stage": str(info.get("stage", manifest.parent.name)), "manifest": manifest.name,
                   "model": model, "cost": counts.get("cost")}  # fmt: skip
            rows.append({**row, **{c: int(counts.get(c) or 0) for c in _USAGE_COUNTS}})
    return rows


def inspect_path(
    path: Path, sql: str | None = None, samples: int = 3, console: Console | None = None
) -> None:
    """Print a summary of every table under ``path``, or the result of ``sql`` over them."""
    console = console or Console()
    tables = find_tables(path)
    usage = usage_rows(path)
    con = connect(tables, usage)
    if sql:
        try:
            rel = con.sql(sql)
        except duckdb.Error as exc:
            views = ", ".join([t.name for t in tables] + (["usage"] if usage else []))
            raise LvrError(f"SQL failed: {str(exc).splitlines()[0]} (tables: {views})") from None
        _print_relation(console, rel, title=sql)
        return
    for ref in tables:
        _summarize(console, con, ref, samples)
    if usage:
        _summarize_usage(console, con, tables)


def _summarize_usage(
    console: Console, con: duckdb.DuckDBPyConnection, tables: list[TableRef]
) -> None:
    """Model calls per stage and model, a total, and the cost per input video when known."""
    console.rule("[bold]model calls[/] (all runs into this folder; cache hits cost nothing)")
    sums = ", ".join(f"sum({c})::BIGINT AS {c}" for c in _USAGE_COUNTS)
    # A cost is known only when every row of the group has a price.
    cost = "CASE WHEN count(cost) = count(*) THEN round(sum(cost), 4) END AS cost"
    per_stage = con.sql(
        f"SELECT stage, model, {sums}, {cost} FROM usage GROUP BY ALL ORDER BY stage, model"
    )
    _print_relation(console, per_stage, title="by stage and model")
    total = con.sql(f"SELECT model, {sums}, {cost} FROM usage GROUP BY ALL ORDER BY model")
    _print_relation(console, total, title="by model")
    if not any(t.name == "videos" for t in tables):
        return
    videos, spent, priced = con.execute(
        "SELECT (SELECT count(*) FROM videos WHERE error IS NULL), sum(cost), "
        "count(cost) = count(*) FROM usage"
    ).fetchone()
    if videos and priced:
        console.print(
            f"cost per input video: {spent / videos:.6g} ({spent:.6g} over {videos} videos)"
        )
    elif not priced:
        console.print("cost: no price for some models (set prices.<model> in the config)")


def _summarize(
    console: Console, con: duckdb.DuckDBPyConnection, ref: TableRef, samples: int
) -> None:
    q = f'"{ref.name}"'
    n = con.execute(f"SELECT count(*) FROM {q}").fetchone()[0]
    known = "lvr table" if ref.name in SCHEMAS else "table"
    console.rule(
        f"[bold]{ref.name}[/] ({known}): {n} rows in {len(ref.files)} file(s) - {ref.glob}"
    )
    columns = [r[0] for r in con.execute(f"DESCRIBE {q}").fetchall()]
    _print_relation(
        console,
        con.sql(f"SUMMARIZE {q}").project(
            "column_name, column_type, approx_unique, null_percentage, min, max"
        ),
        title="columns",
    )
    if "error" in columns:
        _print_relation(
            console,
            con.sql(
                f"SELECT coalesce(error, '(ok)') AS error, count(*) AS rows FROM {q} "
                "GROUP BY 1 ORDER BY rows DESC LIMIT 20"
            ),
            title="errors by reason",
        )
    if "reason" in columns:
        _print_relation(
            console,
            con.sql(
                f"SELECT rule, reason, count(*) AS rows FROM {q} GROUP BY 1, 2 ORDER BY rows DESC LIMIT 20"
            ),
            title="rejections by rule",
        )
    for col in (c for c in _DISTRIBUTION_COLUMNS if c in columns):
        _print_relation(
            console,
            con.sql(
                f'SELECT "{col}", count(*) AS rows, round(100.0 * count(*) / sum(count(*)) OVER (), 1) '
                f"AS pct FROM {q} GROUP BY 1 ORDER BY rows DESC LIMIT 20"
            ),
            title=f"distribution of {col}",
        )
    if samples > 0 and n:
        _print_records(console, con.sql(f"SELECT * FROM {q} LIMIT {int(samples)}"))


def _print_records(console: Console, rel: duckdb.DuckDBPyRelation, width: int = 160) -> None:
    """Sample rows one record at a time (wide tables do not fit a terminal as columns)."""
    for i, row in enumerate(rel.fetchall()):
        table = Table(title=f"sample row {i}", title_justify="left", show_header=False, box=None)
        table.add_column("column", style="bold")
        table.add_column("value", overflow="fold")
        for name, value in zip(rel.columns, row, strict=True):
            table.add_row(name, _short(value, width))
        console.print(table)


def _print_relation(
    console: Console, rel: duckdb.DuckDBPyRelation, title: str, width: int = 60
) -> None:
    table = Table(title=title, title_justify="left", show_lines=False)
    for name in rel.columns:
        table.add_column(name, overflow="fold")
    for row in rel.fetchall():
        table.add_row(*[_short(v, width) for v in row])
    console.print(table)


def _short(value: object, width: int) -> str:
    text = "" if value is None else str(value)
    return text if len(text) <= width else text[: width - 1] + "…"
