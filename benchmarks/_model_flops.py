"""How much a video token costs in the vision tower vs the decoder of the real models, by FLOPs.

Used by `benchmarks/mrsp_reuse.py` to give its tiny models the proportions of real ones. Parameter
counts come from the real configurations instantiated on the `meta` device (no memory, no
download); FLOPs per token are 2 x the parameters a token goes through (the matmuls), plus
attention: 2 x context x attention width per layer for the decoder (causal: half the context on
average, QK and AV), and the same over the attended patches for the vision tower.

Sizes are the published ones of `lvr.models.published` (Qwen2-VL-7B-Instruct, Qwen2.5-VL-7B- and
3B-Instruct, Qwen3-VL-8B-Instruct, Qwen3-VL-30B-A3B-Instruct, LLaVA-OneVision-7B: transformers'
default SigLIP tower before the Qwen2-7B decoder); for Qwen3.5, transformers' own default
`Qwen3_5Config` (its docstring names Qwen/Qwen3.5-27B; its sizes were not checked against the
hub). A LLaVA-OneVision frame is always 384 px (729 patches, projected, then pooled to 196
tokens), whatever `frame_px` says.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForImageTextToText, Qwen3_5Config

from lvr.models.published import PUBLISHED

# lvr family (or size variant) -> the published checkpoint it is measured on.
_CHECKPOINTS = {
    "qwen2_vl": "qwen2-vl-7b",
    "qwen2_5_vl": "qwen2.5-vl-7b",
    "qwen2_5_vl_3b": "qwen2.5-vl-3b",
    "qwen3_vl": "qwen3-vl-8b",
    "qwen3_vl_moe": "qwen3-vl-30b-a3b",
    "llava_onevision": "llava-onevision-7b",
}


def real_configs() -> dict[str, tuple[str, Any]]:
    """family -> (checkpoint name, its config)."""
    configs = {
        family: (PUBLISHED[name].checkpoint, PUBLISHED[name].config())
        for family, name in _CHECKPOINTS.items()
    }
    configs["qwen3_5"] = ("transformers' default Qwen3_5Config", Qwen3_5Config())
    return configs


def _params(module: torch.nn.Module, skip: tuple[str, ...] = ()) -> int:
    return sum(p.numel() for n, p in module.named_parameters() if not any(s in n for s in skip))


def per_token_flops(config: Any, frame_px: int = 224, context: int = 4096) -> dict[str, float]:
    """Forward FLOPs per merged video token in the vision tower and per token in the decoder.

    Args:
        config: A full VLM config.
        frame_px: Frame side in pixels (224: 64 tokens per temporal patch for Qwen2.5-VL).
        context: Decoder context length the token attends within (prompt + video).

    Returns:
        {"vision": FLOPs per merged token, "decoder": FLOPs per decoder token, "ratio": their
        quotient, "vision_params", "decoder_active_params"}.
    """
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    lm = model.model.language_model
    vc, tc = config.vision_config, config.text_config
    if config.model_type == "llava_onevision":
        visual = model.model.vision_tower
        side = vc.image_size // vc.patch_size  # 27
        patches = side**2  # 729 a frame, all projected
        pooled = ((side + 1) // 2) ** 2  # 196 tokens a frame after the 2x2 pooling (ceil)
        tower = 2 * (_params(visual) + _params(model.model.multi_modal_projector)) * patches
        vision = (tower + 2 * vc.num_hidden_layers * patches * patches * vc.hidden_size) / pooled
    else:
        visual = model.model.visual
        merge = vc.spatial_merge_size**2
        width = getattr(vc, "embed_dim", None) or vc.hidden_size
        patches = (frame_px // vc.patch_size) ** 2  # attended per temporal patch (full attention)
        vision = 2 * _params(visual) * merge + 2 * vc.depth * patches * width * merge
    experts = _params(lm, ("embed_tokens",))
    active = experts
    if getattr(tc, "num_experts", None):  # a token runs top-k of the experts
        expert = _params(lm, ("embed_tokens", "self_attn", "norm", "gate.weight", "router"))
        active = experts - expert + expert * tc.num_experts_per_tok / tc.num_experts
    kinds = getattr(tc, "layer_types", None) or ["full_attention"] * tc.num_hidden_layers
    heads_dim = tc.num_attention_heads * (
        getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    )
    attention = 2 * context * heads_dim * sum(k == "full_attention" for k in kinds)
    decoder = 2 * active + attention
    return {"vision": float(vision), "decoder": float(decoder), "ratio": vision / decoder,
            "vision_params": float(_params(visual)), "decoder_active_params": float(active)}  # fmt: skip
