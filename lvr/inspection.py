"""``lvr inspect``: summarize any run, table folder or Parquet file with DuckDB.

A run folder holds one folder per table (``runs/x/clips/``, ``runs/x/qa/``...); each table is
exposed to ``--sql`` as a view named after it, so
``lvr inspect runs/demo --sql "SELECT category, count(*) FROM qa GROUP BY 1"`` just works. Without
``--sql``, a folder gets an overview (every table folder, every stage manifest) and then a
summary per table.

When one table name is found in several folders (one ``eval/<name>/`` per model and frame
budget holds ``questions``, ``predictions`` and ``scores``), each folder's table is a view named
``<folder>_<table>`` (e.g. ``qa_model_f4_predictions``: characters other than letters, digits and
``_`` become ``_``, so no quoting is needed), and the plain view (``predictions``) is the union of
all of them with a first column ``eval`` (for tables under ``eval/``; ``folder`` elsewhere)
naming the folder: a JOIN of plain views must join on that column too, so models never mix.

Model-call usage recorded in the stage manifests (requests, cache hits, attempts, retries,
failures, prompt / completion tokens and cost per stage, machine and model) is printed as a
"model calls" table and exposed as the ``usage`` view (always there; empty when no model was
called).

Inspection is read-only: ``--sql`` runs only queries (SELECT, DESCRIBE, SUMMARIZE...), and DuckDB
may touch no file but the listed tables.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
from rich.console import Console
from rich.table import Table

from lvr.artifacts import SCHEMAS, check_table_file, table_name_of
from lvr.errors import LvrError
from lvr.layout import RunLayout, check_layout

# Columns whose value distribution is worth printing whenever a table has them.
_DISTRIBUTION_COLUMNS = ("category", "format", "split", "answer", "benchmark", "method", "backend")


@dataclass
class TableRef:
    """One logical table found under the inspected path.

    A union (the plain view of a table name found in several folders) has ``parts``: the
    per-folder tables, and ``label`` the column that names each part's folder.
    """

    name: str
    files: list[Path]
    parts: list[tuple[str, TableRef]] | None = None
    label: str = ""

    @property
    def glob(self) -> str:
        if self.parts:
            return ", ".join(part.glob for _, part in self.parts)
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
        (_view_name(table_name_of(files[0]) or folder.name), folder, files)
        for folder, files in groups.items()
    ]
    order = list(SCHEMAS)  # lvr's tables in pipeline order, others after them
    named.sort(key=lambda t: (order.index(t[0]) if t[0] in order else len(order), str(t[1])))
    by_name: dict[str, list[tuple[Path, list[Path]]]] = {}
    for name, folder, files in named:
        for f in files:
            check_table_file(f, name)
        by_name.setdefault(name, []).append((folder, files))
    refs: list[TableRef] = []
    taken = set(by_name)
    for name, found in by_name.items():
        if len(found) == 1:
            refs.append(TableRef(name, found[0][1]))
            continue
        parts = []
        for folder, files in found:
            label = folder.parent.relative_to(path).as_posix()
            prefixed = _view_name(f"{folder.parent.name}_{name}")
            while prefixed in taken:
                prefixed += "_"
            taken.add(prefixed)
            parts.append((label, TableRef(prefixed, files)))
        column = "eval" if all(f.parent.parent.name == "eval" for f, _ in found) else "folder"
        if column == "eval":
            parts = [
                (folder.parent.name, ref)
                for (folder, _), (_, ref) in zip(found, parts, strict=True)
            ]
        refs.append(TableRef(name, [f for _, fs in found for f in fs], parts, column))
        refs += [ref for _, ref in parts]
    return refs


def _view_name(name: str) -> str:
    """A view name usable without quotes: characters other than [A-Za-z0-9_] become ``_``."""
    name = re.sub(r"\W", "_", name, flags=re.ASCII)
    return name if name and not name[0].isdigit() else f"t_{name}"


def connect(
    tables: list[TableRef], usage: list[dict[str, Any]] | None = None
) -> duckdb.DuckDBPyConnection:
    """A read-only DuckDB connection: one view per table, and ``usage`` (model calls, maybe none).

    Raises:
        LvrError: A Parquet file that DuckDB cannot read (names the file, one line).
    """
    con = duckdb.connect()
    con.execute("SET python_enable_replacements = false")  # no Python variable is a table
    for ref in (r for r in tables if not r.parts):
        files = ", ".join(_quote(str(f)) for f in ref.files)
        con.execute(f'CREATE VIEW "{ref.name}" AS SELECT * FROM read_parquet([{files}])')
        _check_readable(con, ref)
    for ref in (r for r in tables if r.parts):
        union = " UNION ALL BY NAME ".join(
            f'SELECT {_quote(label)} AS "{ref.label}", * FROM "{part.name}"'
            for label, part in ref.parts or []
        )
        con.execute(f'CREATE VIEW "{ref.name}" AS {union}')
    if "usage" not in {t.name for t in tables}:
        con.register("usage", pa.Table.from_pylist(usage or [], schema=_USAGE_SCHEMA))
    allowed = ", ".join(_quote(str(f.resolve())) for ref in tables for f in ref.files)
    con.execute(f"SET allowed_paths = [{allowed}]")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _check_readable(con: duckdb.DuckDBPyConnection, ref: TableRef) -> None:
    """Read each file's schema now, so that garbage or a mixed-up table is one line, not later."""
    try:
        con.execute(f'DESCRIBE "{ref.name}"').fetchall()
        return
    except duckdb.Error:
        pass
    for f in ref.files:
        try:
            con.execute(f"DESCRIBE SELECT * FROM read_parquet({_quote(str(f))})").fetchall()
        except duckdb.Error as exc:
            raise LvrError(
                f"{f} is not a readable Parquet file ({str(exc).splitlines()[0]}); "
                "remove or replace it"
            ) from None
    raise LvrError(f"the files of table {ref.name} cannot be read together; check {ref.glob}")


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
    """Print a summary of every table under ``path``, or the result of ``sql`` over them.

    Raises:
        LvrError: Missing path, unreadable table, a negative ``samples``, or ``sql`` that fails
            or is not a query (inspection never writes).
    """
    console = console or Console()
    if samples < 0:
        raise LvrError(f"--samples must be 0 or more, got {samples}")
    tables = find_tables(path)
    usage = usage_rows(path)
    con = connect(tables, usage)
    if sql:
        _print_relation(console, _query(con, sql, tables), title=sql)
        return
    if path.is_dir():
        _overview(console, con, tables, RunLayout(path))
    for ref in tables:
        _summarize(console, con, ref, samples)
    if usage:
        _summarize_usage(console, con, tables)


_READ_ONLY = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}


def _query(
    con: duckdb.DuckDBPyConnection, sql: str, tables: list[TableRef]
) -> duckdb.DuckDBPyRelation:
    """Run one read-only query (SELECT, WITH, DESCRIBE, SUMMARIZE, EXPLAIN) over the views."""
    views = ", ".join(view_names(tables))
    try:
        statements = duckdb.extract_statements(sql)
        if len(statements) != 1:
            raise LvrError(f"--sql takes one query, got {len(statements)} statements")
        if statements[0].type not in _READ_ONLY:
            raise LvrError(
                f"--sql is read-only: a {statements[0].type.name} statement is not allowed "
                "(use SELECT; to save a result, run DuckDB yourself on the Parquet files)"
            )
        return con.sql(sql)
    except duckdb.Error as exc:
        raise LvrError(f"SQL failed: {str(exc).splitlines()[0]} (tables: {views})") from None


def view_names(tables: list[TableRef]) -> list[str]:
    """Every view ``--sql`` can use, ``usage`` included."""
    names = [t.name for t in tables]
    return names if "usage" in names else [*names, "usage"]


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
        if ref.parts:
            folders = [part.files[0].parent.relative_to(layout.root).parts for _, part in ref.parts]
            same = all(len(f) == len(folders[0]) for f in folders)
            pattern = (
                "/".join(
                    p if all(f[i] == p for f in folders) else "*" for i, p in enumerate(folders[0])
                )
                if same
                else "*"
            )
            listing.add_row(ref.name, str(rows), str(len(ref.files)),
                            f"{pattern}/ (union of {len(folders)}, column {ref.label})")  # fmt: skip
        else:
            listing.add_row(ref.name, str(rows), str(len(ref.files)), f"{folder}/")
    if not any(t.name == "usage" for t in tables):
        calls = con.execute("SELECT count(*) FROM usage").fetchone()[0]
        listing.add_row("usage", str(calls), "-", "(model calls of the stage manifests)")
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
