"""The RL learning check: GRPO raises reward and held-out accuracy; inverted advantages do not.

Setup (CPU, minutes): the tiny VLM gets a SHORT `lvr sft` on balanced "which color appears first?"
questions (configs/sft/color_order.yaml, 40 steps): it learns the `<think>..</think><answer>X</answer>`
format but not the visual skill — it answers one constant letter (chance accuracy). `lvr rl`
(configs/rl/color_order.yaml) then trains on other color-order questions whose gold letter is
always "A", and is evaluated on held-out questions of that distribution (greedy, `<answer>` letter).

What this checks, honestly: that the whole RL loop optimizes the reward in the right direction
(rollouts from cached embeddings, rewards, group advantages, clipped loss with KL, update), fast
enough to see in minutes. It does NOT show visual grounding: with a frozen tiny vision tower and a
2-layer decoder, learning to see colors takes far longer than a CPU test allows, so the learnable
signal is the answer-letter distribution. A second run with `algo.invert_advantage=true` (a flag
that exists only for this check) must NOT improve, so the check can fail.

    .venv/bin/python benchmarks/rl_color_task.py          # ~10-15 min on 2 busy CPU cores

The slow test `tests/test_rl_learning.py` runs `learning_check` and asserts its verdict.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
SFT_STEPS = 40
MIN_GAIN = 0.1
GOLD = "A"  # held-out accuracy and reward must rise by at least this much


def _task() -> Any:
    spec = importlib.util.spec_from_file_location(
        "sft_color_task", REPO / "benchmarks/sft_color_task.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_biased_qa(out_dir: Path, n_train: int, n_eval: int, seed: int, gold: str = GOLD) -> Path:
    """Color-order questions whose gold letter is always `gold` (rl rows: split "sft"; + "eval")."""
    import random

    from lvr.artifacts import rows_to_table, write_parquet
    from lvr.datagen.synthetic import render_color_order_video

    task = _task()
    rng = random.Random(seed)
    rows = []
    for i in range(n_train + n_eval):
        colors = rng.sample(task.TASK_COLORS, 4)
        path = out_dir / "videos" / f"b{seed}_{i:05d}.mp4"
        if not path.is_file():
            render_color_order_video(
                path, colors, seed=seed * 100003 + i, duration_s=2.0, size=56, fps=8.0
            )
        rows.append(task._row(i, str(path), colors, gold, rng, "sft" if i < n_train else "eval"))
    write_parquet(out_dir / "qa" / "00000.parquet", rows_to_table(rows, "qa"), "qa")
    return out_dir / "qa"


def warm_start(work: Path, sft_steps: int = SFT_STEPS) -> tuple[Path, Path]:
    """A short SFT on balanced questions (format, not skill) and the RL/eval table."""
    from lvr.config import load_config
    from lvr.train.sft import SFTConfig, run_sft

    qa = _task().make_color_qa(work / "data", 200, 0, seed=1, size=56)
    rl_qa = make_biased_qa(work / "rldata", 64, 24, seed=2)
    # A constant rate: a cosine decay over so few steps leaves the format half-learned.
    sets = [f"data.qa={qa}", f"max_steps={sft_steps}", "optim.schedule=constant"]
    cfg = load_config(SFTConfig, REPO / "configs/sft/color_order.yaml", sets)
    manifest = run_sft(cfg, work / "sft_run")
    return Path(manifest["final_checkpoint"]), rl_qa


def rl_run(
    work: Path, ckpt: Path, rl_qa: Path, invert: bool, sets: list[str] | None = None
) -> dict:
    """RL from the SFT checkpoint; returns the manifest and per-step rewards."""
    from lvr.config import load_config
    from lvr.train.rl import RLConfig, run_rl

    overrides = [
        f"model.path={ckpt}",
        f"data.qa={rl_qa}",
        f"algo.invert_advantage={str(invert).lower()}",
    ]
    cfg = load_config(RLConfig, REPO / "configs/rl/color_order.yaml", overrides + list(sets or []))
    run = work / ("rl_inverted" if invert else "rl")
    manifest = run_rl(cfg, run)
    rows = [json.loads(x) for x in (run / "rl/metrics.jsonl").read_text().splitlines()]
    return {"manifest": manifest, "rewards": [r["reward/mean"] for r in rows], "rows": rows}


def _summary(rewards: list[float]) -> tuple[float, float]:
    k = max(1, len(rewards) // 3)
    return sum(rewards[:k]) / k, sum(rewards[-k:]) / k


def learning_check(work: Path, sets: list[str] | None = None) -> dict:
    """Warm start, RL, inverted RL; held-out accuracy before/after each. Returns the verdict."""
    task = _task()
    t0 = time.time()
    ckpt, rl_qa = warm_start(work)
    t_sft = time.time() - t0
    before = task.evaluate(ckpt, rl_qa, 8, 3136)
    out: dict[str, Any] = {"acc_before": before["accuracy"], "sft_s": round(t_sft, 1)}
    for name, invert in (("rl", False), ("inverted", True)):
        t = time.time()
        res = rl_run(work, ckpt, rl_qa, invert, sets)
        after = task.evaluate(Path(res["manifest"]["final_checkpoint"]), rl_qa, 8, 3136)
        first, last = _summary(res["rewards"])
        out[name] = {"acc_after": after["accuracy"], "reward_first": round(first, 4),
                     "reward_last": round(last, 4), "rewards": [round(r, 3) for r in res["rewards"]],
                     "rl_s": round(time.time() - t, 1)}  # fmt: skip
    rl, inv = out["rl"], out["inverted"]
    gain = rl["acc_after"] - out["acc_before"]
    learned = gain >= MIN_GAIN and rl["reward_last"] - rl["reward_first"] >= MIN_GAIN
    control = (
        inv["acc_after"] - out["acc_before"] < MIN_GAIN
        and inv["reward_last"] <= inv["reward_first"]
    )
    return {
        "benchmark": "rl_color_order",
        "metric": "held-out accuracy after RL (greedy <answer> letter; gold letter always A), short-SFT start",
        "ours": rl["acc_after"],
        "baseline": out["acc_before"],
        "ratio": round(rl["acc_after"] / max(out["acc_before"], 0.01), 3),
        "target": round(out["acc_before"] + MIN_GAIN, 3),
        "met": bool(learned and control),
        "learned": bool(learned),
        "inverted_did_not_learn": bool(control),
        **out,
    }


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(learning_check(Path(tmp), sets=sys.argv[1:])))
