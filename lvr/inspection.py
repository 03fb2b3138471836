"""``lvr inspect``: summarize any run, table folder or Parquet file with DuckDB.

A run folder holds one folder per table (``runs/x/clips/``, ``runs/x/qa/``...); each table is
exposed to ``--sql`` as a view named after it, so
``lvr inspect runs/demo --sql "SELECT category, count(*) FROM qa GROUP BY 1"`` just works. Without
``--sql``, a folder gets an overview (every table folder, every stage manifest) and then a
summary per table.

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
from lvr.layout import RunLayout, check_layout

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
    """All tables under ``path`` (a file, a table folder or a run folder).

    Raises:
        LvrError: ``path`` is missing or holds no Parquet file.
        LayoutError: ``path`` is a run written by an older lvr (names the migration).
    """
    if not path.exists():
        raise LvrError(f"{path} does not exist")
    if path.is_file():
        if path.suffix != ".parquet":
            raise LvrError(f"{path} is not a Parquet file")
        return [TableRef(table_name_of(path) or path.stem, [path])]
    check_layout(path)
    groups: dict[Path, list[Path]] = {}
    for f in sorted(path.rglob("*.parquet")):
        if not f.name.startswith("."):
            groups.setdefault(f.parent, []).append(f)
    if not groups and not usage_rows(path):
        raise LvrError(f"{path} holds no Parquet files")
    named = [
        (table_name_of(files[0]) or folder.name, folder, files) for folder, files in groups.items()
    ]
    order = list(SCHEMAS)  # lvr's tables in pipeline order, others after them
    named.sort(key=lambda t: (order.index(t[0]) if t[0] in order else len(order), str(t[1])))
    refs: list[TableRef] = []
    for name, folder, files in named:
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
    if path.is_dir():
        _overview(console, con, tables, RunLayout(path))
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


def _overview(
    console: Console, con: duckdb.DuckDBPyConnection, tables: list[TableRef], layout: RunLayout
) -> None:
    """Every table folder (view name, rows, files) and every stage manifest of a folder."""
    listing = Table(title="tables (one folder each)", title_justify="left")
    for name in ("table", "rows", "files", "folder"):
        listing.add_column(name, overflow="fold")
    for ref in tables:
        rows = con.execute(f'SELECT count(*) FROM "{ref.name}"').fetchone()[0]
        folder = ref.files[0].parent.relative_to(layout.root)
        listing.add_row(ref.name, str(rows), str(len(ref.files)), f"{folder}/")
    console.print(listing)
    manifests = layout.stage_manifests()
    if not manifests:
        return
    stages = Table(title="stages", title_justify="left")
    for name in ("stage", "status", "shards done/total", "rows (errors)", "manifest"):
        stages.add_column(name, overflow="fold")
    for path in manifests:
        info = json.loads(path.read_text())
        shards = info.get("shards") or {}
        counts = ", ".join(
            f"{t} {n} ({(info.get('errors') or {}).get(t, 0)})"
            for t, n in (info.get("rows") or {}).items()
        )
        stages.add_row(str(info.get("stage")), str(info.get("status")),
                       f"{shards.get('done', '?')}/{shards.get('total', '?')}", counts,
                       str(path.relative_to(layout.root)))  # fmt: skip
    console.print(stages)


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
