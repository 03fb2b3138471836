"""Shared training pieces: schedule, checkpoint discovery, metrics logger, DeepSpeed config, LoRA merge."""

from __future__ import annotations

import doctest
import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
import torch

from lvr.train import checkpoint, common
from lvr.train.common import TrainError

REPO = Path(__file__).resolve().parents[1]


def test_schedule_warms_up_then_decays_to_floor():
    f = [common.lr_factor(s, "cosine", 2, 10, min_lr_ratio=0.1) for s in range(11)]
    assert f[0] < f[1] < f[2] == 1.0
    assert all(a >= b for a, b in zip(f[2:-1], f[3:], strict=True))
    assert f[10] == pytest.approx(0.1)
    lin = [common.lr_factor(s, "linear", 0, 4) for s in range(5)]
    assert lin == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    assert common.lr_factor(7, "constant", 2, 10) == 1.0


def _mark(ckpt: Path, state: dict) -> None:
    (ckpt / checkpoint.STATE_FILE).write_text(json.dumps(state))


def test_latest_checkpoint_ignores_unfinished_folders(tmp_path):
    assert checkpoint.latest_checkpoint(tmp_path) is None
    for step in (2, 4, 6):
        checkpoint.checkpoint_dir(tmp_path, step).mkdir()
    _mark(checkpoint.checkpoint_dir(tmp_path, 2), {"step": 2})
    _mark(checkpoint.checkpoint_dir(tmp_path, 4), {"step": 4})
    assert checkpoint.latest_checkpoint(tmp_path).name == "checkpoint-000004"  # 6 has no marker
    with pytest.raises(TrainError, match="not a finished checkpoint"):
        checkpoint.read_trainer_state(checkpoint.checkpoint_dir(tmp_path, 6))
    ckpt = checkpoint.checkpoint_dir(tmp_path, 2)
    _mark(ckpt, {"step": 2, "world_size": 2})
    assert checkpoint.read_trainer_state(ckpt, world_size=2)["step"] == 2
    with pytest.raises(TrainError, match="written by 2 ranks; resume with the same number"):
        checkpoint.read_trainer_state(ckpt, world_size=1)  # per-rank RNG/data state would not fit


def test_metrics_logger_jsonl_parquet_and_resume_truncation(tmp_path):
    log = common.MetricsLogger(tmp_path)
    for step in (1, 2, 3):
        log.log(step, {"loss": 1.0 / step})
    log.close()
    assert pq.read_table(tmp_path / "metrics.parquet").num_rows == 3
    resumed = common.MetricsLogger(tmp_path, start_step=2)  # steps after the checkpoint are redone
    assert [r["step"] for r in resumed.rows()] == [1, 2]
    quiet = common.MetricsLogger(tmp_path / "other", enabled=False)
    quiet.log(1, {"loss": 1.0})
    assert not (tmp_path / "other").exists()


def test_metrics_log_cut_short_by_a_full_disk_still_resumes(tmp_path):
    """A full disk stops an append mid-line; the resume used to fail on that line (a
    JSONDecodeError traceback). The kernel's file-size limit plays the full disk here: it lets
    the write through up to the limit and refuses the rest, as a disk that fills up does."""
    script = textwrap.dedent("""
        import resource, signal, sys
        from pathlib import Path
        from lvr.train.common import MetricsLogger
        log = MetricsLogger(Path(sys.argv[1]))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the limit as an error, not a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (300, 300))
        try:
            for step in range(1, 100):
                log.log(step, {"loss": 1.0 / step, "lr": 0.001})
        except OSError as exc:
            print(exc.errno)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, text=True,
                         capture_output=True, check=True).stdout  # fmt: skip
    assert out.strip() == str(errno.EFBIG), out
    text = (tmp_path / "metrics.jsonl").read_text()
    assert len(text) == 300 and not text.endswith("\n")  # the last line was cut short
    done = text.count("\n")  # whole lines written before the disk filled
    assert [r["step"] for r in common.MetricsLogger(tmp_path).rows()] == []  # fresh start
    (tmp_path / "metrics.jsonl").write_text(text)
    resumed = common.MetricsLogger(tmp_path, start_step=done - 1)
    assert [r["step"] for r in resumed.rows()] == list(range(1, done))
    resumed.log(done, {"loss": 0.5})
    assert [r["step"] for r in resumed.rows()] == list(range(1, done + 1))


def test_metrics_parquet_keeps_a_metric_that_later_steps_add(tmp_path):
    """RL logs `no_signal` only on steps without a learning signal, never on the first one."""
    log = common.MetricsLogger(tmp_path)
    log.log(1, {"loss": 0.5, "lr": 1e-4})
    log.log(2, {"no_signal": 1.0, "lr": 1e-4})
    log.log(3, {"loss": 0.25, "lr": 2e-4})
    log.close()
    frame = pl.read_parquet(tmp_path / "metrics.parquet")
    assert frame.columns == ["step", "loss", "lr", "no_signal"]
    assert frame["no_signal"].to_list() == [None, 1.0, None]
    assert frame["loss"].to_list() == [0.5, None, 0.25]
    assert frame.to_dicts()[1] == {"step": 2, "loss": None, "lr": 1e-4, "no_signal": 1.0}
    assert doctest.testmod(common).failed == 0  # metrics_table's example


def test_checkpoint_restores_rng_and_needs_the_same_world(tmp_path):
    one = common.DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    common.seed_everything(3)
    ckpt = checkpoint.save_checkpoint(
        tmp_path, 5, one, export=lambda folder: folder.mkdir(parents=True),
        training_state=lambda folder: None, trainer_state={"counts": {}}, keep_last=0,
    )  # fmt: skip
    a = (torch.rand(3), __import__("random").random())
    state = checkpoint.resume_trainer_state(ckpt, one)
    b = (torch.rand(3), __import__("random").random())
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert state["step"] == 5 and state["world_size"] == 1
    two = common.DistInfo(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"))
    with pytest.raises(TrainError, match="resume with the same number"):
        checkpoint.resume_trainer_state(ckpt, two)


def test_fresh_run_never_overwrites_checkpoints(tmp_path):
    assert checkpoint.checkpoint_to_resume(tmp_path, resume=False) is None
    checkpoint.checkpoint_dir(tmp_path, 3).mkdir()
    common_state = checkpoint.checkpoint_dir(tmp_path, 3) / checkpoint.STATE_FILE
    common_state.write_text(json.dumps({"step": 3}))
    with pytest.raises(TrainError, match="pass --resume"):
        checkpoint.checkpoint_to_resume(tmp_path, resume=False)
    assert checkpoint.checkpoint_to_resume(tmp_path, resume=True).name == "checkpoint-000003"


def test_deepspeed_config_takes_batch_and_precision_from_the_recipe(tmp_path):
    cfg = common.deepspeed_config("configs/deepspeed/zero3.json", 2, 4, 8, 1.0, bf16=True)
    assert cfg["train_batch_size"] == 64 and cfg["zero_optimization"]["stage"] == 3
    assert cfg["bf16"] == {"enabled": True} and cfg["gradient_clipping"] == 1.0
    assert (
        json.loads((REPO / "configs/deepspeed/zero2.json").read_text())["zero_optimization"][
            "stage"
        ]
        == 2
    )
    with pytest.raises(TrainError, match="not found"):
        common.deepspeed_config(tmp_path / "nope.json", 1, 1, 1, 1.0, False)


def test_merge_lora_state_dict_folds_adapters():
    w = torch.randn(4, 3)
    a, b = torch.randn(2, 3), torch.randn(4, 2)
    state = {
        "base_model.model.layer.q_proj.base_layer.weight": w,
        "base_model.model.layer.q_proj.base_layer.bias": torch.zeros(4),
        "base_model.model.layer.q_proj.lora_A.default.weight": a,
        "base_model.model.layer.q_proj.lora_B.default.weight": b,
        "base_model.model.norm.weight": torch.ones(3),
    }
    out = checkpoint.merge_lora_state_dict(state, scaling=0.5)
    assert sorted(out) == ["layer.q_proj.bias", "layer.q_proj.weight", "norm.weight"]
    assert torch.allclose(out["layer.q_proj.weight"], w + 0.5 * b @ a)
