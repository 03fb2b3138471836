"""Benchmark files written by others (``../shared/realdata/bench``): the complete Video-MME test set
in the Video-R1 record format, the official Video-MME template, and excerpts of LongVideoBench
and of a LongVideo-Reason re-format, read through ``lvr eval`` into exact question rows.

Skipped with one line when the folder is absent (set ``LVR_REALDATA`` to point elsewhere). The
expected values are computed here from the raw records independently of the adapters, or are
counts of the published files. No benchmark video is on this machine: tests link one generated
clip under every video id the records name.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lvr.artifacts import read_table
from lvr.eval.benchmarks import BenchmarkError, Source, load_questions

REALDATA = Path(
    os.environ.get("LVR_REALDATA") or Path(__file__).parents[1].parent / "shared" / "realdata"
)
BENCH = REALDATA / "bench"
VIDEOMME = BENCH / "videomme" / "eval_videomme.json"
pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(
        not BENCH.is_dir(), reason=f"real benchmark files not found at {BENCH} (set LVR_REALDATA)"
    ),
]


@pytest.fixture(scope="module")
def raw_videomme() -> list[dict]:
    return json.loads(VIDEOMME.read_text())


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lvr.datagen.synthetic import VideoSpec, render_video

    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    spec = {"duration_s": 2.0, "fps": 8.0, "width": 64, "height": 48, "scene_len_s": (1.0, 1.0)}
    render_video(path, VideoSpec(seed=1, **spec))
    return path


def _link_videos(root: Path, clip: Path, names: set[str], ext: str = ".mp4") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        target = root / (name if name.endswith(ext) else f"{name}{ext}")
        if not target.exists():
            os.link(clip, target)
    return root


@pytest.fixture(scope="module")
def vmme_videos(
    tmp_path_factory: pytest.TempPathFactory, clip: Path, raw_videomme: list[dict]
) -> Path:
    root = tmp_path_factory.mktemp("videomme") / "data"
    return _link_videos(root, clip, {r["videoID"] for r in raw_videomme})


# ---------------------------------------------------------------------------------------------
# The whole Video-MME file
# ---------------------------------------------------------------------------------------------


def test_videomme_whole_file_exact_rows(
    raw_videomme: list[dict], vmme_videos: Path, tmp_path: Path
) -> None:
    from lvr.cli import app

    out = tmp_path / "questions.parquet"
    res = CliRunner().invoke(app, ["eval", "questions", "--benchmark", "videomme", "--data",
                                   str(VIDEOMME), "--video-dir", str(vmme_videos), "--out", str(out)])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert res.output.startswith("2700 questions, 0 with errors\n")
    assert (
        "10 question(s) kept as published although options X and X have the same text" in res.output
    )
    rows = read_table(out, "questions").to_pylist()
    assert len(rows) == 2700 and len({r["qa_id"] for r in rows}) == 2700
    assert len({r["video_path"] for r in rows}) == 900
    assert Counter(r["duration_bucket"] for r in rows) == {"short": 900, "medium": 900, "long": 900}
    assert Counter(r["answer"] for r in rows) == {"B": 735, "C": 684, "A": 677, "D": 604}
    assert Counter(r["category"] for r in rows) == {
        "Object Reasoning": 454, "Object Recognition": 354, "Information Synopsis": 323,
        "Action Recognition": 313, "Action Reasoning": 285, "Counting Problem": 268,
        "Attribute Perception": 222, "Temporal Reasoning": 177, "OCR Problems": 139,
        "Spatial Reasoning": 56, "Temporal Perception": 55, "Spatial Perception": 54,
    }  # fmt: skip
    # Every row against its raw record, parsed here on its own terms.
    for row, rec in zip(rows, raw_videomme, strict=True):
        assert row["qa_id"] == f"videomme/{rec['question_id']}"
        assert row["options"] == [re.sub(r"^[A-D]\.\s*", "", o).strip() for o in rec["options"]]
        assert (row["answer"], row["category"], row["duration_bucket"]) == (
            rec["answer"], rec["task_type"], rec["duration"])  # fmt: skip
        assert row["question"] == rec["question"].strip()
        assert row["video_path"] == str(vmme_videos / f"{rec['videoID']}.mp4")
        assert row["format"] == "mc" and row["error"] is None
    last = rows[-1]
    assert last["options"] == ["How does the heroine do fitness exercises and gain muscle every day.",
                               "The heroine's daily eating and shopping routine.",
                               "The home life of the heroine and her boyfriend.", "None of the above."]  # fmt: skip


def test_videomme_official_template(raw_videomme: list[dict], clip: Path, tmp_path: Path) -> None:
    src = Source(
        "videomme",
        str(BENCH / "videomme_official"),
        _link_videos(tmp_path / "v", clip, {"001", "002", "003"}),
    )
    rows = load_questions(src).to_pylist()
    assert [r["qa_id"] for r in rows] == [
        f"videomme/00{v}-{k}" for v in (1, 2, 3) for k in (1, 2, 3)
    ]
    by_id = {f"videomme/{r['question_id']}": r for r in raw_videomme}
    for row in rows:  # the template holds the same questions as the full file
        rec = by_id[row["qa_id"]]
        assert row["options"] == [o[3:] for o in rec["options"]]
        assert (row["answer"], row["category"], row["duration_bucket"], row["error"]) == (
            rec["answer"], rec["task_type"], rec["duration"], None)  # fmt: skip
    assert any("output_test_template.json is not strict JSON" in n for n in src.notes)
    assert "videomme: 3 nested records expanded to 9 questions" in src.notes


@pytest.mark.parametrize("benchmark", ["mlvu", "longvideobench", "longvideo-reason", "videomme-v2",
                                       "lvbench", "video-holmes", "nextqa"])  # fmt: skip
def test_videomme_given_to_other_adapters(benchmark: str) -> None:
    with pytest.raises(BenchmarkError) as err:
        load_questions(Source(benchmark, str(VIDEOMME)))
    line = str(err.value)
    assert "\n" not in line and line.startswith(f"eval_videomme.json is not a {benchmark} file (")
    assert "expected fields" in line and "found answer, data_type, domain" in line
    assert line.endswith("it looks like videomme: pass --benchmark videomme")


def test_qa_adapter_given_videomme_json() -> None:
    with pytest.raises(BenchmarkError, match="is not a Parquet qa table"):
        load_questions(Source("qa", str(VIDEOMME)))


def test_run_that_answers_nothing_exits_nonzero_with_reasons(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "lvr.cli", "eval", "run", "--model", "some/model", "--benchmark",
           "videomme", "--data", str(VIDEOMME), "--run", str(tmp_path / "run"), "--limit", "30",
           "--frames", "2"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)  # fmt: skip
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines() + proc.stdout.strip().splitlines()
    error = [ln for ln in lines if "no question was answered" in ln]
    assert len(error) == 1 and "30 error rows" in error[0]
    assert (
        "30 x video not found: … (looked under the working directory (pass --video-dir))"
        in error[0]
    )
    assert "Traceback" not in proc.stderr


def test_videomme_eval_run_on_real_rows(vmme_videos: Path, tmp_path: Path) -> None:
    from lvr.eval.config import EvalConfig
    from lvr.eval.runner import run_eval
    from lvr.testing.fake_server import FakeOpenAIServer

    with FakeOpenAIServer() as server:
        cfg = EvalConfig(model="openai:fake-model", benchmark="videomme", data=str(VIDEOMME),
                         video_dir=str(vmme_videos), base_url=server.url, frames=[2], limit=9,
                         bootstrap=50)  # fmt: skip
        res = run_eval(cfg, tmp_path / "run", progress=False)[0]
    preds = read_table(res.out_dir / "predictions", "predictions").to_pylist()
    assert (res.questions, res.errors, len(preds)) == (9, 0, 9)
    assert all(p["extracted"] in "ABCD" and p["format_ok"] for p in preds)
    assert [p["answer"] for p in preds] == ["C", "A", "D", "C", "D", "B", "B", "C", "D"]
    scores = read_table(res.out_dir / "scores", "scores").to_pylist()
    assert {s["group"] for s in scores if s["group_by"] == "duration_bucket"} == {"short"}


# ---------------------------------------------------------------------------------------------
# Excerpts
# ---------------------------------------------------------------------------------------------


def test_longvideobench_excerpt(clip: Path, tmp_path: Path) -> None:
    videos = _link_videos(tmp_path / "videos", clip, {"86CxyhFV9MI", "9PD3ciudpIE", "QJ6sjg7SXOQ"})
    rows = {
        r["qa_id"]: r
        for r in load_questions(
            Source("longvideobench", str(BENCH / "longvideobench_excerpt"), videos.parent)
        ).to_pylist()
    }
    assert list(rows) == ["longvideobench/86CxyhFV9MI_0", "longvideobench/9PD3ciudpIE_0",
                          "longvideobench/QJ6sjg7SXOQ_0"]  # fmt: skip
    got = [
        (r["answer"], r["category"], r["duration_bucket"], len(r["options"]), r["error"])
        for r in rows.values()
    ]
    assert got == [("B", "TOS", "180-600s", 4, None), ("A", "T2A", "180-600s", 4, None),
                   ("E", "S2E", "180-600s", 5, None)]  # fmt: skip
    assert rows["longvideobench/9PD3ciudpIE_0"]["options"] == ["yellow", "green", "blue", "red"]
    assert (
        rows["longvideobench/QJ6sjg7SXOQ_0"]["options"][4]
        == "Extending his palm forward while facing the camera"
    )
    assert rows["longvideobench/86CxyhFV9MI_0"]["video_path"] == str(videos / "86CxyhFV9MI.mp4")


def test_longvideo_reason_excerpt(clip: Path, tmp_path: Path) -> None:
    ids = {"I_Q3ajyOrcI", "8kaV6kb7vZo", "mdj9LBPkEhQ", "DkIE2Ck8Tuc"}
    videos = _link_videos(tmp_path / "longvideo_eval_videos" / "merged_longvideo_eval", clip, ids)
    src = Source("longvideo-reason", str(BENCH / "longvideoreason_excerpt"), videos.parent.parent)
    rows = {r["qa_id"]: r for r in load_questions(src).to_pylist()}
    assert list(rows) == [f"longvideo-reason/{i}" for i in (0, 1, 11, 18)]
    assert [r["answer"] for r in rows.values()] == ["B", "B", "D", "C"]
    assert all(r["error"] is None and len(r["options"]) == 4 for r in rows.values())
    assert all(
        not r["question"].startswith("<image>") and r["category"] is None for r in rows.values()
    )
    assert all(r["duration_bucket"] is None for r in rows.values())
    # Listed C, A, B, D in the file: put back in label order, so the gold names the right text.
    q11 = rows["longvideo-reason/11"]
    assert (
        q11["options"][0] == "To document environmental damage caused by underwater nuclear testing"
    )
    assert q11["options"][3].startswith("To report on North Korea’s military advancements")
    q18 = rows["longvideo-reason/18"]
    assert q18["options"][2] == "To reject Hillary Clinton's nomination in favor of Bernie Sanders"
    assert rows["longvideo-reason/0"]["question"].startswith("What is the primary intention behind")
    assert rows["longvideo-reason/0"]["video_path"] == str(videos / "I_Q3ajyOrcI.mp4")
