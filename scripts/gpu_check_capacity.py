"""The capacity model of `scripts/gpu_check.py` (docs/performance.md): peak memory per GPU.

peak(T, sp) = weights + 3 * b * N_train + casts              (static: replicated on every rank)
            + a_fwd * T / sp                                  (activations saved by the forward)
            + max(a_layer * T / sp [checkpointing] + 16 * V * S / sp,   (backward transient)
                  v_patch * patches / sp)                     (frozen vision-encode transient)

The per-token terms are counted, not guessed: autograd's saved-tensor hooks sum the bytes a
forward keeps for backward on two short inputs (the GPU run, or `--device cpu --only
layer_bytes` at real widths). The GPU run then checks the extrapolation against the allocator's
peak at long inputs and against the largest frame count that fits.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import gpu_check_models as gm
import torch


def saved_bytes(fn: Callable[[], torch.Tensor], exclude: set[int]) -> int:
    """Bytes of the distinct storages autograd saves for backward while `fn` runs.

    Args:
        fn: Runs a forward (grad enabled).
        exclude: Storage pointers not to count (parameters).

    Returns:
        The bytes (the activations a backward would need).
    """
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def layer_bytes_per_token(model: torch.nn.Module, tokens: tuple[int, int], amp: bool) -> float:
    """Activation bytes the first decoder layer saves per token (LoRA included when wrapped).

    Runs the layer alone on random hidden states in the model's current mode (training, no
    checkpointing) at two lengths: what a checkpointed layer rebuilds during backward.

    Args:
        model: The model as it will be trained.
        tokens: Two sequence lengths.
        amp: Run under bf16 autocast (as training on CUDA does).

    Returns:
        Bytes per token.
    """
    lm = gm.inner(model).language_model
    layer = lm.layers[0]
    device = next(model.parameters()).device
    dtype = lm.embed_tokens.weight.dtype  # the residual stream's dtype

    def make(n: int) -> tuple[int, Callable[[], Any]]:
        hidden = torch.randn(1, n, lm.config.hidden_size, device=device, dtype=dtype)
        hidden.requires_grad_(True)
        pos = torch.arange(n, device=device).expand(3, 1, n)

        def run() -> Any:
            with torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext():
                cos_sin = lm.rotary_emb(hidden, pos)
                return layer(hidden, attention_mask=None, position_embeddings=cos_sin)

        return n, run

    return bytes_per_token(make, tokens, param_storages(model))


def bytes_per_token(
    make: Callable[[int], tuple[int, Callable[[], Any]]], sizes: tuple[int, int], exclude: set[int]
) -> float:
    """Slope of the saved-activation bytes of a forward between two input sizes.

    Args:
        make: For a size n, returns (tokens, a function running the forward on that input).
        sizes: Two sizes.
        exclude: Storage pointers not to count (parameters).

    Returns:
        Bytes per token (constant terms, like autocast's weight copies, cancel).
    """
    points = []
    for n in sizes:
        tokens, fn = make(n)
        points.append((tokens, saved_bytes(fn, exclude)))
    (t1, b1), (t2, b2) = points
    return (b2 - b1) / (t2 - t1)


def param_storages(model: torch.nn.Module) -> set[int]:
    """Storage pointers of the parameters (saved weights are not activations)."""
    return {p.untyped_storage().data_ptr() for p in model.parameters()}


@dataclass
class MemoryPlan:
    """Inputs of the capacity model (module docstring) for one training or prefill configuration.

    Attributes:
        weights: Bytes of all parameters as held on the GPU.
        trainable: Trainable parameters N_train (their gradients and two AdamW moments resident).
        trainable_bytes: Bytes per trainable value b (4: fp32 masters / fp32 LoRA adapters).
        act_per_token: a_fwd, bytes the whole forward saves per token (counted, see `saved_bytes`).
        layer_per_token: a_layer, bytes one decoder layer saves per token without checkpointing
            (what a checkpointed layer rebuilds during backward); 0 without checkpointing.
        vocab: LM-head width V (fp32 logits of the S scored tokens).
        vision_per_patch: Transient bytes per patch of the frozen vision tower.
        cast_copies: Bytes of the bf16 copies autocast keeps of trainable fp32 weights.
    """

    weights: float
    trainable: float
    trainable_bytes: float
    act_per_token: float
    layer_per_token: float
    vocab: int
    vision_per_patch: float
    cast_copies: float = 0.0

    def peak(self, tokens: int, patches: int, scored: int, sp: int = 1) -> dict[str, float]:
        """Predicted peak bytes per GPU at `tokens` (sequence) and `patches` (vision input).

        MR-SP with `sp` ranks: every rank holds the whole model (no parameter sharding), its
        `tokens / sp` shard of the sequence (Ulysses attention holds `1/sp` of the heads over the
        full length: the same bytes) and encodes `patches / sp` patches.

        Returns:
            static, activations, transient and total bytes.
        """
        static = self.weights + self.trainable * self.trainable_bytes * 3 + self.cast_copies
        activations = self.act_per_token * tokens / sp
        backward = (self.layer_per_token * tokens + 16.0 * self.vocab * scored) / sp
        transient = max(backward, self.vision_per_patch * patches / sp)
        total = static + activations + transient
        return {"static": static, "activations": activations, "transient": transient,
                "total": total}  # fmt: skip

    def max_tokens(self, cap: float, tokens_per_patch: float, scored: int, sp: int = 1) -> int:
        """Largest sequence (video tokens, `tokens_per_patch` of them per patch) under `cap` bytes."""
        lo, hi = 0, 1 << 24
        while hi - lo > 1:
            mid = (lo + hi) // 2
            fits = self.peak(mid, int(mid / tokens_per_patch), scored, sp)["total"] <= cap
            lo, hi = (mid, hi) if fits else (lo, mid)
        return lo


def vision_bytes_per_patch(arch: dict[str, Any], dtype_bytes: int) -> float:
    """Transient bytes per patch inside one frozen vision block (input, qkv, attention output,
    MLP hidden x 3 for gated/up/activation) plus the pixel row: an estimate the GPU run checks."""
    v = arch["vision"]
    d, f = v["hidden_size"], v["intermediate_size"]
    row = 3 * v["temporal_patch_size"] * v["patch_size"] ** 2
    return dtype_bytes * (6 * d + 3 * f + row)
