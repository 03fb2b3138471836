"""Architectures, synthetic inputs, FLOP counts and the capacity model of `scripts/gpu_check.py`.

Real sizes are the published `config.json` values of each model (`lvr.models.published`; no
download: the weights are random, drawn by transformers' own initialisation on the GPU). `--cpu-dry-run` swaps each
architecture for a tiny one of the same family, so the same code runs here in seconds.

Imports only torch, transformers, peft and torch-only parts of lvr (what the GPU machine has),
never av/duckdb/polars/deepspeed (absent there).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

from lvr.models.checkpointing import set_activation_checkpointing
from lvr.models.family import family_of, lora_target_regex
from lvr.models.published import PUBLISHED
from lvr.mrsp.synthetic import (
    EOS,
    FIRST_TEXT_ID,
    IMAGE,
    PAD,
    VIDEO,
    VISION_END,
    VISION_START,
    synthetic_prompt,
)
from lvr.train.config import LORA_TARGETS

_QWEN_IDS = {
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
}
# Ids from 151643 (<|endoftext|>) up are special tokens: random prompt text stays below them.
_QWEN_TEXT_VOCAB = 151643


def _real(name: str) -> dict[str, Any]:
    """The architecture dict of a published Qwen checkpoint (`lvr.models.published`)."""
    real = PUBLISHED[name]
    return {
        "family": real.model_type,
        "source": f"{real.checkpoint} config.json (Hugging Face Hub); "
        f"model card: {real.params / 1e9:.2f}B params",
        "published_params": real.params,
        "text": real.text,
        "vision": real.vision,
        "ids": _QWEN_IDS,
        "tie_word_embeddings": real.tie_word_embeddings,
        "text_vocab": _QWEN_TEXT_VOCAB,
        "eos": 151645,  # <|im_end|>
        "pad": 151643,  # <|endoftext|>
    }


ARCHS: dict[str, dict[str, Any]] = {
    name: _real(name) for name in ("qwen2.5-vl-7b", "qwen2.5-vl-3b", "qwen3-vl-8b")
}

_TINY_IDS = {
    "image_token_id": IMAGE,
    "video_token_id": VIDEO,
    "vision_start_token_id": VISION_START,
    "vision_end_token_id": VISION_END,
}
_TINY_TEXT = {
    "vocab_size": 256,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 1 << 20,
}


def tiny_arch(name: str) -> dict[str, Any]:
    """The dry-run stand-in for `ARCHS[name]`: same family and code path, tiny widths.

    Args:
        name: A key of `ARCHS`.

    Returns:
        An architecture dict (head_dim 64; the 3B stand-in has one more layer than the 7B one).
    """
    real = ARCHS[name]
    arch = {
        "family": real["family"],
        "source": f"tiny stand-in for {name} (--cpu-dry-run)",
        "published_params": None,
        "ids": _TINY_IDS,
        "tie_word_embeddings": False,
        "text_vocab": 256,
        "eos": EOS,
        "pad": PAD,
    }
    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]}
    layers = 3 if name.endswith("3b") else 2
    if real["family"] == "qwen3_vl":
        rope["mrope_interleaved"] = True
        vision = {"depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2,
                  "out_hidden_size": 128, "patch_size": 16, "spatial_merge_size": 2,
                  "temporal_patch_size": 2, "num_position_embeddings": 64,
                  "deepstack_visual_indexes": [1], "hidden_act": "gelu_pytorch_tanh"}  # fmt: skip
        text = {**_TINY_TEXT, "head_dim": 64}
    else:
        vision = {**PUBLISHED["qwen2.5-vl-7b"].vision, "depth": 2, "hidden_size": 64, "intermediate_size": 128,
                  "num_heads": 2, "fullatt_block_indexes": [1], "out_hidden_size": 128}  # fmt: skip
        text = dict(_TINY_TEXT)
    arch["text"] = {**text, "num_hidden_layers": layers, "rope_parameters": rope}
    arch["vision"] = vision
    return arch


def build_config(arch: dict[str, Any]) -> Qwen2_5_VLConfig | Qwen3VLConfig:
    """The transformers config of an architecture dict, with SDPA attention."""
    cls = Qwen3VLConfig if arch["family"] == "qwen3_vl" else Qwen2_5_VLConfig
    text = {**copy.deepcopy(arch["text"]), "bos_token_id": arch["pad"],
            "eos_token_id": arch["eos"], "pad_token_id": arch["pad"]}  # fmt: skip
    return cls(
        text_config=text,
        vision_config=copy.deepcopy(arch["vision"]),
        tie_word_embeddings=arch["tie_word_embeddings"],
        attn_implementation="sdpa",
        **arch["ids"],
    )


def build_model(
    arch: dict[str, Any], device: str | torch.device, dtype: torch.dtype
) -> torch.nn.Module:
    """Random-weight model built directly on `device` (initialised there: no host copy), eval mode."""
    cls = (
        Qwen3VLForConditionalGeneration
        if arch["family"] == "qwen3_vl"
        else Qwen2_5_VLForConditionalGeneration
    )
    with torch.device(device):
        model = cls._from_config(build_config(arch), dtype=dtype)
    return model.eval()


def count_params(model: torch.nn.Module) -> int:
    """Parameters, each shared tensor once (tied embeddings)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# ---------------------------------------------------------------------------------------------
# Synthetic inputs
# ---------------------------------------------------------------------------------------------


def video_grid(arch: dict[str, Any], frames: int, size: int) -> tuple[int, int, int]:
    """(t, h, w) patch grid of `frames` square frames of `size` px, as the processor makes it.

    Raises:
        ValueError: When frames or size do not tile into whole temporal patches / merged patches.
    """
    v = arch["vision"]
    unit = v["patch_size"] * v["spatial_merge_size"]
    if frames % v["temporal_patch_size"] or size % unit:
        raise ValueError(
            f"frames must be a multiple of {v['temporal_patch_size']} and size of {unit}"
        )
    side = size // v["patch_size"]
    return frames // v["temporal_patch_size"], side, side


def video_tokens(arch: dict[str, Any], frames: int, size: int) -> int:
    """Visual tokens of a video: t * h * w / merge^2 (what the decoder sees)."""
    t, h, w = video_grid(arch, frames, size)
    return t * h * w // arch["vision"]["spatial_merge_size"] ** 2


def video_pixels(
    arch: dict[str, Any],
    frames: int,
    size: int,
    device: str | torch.device,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random patch rows `[t*h*w, 3*tp*p*p]` and grid `[3]` (random, never zeros: zeros run fast)."""
    v = arch["vision"]
    t, h, w = video_grid(arch, frames, size)
    gen = torch.Generator(device=device).manual_seed(seed)
    row = 3 * v["temporal_patch_size"] * v["patch_size"] ** 2
    pixels = torch.randn(t * h * w, row, generator=gen, device=device, dtype=dtype)
    return pixels, torch.tensor([t, h, w], device=device)


def random_text(arch: dict[str, Any], n: int, seed: int = 0) -> torch.Tensor:
    """`[n]` ordinary text ids (no special token)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(FIRST_TEXT_ID, arch["text_vocab"], (n,), generator=gen)


def video_prompt(
    arch: dict[str, Any], grid: torch.Tensor, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt ids `[P]` and mm_token_type_ids `[P]` (2 on video tokens) around one video.

    Qwen2.5-VL: one `<|vision_start|> <|video_pad|>*N <|vision_end|>` block (`lvr.mrsp.synthetic`).
    Qwen3-VL: one block per temporal patch, as its processor writes them (timestamps left out);
    its `get_rope_index` takes one grid row per video-token run.
    """
    ids = arch["ids"]
    special = (ids["vision_start_token_id"], ids["video_token_id"], ids["vision_end_token_id"])
    if arch["family"] != "qwen3_vl":
        return synthetic_prompt(grid.cpu(), 24, 16, seed, arch["text_vocab"], special)
    t, h, w = (int(x) for x in grid.reshape(3))
    per_t = h * w // arch["vision"]["spatial_merge_size"] ** 2
    block = torch.tensor([special[0], *[special[1]] * per_t, special[2]])
    parts = [random_text(arch, 24, seed), *[block] * t, random_text(arch, 16, seed + 1)]
    out = torch.cat(parts)
    return out, (out == special[1]).long() * 2


# ---------------------------------------------------------------------------------------------
# LoRA and trainable parts (the recipes' choices)
# ---------------------------------------------------------------------------------------------


@contextmanager
def lora(model: torch.nn.Module, r: int, alpha: int, dropout: float, train_projector: bool):
    """Wrap `model` with LoRA on the language model's linears (the recipes' targets); unload after.

    Yields:
        The `PeftModel` (adapters fp32, base weights untouched); the projector trainable if asked.
    """
    from peft import LoraConfig, get_peft_model

    targets = lora_target_regex(family_of(model), LORA_TARGETS)
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
    peft_model = get_peft_model(model, cfg)
    for name, p in peft_model.named_parameters():
        if ".visual.merger." in name:
            p.requires_grad_(train_projector)
    try:
        yield peft_model
    finally:
        peft_model.unload()  # removes the adapters from `model` in place
        if hasattr(model, "peft_config"):
            del model.peft_config
        model.requires_grad_(False)
        set_activation_checkpointing(model, False)
        model.eval()


def freeze_for_full(model: torch.nn.Module) -> None:
    """Full fine-tuning as `lvr sft` does it by default: LM + projector trained, vision frozen."""
    for name, p in model.named_parameters():
        frozen = ".visual." in name and ".visual.merger." not in name
        p.requires_grad_(not frozen)


# ---------------------------------------------------------------------------------------------
# FLOPs (model FLOPs: no recomputation counted; 2 per multiply-add)
# ---------------------------------------------------------------------------------------------


def _linear_weights(module: torch.nn.Module) -> int:
    """Weights of the dense layers (Linear, Conv3d patch embedding) of a module, LoRA excluded."""
    dense = (torch.nn.Linear, torch.nn.Conv3d)
    return sum(
        m.weight.numel()
        for name, m in module.named_modules()
        if isinstance(m, dense) and "lora_" not in name
    )


def inner(model: torch.nn.Module) -> torch.nn.Module:
    """The `...Model` inside a `...ForConditionalGeneration` (through a PeftModel too)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model


@dataclass
class Flops:
    """Forward FLOPs of one sequence, split by where they happen.

    Attributes:
        vision: The vision tower (patch embedding, blocks, attention per window/frame, mergers).
        lm_linear: The decoder's dense layers over all tokens.
        lm_attention: Causal attention scores and values (2 * T^2 * q_dim per layer).
        head: The LM head over the scored tokens only.
    """

    vision: float
    lm_linear: float
    lm_attention: float
    head: float

    def train_step(self, full: bool) -> float:
        """Model FLOPs of forward + backward (frozen vision: forward only).

        Full fine-tuning: backward = 2 x forward (input and weight gradients). LoRA on a frozen
        base: backward = input gradients only (1 x the dense forward) + 2 x attention.
        """
        dense = self.lm_linear + self.head
        backward = (2.0 if full else 1.0) * dense + 2.0 * self.lm_attention
        return self.vision + dense + self.lm_attention + backward


def vision_flops(model: torch.nn.Module, arch: dict[str, Any], grid: tuple[int, int, int]) -> float:
    """Forward FLOPs of the vision tower on one video grid (dense + windowed/full attention)."""
    v = arch["vision"]
    visual = inner(model).visual
    t, h, w = grid
    patches = t * h * w
    merged = patches // v["spatial_merge_size"] ** 2
    merger = sum(
        _linear_weights(m) for n, m in visual.named_children() if "merger" in n
    )  # applied to merged tokens
    dense = 2.0 * (_linear_weights(visual) - merger) * patches + 2.0 * merger * merged
    d = v["hidden_size"]
    full_seq = h * w  # full attention: within one temporal patch
    if arch["family"] == "qwen3_vl":
        full_layers, window_seq = v["depth"], full_seq
    else:
        full_layers = len(v["fullatt_block_indexes"])
        window_seq = min(full_seq, (v["window_size"] // v["patch_size"]) ** 2)
    attn = 4.0 * d * patches * (full_layers * full_seq + (v["depth"] - full_layers) * window_seq)
    return dense + attn


def lm_flops(
    model: torch.nn.Module, arch: dict[str, Any], tokens: int, scored: int, grid: tuple
) -> Flops:
    """Forward FLOPs of one sequence of `tokens` (video included) with `scored` LM-head positions."""
    lm = inner(model).language_model
    text = arch["text"]
    q_dim = text["num_attention_heads"] * text.get(
        "head_dim", text["hidden_size"] // text["num_attention_heads"]
    )
    attention = 2.0 * tokens * tokens * q_dim * text["num_hidden_layers"]  # causal half of 4*T^2*q
    head = 2.0 * text["hidden_size"] * text["vocab_size"] * scored
    return Flops(
        vision_flops(model, arch, grid), 2.0 * _linear_weights(lm) * tokens, attention, head
    )
