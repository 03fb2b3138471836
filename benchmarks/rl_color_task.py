"""The RL learning check: GRPO raises reward and held-out accuracy; an inverted reward does not.

Task: "which color appears first?" on synthetic videos that show red, green, blue and yellow in a
random order, options always A red, B green, C blue, D yellow (`make_color_qa(options="fixed")`):
question and options are the same text for every video, so only the frames can lift accuracy
above chance (25%).

Setup (CPU, minutes):
1. A SHORT `lvr sft` (configs/sft/color_order.yaml, 140 steps at a constant rate on 200 videos)
   leaves the small VLM halfway through learning the task: well-formed answers, the right color
   about half the time.
2. `lvr rl` (configs/rl/color_order.yaml: GRPO, the paper's loss and reward, frozen vision tower
   with cached embeddings) trains on 256 other videos; a second run from the same start trains on
   the NEGATED paper reward (`inverted_reward` below, plugged in by dotted path: with GRPO its
   advantages are exactly the inverted ones), so the check can fail. Both runs log the true
   accuracy and format components (weight 0 in the inverted run) that the verdict reads.
3. Held-out: 100 further videos, 8 sampled answers each at temperature 1 (the accuracy RL
   optimizes, measured on unseen videos; 800 answers make it precise to about +-2 points), plus
   greedy accuracy for reference. Greedy accuracy of a half-trained model swings by 10-30 points
   between nearby checkpoints (many answers sit at a tie between two colors), so it is reported
   but not the verdict.

Verdict: RL raises held-out sampled accuracy by >= MIN_GAIN and its training reward (last third of
steps vs first third) by >= MIN_GAIN; the inverted run raises neither (its training reward is
the true one, 0.9 accuracy + 0.1 format, read from the logged components).

    .venv/bin/python benchmarks/rl_color_task.py          # ~10 min on 2 CPU cores; last line JSON

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

from lvr.demo.color_task import make_color_qa  # noqa: E402

SFT_STEPS = 140
MIN_GAIN = 0.05  # held-out sampled accuracy and training reward must rise by at least this much
SAMPLES = 8  # sampled answers per held-out question
FRAMES, MAX_PIXELS = 8, 3136  # as in both configs


def _task() -> Any:
    spec = importlib.util.spec_from_file_location(
        "sft_color_task", REPO / "benchmarks/sft_color_task.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def warm_start(work: Path, sft_steps: int = SFT_STEPS) -> tuple[Path, Path]:
    """The short SFT checkpoint, and the RL table (split "rl") with its held-out "eval" rows."""
    from lvr.config import load_config
    from lvr.train.sft import SFTConfig, run_sft

    task = _task()
    qa = make_color_qa(work / "data", 200, 0, seed=1, size=56, options="fixed")
    rl_qa = make_color_qa(work / "rldata", 0, 100, seed=2, size=56, options="fixed", n_rl=256)
    # A constant rate: the check needs a model halfway through learning, not an annealed one.
    sets = [f"data.qa={qa}", f"max_steps={sft_steps}", "optim.schedule=constant"]
    cfg = load_config(SFTConfig, REPO / "configs/sft/color_order.yaml", sets)
    cfg.model.path = str(task.build_color_vlm(work / "models" / "color-vlm"))
    manifest = run_sft(cfg, work / "sft_run")
    return Path(manifest["final_checkpoint"]), rl_qa


def inverted_reward(completions: list[str], **columns: Any) -> list[float]:
    """The negative control's reward: minus the paper's 0.9 accuracy + 0.1 format."""
    from lvr.train.rewards import accuracy_reward, format_reward

    acc = accuracy_reward(completions, columns["answer"], columns.get("options"))
    fmt = format_reward(completions)
    return [-(0.9 * a + 0.1 * f) for a, f in zip(acc, fmt, strict=True)]


def _true_reward(row: dict) -> float:
    """The paper's reward of a logged step, from its components (whatever the run optimized)."""
    return 0.9 * row["reward/accuracy/mean"] + 0.1 * row["reward/format/mean"]


def rl_run(
    work: Path, ckpt: Path, rl_qa: Path, invert: bool, sets: list[str] | None = None
) -> dict:
    """RL from the SFT checkpoint; returns the manifest and per-step (true) rewards."""
    from lvr.config import load_config
    from lvr.train.rl import RLConfig, run_rl

    overrides = [f"model.path={ckpt}", f"data.qa={rl_qa}"]
    cfg = load_config(RLConfig, REPO / "configs/rl/color_order.yaml", overrides + list(sets or []))
    if invert:  # this file, importable by name: `inverted_reward` by dotted path
        if str(REPO / "benchmarks") not in sys.path:
            sys.path.insert(0, str(REPO / "benchmarks"))
        cfg.rewards = [
            {"fn": "accuracy", "weight": 0.0}, {"fn": "format", "weight": 0.0},
            {"fn": "rl_color_task:inverted_reward", "weight": 1.0, "name": "inverted"},
        ]  # fmt: skip
    run = work / ("rl_inverted" if invert else "rl")
    manifest = run_rl(cfg, run)
    rows = [json.loads(x) for x in (run / "rl/metrics.jsonl").read_text().splitlines()]
    return {"manifest": manifest, "rewards": [_true_reward(r) for r in rows], "rows": rows}


def _thirds(rewards: list[float]) -> tuple[float, float]:
    """Mean reward of the first and the last third of the steps."""
    k = max(1, len(rewards) // 3)
    return sum(rewards[:k]) / k, sum(rewards[-k:]) / k


def _held_out(model: Path, rl_qa: Path) -> dict[str, float]:
    task = _task()
    sampled = task.evaluate(model, rl_qa, FRAMES, MAX_PIXELS, samples=SAMPLES)
    greedy = task.evaluate(model, rl_qa, FRAMES, MAX_PIXELS)
    return {"sampled": round(sampled["accuracy"], 4), "greedy": round(greedy["accuracy"], 4)}


def learning_check(work: Path, sets: list[str] | None = None) -> dict:
    """Warm start, RL, inverted RL; held-out accuracy before/after each. Returns the verdict."""
    import torch

    torch.set_num_threads(1)  # fastest on the shared 2-core machine
    t0 = time.time()
    ckpt, rl_qa = warm_start(work)
    before = _held_out(ckpt, rl_qa)
    out: dict[str, Any] = {"before": before, "sft_s": round(time.time() - t0, 1)}
    for name, invert in (("rl", False), ("inverted", True)):
        t = time.time()
        res = rl_run(work, ckpt, rl_qa, invert, sets)
        after = _held_out(Path(res["manifest"]["final_checkpoint"]), rl_qa)
        first, last = _thirds(res["rewards"])
        out[name] = {"after": after, "reward_first": round(first, 4),
                     "reward_last": round(last, 4), "rewards": [round(r, 3) for r in res["rewards"]],
                     "rl_s": round(time.time() - t, 1)}  # fmt: skip
    rl, inv = out["rl"], out["inverted"]
    gain = rl["after"]["sampled"] - before["sampled"]
    learned = gain >= MIN_GAIN and rl["reward_last"] - rl["reward_first"] >= MIN_GAIN
    control = (
        inv["after"]["sampled"] - before["sampled"] < MIN_GAIN
        and inv["reward_last"] - inv["reward_first"] < MIN_GAIN
    )
    return {
        "benchmark": "rl_color_order",
        "metric": f"held-out accuracy after RL ({SAMPLES} sampled answers per question, T=1), "
        "short-SFT start; color-order task, chance 0.25",
        "ours": rl["after"]["sampled"],
        "baseline": before["sampled"],
        "ratio": round(rl["after"]["sampled"] / max(before["sampled"], 0.01), 3),
        "target": round(before["sampled"] + MIN_GAIN, 3),
        "met": bool(learned and control),
        "learned": bool(learned),
        "inverted_did_not_learn": bool(control),
        "total_s": round(time.time() - t0, 1),
        **out,
    }


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(learning_check(Path(tmp), sets=sys.argv[1:])))
