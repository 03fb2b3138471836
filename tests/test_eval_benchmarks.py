"""Benchmark adapters: each published schema -> the questions table (fixtures in tests/fixtures/eval)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lvr.artifacts import SCHEMAS, rows_to_table, write_parquet
from lvr.eval.benchmarks import BenchmarkError, Source, load_questions, read_records, split_problem
from lvr.eval.prompting import question_text

FIX = Path(__file__).parent / "fixtures" / "eval"

VIDEOS = [
    "longvila_videos/vid_a.mp4", "longvila_videos/vid_b.mp4", "vmmeAAAAAAA.mp4", "vmmeBBBBBBB.mp4",
    "videos/lvbAAAAAAAA.mp4", "videos/lvbBBBBBBBB.mp4", "video/1_plotQA/plot_1.mp4",
    "video/1_plotQA/plot_2.mp4", "video/4_count/count_1.mp4",
]  # fmt: skip


@pytest.fixture()
def bench_videos(tmp_path: Path) -> Path:
    """Benchmark video folders laid out as the releases unpack (placeholders: adapters only look)."""
    root = tmp_path / "videos"
    for rel in VIDEOS:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"\x00")
    return root


def _rows(benchmark: str, data: Path | str, bench_videos: Path, **kw) -> dict[str, dict]:
    table = load_questions(Source(benchmark, str(data), bench_videos, **kw))
    assert table.schema.equals(SCHEMAS["questions"])
    return {r["qa_id"]: r for r in table.to_pylist()}


def test_longvideo_reason(bench_videos: Path) -> None:
    rows = _rows("longvideo-reason", FIX / "longvideo_reason" / "eval.jsonl", bench_videos)
    assert len(rows) == 8  # every record is a row, malformed ones too
    good = rows["longvideo-reason/0"]
    assert good["question"] == "Which object appears first in the video?"
    assert good["options"] == [
        "A red circle",
        "A blue square",
        "A green triangle",
        "A yellow diamond",
    ]
    assert (good["answer"], good["category"], good["format"], good["error"]) == (
        "B",
        "temporal",
        "mc",
        None,
    )
    assert good["video_path"] == str(bench_videos / "longvila_videos" / "vid_a.mp4")
    # "vid_b.mp4" without the longvila_videos/ prefix is found in that subfolder.
    assert rows["longvideo-reason/1"]["video_path"] == str(
        bench_videos / "longvila_videos" / "vid_b.mp4"
    )
    errors = {k: r["error"] for k, r in rows.items() if r["error"]}
    assert "no 'A. ...' option lines" in errors["longvideo-reason/3"]
    assert "REASONS" in errors["longvideo-reason/4"]  # reasoning leaked into the options
    assert "'B.' is not one option label" in errors["longvideo-reason/5"]
    assert errors["longvideo-reason/6"].startswith(
        "video not found: longvila_videos/not_downloaded.mp4"
    )
    assert len(errors) == 4


def test_split_problem_cases() -> None:
    assert split_problem("Q?\nA. x\nB. y\nC. z") == ("Q?", ["x", "y", "z"], None)
    assert split_problem("Q?\nA. x\nC. z")[2].startswith("option labels A, C are not A-B")
    assert split_problem("Q?\nA. x\nB. ")[2] == "option B is blank"
    assert split_problem("Q?\nA. x\nstray line\nB. y")[2].startswith("option lines malformed")
    # Re-formatted files list options out of order: the label, not the position, counts.
    assert split_problem("<image>Q?  \nC. z  \nA. x  \nB. y  \n") == (
        "<image>Q?",
        ["x", "y", "z"],
        None,
    )
    assert split_problem("A. x\nB. y")[2] == "problem has no question text before the options"


def test_videomme_with_subtitles(bench_videos: Path) -> None:
    rows = _rows("videomme", FIX / "videomme" / "test.jsonl", bench_videos, subtitles=True)
    q = rows["videomme/001-1"]
    assert q["options"] == ["One.", "Two.", "Three.", "Four."]  # "A. " prefixes removed
    assert (q["answer"], q["category"], q["duration_bucket"]) == ("C", "Counting Problem", "short")
    extra = json.loads(q["extra"])
    assert extra["domain"] == "Knowledge" and extra["videoID"] == "vmmeAAAAAAA"
    assert extra["subtitles"] == [
        [0.0, 1.2, "Here comes the first shape."],
        [1.2, 2.0, "And now a square."],
    ]
    assert json.loads(rows["videomme/301-1"]["extra"])["subtitles"] is None  # none published
    # The prompt gets the cues on screen at the sampled frames (Video-MME's protocol).
    assert question_text(q, [0.5, 0.9]) == (
        "This video's subtitles are listed below:\nHere comes the first shape.\n"
        "How many shapes appear in the video?"
    )
    assert question_text(q, [5.0]) == "How many shapes appear in the video?"
    assert rows["videomme/601-1"]["error"].startswith("video not found: vmmeMISSING")
    assert sum(r["error"] is not None for r in rows.values()) == 1


def test_videomme_parquet_and_bad_prefix(tmp_path: Path, bench_videos: Path) -> None:
    records = [
        json.loads(line) for line in (FIX / "videomme" / "test.jsonl").read_text().splitlines()
    ]
    records[1]["options"][2] = "Z. wrong prefix"
    path = tmp_path / "test-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(records), path)  # the published file type
    rows = _rows("videomme", path, bench_videos)
    assert rows["videomme/001-1"]["error"] is None
    assert "lacks its 'C. ' prefix" in rows["videomme/001-2"]["error"]


@pytest.mark.parametrize("name", ["validation.json", "lvb_val.json"])
def test_longvideobench(bench_videos: Path, name: str) -> None:
    rows = _rows("longvideobench", FIX / "longvideobench" / name, bench_videos)
    q = rows["longvideobench/lvbAAAAAAAA_0"]
    assert q["options"] == ["A circle", "A square", "A triangle", "A cross", "A diamond"]
    assert (q["answer"], q["category"], q["duration_bucket"]) == ("C", "S2O", "8-15s")
    assert q["video_path"] == str(bench_videos / "videos" / "lvbAAAAAAAA.mp4")
    three = rows["longvideobench/lvbBBBBBBBB_0"]
    assert three["options"] == ["The circle", "The square", "The cross"]  # "N/A" dropped
    if name == "validation.json":
        assert rows["longvideobench/lvbAAAAAAAA_1"]["options"][-1] == "The screen goes black"
        assert "correct_choice 4" in rows["longvideobench/lvbBBBBBBBB_1"]["error"]
        assert rows["longvideobench/lvbMISSING0_0"]["error"].startswith("video not found")


def test_mlvu_per_task_files(bench_videos: Path) -> None:
    src = Source("mlvu", str(FIX / "mlvu"), bench_videos)
    table = load_questions(src)
    rows = {r["qa_id"]: r for r in table.to_pylist()}
    assert set(rows) == {
        "mlvu/plotQA/0",
        "mlvu/plotQA/1",
        "mlvu/plotQA/2",
        "mlvu/count/0",
        "mlvu/count/1",
    }
    assert rows["mlvu/plotQA/0"]["answer"] == "B"  # answer text -> letter
    assert rows["mlvu/plotQA/0"]["video_path"] == str(
        bench_videos / "video" / "1_plotQA" / "plot_1.mp4"
    )
    assert rows["mlvu/plotQA/1"]["duration_bucket"] == "15min+"
    assert "matches 0 candidates" in rows["mlvu/plotQA/2"]["error"]
    assert rows["mlvu/count/1"]["error"].startswith("video not found")
    assert src.notes == [
        "mlvu: 1 records of generation task 9_summary not loaded (not multiple choice)"
    ]


def test_qa_table_eval_split(tmp_path: Path, bench_videos: Path) -> None:
    base = {"video_id": "v", "duration_s": 30.0, "format": "mc", "question": "Q?",
            "options": ["x", "y", "z", "w"], "generator": "g", "prompt_version": "p"}  # fmt: skip
    rows = [
        {**base, "qa_id": "q1", "video_path": str(bench_videos / "vmmeAAAAAAA.mp4"), "answer": "B",
         "category": "temporal", "split": "eval"},
        {**base, "qa_id": "q2", "video_path": str(bench_videos / "vmmeAAAAAAA.mp4"), "answer": "A",
         "category": "goal", "split": "rl"},
        {**base, "qa_id": "q3", "video_path": str(tmp_path / "gone.mp4"), "answer": "A",
         "category": "plot", "split": "eval"},
    ]  # fmt: skip
    folder = tmp_path / "run" / "filter" / "qa"
    write_parquet(folder / "00000.parquet", rows_to_table(rows, "qa"), "qa")
    got = _rows("qa", folder, bench_videos)
    assert set(got) == {"q1", "q3"}  # ids kept, so pass rates join back to the qa table
    assert got["q1"]["duration_bucket"] == "0-2min" and got["q1"]["error"] is None
    assert got["q3"]["error"].startswith("video not found")
    assert set(_rows("qa", folder, bench_videos, split="all")) == {"q1", "q2", "q3"}
    # qa_raw (the filter's input, no split column): every row.
    raw = tmp_path / "run" / "qa" / "qa_raw"
    raw_rows = [{k: v for k, v in r.items() if k != "split"} for r in rows]
    write_parquet(raw / "00000.parquet", rows_to_table(raw_rows, "qa_raw"), "qa_raw")
    assert set(_rows("qa", raw, bench_videos)) == {"q1", "q2", "q3"}


def test_unreadable_sources(tmp_path: Path) -> None:
    with pytest.raises(BenchmarkError, match="neither a file"):
        read_records(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(BenchmarkError, match="cannot read"):
        read_records(str(bad))
    with pytest.raises(BenchmarkError, match="unknown benchmark"):
        load_questions(Source("nope", str(bad)))


def test_duplicate_ids_stay_unique(tmp_path: Path, bench_videos: Path) -> None:
    line = (FIX / "longvideo_reason" / "eval.jsonl").read_text().splitlines()[0]
    data = tmp_path / "dup.jsonl"
    data.write_text(line + "\n" + line + "\n")
    assert list(_rows("longvideo-reason", data, bench_videos)) == [
        "longvideo-reason/0",
        "longvideo-reason/0#2",
    ]


def test_hub_name_goes_through_datasets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Offline: the real `datasets.load_dataset` path is taken and its failure is one clear error.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(
        BenchmarkError, match="cannot load dataset 'lvr-test/does-not-exist' split 'test'"
    ):
        read_records("lvr-test/does-not-exist@test")


def test_fixture_copy_is_layout_independent(tmp_path: Path, bench_videos: Path) -> None:
    # MLVU given as the json/ folder itself, and as a single task file.
    shutil.copytree(FIX / "mlvu", tmp_path / "MLVU")
    assert (
        len(
            load_questions(
                Source("mlvu", str(tmp_path / "MLVU" / "json"), bench_videos)
            ).to_pylist()
        )
        == 5
    )
    one = load_questions(
        Source("mlvu", str(tmp_path / "MLVU" / "json" / "4_count.json"), bench_videos)
    )
    assert one.column("qa_id").to_pylist() == ["mlvu/count/0", "mlvu/count/1"]


def test_srt_cues_that_are_numbers_are_text(tmp_path: Path) -> None:
    from lvr.eval.subtitles import read_srt

    srt = tmp_path / "a.srt"
    srt.write_text(
        "\ufeff1\n00:00:01,000 --> 00:00:02,500\nHello <i>there</i>\n\n"
        "2\n00:00:03,000 --> 00:00:04,000\n2024\n\n"
        "3\n00:00:05,000 --> 00:00:06,000\n42\nis the answer\n\n"
        "00:07.250 --> 00:08.000\nno hours, no number\n",
        encoding="utf-8",
    )
    assert read_srt(srt) == [
        [1.0, 2.5, "Hello there"],
        [3.0, 4.0, "2024"],
        [5.0, 6.0, "42 is the answer"],
        [7.25, 8.0, "no hours, no number"],
    ]
