"""RL step time of `lvr rl` vs the closest honest baseline, side by side on the same tiny VLM.

Why not TRL: TRL 1.16's `GRPOTrainer` cannot train a Qwen2.5-VL *video* model. Its prompt
tokenization (`_tokenize_prompts`) collects only `{"type": "image"}` message parts, and its
log-prob forward (`_get_per_token_logps_and_entropies`) forwards only image fields (pixel_values,
image_grid_thw, ...), never `pixel_values_videos` / `video_grid_thw` / `second_per_grid_ts`, so the
video tokens of the prompt would have no features in training. (For images it re-runs the vision
tower in every generation and log-prob forward.)

Baseline instead: the SAME `lvr rl` step (`lvr.train.rl.rl_step`, same model, prompts, G, frames,
response lengths, algorithm) with embedding reuse disabled (`reuse_embeddings=False`): the vision
tower runs again for every rollout and for every row of the old-policy, reference and policy
prefills, as in TRL's image path and the public Long-RL code (which cached pixels only). Ours
encodes each video once per step. The learning rate is 0 so that both modes sample identical
responses at the same step index (same seeds, same weights); modes alternate per repeat.

    .venv/bin/python benchmarks/grpo_step.py                        # 64 and 128 frames
    .venv/bin/python benchmarks/grpo_step.py --frames 64 --repeats 1
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
TARGET = 0.5  # ours / baseline step time at >= 64 frames


def _task():
    spec = importlib.util.spec_from_file_location(
        "sft_color_task", REPO / "benchmarks/sft_color_task.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _state(work: Path, qa: Path, frames: int, g: int, prompts: int, new_tokens: int):
    from lvr.config import load_config
    from lvr.train.rl import RLConfig, setup

    sets = [
        "model.path=tiny", f"data.qa={qa}", "data.split=sft", f"data.frames={frames}",
        "data.max_pixels=12544", f"rollout.n={g}", f"rollout.max_new_tokens={new_tokens}",
        f"rollout_batch={prompts}", f"update_batch={prompts}", f"micro_batch={g}", "steps=1",
        "optim.lr=0.0", "device=cpu", "precision=fp32", "progress=false",
    ]  # fmt: skip
    return setup(load_config(RLConfig, None, sets), work)


def measure(frames: int, repeats: int, g: int, prompts: int, new_tokens: int) -> dict:
    """Median step seconds of both modes at one frame count."""
    import torch

    from lvr.train.rl import rl_step

    torch.set_num_threads(max(1, (os.cpu_count() or 2)))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        qa = _task().make_color_qa(work / "data", prompts, 0, seed=3, size=112, fps=16.0,
                                   duration_s=max(2.0, frames / 16.0))  # fmt: skip
        st = _state(work, qa, frames, g, prompts, new_tokens)
        times: dict[str, list[float]] = {"ours": [], "baseline": []}
        encodes: dict[str, float] = {}
        lengths: dict[str, float] = {}
        rl_step(st, 0)  # warm-up (allocator, kernels)
        for _ in range(repeats):
            for mode, reuse in (("ours", True), ("baseline", False)):
                st.cfg.reuse_embeddings = reuse
                st.cursor = 0  # same prompts for both modes
                m = rl_step(st, 0)
                times[mode].append(m["step_s"])
                encodes[mode] = m["encodes"]
                lengths[mode] = m["response_len/mean"]
    ours, base = statistics.median(times["ours"]), statistics.median(times["baseline"])
    return {"frames": frames, "ours_s": round(ours, 3), "baseline_s": round(base, 3),
            "ratio": round(ours / base, 3), "encodes": encodes, "response_len": lengths}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", default="64,128")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--g", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    rows = []
    for f in (int(x) for x in args.frames.split(",")):
        rows.append(measure(f, args.repeats, args.g, args.prompts, args.new_tokens))
        print(json.dumps(rows[-1]), flush=True)
    worst = max(rows, key=lambda r: r["ratio"])
    print(json.dumps({
        "benchmark": "grpo_step",
        "metric": f"seconds per RL step (G={args.g}, {args.prompts} prompts, {args.new_tokens} new "
                  f"tokens, tiny Qwen2.5-VL, 112x112) at frames {args.frames}; worst frame count",
        "ours": worst["ours_s"],
        "baseline": worst["baseline_s"],
        "baseline_name": "lvr rl with embedding reuse disabled (TRL GRPOTrainer cannot train "
                         "Qwen2.5-VL on video: no video fields in its prompt/logprob paths)",
        "ratio": worst["ratio"],
        "target": TARGET,
        "met": all(r["ratio"] <= TARGET for r in rows),
        "per_frames": rows,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
