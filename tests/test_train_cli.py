"""`lvr sft` / `lvr rl` as a user runs them: every mistake is one `error:` line and exit 2.

The commands run in-process through `lvr.cli.main` (the entry point that turns `LvrError`s into
one line); the tiny offline VLM keeps the runs that load a model short.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lvr.cli import main  # noqa: E402
from lvr.config import ConfigError, load_config  # noqa: E402
from lvr.demo.color_task import make_color_qa  # noqa: E402
from lvr.train.config import RLConfig, SFTConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SFT_CFG = REPO / "configs/sft/tiny_cpu.yaml"
RL_CFG = REPO / "configs/rl/tiny_cpu.yaml"
RL_SMALL = ["data.frames=4", "data.max_pixels=3136", "rollout.n=2", "rollout.max_new_tokens=6",
            "rollout_batch=2", "update_batch=1", "micro_batch=4", "progress=false"]  # fmt: skip


def lvr(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: object) -> tuple:
    """Run the `lvr` console script in-process: (exit code, stdout + stderr)."""
    monkeypatch.setattr(sys, "argv", ["lvr", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        main()
    out = capsys.readouterr()
    return exc.value.code, out.out + out.err


def _sets(*items: str) -> list[str]:
    return [x for item in items for x in ("--set", item)]


def _error_line(code: int, output: str) -> str:
    """The one `error:` line of a refused command (no traceback)."""
    assert code == 2, output
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, output
    return lines[0]


@pytest.fixture(scope="module")
def broken_qa(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A qa table whose every video is a file that does not decode (splits sft and rl)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    qa = make_color_qa(tmp_path_factory.mktemp("broken") / "data", 0, bad_videos=3)
    path = next(qa.glob("*.parquet"))
    table = pq.read_table(path)
    rl = table.set_column(
        table.column_names.index("split"), "split", pa.array(["rl"] * table.num_rows)
    )
    pq.write_table(pa.concat_tables([table, rl]), path)
    return qa


@pytest.fixture(scope="module")
def good_qa(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four decodable sft rows plus one that does not decode."""
    return make_color_qa(tmp_path_factory.mktemp("good") / "data", 4, 0, size=56, bad_videos=1)


# --- 1. a run that trained on nothing fails, with its reasons grouped ----------------------------


def test_sft_with_every_video_broken_fails_before_any_checkpoint(
    broken_qa, tmp_path, monkeypatch, capsys
):
    run = tmp_path / "r"
    sets = _sets(f"data.qa={broken_qa}", "max_steps=2", "progress=false")
    line = _error_line(*lvr(monkeypatch, capsys, "sft", "-c", SFT_CFG, "-r", run, *sets))
    assert "every sample was skipped (4 x decode" in line, line
    assert "skipped.jsonl" in line
    assert not list((run / "sft").glob("checkpoint-*"))
    assert len((run / "sft/skipped.jsonl").read_text().splitlines()) == 4


def test_sft_with_every_row_too_long_fails(good_qa, tmp_path, monkeypatch, capsys):
    sets = _sets(f"data.qa={good_qa}", "max_steps=1", "data.max_seq_len=10", "progress=false")
    line = _error_line(*lvr(monkeypatch, capsys, "sft", "-c", SFT_CFG, "-r", tmp_path, *sets))
    assert "every sample was skipped" in line and "too long" in line, line
    assert not list((tmp_path / "sft").glob("checkpoint-*"))


def test_sft_with_some_videos_broken_reports_them_in_the_summary(
    good_qa, tmp_path, monkeypatch, capsys
):
    sets = _sets(f"data.qa={good_qa}", "max_steps=3", "progress=false", "micro_batch=2")
    code, out = lvr(monkeypatch, capsys, "sft", "-c", SFT_CFG, "-r", tmp_path, *sets)
    assert code == 0, out
    summary = next(line for line in out.splitlines() if line.startswith("sft done:"))
    assert "samples skipped (" in summary and "decode" in summary, summary
    manifest = json.loads((tmp_path / "sft/manifest.json").read_text())
    assert manifest["skipped"]["samples"] >= 1


def test_rl_with_every_video_broken_fails_after_one_step(
    broken_qa, good_qa, tmp_path, monkeypatch, capsys
):
    run = tmp_path / "r"
    sets = _sets(f"data.qa={broken_qa}", "model.path=tiny", "steps=2", *RL_SMALL)
    line = _error_line(*lvr(monkeypatch, capsys, "rl", "-c", RL_CFG, "-r", run, *sets))
    assert "rl: every sample was skipped (" in line and "decode" in line, line
    assert not list((run / "rl").glob("checkpoint-*"))
    # the same run folder with a table that works: a fresh start, no stale skips in its report
    sets = _sets(f"data.qa={good_qa}", "data.split=sft", "model.path=tiny", "steps=1", *RL_SMALL)
    code, out = lvr(monkeypatch, capsys, "rl", "-c", RL_CFG, "-r", run, *sets)
    assert code == 0, out
    manifest = json.loads((run / "rl/manifest.json").read_text())
    counts = manifest["counts"]
    assert manifest["skipped"]["samples"] == counts["skipped_decode"] + counts["skipped_too_long"]


# --- 2. values out of range are refused when the config is built ---------------------------------


@pytest.mark.parametrize(
    ("cls", "override", "needle"),
    [
        (SFTConfig, "epochs=-1", "'epochs' must be >= 1; got -1"),
        (SFTConfig, "epochs=0", "'epochs' must be >= 1; got 0"),
        (SFTConfig, "max_steps=-5", "'max_steps' must be >= 0"),
        (SFTConfig, "optim.lr=-1", "'optim.lr' must be > 0; got -1.0"),
        (SFTConfig, "data.frames=0", "'data.frames' must be >= 1; got 0"),
        (SFTConfig, "data.frames=-2", "'data.frames' must be >= 1; got -2"),
        (SFTConfig, "micro_batch=0", "'micro_batch' must be >= 1; got 0"),
        (SFTConfig, "grad_accum=0", "'grad_accum' must be >= 1; got 0"),
        (SFTConfig, "data.max_pixels=-1", "'data.max_pixels' must be >= 0"),
        (SFTConfig, "device=gpu", "'device' must be auto, cpu, cuda or cuda:<index>; got 'gpu'"),
        (SFTConfig, "optim.warmup_ratio=1.5", "'optim.warmup_ratio' must be in [0, 1]"),
        (SFTConfig, "model.lora_dropout=1", "'model.lora_dropout' must be in [0, 1)"),
        (SFTConfig, "optim.betas=[0.9,1.5]", "'optim.betas' must be two numbers in [0, 1)"),
        (SFTConfig, "data.num_workers=-1", "'data.num_workers' must be >= 0"),
        (SFTConfig, "keep_last=-1", "'keep_last' must be >= 0"),
        (RLConfig, "rollout_batch=0", "'rollout_batch' must be >= 1; got 0"),
        (RLConfig, "optim.lr=-1", "'optim.lr' must be > 0; got -1.0"),
        (RLConfig, "rollout.top_p=1.5", "'rollout.top_p' must be in (0, 1]"),
        (RLConfig, "rollout.n=1", "'rollout.n' must be >= 2"),
        (RLConfig, "algo.clip_low=1", "'algo.clip_low' must be in [0, 1)"),
        (RLConfig, "steps=0", "'steps' must be >= 1"),
        (RLConfig, "sp_size=-1", "'sp_size' must be >= 0"),
    ],
)
def test_out_of_range_values_name_key_value_and_range(cls, override, needle):
    with pytest.raises(ConfigError) as exc:
        load_config(cls, None, [override])
    assert needle in str(exc.value)
    assert "\n" not in str(exc.value)


def test_shipped_configs_pass_the_checks():
    for path in (REPO / "configs/sft").glob("*.yaml"):
        load_config(SFTConfig, path)
    for path in (REPO / "configs/rl").glob("*.yaml"):
        load_config(RLConfig, path)


@pytest.mark.parametrize("stage", ["sft", "rl"])
def test_cli_refuses_a_bad_value_in_one_line(stage, tmp_path, monkeypatch, capsys):
    cfg = SFT_CFG if stage == "sft" else RL_CFG
    args = [stage, "-c", cfg, "-r", tmp_path, "--set", "optim.lr=-1"]
    line = _error_line(*lvr(monkeypatch, capsys, *args))
    assert "'optim.lr' must be > 0; got -1.0" in line
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize("stage", ["sft", "rl"])
def test_cuda_without_a_gpu_is_one_line(stage, tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = SFT_CFG if stage == "sft" else RL_CFG
    line = _error_line(*lvr(monkeypatch, capsys, stage, "-c", cfg, "-r", tmp_path,
                            "--set", "device=cuda"))  # fmt: skip
    assert "device=cuda but no CUDA GPU is usable" in line and "device=cpu" in line


# --- 3-6. wrong paths ------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["sft", "rl"])
def test_missing_model_folder_is_one_line(stage, good_qa, tmp_path, monkeypatch, capsys):
    cfg = SFT_CFG if stage == "sft" else RL_CFG
    sets = _sets(f"data.qa={good_qa}", "data.split=sft", "model.path=/nonexistent/ckpt")
    line = _error_line(*lvr(monkeypatch, capsys, stage, "-c", cfg, "-r", tmp_path, *sets))
    assert "model folder not found: /nonexistent/ckpt" in line


def test_model_path_that_is_a_table_is_one_line(good_qa, tmp_path, monkeypatch, capsys):
    sets = _sets(f"data.qa={good_qa}", f"model.path={good_qa}")
    line = _error_line(*lvr(monkeypatch, capsys, "sft", "-c", SFT_CFG, "-r", tmp_path, *sets))
    assert "no config.json" in line


@pytest.mark.parametrize("stage", ["sft", "rl"])
def test_run_that_is_a_file_is_one_line(stage, tmp_path, monkeypatch, capsys):
    wrong = tmp_path / "wrong.parquet"
    wrong.write_bytes(b"PAR1")
    cfg = SFT_CFG if stage == "sft" else RL_CFG
    line = _error_line(*lvr(monkeypatch, capsys, stage, "-c", cfg, "-r", wrong))
    assert f"{wrong} is a file" in line and "--run" in line


@pytest.mark.parametrize("stage", ["sft", "rl"])
def test_old_layout_run_gets_the_migrate_line_before_loading(stage, tmp_path, monkeypatch, capsys):
    from lvr.layout import LayoutError, check_layout

    run = tmp_path / "old"
    (run / "qa" / "qa_raw").mkdir(parents=True)  # the older layout's qa stage folder
    with pytest.raises(LayoutError) as inspect_error:  # what `lvr inspect` says
        check_layout(run)
    cfg = SFT_CFG if stage == "sft" else RL_CFG
    line = _error_line(*lvr(monkeypatch, capsys, stage, "-c", cfg, "-r", run))
    assert line == f"error: {inspect_error.value}"
    assert f"lvr datagen migrate --run {run}" in line
    assert not (run / "models").exists()


def test_config_that_is_a_directory_says_so(tmp_path, monkeypatch, capsys):
    line = _error_line(*lvr(monkeypatch, capsys, "sft", "--config", tmp_path, "--show-config"))
    assert f"config file {tmp_path} is a directory" in line


# --- 7-8. checkpoints ------------------------------------------------------------------------------


def test_refusal_names_the_latest_checkpoint_and_an_unfinished_newer_one(tmp_path):
    from lvr.train.checkpoint import STATE_FILE, checkpoint_to_resume
    from lvr.train.common import TrainError

    for step in (10, 20, 30):
        (tmp_path / f"checkpoint-{step:06d}").mkdir()
    for step in (10, 20):
        (tmp_path / f"checkpoint-{step:06d}" / STATE_FILE).write_text("{}")
    with pytest.raises(TrainError) as exc:
        checkpoint_to_resume(tmp_path, resume=False)
    msg = str(exc.value)
    assert "already holds checkpoint-000020" in msg and "checkpoint-000030 is unfinished" in msg
    assert "checkpoint-000010" not in msg


def test_resume_over_another_model_family_names_the_families(tmp_path):
    from types import SimpleNamespace

    from lvr.train.checkpoint import check_same_model
    from lvr.train.common import TrainError

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    check_same_model(tmp_path, SimpleNamespace(config=SimpleNamespace(model_type="qwen2_5_vl")))
    other = SimpleNamespace(config=SimpleNamespace(model_type="qwen3_vl"))
    with pytest.raises(
        TrainError, match="holds a qwen2_5_vl model but model.path loads a qwen3_vl"
    ):
        check_same_model(tmp_path, other)


@pytest.mark.slow
def test_sft_resume_with_another_family_is_one_line(good_qa, tmp_path, monkeypatch, capsys):
    base = ["sft", "-c", SFT_CFG, "-r", tmp_path, *_sets(f"data.qa={good_qa}", "progress=false")]
    code, out = lvr(monkeypatch, capsys, *base, "--set", "max_steps=1")
    assert code == 0, out
    args = [*base, "--set", "max_steps=2", "--set", "model.path=tiny:qwen3_vl", "--resume"]
    line = _error_line(*lvr(monkeypatch, capsys, *args))
    assert "holds a qwen2_5_vl model but model.path loads a qwen3_vl model" in line


def test_doctests() -> None:
    import doctest

    import lvr.train.common
    import lvr.train.config

    assert doctest.testmod(lvr.train.config).failed == 0
    assert doctest.testmod(lvr.train.common).failed == 0


def test_sft_with_fewer_rows_than_one_step_fails_before_loading(
    good_qa, tmp_path, monkeypatch, capsys
):
    for extra in ([], ["max_steps=3"]):
        sets = _sets(f"data.qa={good_qa}", "micro_batch=8", *extra)
        line = _error_line(*lvr(monkeypatch, capsys, "sft", "-c", SFT_CFG, "-r", tmp_path, *sets))
        assert "5 qa rows with split 'sft' cannot fill one step of 8 samples" in line, line
        assert not (tmp_path / "models").exists()  # refused before the tiny model is built


def test_sft_stops_once_every_row_failed_and_saves_no_untrained_checkpoint(
    broken_qa, tmp_path, monkeypatch, capsys
):
    sets = _sets(f"data.qa={broken_qa}", "max_steps=50", "save_every=1", "progress=false")
    line = _error_line(*lvr(monkeypatch, capsys, "sft", "-c", SFT_CFG, "-r", tmp_path, *sets))
    assert "every sample was skipped" in line, line
    assert not list((tmp_path / "sft").glob("checkpoint-*"))
    steps = (tmp_path / "sft/metrics.jsonl").read_text().splitlines()
    assert len(steps) == 2  # 3 broken rows, 2 per step: stopped once each had failed


def test_resumed_sft_says_where_it_took_over(good_qa, tmp_path, monkeypatch, capsys):
    """The summary line of a resumed run names the checkpoint it continued (it used to read
    like a run from the start, although an earlier invocation did the first steps)."""
    import shutil

    sets = _sets(f"data.qa={good_qa}", "max_steps=2", "save_every=1", "progress=false",
                 "keep_last=0", "data.frames=4", "data.max_pixels=3136")  # fmt: skip
    code, out = lvr(monkeypatch, capsys, "sft", "-c", SFT_CFG, "-r", tmp_path, *sets)
    assert code == 0, out
    assert ", resumed from" not in next(x for x in out.splitlines() if x.startswith("sft done:"))
    shutil.rmtree(tmp_path / "sft/checkpoint-000002")  # killed before step 2's checkpoint
    code, out = lvr(monkeypatch, capsys, "sft", "-c", SFT_CFG, "-r", tmp_path, *sets, "--resume")
    assert code == 0, out
    summary = next(x for x in out.splitlines() if x.startswith("sft done:"))
    assert summary.startswith("sft done: 2 steps, resumed from checkpoint-000001 at step 1, loss")
