"""Every table folder reads, all shards at once, with the readers researchers use: DuckDB (with and
without ``union_by_name``), Polars, pyarrow datasets, pandas and Hugging Face ``datasets``, and they
count what ``lvr inspect`` and `lvr.artifacts.read_table` count.

The run has shards of every kind: broken videos give error-only ``videos`` shards and ``clips``,
``captions`` and ``qa_raw`` shards without rows; the filter writes more shards than it keeps rows.
Also: `lvr datagen migrate` rewrites the empty shards older runs hold, ``--as-qa`` never mixes
its shard into a table of other shards, and the writers that rewrite a whole table folder (filter,
eval) leave no temp file of a killed earlier writer there.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from lvr.artifacts import SCHEMAS, read_table, rows_to_table, write_parquet
from lvr.config import load_config
from lvr.datagen.migrate import migrate_run
from lvr.datagen.synthetic import VideoSpec, render_video
from lvr.testing.bad_files import write_bad_files

pl = pytest.importorskip("polars")
datasets = pytest.importorskip("datasets")

REPO = Path(__file__).resolve().parents[1]
TABLES = ("videos", "clips", "captions", "qa_raw", "qa", "qa_rejected")
SETS = [
    "input.synthetic.videos=0", "shards.videos_per_shard=1", "filter.shard_rows=4",
    "segment.method=stride", "segment.stride_s=2", "caption.backend=annotations",
    "caption.annotations=sidecar", "qa.backend=template", "qa.questions_per_video=4",
    "qa.categories=[{name: temporal, share: 1}]", "filter.category_shares={}",
]  # fmt: skip


def lvr(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "lvr.cli", *map(str, args)], env=env, cwd=REPO,
                          text=True, capture_output=True, check=True)  # fmt: skip


def reader_counts(folder: Path, cache: Path) -> dict[str, int]:
    """Rows of one table folder as each reader counts them, reading every shard at once."""
    glob = str(folder / "*.parquet")
    hf = datasets.load_dataset("parquet", data_files=glob, split="train", cache_dir=str(cache))
    return {
        "duckdb": len(duckdb.sql(f"SELECT * FROM read_parquet('{glob}')").fetchall()),
        "duckdb union_by_name": len(
            duckdb.sql(f"SELECT * FROM read_parquet('{glob}', union_by_name=true)").fetchall()
        ),
        "polars scan": pl.scan_parquet(glob).collect().height,
        "polars read": pl.read_parquet(glob).height,
        "pyarrow dataset": ds.dataset(folder, format="parquet").to_table().num_rows,
        "pandas": len(pd.read_parquet(folder)),
        "datasets": hf.num_rows,
    }


@pytest.fixture(scope="module")
def run_with_error_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A datagen run of 2 good videos and 6 broken files, one video per shard."""
    root = tmp_path_factory.mktemp("readers")
    inputs = root / "inputs"
    for i in range(2):
        spec = VideoSpec(duration_s=4.0, width=96, height=64, fps=12.0, seed=40 + i)
        render_video(inputs / f"good{i}.mp4", spec)
    write_bad_files(inputs)
    run = root / "run"
    sets = [a for s in [f"input.source={inputs}", *SETS] for a in ("--set", s)]
    lvr("datagen", "run", "--run", run, "-q", *sets)
    return run


def test_every_table_reads_across_shards_in_every_reader(
    run_with_error_shards: Path, tmp_path: Path
) -> None:
    run = run_with_error_shards
    empty = [
        p for t in TABLES for p in (run / t).glob("*.parquet") if pq.read_metadata(p).num_rows == 0
    ]
    assert len(empty) >= 6, "the run should hold shards without rows (broken videos)"
    query = " UNION ALL ".join(f"SELECT '{t}' AS t, count(*) AS n FROM {t}" for t in TABLES)
    inspected = lvr("inspect", run, "--sql", query).stdout
    for table in TABLES:
        want = read_table(run / table, table).num_rows
        assert re.search(rf"│ {table} +│ {want} +│", inspected), (table, want, inspected)
        counts = reader_counts(run / table, tmp_path / "hf" / table)
        assert counts == dict.fromkeys(counts, want), (table, counts)
    assert read_table(run / "qa", "qa").num_rows > 0 and read_table(run / "videos").num_rows == 8


def test_shard_without_rows_reads_in_datasets(tmp_path: Path) -> None:
    """An empty shard next to a full one: Hugging Face ``datasets`` counts the full one's rows."""
    folder = tmp_path / "clips"
    rows = [{"clip_id": f"c{i}", "video_id": "v", "clip_index": i, "start_s": float(i),
             "end_s": i + 1.0, "method": "stride"} for i in range(3)]  # fmt: skip
    write_parquet(folder / "00000.parquet", rows_to_table(rows, "clips"), "clips")
    write_parquet(folder / "00001.parquet", SCHEMAS["clips"].empty_table(), "clips")
    assert read_table(folder / "00001.parquet", "clips").schema == SCHEMAS["clips"]
    counts = reader_counts(folder, tmp_path / "hf")
    assert counts == dict.fromkeys(counts, 3), counts


def test_migrate_rewrites_empty_shards_an_older_lvr_wrote(tmp_path: Path) -> None:
    """Older lvr wrote an empty shard with one row group of 0 rows; migrate rewrites it, once."""
    run = tmp_path / "run"
    folder = run / "eval" / "qa-m-f4" / "predictions"
    row = {"qa_id": "q1", "model": "m", "pass_index": 0, "options": ["a", "b"], "answer": "A"}
    write_parquet(folder / "00000.parquet", rows_to_table([row], "predictions"), "predictions")
    old = folder / "00001.parquet"  # as lvr wrote it before: pq.write_table of an empty table
    meta = {b"lvr.table": b"predictions"}
    pq.write_table(SCHEMAS["predictions"].empty_table().replace_schema_metadata(meta), old)
    other = run / "sft" / "metrics.parquet"  # not an lvr table: left as it is
    other.parent.mkdir()
    pq.write_table(pa.table({"step": pa.array([], pa.int64())}), other)
    before = other.read_bytes()
    with pytest.raises(datasets.exceptions.DatasetGenerationError):
        reader_counts(folder, tmp_path / "hf0")

    assert migrate_run(run) == [f"rewrote {old}: no rows, now without an empty row group"]
    table = read_table(old)
    assert table.schema.equals(SCHEMAS["predictions"]) and table.num_rows == 0
    counts = reader_counts(folder, tmp_path / "hf1")
    assert counts == dict.fromkeys(counts, 1), counts
    assert other.read_bytes() == before and migrate_run(run) == []


def _qa_rows(videos: Path, n: int, generator: str) -> pa.Table:
    rows = []
    for i in range(n):
        (videos / f"v{i}.mp4").touch()
        rows.append({"qa_id": f"q{i}", "video_id": f"v{i}", "video_path": str(videos / f"v{i}.mp4"),
                     "category": "temporal", "format": "mc", "question": f"Which first {i}?",
                     "options": ["a", "b", "c", "d"], "answer": "A", "generator": generator,
                     "split": "eval"})  # fmt: skip
    return rows_to_table(rows, "qa")


def test_as_qa_never_mixes_into_a_table_the_filter_wrote(tmp_path: Path) -> None:
    """`--as-qa` writes shard 00000 only: into the filter's 2 shards it would have left 00001."""
    from typer.testing import CliRunner

    from lvr.cli import app

    videos = tmp_path / "videos"
    videos.mkdir()
    bench = tmp_path / "bench" / "qa"
    write_parquet(bench / "00000.parquet", _qa_rows(videos, 3, "template:v1"), "qa")
    filtered = tmp_path / "run" / "qa"
    for k in range(2):
        write_parquet(filtered / f"0000{k}.parquet", _qa_rows(videos, 2, "template:v1"), "qa")

    def as_qa(folder: Path) -> Any:
        args = [
            "eval",
            "questions",
            "--benchmark",
            "qa",
            "--data",
            str(bench),
            "--as-qa",
            str(folder),
        ]
        return CliRunner().invoke(app, args)

    res = as_qa(filtered)
    assert "already holds a table (2 Parquet file(s)" in str(res.exception), res.output
    assert read_table(filtered, "qa").column("generator").to_pylist() == ["template:v1"] * 4
    fresh = tmp_path / "fresh" / "qa"
    for _ in range(2):  # a new folder, then its own earlier output: written, then replaced
        res = as_qa(fresh)
        assert res.exit_code == 0 and "3 qa rows (split rl)" in res.output, res.output
    assert read_table(fresh, "qa").column("generator").to_pylist() == ["benchmark:qa"] * 3


def _stale_temp(folder: Path, shard: str) -> Path:
    """A temp file as a writer killed mid-`write_parquet` leaves it (another process id)."""
    tmp = folder / f".{shard}.parquet.tmp-999999"
    tmp.write_bytes(b"PAR1 half a file")
    return tmp


def test_filter_and_eval_remove_temp_files_killed_writers_left(
    run_with_error_shards: Path, tmp_path: Path
) -> None:
    """`pl.read_parquet(folder)` refused a folder holding one; a glob of `*.parquet` never saw it."""
    from lvr.datagen.config import DatagenConfig
    from lvr.datagen.filter import run_filter
    from lvr.eval.config import EvalConfig
    from lvr.eval.runner import run_eval
    from lvr.testing.fake_server import FakeOpenAIServer

    run = tmp_path / "run"
    shutil.copytree(run_with_error_shards, run)
    stale = [_stale_temp(run / "qa", "00009"), _stale_temp(run / "qa_rejected", "00000")]
    with pytest.raises(pl.exceptions.InvalidOperationError, match="different file extensions"):
        pl.read_parquet(run / "qa")
    run_filter(run, load_config(DatagenConfig, None, SETS).filter, force=True)
    assert not any(p.exists() for p in stale)
    assert pl.read_parquet(run / "qa").height == read_table(run / "qa", "qa").num_rows

    with FakeOpenAIServer() as server:
        cfg = EvalConfig(model="openai:fake-model", benchmark="qa", base_url=server.url,
                         frames=[2], bootstrap=10, split="all", limit=2)  # fmt: skip
        out = run_eval(cfg, run, progress=False)[0].out_dir
        stale = [_stale_temp(out / t, "00001") for t in ("questions", "predictions", "scores")]
        run_eval(cfg, run, progress=False)  # a rerun: every answer reused, the folder rewritten
    assert not any(p.exists() for p in stale)
    assert pl.read_parquet(out / "predictions").height == 2
