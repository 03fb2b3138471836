"""`lvr eval run` / `lvr eval report` end to end: tiny VLM on real synthetic videos, resume, pass rates,
frame sweeps, the OpenAI-compatible path (loopback server) with the judge, and reports."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from lvr.artifacts import SCHEMAS, read_table, rows_to_table, write_parquet
from lvr.datagen.synthetic import VideoSpec, render_video
from lvr.errors import LvrError
from lvr.eval.config import EvalConfig, JudgeConfig
from lvr.eval.extract import PARSER_VERSION
from lvr.eval.runner import run_eval
from lvr.layout import RunLayout
from lvr.testing.bad_files import write_bad_files

os.environ.setdefault("HF_HUB_OFFLINE", "1")
FIX = Path(__file__).parent / "fixtures" / "eval"
LVR_DATA = FIX / "longvideo_reason" / "eval.jsonl"
ANSWERABLE = {
    "longvideo-reason/0",
    "longvideo-reason/1",
    "longvideo-reason/2",
    "longvideo-reason/7",
}
TINY_SPEC = {"duration_s": 3.0, "fps": 8.0, "width": 96, "height": 64, "scene_len_s": (1.0, 2.0)}


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lvr.models.tiny import build_tiny_vlm

    return build_tiny_vlm(tmp_path_factory.mktemp("eval_models") / "tiny-vlm")


@pytest.fixture(scope="session")
def lvr_videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real H.264 synthetic videos laid out like longvila_videos/ (the fixture names two)."""
    root = tmp_path_factory.mktemp("lvr_videos")
    for seed, name in enumerate(["vid_a", "vid_b"]):
        render_video(root / "longvila_videos" / f"{name}.mp4", VideoSpec(seed=seed, **TINY_SPEC))
    return root


def _cfg(model: Path, videos: Path, **kw) -> EvalConfig:
    base = {"model": str(model), "benchmark": "longvideo-reason", "data": str(LVR_DATA),
            "video_dir": str(videos), "frames": [4], "max_tokens": 6, "bootstrap": 200}  # fmt: skip
    return EvalConfig(**{**base, **kw})


def _predictions(out_dir: Path) -> list[dict]:
    return read_table(out_dir / "predictions", "predictions").to_pylist()


def test_cli_end_to_end_tiny_model(tiny_vlm: Path, lvr_videos: Path, tmp_path: Path) -> None:
    from lvr.cli import app

    run = tmp_path / "run"
    args = ["eval", "run", "--model", str(tiny_vlm), "--benchmark", "longvideo-reason",
            "--data", str(LVR_DATA), "--video-dir", str(lvr_videos), "--run", str(run),
            "--frames", "4", "--set", "max_tokens=6", "--set", "bootstrap=200"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "8 questions, asked 4" in result.output
    out = run / "eval" / f"longvideo-reason-{tiny_vlm.name}-{_tag_hash(tiny_vlm)}-f4"
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "predictions",
        "questions",
        "scores",
    ]
    rows = _predictions(out)
    assert len(rows) == 8 and {r["pass_index"] for r in rows} == {0}
    answered = {r["qa_id"] for r in rows if r["error"] is None}
    assert answered == ANSWERABLE  # three malformed rows and one missing video are error rows
    for r in rows:
        settings = json.loads(r["settings"])
        assert settings["frames"] == 4 and settings["temperature"] == 0.0 and settings["parser"]
        if r["error"] is None:
            assert r["frames"] == 4 and isinstance(r["response"], str) and r["latency_s"] >= 0
    scores = read_table(out / "scores", "scores").to_pylist()
    overall = next(s for s in scores if s["metric"] == "robust" and s["group_by"] == "overall")
    assert (overall["n"], overall["errors"]) == (8, 4)
    assert overall["floor"] == pytest.approx(3 / 8)  # gold B is the most common letter
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["asked"] == 4 and manifest["settings"]["max_pixels"] == 448 * 448


def _tag_hash(path: Path) -> str:
    import hashlib

    return hashlib.blake2b(str(path.resolve()).encode(), digest_size=3).hexdigest()


def test_resume_asks_only_missing_rows(tiny_vlm: Path, lvr_videos: Path, tmp_path: Path) -> None:
    cfg = _cfg(tiny_vlm, lvr_videos)
    first = run_eval(cfg, tmp_path, progress=False)[0]
    assert sorted(first.asked_ids) == sorted(ANSWERABLE) and first.requests == 4
    again = run_eval(cfg, tmp_path, progress=False)[0]
    assert (again.asked, again.requests, again.reused) == (0, 0, 4)
    # Delete half of the answered rows: only those are asked again.
    path = first.out_dir / "predictions" / "00000.parquet"
    rows = pq.read_table(path).to_pylist()
    dropped = sorted(ANSWERABLE)[:2]
    write_parquet(
        path,
        rows_to_table([r for r in rows if r["qa_id"] not in dropped], "predictions"),
        "predictions",
    )
    third = run_eval(cfg, tmp_path, progress=False)[0]
    assert sorted(third.asked_ids) == dropped and third.requests == 2
    final = _predictions(third.out_dir)
    assert len(final) == 8 and len({r["qa_id"] for r in final}) == 8
    assert [p.name for p in (third.out_dir / "predictions").iterdir()] == ["00000.parquet"]
    # Other settings (a new prompt mode) are a new key: everything is asked again.
    fourth = run_eval(_cfg(tiny_vlm, lvr_videos, prompt="direct"), tmp_path, progress=False)[0]
    assert fourth.asked == 4 and any("other settings" in n for n in fourth.notes)


def test_passes_write_pass_rates_and_resume_per_pass(
    tiny_vlm: Path, lvr_videos: Path, tmp_path: Path
) -> None:
    cfg = _cfg(tiny_vlm, lvr_videos, passes=2, temperature=1.0, limit=3)
    res = run_eval(cfg, tmp_path, progress=False)[0]
    assert res.asked == 6 and res.requests == 3  # one request per question with n = 2
    rates = read_table(res.out_dir / "pass_rates", "pass_rates").to_pylist()
    assert sorted(r["qa_id"] for r in rates) == [
        "longvideo-reason/0",
        "longvideo-reason/1",
        "longvideo-reason/2",
    ]
    preds = _predictions(res.out_dir)
    for r in rates:
        mine = [p for p in preds if p["qa_id"] == r["qa_id"]]
        assert r["passes"] == 2 == len(mine)
        assert r["correct"] == sum(p["correct"] for p in mine)
        assert r["pass_rate"] == pytest.approx(r["correct"] / 2)
    # A third pass on a rerun asks one more sample per question, nothing else.
    more = run_eval(
        _cfg(tiny_vlm, lvr_videos, passes=3, temperature=1.0, limit=3), tmp_path, progress=False
    )[0]
    assert more.asked == 3 and more.reused == 6
    assert {
        r["passes"] for r in read_table(more.out_dir / "pass_rates", "pass_rates").to_pylist()
    } == {3}
    with pytest.raises(ValueError, match="identical greedy"):
        EvalConfig(passes=3, temperature=0.0)


def test_decode_failure_is_an_error_row(tiny_vlm: Path, lvr_videos: Path, tmp_path: Path) -> None:
    bad = write_bad_files(tmp_path / "bad")
    name, path = sorted(bad.items())[0]
    base = {"video_id": "v", "duration_s": 3.0, "format": "mc", "question": "Which shape?",
            "options": ["circle", "square"], "answer": "A", "category": "temporal", "split": "eval",
            "generator": "g", "prompt_version": "p"}  # fmt: skip
    rows = [{**base, "qa_id": "good", "video_path": str(lvr_videos / "longvila_videos" / "vid_a.mp4")},
            {**base, "qa_id": "bad", "video_path": str(path)}]  # fmt: skip
    write_parquet(RunLayout(tmp_path / "run").qa / "00000.parquet", rows_to_table(rows, "qa"), "qa")
    res = run_eval(
        _cfg(tiny_vlm, lvr_videos, benchmark="qa", data="", video_dir=""),
        tmp_path / "run",
        progress=False,
    )[0]
    preds = {r["qa_id"]: r for r in _predictions(res.out_dir)}
    assert preds["good"]["error"] is None
    assert preds["bad"]["error"].startswith("video: cannot decode video"), (
        name,
        preds["bad"]["error"],
    )
    assert res.requests == 1  # nothing was sent for the broken video


def test_frame_sweep_and_report(tiny_vlm: Path, lvr_videos: Path, tmp_path: Path) -> None:
    from lvr.cli import app

    run = tmp_path / "run"
    results = run_eval(_cfg(tiny_vlm, lvr_videos, frames=[2, 4]), run, progress=False)
    assert [r.out_dir.name.rsplit("-", 1)[-1] for r in results] == ["f2", "f4"]
    assert {r["frames"] for r in _predictions(results[0].out_dir) if r["error"] is None} == {2}
    result = CliRunner().invoke(app, ["eval", "report", str(run)])
    assert result.exit_code == 0, result.output
    md, page = run / "eval" / "report.md", run / "eval" / "report.html"
    text = md.read_text()
    assert "robust [95% CI]" in text and "strict (official)" in text and "floor" in text
    assert "accuracy_vs_frames.png" in text and "max_pixels" in text and PARSER_VERSION in text
    assert page.read_text().startswith("<!doctype html>") and "<img" in page.read_text()
    pngs = sorted((run / "eval" / "plots").glob("*.png"))
    # frames plot + per evaluation: category bars and confusion (this benchmark has no durations)
    assert len(pngs) == 5
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000


def test_openai_backend_and_malformed_judge(lvr_videos: Path, tmp_path: Path) -> None:
    from lvr.testing.fake_server import FakeOpenAIServer

    base = {"video_id": "v", "duration_s": 3.0, "category": "goal", "split": "eval",
            "generator": "g", "prompt_version": "p",
            "video_path": str(lvr_videos / "longvila_videos" / "vid_b.mp4")}  # fmt: skip
    rows = [
        {**base, "qa_id": "mc1", "format": "mc", "question": "Which?", "options": ["x", "y", "z"], "answer": "B"},
        {**base, "qa_id": "open1", "format": "open", "question": "What moves?", "options": [], "answer": "a red circle"},
    ]  # fmt: skip
    write_parquet(RunLayout(tmp_path).qa / "00000.parquet", rows_to_table(rows, "qa"), "qa")
    with FakeOpenAIServer() as server:
        cfg = EvalConfig(model="openai:fake-model", benchmark="qa", base_url=server.url, frames=[3],
                         bootstrap=100, judge=JudgeConfig(model="fake-model", base_url=server.url))  # fmt: skip
        res = run_eval(cfg, tmp_path, progress=False)[0]
        sent = list(server.log)
    preds = {r["qa_id"]: r for r in _predictions(res.out_dir)}
    mc = preds["mc1"]
    assert mc["error"] is None and mc["format_ok"] and mc["extracted"] in {"A", "B", "C"}
    assert mc["strict_correct"] == mc["correct"]  # the fake server answers in the exact format
    # The fake server echoes the instruction line, so the open answer's <answer></answer> is empty:
    # nothing to judge, a wrong answer (not an error, not a guess).
    op = preds["open1"]
    assert (op["error"], op["extracted"], op["correct"], res.judge_requests) == (
        None,
        None,
        False,
        0,
    )
    assert "openai-fake-model" in res.out_dir.name
    assert any("Which?" in a.user_text for a in sent)


def test_judge_yes_no_and_malformed_reply_is_an_error() -> None:
    from lvr.backends import make_backend
    from lvr.eval.judge import judge_messages, judge_rows, parse_verdict
    from lvr.testing.fake_server import FakeOpenAIServer, FaultConfig

    assert [parse_verdict(t) for t in ["Yes", " no.", "**YES**", "<think>hm</think>No"]] == [
        True, False, True, False]  # fmt: skip
    assert [parse_verdict(t) for t in ["Maybe", "Yes and no", "", None]] == [None] * 4
    assert "Reference answer: red" in judge_messages("Q?", "red", "crimson")[1]["content"]
    row = {"qa_id": "q", "pass_index": 0, "format": "open", "error": None, "correct": False,
           "extracted": "a crimson circle", "answer": "a red circle"}  # fmt: skip
    exact = {**row, "qa_id": "e", "correct": True}  # an exact match is never sent to the judge
    close = {**row, "qa_id": "c", "extracted": "the red circle on the left"}
    questions = {k: {"question": "What moves?"} for k in "qc"}
    with FakeOpenAIServer() as server:
        backend = make_backend("openai", "fake-model", base_url=server.url)
        sent = judge_rows([row, exact, close], questions, backend)
    assert sent == 2 and exact["error"] is None and exact["correct"]
    assert (row["error"], row["correct"], close["error"], close["correct"]) == (
        None,
        False,
        None,
        True,
    )
    # A reply without content (a model that returned nothing usable) is an error row, not a guess.
    row["correct"] = False
    with FakeOpenAIServer(faults=FaultConfig(rate=1.0, kinds=("missing_fields",))) as server:
        backend = make_backend("openai", "fake-model", base_url=server.url, max_retries=0)
        judge_rows([row], questions, backend)
    assert row["error"].startswith("judge") and row["correct"] is False


def test_vllm_backend_without_vllm_is_a_clear_error(lvr_videos: Path, tmp_path: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed")
    with pytest.raises(LvrError, match=r"install lvr\[gpu\]"):
        run_eval(_cfg(Path("some/model"), lvr_videos, backend="vllm"), tmp_path, progress=False)


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    from lvr.cli import app

    res = CliRunner().invoke(app, ["eval", "run", "--model", "m", "--benchmark", "nope"])
    assert isinstance(res.exception, LvrError) and "must be one of" in str(res.exception)
    res = CliRunner().invoke(app, ["eval", "run", "--model", "m", "--data", str(tmp_path / "none.json"),
                                   "--run", str(tmp_path)])  # fmt: skip
    assert isinstance(res.exception, LvrError) and "neither a file" in str(res.exception)
    res = CliRunner().invoke(app, ["eval", "report", str(tmp_path)])
    assert isinstance(res.exception, LvrError) and "no evaluations" in str(res.exception)
    shown = CliRunner().invoke(app, ["eval", "run", "--frames", "8,16", "--show-config"])
    assert shown.exit_code == 0 and "- 8\n- 16" in shown.output


def test_questions_command(tmp_path: Path) -> None:
    from lvr.cli import app

    out = tmp_path / "q.parquet"
    res = CliRunner().invoke(app, ["eval", "questions", "--benchmark", "mlvu", "--data",
                                   str(FIX / "mlvu"), "--out", str(out)])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "5 questions, 5 with errors" in res.output  # no --video-dir: every video is missing
    assert "generation task 9_summary" in res.output
    assert pq.read_schema(out).names == SCHEMAS["questions"].names
    shutil.rmtree(tmp_path)


def test_corrected_benchmark_rescores_without_asking(
    tiny_vlm: Path, lvr_videos: Path, tmp_path: Path
) -> None:
    data = tmp_path / "eval.jsonl"
    lines = LVR_DATA.read_text().splitlines()[:2]
    data.write_text("\n".join(lines) + "\n")
    cfg = _cfg(tiny_vlm, lvr_videos, data=str(data))
    first = run_eval(cfg, tmp_path, progress=False)[0]
    assert first.asked == 2
    fixed = [json.loads(line) for line in lines]
    fixed[0]["answer"] = "<answer>A</answer>"  # a corrected gold letter: re-scored, not re-asked
    fixed[1]["problem"] = fixed[1]["problem"].replace("To paint it", "To polish it")  # new option
    data.write_text("\n".join(json.dumps(r) for r in fixed) + "\n")
    second = run_eval(cfg, tmp_path, progress=False)[0]
    assert second.asked_ids == ["longvideo-reason/1"]
    rows = {r["qa_id"]: r for r in _predictions(second.out_dir)}
    assert rows["longvideo-reason/0"]["answer"] == "A"
    assert rows["longvideo-reason/1"]["options"][1] == "To polish it"


def test_run_that_answers_nothing_fails_with_grouped_reasons(tmp_path: Path) -> None:
    from lvr.cli import app

    args = ["eval", "run", "--model", "some/model", "--benchmark", "longvideo-reason",
            "--data", str(LVR_DATA), "--video-dir", str(tmp_path), "--run", str(tmp_path / "run"),
            "--frames", "2"]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert isinstance(res.exception, LvrError)
    msg = str(res.exception)
    assert "\n" not in msg and msg.startswith("no question was answered (8 error rows in ")
    assert "5 x video not found: … (looked under …)" in msg  # one reason, not five videos
    # The rows and the manifest are still written, with the reasons grouped.
    out = next((tmp_path / "run" / "eval").iterdir())
    manifest = json.loads((out / "manifest.json").read_text())
    assert (
        manifest["counts"]["answered"] == 0
        and "5 x video not found" in manifest["errors_by_reason"]
    )


def test_report_groups_errors_by_reason(tiny_vlm: Path, lvr_videos: Path, tmp_path: Path) -> None:
    from lvr.eval.report import error_table, load_entry

    missing = [json.loads(line) for line in LVR_DATA.read_text().splitlines()][:3]
    for i, rec in enumerate(missing):
        rec["videos"] = f"longvila_videos/gone_{i}.mp4"
    data = tmp_path / "eval.jsonl"
    data.write_text("\n".join([LVR_DATA.read_text().splitlines()[0], *map(json.dumps, missing)]))
    res = run_eval(_cfg(tiny_vlm, lvr_videos, data=str(data)), tmp_path / "run", progress=False)[0]
    head, rows = error_table(load_entry(res.out_dir))
    assert head == ["reason", "rows", "example"]
    assert [r[:2] for r in rows] == [["video not found: … (looked under …)", "3"]]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--temperature", "-1"], "temperature must be >= 0"),
        (["--limit", "-1"], "limit must be >= 1"),
        (["--limit", "0"], "limit must be >= 1"),
        (["--set", "max_tokens=-3"], "max_tokens must be >= 1"),
        (["--set", "top_p=0"], "top_p must be in (0, 1]"),
        (["--frames", "4,,8"], "--frames expects frame counts separated by commas"),
        (["--frames", "0"], "frames must be positive integers"),
    ],
)
def test_out_of_range_settings_are_one_line(args: list[str], message: str) -> None:
    from lvr.cli import app

    res = CliRunner().invoke(app, ["eval", "run", "--model", "m", "--data", "d.json", *args])
    assert isinstance(res.exception, LvrError) and message in str(res.exception)
    assert "\n" not in str(res.exception)


def test_a_qa_split_that_is_not_there_names_the_splits(tmp_path: Path) -> None:
    from lvr.eval.benchmarks import BenchmarkError, Source, load_questions

    row = {name: None for name in SCHEMAS["qa"].names}
    rows = [
        {**row, "qa_id": f"q{i}", "split": split} for i, split in enumerate(["sft", "rl", "rl"])
    ]
    write_parquet(
        tmp_path / "qa" / "00000.parquet", pa.Table.from_pylist(rows, SCHEMAS["qa"]), "qa"
    )
    with pytest.raises(
        BenchmarkError,
        match=r"no rows with split 'bogus'; its splits: rl \(2 rows\), sft \(1 rows\)",
    ):
        load_questions(Source("qa", str(tmp_path / "qa"), None, "bogus"))


def test_a_model_that_does_not_load_leaves_no_eval_folder(lvr_videos: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(LvrError, match="model folder not found: /nonexistent/model"):
        run_eval(_cfg(Path("/nonexistent/model"), lvr_videos), run, progress=False)
    assert not (run / "eval").exists() or not any((run / "eval").iterdir())
