"""The timed workloads of `scripts/gpu_check.py`: one RL step through `lvr.mrsp`, one SFT step,
and the largest-frame-count search (OOM caught, cache emptied).

The RL step follows `lvr rl`'s step (lvr/train/rl.py) with its own calls, not by importing the
recipe (being refactored): encode once with `EmbeddingCache`, G rollouts with `HFRolloutEngine`,
old-policy and reference prefills and the policy update with `pack_batch` +
`sp_prefill_logprobs` (group=None: one GPU), bf16 autocast on CUDA. With reuse off the vision
tower runs again for every rollout and every prefill row (the public code's behaviour, and
`reuse_embeddings=False` in lvr): 1 + (G - 1) + 3G encodes instead of 1.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import gpu_check_models as gm
import torch
import torch.nn.functional as F

from lvr.mrsp import (
    EmbeddingCache,
    HFRolloutEngine,
    PrefillBatch,
    PromptInput,
    VideoKey,
    pack_batch,
    sp_prefill_logprobs,
)
from lvr.mrsp.ulysses import ulysses_attention_enabled

IGNORE = -100
GIB = 1024**3


def sync(device: torch.device) -> None:
    """Wait for queued GPU work (timing reads the host clock)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def phase(timers: dict[str, float], name: str, device: torch.device) -> Iterator[None]:
    """Add the block's synchronised wall seconds to `timers[name]`."""
    sync(device)
    t0 = time.perf_counter()
    yield
    sync(device)
    timers[name] = timers.get(name, 0.0) + time.perf_counter() - t0


def reset_peak(device: torch.device) -> None:
    """Forget freed blocks and restart the allocator's high-water mark."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    """Peak allocated GiB since `reset_peak` (None on CPU: no allocator counters there)."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / GIB, 3)


def amp(device: torch.device):
    """bf16 autocast on CUDA, as the recipes use (`precision: auto`); nothing on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


# ---------------------------------------------------------------------------------------------
# RL step
# ---------------------------------------------------------------------------------------------


def _to_device(batch: PrefillBatch, device: torch.device) -> PrefillBatch:
    moved = {
        f.name: getattr(batch, f.name).to(device)
        for f in dataclasses.fields(batch)
        if isinstance(getattr(batch, f.name), torch.Tensor)
    }
    return dataclasses.replace(batch, **moved)


@dataclasses.dataclass
class RLSetup:
    """One prompt with its video, the LoRA policy and what a step needs."""

    policy: Any  # PeftModel
    base: torch.nn.Module
    arch: dict[str, Any]
    cache: EmbeddingCache
    key: VideoKey
    pixels: torch.Tensor  # [t*h*w, C*tp*p*p] on the device
    grid: torch.Tensor  # [3] on the CPU (prompts: positions are computed on the CPU)
    grid_dev: torch.Tensor  # [3] beside the pixels (the vision tower mixes grid and pixel devices)
    ids: torch.Tensor  # [P]
    types: torch.Tensor  # [P]
    device: torch.device


def rl_setup(policy: Any, arch: dict, frames: int, size: int, device: torch.device) -> RLSetup:
    """Synthetic video + prompt for an RL step on `policy` (a LoRA-wrapped model)."""
    base = policy.get_base_model()
    pixels, grid = gm.video_pixels(arch, frames, size, device, next(base.parameters()).dtype)
    ids, types = gm.video_prompt(arch, grid)
    key = VideoKey("gpu-check", tuple(range(frames)), (size, size))
    return RLSetup(
        policy, base, arch, EmbeddingCache(base), key, pixels, grid.cpu(), grid, ids, types, device
    )


def _prompt(s: RLSetup, reencode: bool) -> PromptInput:
    """The prompt with its embeddings: cached, or encoded again (`reuse_embeddings=False`)."""
    if reencode:
        s.cache.new_step()  # forget: the next get runs the vision tower again
    emb = s.cache.get(s.key, s.pixels, s.grid_dev)  # [N_video_tokens, D]
    return PromptInput(s.ids, s.types, s.grid, 1.0, emb, key="gpu-check")


def _prefill(
    s: RLSetup, model: torch.nn.Module, responses: list[torch.Tensor], reencode: bool
) -> Any:
    """`sp_prefill_logprobs` (one GPU: group None) of the rows, bf16 autocast on CUDA."""
    rows = [_prompt(s, reencode) for _ in responses]
    batch = _to_device(pack_batch(model, rows, responses, s.arch["pad"]), s.device)
    with amp(s.device):
        return sp_prefill_logprobs(model, batch)  # logprobs/entropy/mask [b, R]


def _logprobs(
    s: RLSetup, responses: list[torch.Tensor], reencode: bool, mb: int
) -> list[torch.Tensor]:
    """Per-row `[R_i]` log-probs without gradient (old policy, or reference with adapters off)."""
    out = []
    with torch.no_grad():
        for i in range(0, len(responses), mb):
            res = _prefill(s, s.base, responses[i : i + mb], reencode)
            out += [
                res.logprobs[b, : r.numel()].float() for b, r in enumerate(responses[i : i + mb])
            ]
    return out


def _padded(values: list[torch.Tensor], length: int) -> torch.Tensor:
    out = values[0].new_zeros(len(values), length)  # [b, R]
    for i, v in enumerate(values):
        out[i, : v.numel()] = v
    return out


def _update(
    s: RLSetup,
    responses: list[torch.Tensor],
    adv: torch.Tensor,
    old: list[torch.Tensor],
    ref: list[torch.Tensor],
    mb: int,
    opt: torch.optim.Optimizer,
    reencode: bool,
) -> float:
    """Clipped surrogate + k3 KL (the paper's defaults), token-mean, one optimizer step."""
    total = sum(r.numel() for r in responses)
    loss_sum = 0.0
    for i in range(0, len(responses), mb):
        out = _prefill(s, s.base, responses[i : i + mb], reencode)
        logp, mask = out.logprobs, out.mask  # [b, R]
        r = logp.shape[1]
        old_b, ref_b = _padded(old[i : i + mb], r), _padded(ref[i : i + mb], r)
        a = adv[i : i + mb, None].to(logp.device)  # [b, 1]
        ratio = torch.exp((logp - old_b).clamp(-20, 20))
        pg = torch.maximum(-a * ratio, -a * ratio.clamp(0.8, 1.3))
        d = ref_b - logp
        kl = (torch.exp(d) - d - 1).clamp(-10, 10)
        loss = ((pg + 0.01 * kl) * mask).sum() / total
        # With gradient checkpointing (the fallback) backward recomputes the decoder layers: under
        # the same Ulysses attention function as the forward, or the recompute would differ.
        with ulysses_attention_enabled(gm.inner(s.base).language_model.config):
            loss.backward()
        loss_sum += float(loss.detach())
    params = [p for p in s.policy.parameters() if p.requires_grad]
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss_sum


def rl_step(
    s: RLSetup, reuse: bool, g: int, new_tokens: int, mb: int, opt: torch.optim.Optimizer
) -> dict[str, Any]:
    """One GRPO step on one prompt: encode / rollout / old+ref prefill / update seconds.

    Rewards are synthetic (half the group right): the step's cost does not depend on them.
    """
    timers: dict[str, float] = {}
    dev = s.device
    s.cache.new_step()
    encodes0 = s.cache.encodes
    reset_peak(dev)
    with phase(timers, "encode_s", dev):
        prompt = _prompt(s, reencode=False)
    with phase(timers, "rollout_s", dev):
        if not reuse:  # one encode per rollout (the first was above)
            for _ in range(g - 1):
                _prompt(s, reencode=True)
        engine = HFRolloutEngine(s.base, [s.arch["eos"]], s.arch["pad"])
        training = s.base.training
        s.base.eval()  # in training mode a checkpointed model would generate without its KV cache
        ro = engine.generate(
            [prompt], n=g, temperature=1.0, top_p=0.99, max_new_tokens=new_tokens, seed=0
        )
        s.base.train(training)
    responses = ro.response_ids
    rewards = torch.tensor([float(i % 2) for i in range(g)])
    adv = (rewards - rewards.mean()) / (rewards.std() + 1e-6)  # GRPO, one group
    with phase(timers, "prefill_s", dev):
        old = _logprobs(s, responses, not reuse, mb)
        with s.policy.disable_adapter():
            ref = _logprobs(s, responses, not reuse, mb)
    with phase(timers, "update_s", dev):
        loss = _update(s, responses, adv, old, ref, mb, opt, reencode=not reuse)
    out = {k: round(v, 3) for k, v in timers.items()}
    out["step_s"] = round(sum(timers.values()), 3)
    out["encodes"] = s.cache.encodes - encodes0
    out["response_tokens"] = [int(r.numel()) for r in responses]
    out["prompt_tokens"] = int(s.ids.numel())
    out["peak_gib"] = peak_gib(dev)
    out["loss"] = loss
    return out


# ---------------------------------------------------------------------------------------------
# SFT step
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SFTBatch:
    """One video question + target: the model inputs, labels and sizes."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor  # [1, L]
    first: int  # first label position
    tokens: int
    scored: int
    grid: tuple[int, int, int]


def sft_batch(arch: dict, frames: int, size: int, target: int, device: torch.device) -> SFTBatch:
    """A one-sample batch as `lvr sft` builds it (right-padded, 3-D positions via mm_token_type_ids)."""
    pixels, grid = gm.video_pixels(arch, frames, size, device)
    ids, types = gm.video_prompt(arch, grid)
    answer = gm.random_text(arch, target, seed=1)
    input_ids = torch.cat([ids, answer])[None].to(device)  # [1, L]
    labels = torch.full_like(input_ids, IGNORE)
    labels[0, ids.numel() :] = answer.to(device)
    mm = torch.cat([types, torch.zeros_like(answer)])[None].to(device)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
              "mm_token_type_ids": mm, "pixel_values_videos": pixels,
              "video_grid_thw": grid.reshape(1, 3)}  # fmt: skip
    if arch["family"] == "qwen2_5_vl":
        inputs["second_per_grid_ts"] = torch.tensor([1.0], device=device)
    t, h, w = (int(x) for x in grid)
    return SFTBatch(inputs, labels, ids.numel(), input_ids.shape[1], target, (t, h, w))


def sft_step(model: torch.nn.Module, batch: SFTBatch, opt: torch.optim.Optimizer) -> float:
    """Forward (logits only where a label is predicted), cross-entropy, backward, AdamW step."""
    dev = batch.labels.device
    keep = torch.arange(batch.first - 1, batch.tokens - 1, device=dev)  # [K]
    with amp(dev):
        logits = model(**batch.inputs, logits_to_keep=keep, use_cache=False).logits  # [1, K, V]
    ce = F.cross_entropy(
        logits.float().flatten(0, 1), batch.labels[:, keep + 1].flatten(), ignore_index=IGNORE
    )
    ce.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(ce)


def timed_sft(model, batch: SFTBatch, opt, steps: int) -> dict[str, Any]:
    """Median seconds of `steps` SFT steps on one batch, and the peak memory."""
    dev = batch.labels.device
    reset_peak(dev)
    times, losses = [], []
    for _ in range(steps):
        t: dict[str, float] = {}
        with phase(t, "s", dev):
            losses.append(sft_step(model, batch, opt))
        times.append(t["s"])
    return {"step_s": round(statistics.median(times), 4), "all_step_s": [round(x, 4) for x in times],
            "loss": losses[-1], "peak_gib": peak_gib(dev)}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Largest frame count that fits: probes with OOM caught
# ---------------------------------------------------------------------------------------------


class EmulatedOOM(torch.OutOfMemoryError):
    """Raised by `--cpu-dry-run` probes above a token cap, so the search logic runs on CPU."""


def is_oom(exc: BaseException) -> bool:
    """An allocation failure: the allocator's OutOfMemoryError, or one a library reports itself
    (cuBLAS, a kernel's own cudaMalloc) as a RuntimeError."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text.lower() or "CUBLAS_STATUS_ALLOC_FAILED" in text
    )


def probe(run: Callable[[], Any], device: torch.device) -> dict[str, Any]:
    """Run one workload; an out-of-memory error is a result (fits=False), not a failure."""
    reset_peak(device)
    t0 = time.perf_counter()
    error = None
    try:
        run()
        sync(device)
    except RuntimeError as exc:  # torch.OutOfMemoryError is one (the dry run's emulated one too)
        if not is_oom(exc):
            raise
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    # Outside the except: its traceback (holding the step's tensors) is gone, the cache can empty.
    peak = peak_gib(device)
    reset_peak(device)
    return {"fits": error is None, "peak_gib": peak, "seconds": round(time.perf_counter() - t0, 2),
            "error": error}  # fmt: skip


def search_max(
    try_frames: Callable[[int], dict[str, Any]],
    guess: int,
    step: int,
    max_probes: int,
    deadline: float,
    known_fit: int = 0,
) -> dict[str, Any]:
    """Largest multiple of `step` frames that fits, starting at a predicted `guess`.

    Above the largest fit and below the smallest failure it bisects; while nothing has failed yet
    it climbs by an eighth (a near-miss guess should not cost a probe at twice the size: near the
    limit one probe of a long-video SFT step takes most of a minute). A probe is not started when
    the previous one's duration would overrun `deadline`.

    Args:
        try_frames: Runs a probe at a frame count (returns `probe`'s dict).
        guess: First frame count to try (a prediction).
        step: Resolution in frames.
        max_probes: Probe budget.
        deadline: `time.time()` after which no probe may still run.
        known_fit: A frame count already known to fit.

    Returns:
        max_fit_frames (largest that fitted), min_oom_frames (smallest that did not), the probes,
        and why the search stopped.
    """
    lo, hi = known_fit, None
    frames = max(step, guess // step * step, lo + step)
    probes: list[dict[str, Any]] = []
    stop = "resolution"
    while True:
        last = probes[-1].get("seconds", 0.0) if probes else 0.0
        if len(probes) >= max_probes:
            stop = "probe budget"
            break
        if time.time() + last > deadline:
            stop = "time budget"
            break
        r = {"frames": frames, **try_frames(frames)}
        probes.append(r)
        if r["fits"]:
            lo = max(lo, frames)
        else:
            hi = frames if hi is None else min(hi, frames)
        if hi is not None and hi - lo <= step:
            break
        climb = lo + max(step, lo // 8 // step * step)
        frames = climb if hi is None else max(lo + step, (lo + hi) // 2 // step * step)
    return {"max_fit_frames": lo or None, "min_oom_frames": hi, "resolution_frames": step,
            "stopped_by": stop, "probes": probes}  # fmt: skip
