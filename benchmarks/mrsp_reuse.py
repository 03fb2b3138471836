"""MR-SP stage 1 benchmark: one RL step with the video encoded once vs re-encoded everywhere,
for every model family, at the tiny models' proportions and at the real models'.

Workload (one prompt, one video of N frames at 112x112 built by the family's own processor; the
tiny model of each family from `lvr.models.tiny`): G = 8 rollouts of up to 16 tokens
(`HFRolloutEngine`), then old-policy and reference prefills (no grad) and the policy prefill with
backward (`sp_prefill_logprobs`) over the G sequences.

- ours: `EmbeddingCache` — the tower runs once; every rollout and prefill reuses the embeddings.
- baseline (the public implementation: only pixels cached, every sequence of every forward carries
  its video): the tower runs once per rollout and once per row of each of the 3 prefills
  = 4 * G encodes. The decoder work is the identical calls in both, so the ratio isolates reuse.

Why the figure moves between machines, and what reuse can give (the investigation of issue 14).
With E the cost of one encode and D the decoder work of the step, ours is E + D and the baseline
32 E + D, so the speed-up is (32 e + 1) / (e + 1) with e = E / D. The decoder runs ~5G + 1 = 41
forward-equivalents of the prompt (rollout prefill once, old + reference 2G, policy forward +
backward 3G), so e ~ r / 41, where r is what one video token costs in the tower relative to one
decoder token (`predicted_ratio`). 2.1x needs e >= 0.037, i.e. r >= ~1.5. The tiny models of the
tests (a 2-block ViT of width 64 next to a 2-layer decoder of width 128) measured r = 1.4-2.2 on
this machine from run to run, i.e. tiny ratios of 1.7-2.5x: the tiny figure sits on the knife's
edge of 2.1x, and which kernels a CPU runs faster decides the side (1.95x on one machine, 2.1x on
another). Encoding is then ~40-60% of the baseline step and ~2-5% of ours. Real models have
r = 0.23-0.88 (`_model_flops.py`, 224 x 224 frames, 4K context: Qwen2.5-VL-7B 0.40, 3B 0.88,
Qwen3-VL-8B 0.31, Qwen3-VL-30B-A3B 0.62, Qwen3.5 at transformers' default sizes 0.26;
LLaVA-OneVision-7B 0.23, its 384 px frames pooled to 196 tokens), so
"realistic" gives each family's tiny model as many decoder layers as make its measured r that of
its real model. There encoding is ~12-30% of the baseline step and about 1% of ours, and reuse
alone gives 1.1-1.4x at 128 frames; less with real response lengths (512-1024 tokens instead of 16
add decoder work only), more only for small decoders (Qwen2.5-VL-3B, r 0.88: ~1.6x by the formula).
It cannot reach 2.1x. The paper's 2.1x (439 s / 205 s at 512 frames, 8 GPUs) is stage 1 + stage 2:
the sequence-parallel prefill divides the dominant decoder term over the SP group (and is what
lets 1,024 frames fit at all), and a batching rollout engine (vLLM) shrinks the rollout part; on
one CPU process neither can show a speed-up: that needs the GPUs of an SP group.

Time is this process's CPU time with one torch thread: the machine is shared with other jobs,
and wall time under contention measured the neighbours (CPU time of single-threaded compute is
the work done). The rollout engine shares one prompt prefill across the G samples (prefix cache),
so both sides pay the decoder what a prefix-caching engine would. Vision is frozen in both
(encodes under no_grad, generous to the baseline).

    .venv/bin/python benchmarks/mrsp_reuse.py                       # all families, 128 frames
    .venv/bin/python benchmarks/mrsp_reuse.py --families qwen2_5_vl --frames 64,128,256
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from _model_flops import per_token_flops, real_configs

from lvr.models.family import VideoEmbeds, video_grid
from lvr.models.inputs import build_sample
from lvr.models.tiny import TINY_FAMILIES, tiny_vlm
from lvr.mrsp.batch import PromptInput, pack_batch, prompt_from_sample
from lvr.mrsp.encode import EmbeddingCache, VideoKey, encode_video
from lvr.mrsp.prefill import sp_prefill_logprobs
from lvr.mrsp.rollout import HFRolloutEngine

G = 8
MAX_NEW = 16
TARGET = 2.1
GATE_FRAMES = 128


def _prefills(
    model: torch.nn.Module, rows: Callable[[], list[PromptInput]], responses: list[torch.Tensor],
    pad: int,
) -> None:  # fmt: skip
    """old-policy + reference (no grad) and policy (with backward) prefills of the G sequences."""
    for _ in range(2):
        with torch.no_grad():
            sp_prefill_logprobs(model, pack_batch(model, rows(), responses, pad))
    out = sp_prefill_logprobs(model, pack_batch(model, rows(), responses, pad))
    (-(out.logprobs * out.mask).sum() / out.mask.sum()).backward()
    model.zero_grad(set_to_none=True)


def rl_step(
    model: torch.nn.Module, sample: dict, embed: Callable[[], VideoEmbeds], reuse: bool,
    eos: list[int], pad: int,
) -> int:  # fmt: skip
    """One RL-step-shaped workload. Returns the number of `embed` calls that ran the tower."""
    calls = 0

    def prompt() -> PromptInput:
        nonlocal calls
        calls += 1
        return prompt_from_sample(sample, embed(), key="video")

    engine = HFRolloutEngine(model, eos, pad)
    if reuse:
        p = prompt()  # the cache encodes on this first call only
        ro = engine.generate([p], n=G, max_new_tokens=MAX_NEW, seed=0)
        _prefills(model, lambda: [p] * G, ro.response_ids, pad)
        return 1
    for _ in range(G - 1):  # one encode per rollout; the decoder work is the same single call
        prompt()
    ro = engine.generate([prompt()], n=G, max_new_tokens=MAX_NEW, seed=0)
    # Every row of the old, ref and policy prefills carries (and re-encodes) its video.
    _prefills(model, lambda: [prompt() for _ in range(G)], ro.response_ids, pad)
    return calls


def _setup(name: str, layers: int, frames: int) -> tuple[torch.nn.Module, Any, dict]:
    model, proc = tiny_vlm(name, seed=0, layers=layers)
    pixels = np.random.default_rng(frames).integers(0, 256, (frames, 112, 112, 3), np.uint8)
    sample = build_sample(proc, "What happens first?", ["red", "blue"], frames=pixels, fps=2.0)
    return model, proc, {k: v for k, v in sample.items() if k != "attention_mask"}


def token_cost_ratio(model: torch.nn.Module, sample: dict, pad: int) -> dict[str, float]:
    """Measured CPU cost of one video token in the tower over one decoder token (no grad; the
    faster of two runs each, so one-off first-call costs do not count)."""
    pixels, grid = sample["pixel_values_videos"], video_grid(sample)
    encode_s, prefill_s = float("inf"), float("inf")
    with torch.no_grad():
        for _ in range(2):
            t0 = time.process_time()
            emb = encode_video(model, pixels, grid)
            encode_s = min(encode_s, time.process_time() - t0)
            p = prompt_from_sample(sample, emb)
            t0 = time.process_time()
            sp_prefill_logprobs(model, pack_batch(model, [p], [torch.tensor([9, 9])], pad))
            prefill_s = min(prefill_s, time.process_time() - t0)
    length = p.input_ids.numel() + 2
    return {"encode_s": encode_s, "prefill_s": prefill_s,
            "r": (encode_s / emb.rows) / (prefill_s / length)}  # fmt: skip


def measure(name: str, frames: int, layers: int, repeats: int) -> dict[str, Any]:
    """Time ours and the baseline for one family, frame count and decoder depth."""
    model, proc, sample = _setup(name, layers, frames)
    tok = proc.tokenizer
    eos, pad = [tok.convert_tokens_to_ids("<|im_end|>")], int(tok.pad_token_id)
    pixels, grid = sample["pixel_values_videos"], video_grid(sample)
    key = VideoKey("video", tuple(range(frames)), (112, 112))

    def fresh() -> VideoEmbeds:
        with torch.no_grad():
            return encode_video(model, pixels, grid)

    times: dict[str, list[float]] = {"ours": [], "baseline": []}
    counts = {}
    for _ in range(repeats):
        for kind in ("baseline", "ours"):
            cache = EmbeddingCache(model)
            embed = fresh if kind == "baseline" else (lambda c=cache: c.get(key, pixels, grid))
            t0 = time.process_time()
            n_enc = rl_step(model, sample, embed, kind == "ours", eos, pad)
            times[kind].append(time.process_time() - t0)
            counts[kind] = cache.encodes if kind == "ours" else n_enc
    ours, base = min(times["ours"]), min(times["baseline"])
    cost = token_cost_ratio(model, sample, pad)
    share = (base - ours) / base  # what the 4G - 1 extra encodes took of the baseline step
    return {
        "family": name, "frames": frames, "decoder_layers": layers,
        "video_tokens": int((sample["mm_token_type_ids"] == 2).sum()),
        "ours_s": round(ours, 3), "baseline_s": round(base, 3), "ratio": round(base / ours, 2),
        "r_measured": round(cost["r"], 3), "encode_share_of_ours": round(
            (base - ours) / (counts["baseline"] - 1) / ours, 3),
        "encode_share_of_baseline": round(share, 3),
        "encodes_ours": counts["ours"], "encodes_baseline": counts["baseline"],
    }  # fmt: skip


def realistic_layers(name: str, frames: int, r_real: float) -> int:
    """Decoder depth that gives the tiny model the real model's r (decoder cost ~ depth): from the
    measured r at depth 2, corrected once by the r measured at the first estimate."""
    layers = 2
    for _ in range(2):
        model, proc, sample = _setup(name, layers, frames)
        r = token_cost_ratio(model, sample, int(proc.tokenizer.pad_token_id))["r"]
        layers = max(2, round(layers * r / r_real))
    return layers


def main() -> None:
    """Run the benchmark and print one JSON line per measurement, then the summary line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=",".join(TINY_FAMILIES))
    ap.add_argument("--frames", default=str(GATE_FRAMES))
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    real = real_configs()
    measure("qwen2_5_vl", 8, 2, 1)  # warm-up: first calls pay one-off kernel and import costs
    rows = []
    for name in args.families.split(","):
        checkpoint, config = real[name]
        r_real = per_token_flops(config)["ratio"]
        for frames in (int(f) for f in args.frames.split(",")):
            layers = realistic_layers(name, frames, r_real)
            for kind, depth in (("tiny", 2), ("realistic", layers)):
                row = measure(name, frames, depth, args.repeats)
                row |= {"proportions": kind, "r_real": round(r_real, 3), "real_model": checkpoint}
                predicted = (4 * G * row["r_measured"] / (5 * G + 1) + 1) / (
                    row["r_measured"] / (5 * G + 1) + 1)  # fmt: skip
                row["predicted_ratio"] = round(predicted, 2)
                print(json.dumps(row), flush=True)
                rows.append(row)
    gated = [r for r in rows if r["proportions"] == "realistic" and r["frames"] >= GATE_FRAMES]
    gated = gated or [r for r in rows if r["proportions"] == "realistic"]
    worst = min(gated, key=lambda r: r["ratio"])
    print(json.dumps({
        "benchmark": "mrsp_reuse",
        "metric": "rl_step_cpu_time_ratio_reencode_over_reuse_realistic_proportions_min_families",
        "ours": worst["ours_s"], "baseline": worst["baseline_s"], "ratio": worst["ratio"],
        "target": TARGET, "met": all(r["ratio"] >= TARGET for r in gated),
        "per_family": {f"{r['family']}/{r['proportions']}/f{r['frames']}": r["ratio"] for r in rows},
    }))  # fmt: skip


if __name__ == "__main__":
    main()
