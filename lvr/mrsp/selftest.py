"""SP-vs-single-process numerical checks, runnable on any group (2 gloo CPU ranks in the tests,
N GPUs via torchrun on a cluster).

Every check computes one thing twice on every rank, once sequence-parallel over the group and once
alone (group=None), and reports the largest absolute difference. `run_sp_checks` returns them as a
dict; `spawn_sp_checks` starts `world` local gloo processes and returns rank 0's dict.

    torchrun --nproc_per_node 2 -m lvr.mrsp.selftest     # prints the JSON dict on rank 0

Besides synthetic Qwen2.5-VL inputs at two head layouts, every tiny model family (Qwen2-VL,
Qwen2.5-VL, Qwen3-VL with DeepStack, Qwen3-VL-MoE, Qwen3.5 with gated delta-net layers,
LLaVA-OneVision with 1-D positions and frame-wise encoding) is checked on real prompts from its
own processor (`families`).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lvr.models import family
from lvr.models.family import VideoEmbeds
from lvr.models.inputs import build_sample
from lvr.models.tiny import TINY_FAMILIES, tiny_vlm
from lvr.mrsp.batch import PromptInput, pack_batch
from lvr.mrsp.comm import sync_sp_grads
from lvr.mrsp.encode import EmbeddingCache, VideoKey, encode_video, encode_video_sp
from lvr.mrsp.prefill import PrefillOutput, sp_prefill_logprobs
from lvr.mrsp.synthetic import PAD, random_response, synthetic_prompt, synthetic_video, tiny_model

# Units (temporal patches, or frames) per video: 3 (uneven over 2 ranks), 2 (even), 1 (fewer
# than the ranks); the synthetic Qwen2.5-VL videos have 2 frames a unit.
CHECK_PATCHES = (3, 2, 1)


@dataclass
class Case:
    """One video prompt to check: its patch rows, grid, prompt ids/types and timing."""

    pixels: torch.Tensor  # [t*h*w, C*T_patch*p*p] patch rows or [1, F, C, H, W] frames
    grid: torch.Tensor  # [3]
    ids: torch.Tensor  # [P]
    types: torch.Tensor  # [P]
    secs: float | None
    key: str


def _synthetic_cases() -> list[Case]:
    """Random patch rows and random text around one video block (Qwen2.5-VL layout)."""
    out = []
    for i, patches in enumerate(CHECK_PATCHES):
        v = synthetic_video(2 * patches, seed=i)
        ids, types = synthetic_prompt(v.grid_thw, n_before=3 + i, seed=i)
        out.append(Case(v.pixel_values_videos, v.grid_thw, ids, types, 0.5 + i, v.video_id))
    return out


def _family_cases(processor: object) -> list[Case]:
    """Real prompts of a family: the model's own chat template and processor over random frames
    (Qwen3-VL / Qwen3.5: one placeholder run per temporal patch between timestamp texts)."""
    out = []
    # The same unit counts for every family: Qwen's units are temporal patches of 2 frames,
    # LLaVA-OneVision's single frames.
    per_unit = family.frames_per_unit(processor)
    for i, patches in enumerate(CHECK_PATCHES):
        frames = patches * per_unit
        pixels = np.random.default_rng(i).integers(0, 256, (frames, 112, 112, 3), dtype=np.uint8)
        s = build_sample(processor, f"Question {i}?", ["red", "blue"], frames=pixels, fps=2.0 + i)
        secs = s.get("second_per_grid_ts")
        out.append(Case(
            s["pixel_values_videos"], family.video_grid(s), s["input_ids"][0],
            s["mm_token_type_ids"][0], None if secs is None else float(secs[0]), f"video-{i}",
        ))  # fmt: skip
    return out


def _prompts(cases: Sequence[Case], embeds: Sequence[VideoEmbeds]) -> list[PromptInput]:
    return [
        PromptInput(c.ids, c.types, c.grid, c.secs, e, key=c.key)
        for c, e in zip(cases, embeds, strict=True)
    ]


def _rows(prompts: list[PromptInput]) -> tuple[list[PromptInput], list[torch.Tensor]]:
    """Two responses of different lengths per prompt (right padding inside the batch)."""
    rows, resps = [], []
    for i, p in enumerate(prompts):
        for k in range(2):
            rows.append(p)
            resps.append(random_response(4 + 3 * k + i, seed=10 * i + k))
    return rows, resps


def _policy_loss(out: PrefillOutput) -> torch.Tensor:
    """A GRPO-like token-mean loss with varied advantages and an entropy term."""
    adv = torch.linspace(-1.0, 1.0, out.logprobs.shape[0])[:, None]  # [B, 1]
    per_tok = -adv * torch.exp(out.logprobs - out.logprobs.detach()) - 0.01 * out.entropy
    return (per_tok * out.mask).sum() / out.mask.sum()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) if a.numel() else 0.0


def _embeds_diff(a: VideoEmbeds, b: VideoEmbeds) -> float:
    parts = [_max_diff(a.tokens, b.tokens)]
    parts += [_max_diff(x, y) for x, y in zip(a.deepstack, b.deepstack, strict=True)]
    return max(parts) + float(len(a.deepstack) != len(b.deepstack))


def _encode_checks(
    model: torch.nn.Module, cases: Sequence[Case], group: dist.ProcessGroup
) -> dict[str, float]:
    res: dict[str, float] = {}
    cache = EmbeddingCache(model, group)
    for c in cases:
        with torch.no_grad():
            ref = encode_video(model, c.pixels, c.grid)
        key = VideoKey(c.key, tuple(range(int(c.grid[0]) * 2)), (112, 112))
        for _ in range(3):  # rollouts + old/ref/policy prefills ask again: served from the cache
            got = cache.get(key, c.pixels, c.grid)
        res[f"encode_t{int(c.grid[0])}"] = _embeds_diff(got, ref)
    res["encode_count"] = float(cache.encodes)
    return res


def _prefill_checks(
    model: torch.nn.Module, cases: Sequence[Case], group: dist.ProcessGroup
) -> dict[str, float]:
    with torch.no_grad():
        embeds = [encode_video(model, c.pixels, c.grid) for c in cases]
    rows, resps = _rows(_prompts(cases, embeds))
    batch = pack_batch(model, rows, resps, PAD)
    res: dict[str, float] = {}
    with torch.no_grad():
        one = sp_prefill_logprobs(model, batch, None)
        for block in (1, 3):
            two = sp_prefill_logprobs(model, batch, group, block=block)
            res[f"logprob_block{block}"] = _max_diff(two.logprobs, one.logprobs)
            res[f"entropy_block{block}"] = _max_diff(two.entropy, one.entropy)
        res["mask"] = _max_diff(two.mask, one.mask)
        # Pairing: shuffle the rows; each row must keep its own video and its own numbers.
        perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))
        shuffled = pack_batch(model, [rows[i] for i in perm], [resps[i] for i in perm], PAD)
        back = sp_prefill_logprobs(model, shuffled, group).logprobs
        r = one.logprobs.shape[1]
        res["pairing"] = _max_diff(_pad_cols(back, r), one.logprobs[perm])
    return res


def _pad_cols(x: torch.Tensor, r: int) -> torch.Tensor:
    return torch.cat([x, x.new_zeros(x.shape[0], r - x.shape[1])], 1) if x.shape[1] < r else x


def _grads(
    model: torch.nn.Module, cases: Sequence[Case], group: dist.ProcessGroup | None
) -> dict[str, torch.Tensor]:
    """Gradients of the policy loss w.r.t. all parameters, vision tower trained (SP encode too)."""
    model.zero_grad(set_to_none=True)
    embeds = [encode_video_sp(model, c.pixels, c.grid, group) for c in cases]
    rows, resps = _rows(_prompts(cases, embeds))
    _policy_loss(sp_prefill_logprobs(model, pack_batch(model, rows, resps, PAD), group)).backward()
    sync_sp_grads(model.parameters(), group)
    # A parameter the loss never reaches (LLaVA-OneVision's unused SigLIP post-norm) has no
    # gradient alone and zeros after `sync_sp_grads`: both mean none.
    return {
        n: p.grad.clone()
        for n, p in model.named_parameters()
        if p.grad is not None and bool(p.grad.any())
    }


def _grad_checks(
    model: torch.nn.Module, cases: Sequence[Case], group: dist.ProcessGroup
) -> dict[str, float]:
    one, two = _grads(model, cases, None), _grads(model, cases, group)
    fam = family.family_of(model)
    lm = [n for n in one if not family.is_vision_param(fam, n)]
    vis = [n for n in one if n not in lm]
    return {
        "grad_names_match": float(set(one) != set(two)),
        "grad_lm": max(_max_diff(one[n], two[n]) for n in lm),
        "grad_vision": max(_max_diff(one[n], two[n]) for n in vis),
        "grad_lm_norm": float(sum(one[n].norm() for n in lm)),
        "grad_vision_norm": float(sum(one[n].norm() for n in vis)),
    }


def _model_checks(
    model: torch.nn.Module, cases: Sequence[Case], group: dist.ProcessGroup
) -> dict[str, float]:
    return {**_prefill_checks(model, cases, group), **_grad_checks(model, cases, group)}


def run_sp_checks(
    group: dist.ProcessGroup | None = None, families: Sequence[str] = ()
) -> dict[str, float]:
    """Run every check on the current process group (all ranks must call it).

    Args:
        group: The SP group (default: the world).
        families: Also check the tiny model of each of these families (`lvr.models.tiny`) on
            real prompts from its processor: keys `<family>/...`.

    Returns:
        Check name -> max abs difference (or a count / norm for the `encode_count`, `*_norm` keys).
    """
    group = group if group is not None else dist.group.WORLD
    res: dict[str, float] = {}
    synthetic = _synthetic_cases()
    for heads, kv in ((2, 1), (4, 2)):
        model = tiny_model(seed=0, heads=heads, kv_heads=kv, hidden=64 * heads)
        for name, value in _model_checks(model, synthetic, group).items():
            res[f"h{heads}kv{kv}/{name}"] = value
    res.update(_encode_checks(tiny_model(seed=0), synthetic, group))
    for name in families:
        model, processor = tiny_vlm(name, seed=0)
        cases = _family_cases(processor)
        checks = {**_model_checks(model, cases, group), **_encode_checks(model, cases, group)}
        res.update({f"{name}/{k}": v for k, v in checks.items()})
    res["world"] = float(dist.get_world_size(group))
    return res


def _worker(rank: int, world: int, init_file: str, out_path: str, families: Sequence[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        res = run_sp_checks(families=families)
        if rank == 0:
            Path(out_path).write_text(json.dumps(res))
    finally:
        dist.destroy_process_group()


def spawn_sp_checks(world: int = 2, families: Sequence[str] = ()) -> dict[str, float]:
    """Start `world` gloo processes on this machine, run the checks, return rank 0's results."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        args = (world, os.path.join(tmp, "init"), out, tuple(families))
        mp.spawn(_worker, args=args, nprocs=world, join=True)
        return json.loads(Path(out).read_text())


def main() -> None:
    """torchrun entry point: run the checks on the launched world, print the dict on rank 0."""
    dist.init_process_group("gloo")  # the tiny check models run on CPU
    res = run_sp_checks(families=TINY_FAMILIES)
    if dist.get_rank() == 0:
        print(json.dumps(res, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
