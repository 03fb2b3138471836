"""RL step time of `lvr rl` vs TRL's `GRPOTrainer`, side by side on the same tiny VLM.

Both sides get the same tiny Qwen2.5-VL folder, color-task prompts (system prompt, question,
options, instruction), frames (our sampler, 112x112 cap), G, prompts per optimizer step, response
length, sampling (temperature 1, top-p 0.99), clip range and KL coefficient (TRL also runs its
reference model), frozen vision tower, fp32 on CPU, learning rate 0, and the same torch thread
count. Modes run in one process, one after the other:

- ours: `lvr.train.rl.rl_step` with embedding reuse (each video encoded once per step, the
  embeddings reused by all G rollouts and the old-policy, reference and policy prefills);
- ours without reuse (`reuse_embeddings=False`): the vision tower runs again for every rollout
  and every prefill row, as in TRL and the public Long-RL code — it isolates what reuse buys;
- TRL (`benchmarks/_trl_grpo.py`): TRL 1.16 cannot feed a Qwen2.5-VL *video* (no video
  fields in its prompt and log-prob paths), so it gets the F frames as F/2 images; Qwen2.5-VL
  repeats each image to 2 frames, so the vision patches and LM visual tokens are exactly those of
  the F-frame video (checked: `visual_tokens_trl == visual_tokens_ours`). TRL skips the
  old-policy forward when on-policy; ours always runs it, so the comparison is not tilted to us.

    .venv/bin/python benchmarks/grpo_step.py                        # 64 and 128 frames
    .venv/bin/python benchmarks/grpo_step.py --frames 64 --repeats 1

The last line is the JSON verdict: ours / TRL at the worst frame count (target <= 0.5).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]

from lvr.demo.color_task import make_color_qa  # noqa: E402

TARGET = 0.5  # ours / baseline step time at >= 64 frames


def _state(work: Path, qa: Path, frames: int, g: int, prompts: int, new_tokens: int):
    from lvr.config import load_config
    from lvr.layout import RunLayout
    from lvr.train.rl import RLConfig
    from lvr.train.rl.recipe import setup

    sets = [
        "model.path=tiny", f"data.qa={qa}", "data.split=sft", f"data.frames={frames}",
        "data.max_pixels=12544", f"rollout.n={g}", f"rollout.max_new_tokens={new_tokens}",
        f"rollout_batch={prompts}", f"update_batch={prompts}", f"micro_batch={g}", "steps=1",
        "optim.lr=0.0", "device=cpu", "precision=fp32", "progress=false",
    ]  # fmt: skip
    return setup(load_config(RLConfig, None, sets), RunLayout(work))


def measure(frames: int, repeats: int, g: int, prompts: int, new_tokens: int, threads: int) -> dict:
    """Median step seconds of ours, ours without reuse, and TRL at one frame count."""
    import torch

    from lvr.train.rl.step import rl_step

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        qa = make_color_qa(work / "data", prompts, 0, seed=3, size=112, fps=16.0,
                                   duration_s=max(2.0, frames / 16.0))  # fmt: skip
        st = _state(work, qa, frames, g, prompts, new_tokens)
        times: dict[str, list[float]] = {"ours": [], "no_reuse": []}
        encodes: dict[str, float] = {}
        lengths: dict[str, float] = {}
        rl_step(st, 0)  # warm-up (allocator, kernels)
        for _ in range(repeats):
            for mode, reuse in (("ours", True), ("no_reuse", False)):
                st.cfg.reuse_embeddings = reuse
                st.questions.cursor = 0  # same prompts for both modes
                m = rl_step(st, 0)
                times[mode].append(m["step_s"])
                encodes[mode] = m["encodes"]
                lengths[mode] = m["response_len/mean"]
        del st
        from _trl_grpo import trl_step_seconds  # benchmarks/ is on sys.path when run as a script

        trl = trl_step_seconds(
            work / "models" / "tiny-vlm", qa, frames, g, prompts, new_tokens, steps=repeats + 1,
            work=work, threads=threads,
        )  # fmt: skip
    ours, no_reuse = statistics.median(times["ours"]), statistics.median(times["no_reuse"])
    return {"frames": frames, "ours_s": round(ours, 3), "no_reuse_s": round(no_reuse, 3),
            "trl_s": trl["step_s"], "ratio": round(ours / trl["step_s"], 3),
            "ratio_no_reuse": round(ours / no_reuse, 3), "encodes": encodes,
            "trl_images_encoded": trl["images_encoded_per_step"],
            "visual_tokens": {"ours": trl["visual_tokens_ours"], "trl": trl["visual_tokens_trl"]},
            "response_len": {**lengths, "trl": trl["completion_len_mean"]}}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", default="64,128")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--g", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch threads, same for every mode")
    args = ap.parse_args()
    rows = []
    for f in (int(x) for x in args.frames.split(",")):
        rows.append(measure(f, args.repeats, args.g, args.prompts, args.new_tokens, args.threads))
        print(json.dumps(rows[-1]), flush=True)
    worst = max(rows, key=lambda r: r["ratio"])
    print(json.dumps({
        "benchmark": "grpo_step",
        "metric": f"seconds per RL step (G={args.g}, {args.prompts} prompts, {args.new_tokens} new "
                  f"tokens, tiny Qwen2.5-VL, 112x112) at frames {args.frames}; worst frame count",
        "ours": worst["ours_s"],
        "baseline": worst["trl_s"],
        "baseline_name": "TRL 1.16 GRPOTrainer, frames given as frames/2 images (same visual tokens)",
        "ratio": worst["ratio"],
        "target": TARGET,
        "met": all(r["ratio"] <= TARGET for r in rows),
        "per_frames": rows,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
