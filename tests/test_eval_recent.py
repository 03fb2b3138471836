"""Video-MME-v2, LVBench, Video-Holmes and NExT-QA: adapters on fixtures in their published record
formats, the official scoring rules (Video-MME-v2's grouped non-linear score, LVBench's
multi-label categories), numbered options through prompts, extraction and scoring."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lvr.artifacts import SCHEMAS, read_table, rows_to_table, write_parquet
from lvr.eval.benchmarks import Source, load_questions
from lvr.eval.official import (
    category_memberships,
    logic_score,
    relevance_score,
    videomme_v2_rows,
)
from lvr.eval.prompting import error_row, prompt_messages, rescore, score_row
from lvr.eval.scoring import score_rows

FIX = Path(__file__).parent / "fixtures" / "eval"


def _touch(root: Path, *names: str) -> Path:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"\x00")
    return root


def _rows(benchmark: str, data: Path, videos: Path, **kw) -> dict[str, dict]:
    table = load_questions(Source(benchmark, str(data), videos, **kw))
    assert table.schema.equals(SCHEMAS["questions"])
    return {r["qa_id"]: r for r in table.to_pylist()}


# ---------------------------------------------------------------------------------------------
# Video-MME-v2
# ---------------------------------------------------------------------------------------------


@pytest.fixture()
def v2_parquet(tmp_path: Path) -> Path:
    """The fixture as the release ships it: test.parquet."""
    recs = [json.loads(x) for x in (FIX / "videomme_v2" / "test.jsonl").read_text().splitlines()]
    path = tmp_path / "test.parquet"
    pq.write_table(pa.Table.from_pylist(recs), path)
    return path


def test_videomme_v2_rows(v2_parquet: Path, tmp_path: Path) -> None:
    videos = _touch(tmp_path / "v", "001.mp4", "002.mp4", "003.mp4", "004.mp4")
    rows = _rows("videomme-v2", v2_parquet, videos)
    assert len(rows) == 15
    q = rows["videomme-v2/001-4"]
    assert q["options"] == ["One.", "Two.", "Three.", "Four.", "Five.", "Six.", "Seven.",
                            "Cannot be determined."]  # fmt: skip
    assert (q["answer"], q["category"], q["error"]) == ("D", "Counting", None)
    extra = json.loads(q["extra"])
    assert (extra["group"], extra["group_index"], extra["group_type"], extra["level"]) == (
        "001", 3, "relevance", 1)  # fmt: skip
    assert json.loads(rows["videomme-v2/002-1"]["extra"])["group_structure"] == [1, [2, 3], 4]
    broken = [r["error"] for k, r in rows.items() if k.startswith("videomme-v2/004")]
    assert broken == ["group of video 004 has 3 questions (the grouped score needs 4)"] * 3
    assert all(r["error"] is None for k, r in rows.items() if not k.startswith("videomme-v2/004"))


def test_group_scores_follow_the_release() -> None:
    assert [relevance_score([True] * k + [False] * (4 - k)) for k in range(5)] == [
        0.0, 1 / 16, 4 / 16, 9 / 16, 1.0]  # fmt: skip
    assert relevance_score([False, True, False, True]) == 4 / 16  # order does not matter
    chain = [1, 2, 3, 4]
    assert logic_score([True, True, False, True], chain) == 4 / 16  # the first error ends it
    assert logic_score([False, True, True, True], chain) == 0.0
    par23 = [1, [2, 3], 4]
    assert logic_score([True, False, True, True], par23) == 4 / 12  # step 3 stands in for 2
    assert logic_score([True, True, False, True], par23) == 4 / 12
    assert logic_score([True, True, True, False], par23) == 7 / 12
    assert logic_score([True] * 4, par23) == 1.0
    par12 = [[1, 2], 3, 4]
    assert logic_score([False, True, True, True], par12) == 1 / 10  # step 2 stands in, once
    assert logic_score([True, False, True, True], par12) == 1 / 10
    assert logic_score([True, True, True, False], par12) == 5 / 10
    with pytest.raises(ValueError, match="unknown Video-MME-v2 group structure"):
        logic_score([True] * 4, [1, 2, [3, 4]])


def _pred(q: dict, right: bool, error: str | None = None, pass_index: int = 0) -> dict:
    row = error_row(q, pass_index, error, {"model": "m", "hash": "h"})
    if error is None:
        row.update(response="<answer>X</answer>", correct=right, strict_correct=right)
    return row


def test_videomme_v2_grouped_scores(v2_parquet: Path, tmp_path: Path) -> None:
    videos = _touch(tmp_path / "v", "001.mp4", "002.mp4", "003.mp4", "004.mp4")
    questions = list(_rows("videomme-v2", v2_parquet, videos).values())
    right = {
        "001": [True, False, True, True],  # relevance, 3 of 4 -> 9/16
        "002": [True, False, True, False],  # [1, [2, 3], 4] -> 4/12
        "003": [False, True, True, True],  # [[1, 2], 3, 4] -> 1/10
    }
    preds = []
    for q in questions:
        vid, k = q["qa_id"].split("/")[1].split("-")
        preds.append(
            _pred(q, False, q["error"]) if vid == "004" else _pred(q, right[vid][int(k) - 1])
        )
    base = {"benchmark": "videomme-v2", "model": "m", "settings": "{}"}
    rows = videomme_v2_rows(preds, questions, base, floor_letter="A", n_boot=50)
    got = {(r["metric"], r["group_by"], r["group"]): r for r in rows}
    overall = got[("robust", "nonlinear", "overall")]
    assert rows[0] is overall  # the headline row comes first
    assert overall["accuracy"] == pytest.approx((9 / 16 + 4 / 12 + 1 / 10 + 0.0) / 4)
    assert (overall["n"], overall["errors"]) == (4, 1)  # 4 groups; the broken one counts as 0
    # Floor: always "A" -> 001 [F,F,T,F]=1/16, 002 [T,F,F,T]=1/12, 003 [F,F,T,T]=0, 004 1/16.
    assert overall["floor"] == pytest.approx((1 / 16 + 1 / 12 + 0 + 1 / 16) / 4)
    assert got[("robust", "nonlinear", "logic")]["accuracy"] == pytest.approx((4 / 12 + 1 / 10) / 2)
    assert got[("robust", "nonlinear", "relevance")]["accuracy"] == pytest.approx(9 / 32)
    assert got[("robust", "nonlinear", "level 3")]["accuracy"] == pytest.approx(4 / 12)
    assert got[("robust", "nonlinear_second_head", "Temporal Understanding")]["n"] == 1
    assert got[("robust", "linear", "relevance")]["accuracy"] == pytest.approx((3 / 4 + 0) / 2)
    # Two passes: a group's score is the mean of its per-pass scores.
    second = [dict(p, pass_index=1, correct=p["error"] is None) for p in preds]
    rows2 = videomme_v2_rows(preds + second, questions, base, floor_letter="A", n_boot=50)
    two = next(r for r in rows2 if r["group"] == "overall" and r["metric"] == "robust")
    assert two["accuracy"] == pytest.approx(
        ((9 / 16 + 1) / 2 + (4 / 12 + 1) / 2 + (0.1 + 1) / 2) / 4
    )


def test_videomme_v2_subtitles_all_words(tmp_path: Path) -> None:
    from lvr.eval.prompting import question_text

    videos = _touch(tmp_path / "v", "001.mp4", "002.mp4", "003.mp4", "004.mp4")
    words = [{"text": "Hello", "start_time": 0.5, "end_time": 0.8},
             {"text": "world", "start_time": 0.8, "end_time": 1.1}]  # fmt: skip
    sub = videos / "subtitle" / "001.jsonl"
    sub.parent.mkdir()
    sub.write_text("\n".join(json.dumps(w) for w in words))
    rows = _rows("videomme-v2", FIX / "videomme_v2" / "test.jsonl", videos, subtitles=True)
    q = rows["videomme-v2/001-1"]
    assert question_text(q, [30.0]).splitlines()[:2] == [
        "This video's subtitles are listed below:", "Hello world"]  # fmt: skip
    assert question_text(rows["videomme-v2/002-1"], [0.6]) == "What appears first?"


# ---------------------------------------------------------------------------------------------
# LVBench
# ---------------------------------------------------------------------------------------------


def test_lvbench_rows_and_multi_label_categories(tmp_path: Path) -> None:
    videos = _touch(tmp_path / "v", "lvbAAAAAAAA.mp4", "lvbBBBBBBBB.mp4")
    rows = _rows("lvbench", FIX / "lvbench" / "video_info.meta.jsonl", videos)
    assert list(rows) == ["lvbench/101", "lvbench/102", "lvbench/201", "lvbench/202"]
    q = rows["lvbench/102"]
    assert q["question"] == "Why does the woman leave the room?"
    assert q["options"] == ["She is angry", "The phone rings", "Someone knocks", "She is late"]
    assert (q["answer"], q["category"], q["duration_bucket"]) == (
        "C", "reasoning, event understanding", "15min+")  # fmt: skip
    assert json.loads(q["extra"])["duration_s"] == pytest.approx(65.2 * 60)
    assert rows["lvbench/202"]["error"] == "answer E is not among the offered labels ABCD"
    memberships = category_memberships(list(rows.values()))
    assert memberships["lvbench/102"] == ["reasoning", "event understanding"]
    # Scores: a question counts in each of its types (the release's compute_accuracy).
    preds = [_pred(q, k in {"lvbench/101", "lvbench/102"}, q["error"]) for k, q in rows.items()]
    table = rows_to_table(preds, "predictions")
    scores = score_rows(table, n_boot=20, memberships=memberships)
    cat = {s["group"]: s for s in scores if s["metric"] == "robust" and s["group_by"] == "category"}
    assert set(cat) == {"entity recognition", "reasoning", "event understanding",
                        "key information retrieval"}  # fmt: skip
    assert (cat["event understanding"]["n"], cat["event understanding"]["accuracy"]) == (2, 0.5)
    assert (
        cat["reasoning"]["accuracy"] == 1.0 and cat["key information retrieval"]["accuracy"] == 0.0
    )
    assert not [s for s in scores if s["group_by"] == "macro"]
    overall = next(s for s in scores if s["metric"] == "robust" and s["group_by"] == "overall")
    assert (overall["n"], overall["accuracy"]) == (4, 0.5)


# ---------------------------------------------------------------------------------------------
# Video-Holmes (options as a letter -> text dict), and its train split as a qa table
# ---------------------------------------------------------------------------------------------


def test_video_holmes_rows(tmp_path: Path) -> None:
    videos = _touch(tmp_path / "v", "vhAAAAAAAAA.mp4", "vhBBBBBBBBB.mp4")
    rows = _rows("video-holmes", FIX / "video_holmes" / "test_Video-Holmes.json", videos)
    q = rows["video-holmes/vhAAAAAAAAA-2"]
    assert q["question"].startswith("Arrange these events chronologically:\n1. The cup falls")
    assert q["options"] == ["3→1→2", "1→3→2", "2→1→3", "3→2→1", "1→2→3", "2→3→1"]
    assert (q["answer"], q["category"], q["error"]) == ("A", "TA", None)
    assert rows["video-holmes/vhBBBBBBBBB-3"]["error"].startswith(
        "option labels A, B, D, E, F are not A-E"
    )
    assert rows["video-holmes/vhBBBBBBBBB-4"]["error"] == "answer is blank"


def test_video_holmes_train_split_feeds_rl(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from lvr.cli import app
    from lvr.train.data import read_qa

    videos = _touch(tmp_path / "v", "vhAAAAAAAAA.mp4", "vhBBBBBBBBB.mp4")
    out = tmp_path / "run" / "filter" / "qa"
    res = CliRunner().invoke(app, ["eval", "questions", "--benchmark", "video-holmes", "--data",
                                   str(FIX / "video_holmes" / "train_Video-Holmes.json"),
                                   "--video-dir", str(videos), "--as-qa", str(out)])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "2 qa rows (split rl), 0 left out" in res.output
    rows = read_qa(out, split="rl")
    assert [r.qa_id for r in rows] == ["video-holmes/vhAAAAAAAAA-11", "video-holmes/vhBBBBBBBBB-12"]
    assert rows[0].answer == "C" and rows[0].reasoning.startswith("She picks up the mop")
    assert rows[0].video_path == str(videos / "vhAAAAAAAAA.mp4") and len(rows[0].options) == 6


# ---------------------------------------------------------------------------------------------
# NExT-QA: numbered options through prompts, extraction and scoring
# ---------------------------------------------------------------------------------------------


def test_nextqa_numbered_options(tmp_path: Path) -> None:
    videos = _touch(tmp_path / "v", "NExTVideo/4010069381.mp4", "NExTVideo/5336458412.mp4")
    rows = _rows("nextqa", FIX / "nextqa" / "val.csv", videos)
    q = rows["nextqa/4010069381-0"]
    assert q["options"] == ["to hide", "to sleep", "to greet his father", "to eat", "to dance"]
    assert (q["answer"], q["category"], q["error"]) == ("2", "CW", None)
    assert rows["nextqa/5336458412-2"]["error"] == "answer 5 is not among the offered labels 01234"
    # Prompt: numbered options and an instruction asking for the number.
    user = prompt_messages(q, q["question"], "think")[-1]["content"]
    assert "\n0. to hide\n1. to sleep\n2. to greet his father\n" in user
    assert user.endswith("then give the option number inside <answer></answer>.")
    assert "A. " not in user
    # Extraction and scoring compare numbers, never letters.
    cases = {
        "<think>3 people run</think><answer>2</answer>": ("2", True, True),
        "<answer>2. to greet his father</answer>": ("2", True, False),
        "The answer is option 0": ("0", False, False),
        "<answer>C</answer>": (None, False, False),
        "<answer>to greet his father</answer>": ("2", True, False),
    }
    for response, (extracted, correct, strict) in cases.items():
        row = error_row(q, 0, None, {"model": "m", "hash": "h", "parser": "p"})
        row["response"] = response
        scored = score_row(row, q)
        assert (scored["extracted"], scored["correct"], scored["strict_correct"]) == (
            extracted, correct, strict), response  # fmt: skip
        again = rescore(scored, q, {"judge": None})
        assert again["extracted"] == extracted


def test_nextqa_end_to_end_with_tiny_vlm(tmp_path: Path) -> None:
    """A real run: the tiny VLM answers numbered questions; the report reads them with numbers."""
    from typer.testing import CliRunner

    from lvr.cli import app
    from lvr.datagen.synthetic import VideoSpec, render_video
    from lvr.models.tiny import build_tiny_vlm

    spec = {"duration_s": 2.0, "fps": 8.0, "width": 64, "height": 64, "scene_len_s": (1.0, 1.0)}
    for seed, vid in enumerate(["4010069381", "5336458412"]):
        render_video(tmp_path / "videos" / f"{vid}.mp4", VideoSpec(seed=seed, **spec))
    model = build_tiny_vlm(tmp_path / "tiny-vlm")
    run = tmp_path / "run"
    args = ["eval", "run", "--model", str(model), "--benchmark", "nextqa", "--data",
            str(FIX / "nextqa" / "val.csv"), "--video-dir", str(tmp_path / "videos"),
            "--run", str(run), "--frames", "2", "--set", "max_tokens=4", "--set", "bootstrap=20"]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "errors: 1 x answer N is not among the offered labels N" in res.output
    out = next((run / "eval").iterdir())
    preds = {r["qa_id"]: r for r in read_table(out / "predictions", "predictions").to_pylist()}
    assert {k for k, r in preds.items() if r["error"] is None} == {
        "nextqa/4010069381-0", "nextqa/4010069381-1"}  # fmt: skip
    assert all(r["extracted"] in {None, "0", "1", "2", "3", "4"} for r in preds.values())
    assert CliRunner().invoke(app, ["eval", "report", str(run)]).exit_code == 0
    text = (run / "eval" / "report.md").read_text()
    assert "| answer N is not among the offered labels N | 1 |" in text


def test_as_qa_relabels_numbers(tmp_path: Path) -> None:
    from lvr.eval.export import questions_to_qa

    videos = _touch(tmp_path / "v", "4010069381.mp4", "5336458412.mp4")
    questions = list(_rows("nextqa", FIX / "nextqa" / "val.csv", videos).values())
    table, left_out = questions_to_qa(questions, "sft")
    write_parquet(tmp_path / "qa.parquet", table, "qa")
    assert left_out == 1 and table.column("answer").to_pylist() == ["C", "A"]


def test_videomme_v2_run_headline_is_the_grouped_score(tmp_path: Path) -> None:
    from lvr.datagen.synthetic import VideoSpec, render_video
    from lvr.eval.config import EvalConfig
    from lvr.eval.official import group_score
    from lvr.eval.report import write_report
    from lvr.eval.runner import run_eval
    from lvr.testing.fake_server import FakeOpenAIServer

    spec = {"duration_s": 2.0, "fps": 8.0, "width": 64, "height": 48, "scene_len_s": (1.0, 1.0)}
    for seed, vid in enumerate(["001", "002", "003", "004"]):
        render_video(tmp_path / "videos" / f"{vid}.mp4", VideoSpec(seed=seed, **spec))
    with FakeOpenAIServer() as server:
        cfg = EvalConfig(model="openai:fake-model", benchmark="videomme-v2", base_url=server.url,
                         data=str(FIX / "videomme_v2" / "test.jsonl"), frames=[2], bootstrap=50,
                         video_dir=str(tmp_path / "videos"))  # fmt: skip
        res = run_eval(cfg, tmp_path / "run", progress=False)[0]
    preds = {
        r["qa_id"]: r for r in read_table(res.out_dir / "predictions", "predictions").to_pylist()
    }
    assert res.errors == 3 and len(preds) == 15  # the 3-question group is an error group
    structures = {"001": None, "002": [1, [2, 3], 4], "003": [[1, 2], 3, 4]}
    expected = [
        group_score([preds[f"videomme-v2/{vid}-{k}"]["correct"] for k in range(1, 5)],
                    "relevance" if s is None else "logic", s)
        for vid, s in structures.items()
    ] + [0.0]  # fmt: skip
    assert res.headline == pytest.approx(sum(expected) / 4)
    manifest = json.loads((res.out_dir / "manifest.json").read_text())
    assert manifest["headline_group"] == "nonlinear" and manifest["headline"] == res.headline
    md = write_report(tmp_path / "run")[0].read_text()
    assert "### By nonlinear\n" in md and "### By nonlinear_third_head" in md
