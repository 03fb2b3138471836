"""The published sizes of the real checkpoints lvr is used with, as transformers config values.

Written once, here, from each checkpoint's `config.json` on the Hugging Face Hub and its model
card (nothing is downloaded at run time). They serve wherever a real-size architecture is needed
without its weights: the FLOP proportions of `benchmarks/_model_flops.py` and the random-weight
models of `scripts/gpu_check_models.py`. Pure data plus one builder, so a GPU machine without
lvr's other dependencies can import it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

# The Qwen2-7B decoder: Qwen2-VL-7B, Qwen2.5-VL-7B and LLaVA-OneVision-7B all use it.
_QWEN2_7B = {
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-6,
}
_QWEN2_MROPE = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}
_QWEN3_MROPE = {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                "mrope_interleaved": True}  # fmt: skip
_QWEN25_VISION = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "tokens_per_second": 2,
    "hidden_act": "silu",
}
_QWEN3_VISION = {
    "depth": 27,
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_heads": 16,
    "patch_size": 16,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "num_position_embeddings": 2304,
    "deepstack_visual_indexes": [8, 16, 24],
    "hidden_act": "gelu_pytorch_tanh",
}


@dataclass(frozen=True)
class Published:
    """One real checkpoint's architecture.

    Attributes:
        checkpoint: Its hub id.
        model_type: transformers' `model_type` (also lvr's family name).
        params: Total parameters from the model card (None where the card gives none).
        text: `text_config` values.
        vision: `vision_config` values; `{}` keeps transformers' default tower (LLaVA's SigLIP).
        tie_word_embeddings: Whether the output head shares the input embeddings.
    """

    checkpoint: str
    model_type: str
    params: float | None
    text: dict[str, Any]
    vision: dict[str, Any] = field(default_factory=dict)
    tie_word_embeddings: bool = False

    def config(self, **kwargs: Any) -> Any:
        """The transformers config (random weights come from `from_config`); kwargs go to it."""
        from transformers import AutoConfig

        return AutoConfig.for_model(
            self.model_type,
            text_config=copy.deepcopy(self.text),
            vision_config=copy.deepcopy(self.vision) or None,
            tie_word_embeddings=self.tie_word_embeddings,
            **kwargs,
        )


PUBLISHED: dict[str, Published] = {
    "qwen2-vl-7b": Published(
        "Qwen/Qwen2-VL-7B-Instruct",
        "qwen2_vl",
        None,
        {**_QWEN2_7B, "max_position_embeddings": 32768, "rope_parameters": _QWEN2_MROPE},
        {
            "depth": 32,
            "embed_dim": 1280,
            "hidden_size": 3584,
            "num_heads": 16,
            "mlp_ratio": 4,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },  # fmt: skip
    ),
    "qwen2.5-vl-7b": Published(
        "Qwen/Qwen2.5-VL-7B-Instruct",
        "qwen2_5_vl",
        8.29e9,
        {**_QWEN2_7B, "max_position_embeddings": 128000, "rope_parameters": _QWEN2_MROPE},
        {**_QWEN25_VISION, "out_hidden_size": 3584},
    ),
    "qwen2.5-vl-3b": Published(
        "Qwen/Qwen2.5-VL-3B-Instruct",
        "qwen2_5_vl",
        3.75e9,
        {
            "vocab_size": 151936,
            "hidden_size": 2048,
            "intermediate_size": 11008,
            "num_hidden_layers": 36,
            "num_attention_heads": 16,
            "num_key_value_heads": 2,
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": 128000,
            "rope_parameters": _QWEN2_MROPE,
        },  # fmt: skip
        {**_QWEN25_VISION, "out_hidden_size": 2048},
        tie_word_embeddings=True,
    ),
    "qwen3-vl-8b": Published(
        "Qwen/Qwen3-VL-8B-Instruct",
        "qwen3_vl",
        8.77e9,
        {
            "vocab_size": 151936,
            "hidden_size": 4096,
            "intermediate_size": 12288,
            "num_hidden_layers": 36,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": 262144,
            "rope_parameters": _QWEN3_MROPE,
        },  # fmt: skip
        {**_QWEN3_VISION, "out_hidden_size": 4096},
    ),
    "qwen3-vl-30b-a3b": Published(
        "Qwen/Qwen3-VL-30B-A3B-Instruct",
        "qwen3_vl_moe",
        None,
        {
            "vocab_size": 151936,
            "hidden_size": 2048,
            "num_hidden_layers": 48,
            "num_attention_heads": 32,
            "num_key_value_heads": 4,
            "head_dim": 128,
            "num_experts": 128,
            "num_experts_per_tok": 8,
            "moe_intermediate_size": 768,
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": 262144,
            "rope_parameters": _QWEN3_MROPE,
        },  # fmt: skip
        {**_QWEN3_VISION, "out_hidden_size": 2048},
    ),
    # SigLIP-so400m at 384 px (transformers' default LLaVA-OneVision tower) before Qwen2-7B.
    "llava-onevision-7b": Published(
        "llava-hf/llava-onevision-qwen2-7b-ov-hf",
        "llava_onevision",
        None,
        {**_QWEN2_7B, "model_type": "qwen2", "max_position_embeddings": 32768},
    ),
}
