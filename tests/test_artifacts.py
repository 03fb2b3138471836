from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lvr.artifacts import (
    SCHEMAS,
    SchemaError,
    clip_id,
    qa_id,
    read_table,
    rows_to_table,
    video_id,
    write_parquet,
)
from lvr.layout import RunLayout
from lvr.stages import Shard, Stage, manifest_name, plan_shards, run_stage


def _clips(n: int, vid: str = "v") -> pa.Table:
    rows = [
        {
            "clip_id": clip_id(vid, i * 10.0, i * 10.0 + 10),
            "video_id": vid,
            "video_path": "/v.mp4",
            "clip_index": i,
            "start_s": i * 10.0,
            "end_s": i * 10.0 + 10,
            "method": "stride",
        }
        for i in range(n)
    ]
    return rows_to_table(rows, "clips")


def _segment(n: int, vid: str = "v") -> dict[str, pa.Table]:
    """Outputs of one segment shard: its clips (the videos table is not what is tested here)."""
    return {"videos": SCHEMAS["videos"].empty_table(), "clips": _clips(n, vid)}


def test_ids_are_content_based(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.bin", tmp_path / "b.bin", tmp_path / "c.bin"
    a.write_bytes(os.urandom(3 << 20))
    b.write_bytes(a.read_bytes())
    c.write_bytes(a.read_bytes()[:-1] + b"x")
    assert video_id(a) == video_id(b) != video_id(c)
    assert clip_id("v", 0, 10) == clip_id("v", 0.0, 10.0000001) != clip_id("v", 0, 10.5)
    assert qa_id("v", "template", "p1", 0) != qa_id("v", "template", "p2", 0)


def test_write_and_read_validate_schema(tmp_path: Path) -> None:
    path = tmp_path / "clips" / "00000.parquet"
    write_parquet(path, _clips(3), "clips")
    back = read_table(tmp_path / "clips")
    assert back.schema.equals(SCHEMAS["clips"]) and back.num_rows == 3
    assert not list(tmp_path.rglob(".*tmp*"))  # temp file renamed away

    bad = _clips(2).set_column(4, "start_s", pa.array(["zero", "ten"]))
    pq.write_table(bad, tmp_path / "clips" / "00001.parquet")
    with pytest.raises(SchemaError) as info:
        read_table(tmp_path / "clips", "clips")
    assert "00001.parquet" in str(info.value) and "'start_s'" in str(info.value)

    pq.write_table(_clips(1).drop_columns(["method"]), tmp_path / "clips" / "00001.parquet")
    with pytest.raises(SchemaError, match="missing column 'method'"):
        read_table(tmp_path / "clips", "clips")


def test_plan_shards_is_deterministic_and_disjoint() -> None:
    items = [f"v{i:03d}" for i in range(23)]
    full = plan_shards(items, 5)
    assert [len(s.items) for s in full] == [5, 5, 5, 5, 3]
    parts = [plan_shards(items, 5, shard=i, num_shards=3) for i in range(3)]
    names = [s.name for p in parts for s in p]
    assert sorted(names) == [s.name for s in full] and len(set(names)) == len(names)
    with pytest.raises(ValueError):
        plan_shards(items, 5, shard=3, num_shards=3)


def test_runner_skips_done_shards_and_redoes_changed_ones(tmp_path: Path) -> None:
    calls: list[str] = []

    def fn(shard):
        calls.append(shard.name)
        return _segment(len(shard.items), vid=shard.items[0])

    stage = Stage(RunLayout(tmp_path), "segment")
    shards = plan_shards(["a", "b", "c", "d"], 2)
    res = run_stage(stage, shards, fn, config=None, progress=False)
    assert res.shards_run == 2 and res.rows == {"videos": 0, "clips": 4}
    # tables in the run's table folders, bookkeeping in the stage's folder
    assert sorted(p.name for p in (tmp_path / "clips").iterdir()) == [
        "00000.parquet",
        "00001.parquet",
    ]
    assert sorted(p.name for p in (tmp_path / "_stages" / "segment" / "_done").iterdir()) == [
        "00000.json",
        "00001.json",
    ]
    res = run_stage(stage, shards, fn, config=None, progress=False)
    assert res.shards_run == 0 and res.shards_skipped == 2 and calls == ["00000", "00001"]
    changed = plan_shards(["a", "b", "c", "e"], 2)
    run_stage(stage, changed, fn, config=None, progress=False)
    assert calls == ["00000", "00001", "00001"]
    manifest = json.loads((tmp_path / "_stages" / "segment" / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["shards"] == {"total": 2, "done": 2}
    assert manifest["stage"] == "segment" and manifest["tables"] == ["videos", "clips"]
    assert "pyarrow" in manifest["versions"]


_SLOW_STAGE = textwrap.dedent(
    """
    import sys, time
    from lvr.artifacts import SCHEMAS, rows_to_table, clip_id
    from lvr.stages import Stage, plan_shards, run_stage

    def fn(shard):
        time.sleep(float(sys.argv[2]))
        rows = [{"clip_id": clip_id(v, 0, 1), "video_id": v, "video_path": v, "clip_index": 0,
                 "start_s": 0.0, "end_s": 1.0, "method": "stride"} for v in shard.items]
        return {"videos": SCHEMAS["videos"].empty_table(), "clips": rows_to_table(rows, "clips")}

    items = [f"video{i:02d}" for i in range(12)]
    run_stage(Stage(sys.argv[1], "segment"), plan_shards(items, 2), fn, config=None, progress=False)
    """
)


def test_killed_stage_resumes_without_loss_or_duplicates(tmp_path: Path) -> None:
    script = tmp_path / "stage.py"
    script.write_text(_SLOW_STAGE)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(script), str(killed), "0.4"])
    deadline = time.time() + 60
    done = killed / "_stages" / "segment" / "_done"
    while len(list(done.glob("*.json"))) < 2 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list(done.glob("*.json")))
    assert 2 <= done_before < 6, "the kill should land mid-stage"
    subprocess.run([sys.executable, str(script), str(killed), "0"], check=True)
    clean = tmp_path / "clean"
    subprocess.run([sys.executable, str(script), str(clean), "0"], check=True)

    got = read_table(killed / "clips", "clips").sort_by("clip_id")
    want = read_table(clean / "clips", "clips").sort_by("clip_id")
    assert got.equals(want) and got.num_rows == 12
    assert len(set(got.column("clip_id").to_pylist())) == 12
    assert not list(killed.rglob(".*.tmp-*")), "temp files of redone shards are cleaned up"


def test_machines_sharing_a_stage_keep_their_own_manifests(tmp_path: Path) -> None:
    stage = Stage(RunLayout(tmp_path), "segment")
    items = ["a", "b", "c", "d", "e"]
    for i in range(2):
        run_stage(
            stage,
            plan_shards(items, 1, shard=i, num_shards=2),
            lambda s: _segment(1, vid=s.items[0]),
            config=None,
            progress=False,
            manifest=manifest_name(i, 2),
        )
    counts = [
        json.loads((stage.dir / f"manifest.{i}-of-2.json").read_text())["rows"]["clips"]
        for i in range(2)
    ]
    assert counts == [3, 2] and not (stage.dir / "manifest.json").exists()
    assert read_table(tmp_path / "clips").num_rows == 5


def test_stage_names_its_tables_from_the_layout(tmp_path: Path) -> None:
    stage = Stage(tmp_path, "filter")
    assert stage.tables == ["qa", "qa_rejected"]
    assert stage.shard_path("qa", Shard(3, [])) == tmp_path / "qa" / "00003.parquet"
    assert stage.marker(3) == tmp_path / "_stages" / "filter" / "_done" / "00003.json"
    with pytest.raises(ValueError, match="unknown stage 'segmnt'"):
        Stage(tmp_path, "segmnt")


@dataclass
class _Item:
    clip_id: str
    start_s: float
    duration_s: float | None = field(default=None, metadata={"fingerprint": False})


def test_typed_items_fingerprint_as_their_fields() -> None:
    """Typed items fingerprint like the dicts of their fields (runs written with dict items keep
    their finished shards); a field marked derived does not count."""
    typed = Shard(0, [_Item("c1", 1.5, duration_s=9.0)])
    assert typed.fingerprint == Shard(0, [{"clip_id": "c1", "start_s": 1.5}]).fingerprint
    assert typed.fingerprint != Shard(0, [_Item("c1", 2.5)]).fingerprint
