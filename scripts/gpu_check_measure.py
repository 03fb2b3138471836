"""The real-size measurements of `scripts/gpu_check.py`: sizes (`Plan`), the one-model-at-a-time
holder (`Models`), vision encode, the RL step, SFT steps, the largest-frame searches and Qwen3-VL.

Each function returns a JSON-able dict; `gpu_check.Runner` runs each fail-soft.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import gpu_check_capacity as gc
import gpu_check_models as gm
import gpu_check_steps as gs
import torch

from lvr.models.checkpointing import set_activation_checkpointing
from lvr.models.family import VideoEmbeds
from lvr.mrsp import EmbeddingCache, VideoKey, pack_batch, sp_prefill_logprobs

GIB = gs.GIB


@dataclasses.dataclass
class Plan:
    """Sizes of every measurement (the GPU plan; `dry()` shrinks them for the CPU dry run)."""

    big: str = "qwen2.5-vl-7b"  # encode, RL, LoRA SFT, the searches
    full: str = "qwen2.5-vl-3b"  # full fine-tuning (a 7B with fp32 AdamW does not fit 80 GB)
    qwen3: str = "qwen3-vl-8b"
    encode_frames: tuple[int, ...] = (64, 256, 1024)
    encode_size: int = 448
    # RL at the 1-GPU RL config's resolution (configs/rl/qwen25vl_1gpu.yaml: 224x224 frames).
    rl_frames: int = 256
    rl_size: int = 224
    rl_group: int = 8
    rl_new: int = 64
    rl_micro: int = 1
    rl_warmup: int = 16
    sft_frames: tuple[int, ...] = (64, 256)
    sft_size: int = 448  # configs/sft/qwen25vl_1gpu.yaml: max_pixels 448x448
    sft_target: int = 256
    sft_steps: int = 2
    lora_r: int = 64  # configs/*/qwen25vl_1gpu.yaml
    lora_alpha: int = 128
    sft_dropout: float = 0.05
    search_step: int = 32
    search_probes: int = 4
    sft_search_s: float = 90.0
    rl_search_s: float = 40.0
    rl_fit_frames: tuple[int, ...] = (64, 128)
    # Frames of the two short forwards whose saved bytes give the per-token slope.
    byte_sizes: tuple[int, int] = (4, 8)
    layer_tokens: tuple[int, int] = (256, 512)
    token_cap: int | None = None  # dry run only: probes above it raise an emulated OOM

    @classmethod
    def dry(cls) -> Plan:
        """Tiny sizes for `--cpu-dry-run`: every code path, seconds on a CPU."""
        return cls(
            encode_frames=(4, 8, 16), encode_size=56, rl_frames=8, rl_size=56, rl_group=2,
            rl_new=4, rl_warmup=4, sft_frames=(4, 8), sft_size=56, sft_target=8, sft_steps=1,
            lora_r=4, lora_alpha=8, search_step=4, search_probes=5, rl_fit_frames=(4, 8),
            layer_tokens=(16, 32), token_cap=120,
        )  # fmt: skip


class Models:
    """One model on the device at a time (a 7B and a 3B with optimizer states do not fit together)."""

    def __init__(self, plan: Plan, device: torch.device, dry: bool) -> None:
        self.plan, self.device, self.dry = plan, device, dry
        self.key: tuple[str, torch.dtype] | None = None
        self.model: torch.nn.Module | None = None
        self.builds: dict[str, float] = {}

    def arch(self, name: str) -> dict[str, Any]:
        """The architecture dict (tiny stand-in in the dry run)."""
        return gm.tiny_arch(name) if self.dry else gm.ARCHS[name]

    def get(self, name: str, dtype: torch.dtype) -> torch.nn.Module:
        """The model `name` in `dtype`, built on the device (random weights) unless held already."""
        if self.key != (name, dtype):
            self.free()
            t0 = time.time()
            self.model = gm.build_model(self.arch(name), self.device, dtype)
            gs.sync(self.device)
            self.builds[f"{name}/{dtype}"] = round(time.time() - t0, 2)
            self.key = (name, dtype)
        assert self.model is not None
        return self.model

    def free(self) -> None:
        """Drop the held model and return its memory."""
        self.model, self.key = None, None
        gs.reset_peak(self.device)


# ---------------------------------------------------------------------------------------------
# Real-size measurements
# ---------------------------------------------------------------------------------------------


def fit_size(arch: dict[str, Any], size: int) -> int:
    """`size` rounded up to whole merged patches of the family (28 px Qwen2.5-VL, 32 Qwen3-VL)."""
    unit = arch["vision"]["patch_size"] * arch["vision"]["spatial_merge_size"]
    return -(-size // unit) * unit


def model_dtype(device: torch.device) -> torch.dtype:
    """bf16 weights on CUDA (as `lvr.models.default_dtype`), fp32 on CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def encode(models: Models, plan: Plan, name: str) -> dict[str, Any]:
    """Vision-tower seconds and visual tokens per frame count, through lvr's `EmbeddingCache`
    (the family's own `get_video_features`; Qwen3-VL's DeepStack features included)."""
    dev, arch = models.device, models.arch(name)
    model = models.get(name, model_dtype(dev))
    size = fit_size(arch, plan.encode_size)

    def run(pixels: torch.Tensor, grid: torch.Tensor, frames: int) -> VideoEmbeds:
        key = VideoKey("gpu-check", tuple(range(frames)), (size, size))
        return EmbeddingCache(model).get(key, pixels, grid)  # tokens [N_video_tokens, D]

    run(*gm.video_pixels(arch, 4, size, dev, model.dtype), 4)  # warm-up
    rows = []
    for frames in plan.encode_frames:
        pixels, grid = gm.video_pixels(arch, frames, size, dev, model.dtype)
        gs.reset_peak(dev)
        t: dict[str, float] = {}
        with gs.phase(t, "s", dev):
            emb = run(pixels, grid, frames)
        flops = gm.vision_flops(model, arch, tuple(int(x) for x in grid))
        rows.append({"frames": frames, "size": size, "grid_thw": grid.tolist(),
                     "patches": int(grid.prod()), "visual_tokens": emb.rows,
                     "expected_tokens": gm.video_tokens(arch, frames, size),
                     "seconds": round(t["s"], 4), "tflops": round(flops / t["s"] / 1e12, 2),
                     "peak_gib": gs.peak_gib(dev)})  # fmt: skip
        del pixels, emb
    return {"arch": name, "source": arch["source"], "dtype": str(model.dtype), "rows": rows,
            "build_s": models.builds}  # fmt: skip


def _rl_runs(s: gs.RLSetup, plan: Plan, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Reuse on, off, on again (the spread of the two "on" runs is the noise)."""
    args = (plan.rl_group, plan.rl_new, plan.rl_micro, opt)
    on = gs.rl_step(s, True, *args)
    off = gs.rl_step(s, False, *args)
    again = gs.rl_step(s, True, *args)
    mean_on = (on["step_s"] + again["step_s"]) / 2
    return {"reuse_on": on, "reuse_off": off, "reuse_on_again": again,
            "speedup_reuse": round(off["step_s"] / mean_on, 3)}  # fmt: skip


def rl_step(models: Models, plan: Plan) -> dict[str, Any]:
    """One RL step (LoRA policy, reference = adapters off) with embedding reuse on, off, on.

    `lvr rl` runs the policy prefill without gradient checkpointing; if that runs out of memory
    here, the error is kept and the steps are rerun with checkpointing on (a measured fallback).
    """
    dev, arch = models.device, models.arch(plan.big)
    model = models.get(plan.big, model_dtype(dev))
    size = fit_size(arch, plan.rl_size)
    out: dict[str, Any] = {"arch": plan.big, "frames": plan.rl_frames, "size": size,
                           "video_tokens": gm.video_tokens(arch, plan.rl_frames, size),
                           "G": plan.rl_group, "max_new_tokens": plan.rl_new,
                           "micro_batch": plan.rl_micro, "lora_r": plan.lora_r,
                           "gradient_checkpointing": False}  # fmt: skip
    with gm.lora(model, plan.lora_r, plan.lora_alpha, 0.0, False) as policy:
        policy.train()  # as the recipe (LoRA dropout 0: RL config default)
        params = [p for p in policy.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-6, weight_decay=0.01)
        warm = gs.rl_setup(policy, arch, plan.rl_warmup, size, dev)
        gs.rl_step(warm, True, plan.rl_group, min(8, plan.rl_new), plan.rl_micro, opt)
        del warm
        s = gs.rl_setup(policy, arch, plan.rl_frames, size, dev)
        error = None
        try:
            out.update(_rl_runs(s, plan, opt))
        except RuntimeError as exc:
            if not gs.is_oom(exc):
                raise
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        if error is not None:  # outside the except: the failed step's tensors are released
            opt.zero_grad(set_to_none=True)
            gs.reset_peak(dev)
            out["no_checkpointing_error"] = error
            out["gradient_checkpointing"] = True
            set_activation_checkpointing(policy, True)
            out.update(_rl_runs(s, plan, opt))
    return out


def memory_plan(
    model: torch.nn.Module,
    arch: dict[str, Any],
    full: bool,
    checkpointing: bool,
    make: Callable[[int], tuple[int, Callable[[], Any]]],
    plan: Plan,
) -> tuple[gc.MemoryPlan, dict[str, float]]:
    """The capacity model's inputs for `model` as it is about to train, counted on short inputs.

    Saved bytes are counted by autograd hooks on two short forwards; with gradient checkpointing
    the hooks do not see what a checkpointed layer keeps (its input), added as layers x hidden x
    residual bytes. The layer's own no-checkpoint bytes are what backward rebuilds per layer.
    """
    dev = next(model.parameters()).device
    uniq = {id(p): p for p in model.parameters()}.values()
    trainable = sum(p.numel() for p in uniq if p.requires_grad)
    residual = gm.inner(model).language_model.embed_tokens.weight.element_size()
    act = gc.bytes_per_token(make, plan.byte_sizes, gc.param_storages(model))
    text = arch["text"]
    kept = text["num_hidden_layers"] * text["hidden_size"] * residual if checkpointing else 0.0
    layer = 0.0
    if checkpointing:
        set_activation_checkpointing(model, False)
        layer = gc.layer_bytes_per_token(model, plan.layer_tokens, amp=dev.type == "cuda")
        set_activation_checkpointing(model, True)
    mem = gc.MemoryPlan(
        weights=sum(p.numel() * p.element_size() for p in uniq), trainable=trainable,
        trainable_bytes=4, act_per_token=act + kept, layer_per_token=layer,
        vocab=text["vocab_size"], vision_per_patch=gc.vision_bytes_per_patch(arch, 2),
        cast_copies=2.0 * trainable if full and dev.type == "cuda" else 0.0,
    )  # fmt: skip
    return mem, dataclasses.asdict(mem)


def _predicted(mem: gc.MemoryPlan, tokens: int, patches: int, scored: int) -> float:
    return round(mem.peak(tokens, patches, scored)["total"] / GIB, 3)


def sft(models: Models, plan: Plan, name: str, full: bool, frames: tuple[int, ...],
        env: dict[str, Any], peak_tflops: float | None) -> dict[str, Any]:  # fmt: skip
    """SFT steps (gradient checkpointing, AdamW): tokens/s, MFU, peak vs predicted memory."""
    dev, arch = models.device, models.arch(name)
    size = fit_size(arch, plan.sft_size)
    if full:  # fp32 masters under bf16 autocast, vision frozen, projector trained (lvr sft)
        model = models.get(name, torch.float32)
        gm.freeze_for_full(model)
        ctx: Any = nullcontext(model)
    else:
        model = models.get(name, model_dtype(dev))
        ctx = gm.lora(model, plan.lora_r, plan.lora_alpha, plan.sft_dropout, True)
    try:
        with ctx as m:
            set_activation_checkpointing(m, True)
            m.train()
            params = [p for p in m.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-5 if full else 1e-4, weight_decay=0.0)

            def make(n: int) -> tuple[int, Callable[[], Any]]:
                b = gs.sft_batch(arch, n, size, plan.sft_target, dev)
                keep = torch.arange(b.first - 1, b.tokens - 1, device=dev)
                return b.tokens, lambda: m(**b.inputs, logits_to_keep=keep, use_cache=False).logits

            with gs.amp(dev):
                mem, mem_inputs = memory_plan(m, arch, full, True, make, plan)
            warm = gs.sft_batch(arch, frames[0], size, plan.sft_target, dev)
            gs.sft_step(m, warm, opt)  # warm-up: kernels, cuBLAS handles, AdamW states
            del warm
            peaks = (env.get("datasheet_bf16_tflops"), peak_tflops)
            rows = [_sft_row(m, arch, plan, f, size, full, opt, mem, peaks) for f in frames]
    finally:
        if full:
            models.free()  # the fp32 3B is used once
    return {"arch": name, "mode": "full" if full else f"lora r{plan.lora_r}", "size": size,
            "gradient_checkpointing": True, "rows": rows, "memory_model": mem_inputs}  # fmt: skip


def _sft_row(
    m: torch.nn.Module,
    arch: dict[str, Any],
    plan: Plan,
    frames: int,
    size: int,
    full: bool,
    opt: torch.optim.Optimizer,
    mem: gc.MemoryPlan,
    peaks: tuple[float | None, float | None],
) -> dict[str, Any]:
    """Timed SFT steps at one frame count: tokens/s, model FLOPs, MFU (datasheet and measured
    matmul peaks), measured and predicted peak memory."""
    dev = next(m.parameters()).device
    batch = gs.sft_batch(arch, frames, size, plan.sft_target, dev)
    r = gs.timed_sft(m, batch, opt, plan.sft_steps)
    flops = gm.lm_flops(m, arch, batch.tokens, batch.scored, batch.grid).train_step(full)
    achieved = flops / r["step_s"] / 1e12
    sheet, peak_tflops = peaks
    r.update({"frames": frames, "tokens": batch.tokens, "tokens_per_s": round(batch.tokens / r["step_s"], 1),
              "model_tflop_per_step": round(flops / 1e12, 3), "achieved_tflops": round(achieved, 1),
              "mfu_datasheet": round(achieved / sheet, 4) if sheet else None,
              "mfu_measured_matmul": round(achieved / peak_tflops, 4) if peak_tflops else None,
              "predicted_peak_gib": _predicted(mem, batch.tokens, int(torch.tensor(batch.grid).prod()),
                                               batch.scored)})  # fmt: skip
    return r


def _frames_guess(points: list[tuple[int, float]], cap_gib: float | None, default: int) -> int:
    """Frame count where the straight line through measured (frames, peak GiB) meets the cap."""
    pts = [(f, p) for f, p in points if p is not None]
    if cap_gib is None or len(pts) < 2:
        return default
    (f1, p1), (f2, p2) = pts[0], pts[-1]
    slope = (p2 - p1) / (f2 - f1)
    return default if slope <= 0 else int(f1 + (0.97 * cap_gib - p1) / slope)


def _sequence_tokens(arch: dict[str, Any], frames: int, size: int, extra: int) -> int:
    """Prompt tokens (video + text) of a synthetic video prompt, plus `extra` (target/response)."""
    grid = torch.tensor(gm.video_grid(arch, frames, size))
    return int(gm.video_prompt(arch, grid)[0].numel()) + extra


def _emulated_cap(plan: Plan, tokens: int) -> None:
    """Dry run only: raise an emulated out-of-memory error above the plan's token cap."""
    if plan.token_cap is not None and tokens > plan.token_cap:
        raise gs.EmulatedOOM(f"emulated (--cpu-dry-run): {tokens} tokens > cap {plan.token_cap}")


def _model_max_frames(mem: gc.MemoryPlan, arch: dict, size: int, scored: int, cap: float | None,
                      extra: int) -> int | None:  # fmt: skip
    """Frames the capacity model predicts to fit `cap` GiB (None without a cap)."""
    if cap is None:
        return None
    per_frame = gm.video_tokens(arch, 2, size) / 2  # visual tokens per frame
    tokens_per_patch = 1 / arch["vision"]["spatial_merge_size"] ** 2
    tokens = mem.max_tokens(cap * GIB, tokens_per_patch, scored)
    return int((tokens - extra) / per_frame)


def max_frames_sft(models: Models, plan: Plan, cap: float | None, sft_result: dict | None,
                   seconds: float) -> dict[str, Any]:  # fmt: skip
    """Most frames (448x448) of one 7B LoRA SFT step (checkpointing) under the memory cap."""
    dev, arch = models.device, models.arch(plan.big)
    model = models.get(plan.big, model_dtype(dev))
    size = fit_size(arch, plan.sft_size)
    rows = (sft_result or {}).get("rows", [])
    fitted = [r["frames"] for r in rows]
    with gm.lora(model, plan.lora_r, plan.lora_alpha, plan.sft_dropout, True) as m:
        set_activation_checkpointing(m, True)
        m.train()
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)

        def try_frames(frames: int) -> dict[str, Any]:
            tokens = _sequence_tokens(arch, frames, size, plan.sft_target)

            def run() -> None:
                _emulated_cap(plan, tokens)
                gs.sft_step(m, gs.sft_batch(arch, frames, size, plan.sft_target, dev), opt)

            return {"tokens": tokens, **gs.probe(run, dev)}

        guess = _frames_guess([(r["frames"], r["peak_gib"]) for r in rows], cap,
                              4 * max(plan.sft_frames))  # fmt: skip
        res = gs.search_max(try_frames, guess, plan.search_step, plan.search_probes,
                            time.time() + seconds, max(fitted, default=0))  # fmt: skip
    mem = (sft_result or {}).get("memory_model")
    predicted = None
    if mem:
        extra = _sequence_tokens(arch, 2, size, plan.sft_target) - gm.video_tokens(arch, 2, size)
        predicted = _model_max_frames(gc.MemoryPlan(**mem), arch, size, plan.sft_target, cap, extra)
    return {"arch": plan.big, "mode": f"lora r{plan.lora_r}, checkpointing", "size": size,
            "cap_gib": cap, "first_guess_frames": guess, "capacity_model_max_frames": predicted,
            **res}  # fmt: skip


def max_frames_rl(models: Models, plan: Plan, cap: float | None, seconds: float) -> dict[str, Any]:
    """Most frames (224x224) of the RL policy prefill (forward + backward, one row, 7B LoRA)."""
    dev, arch = models.device, models.arch(plan.big)
    model = models.get(plan.big, model_dtype(dev))
    size = fit_size(arch, plan.rl_size)
    response = gm.random_text(arch, plan.rl_new)
    with gm.lora(model, plan.lora_r, plan.lora_alpha, 0.0, False) as policy:
        policy.train()

        def batch(frames: int) -> Any:
            s = gs.rl_setup(policy, arch, frames, size, dev)
            return gs._to_device(pack_batch(s.base, [gs._prompt(s, False)], [response],
                                            arch["pad"]), dev)  # fmt: skip

        def prefill(b: Any) -> Any:
            with gs.amp(dev):
                return sp_prefill_logprobs(policy.get_base_model(), b)

        def try_frames(frames: int) -> dict[str, Any]:
            tokens = _sequence_tokens(arch, frames, size, plan.rl_new)

            def run() -> None:
                _emulated_cap(plan, tokens)
                out = prefill(batch(frames))
                (-(out.logprobs * out.mask).sum() / out.mask.sum()).backward()
                policy.zero_grad(set_to_none=True)

            return {"tokens": tokens, **gs.probe(run, dev)}

        def make(frames: int) -> tuple[int, Callable[[], Any]]:
            b = batch(frames)
            return int(b.input_ids.shape[1]), lambda: prefill(b).logprobs

        mem, mem_inputs = memory_plan(policy, arch, False, False, make, plan)
        points = [(f, try_frames(f)) for f in plan.rl_fit_frames]
        for f, r in points:
            patches = int(torch.tensor(gm.video_grid(arch, f, size)).prod())
            r["predicted_peak_gib"] = round(
                mem.peak(r["tokens"], patches, plan.rl_new)["total"] / GIB, 3
            )
        guess = _frames_guess(
            [(f, r["peak_gib"]) for f, r in points], cap, 4 * plan.rl_fit_frames[-1]
        )
        known = max((f for f, r in points if r["fits"]), default=0)
        res = gs.search_max(try_frames, guess, plan.search_step, plan.search_probes,
                            time.time() + seconds, known)  # fmt: skip
    extra = _sequence_tokens(arch, 2, size, plan.rl_new) - gm.video_tokens(arch, 2, size)
    return {"arch": plan.big, "mode": f"lora r{plan.lora_r}, no checkpointing (as lvr rl)",
            "size": size, "cap_gib": cap, "fit_points": [{"frames": f, **r} for f, r in points],
            "first_guess_frames": guess, "memory_model": mem_inputs,
            "capacity_model_max_frames": _model_max_frames(mem, arch, size, plan.rl_new, cap, extra),
            **res}  # fmt: skip


def qwen3(models: Models, plan: Plan, env: dict, peak_tflops: float | None) -> dict[str, Any]:
    """Qwen3-VL-8B through transformers' own modules: encode, and one LoRA SFT step per frame
    count (lvr.mrsp does not support this family yet)."""
    enc = encode(models, plan, plan.qwen3)
    lora = sft(models, plan, plan.qwen3, False, plan.sft_frames[:1], env, peak_tflops)
    models.free()
    return {"encode": enc, "sft_lora": lora}


def layer_bytes(device: torch.device, plan: Plan, dry: bool) -> dict[str, Any]:
    """Bytes one decoder layer saves per token for backward, at real widths (one-layer copies of
    the 7B and 3B: cheap on a CPU too), in each training configuration, bf16 autocast on."""
    out: dict[str, Any] = {}
    for name, dtype, configs in (
        (plan.big, torch.bfloat16, (("frozen_base", None), ("lora_rl", 0.0),
                                    ("lora_sft", plan.sft_dropout))),
        (plan.full, torch.float32, (("full_fp32_masters", None),)),
    ):  # fmt: skip
        arch = gm.tiny_arch(name) if dry else gm.ARCHS[name]
        arch = {**arch, "text": {**arch["text"], "num_hidden_layers": 1},
                "vision": {**arch["vision"], "depth": 1, "fullatt_block_indexes": [0]}}  # fmt: skip
        model = gm.build_model(arch, device, dtype).train()
        hidden = arch["text"]["hidden_size"]
        for label, dropout in configs:
            if label == "full_fp32_masters":
                gm.freeze_for_full(model)
                ctx: Any = nullcontext(model)
            elif dropout is None:
                ctx = nullcontext(
                    model
                )  # frozen bf16 base: what a trained input still makes it save
            else:
                ctx = gm.lora(model, plan.lora_r, plan.lora_alpha, dropout, False)
            with ctx as m:
                m.train()
                b = gc.layer_bytes_per_token(m, plan.layer_tokens, amp=True)
            out[f"{name}/{label}"] = {"bytes_per_token": b, "per_hidden_unit": round(b / hidden, 2),
                                      "hidden": hidden, "tokens": list(plan.layer_tokens)}  # fmt: skip
        del model
    return out
