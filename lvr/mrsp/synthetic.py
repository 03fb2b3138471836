"""Tiny Qwen2.5-VL models and synthetic video prompts for MR-SP tests and benchmarks.

Self-contained (no tokenizer, no files): a model built from a config with seeded weights and prompts
made of random text ids around a `<|vision_start|> <|video_pad|>* <|vision_end|>` block, with the
exact pixel layout the Qwen2-VL video processor produces (`[T/2 * H/14 * W/14, 3*2*14*14]` rows,
grid `[T/2, H/14, W/14]`). The shared product builder lives in `lvr.models`; this module only
exists so MR-SP numerics can be checked at any shape (heads, frames, resolution) quickly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from lvr.mrsp.batch import PromptInput
from lvr.mrsp.encode import encode_video

PAD, BOS, EOS, VISION_START, VISION_END, IMAGE, VIDEO = 0, 1, 2, 3, 4, 5, 6
FIRST_TEXT_ID = 8


def tiny_config(
    heads: int = 2,
    kv_heads: int = 1,
    layers: int = 2,
    vision_depth: int = 2,
    vision_hidden: int = 64,
    vocab: int = 256,
    hidden: int = 128,
) -> Qwen2_5_VLConfig:
    """Build a tiny Qwen2.5-VL config (head_dim 64, M-RoPE sections [8, 12, 12]).

    Args:
        heads: Decoder attention heads (hidden = 64 * heads unless `hidden` is given).
        kv_heads: Decoder KV heads.
        layers: Decoder layers.
        vision_depth: Vision blocks (the last one full attention, others windowed).
        vision_hidden: Vision width.
        vocab: Vocabulary size.
        hidden: Decoder width (must be 64 * heads).

    Returns:
        The config, with sdpa attention.
    """
    text = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": 1 << 20,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 1e6,
            "mrope_section": [8, 12, 12],
        },
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "pad_token_id": PAD,
    }
    vision = {
        "depth": vision_depth,
        "hidden_size": vision_hidden,
        "intermediate_size": 2 * vision_hidden,
        "num_heads": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "tokens_per_second": 2,
        "window_size": 112,
        "fullatt_block_indexes": [vision_depth - 1],
        "out_hidden_size": hidden,
    }
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
        attn_implementation="sdpa",
    )


def tiny_model(seed: int = 0, **kwargs: int) -> Qwen2_5_VLForConditionalGeneration:
    """Build a seeded tiny model in eval mode, fp32 (kwargs go to `tiny_config`)."""
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(tiny_config(**kwargs)).eval()


@dataclass
class SyntheticVideo:
    """Pixel patches of one video as the processor lays them out.

    Attributes:
        pixel_values_videos: `[t * h * w, 3 * 2 * 14 * 14]`.
        grid_thw: `[3]` (t = frames / 2, h = H / 14, w = W / 14).
        video_id: A name for cache keys.
    """

    pixel_values_videos: torch.Tensor
    grid_thw: torch.Tensor
    video_id: str


def synthetic_video(frames: int, size: int = 112, seed: int = 0) -> SyntheticVideo:
    """Random pixels for `frames` frames of `size` x `size` (frames even, size a multiple of 28)."""
    g = torch.Generator().manual_seed(seed)
    t, hw = frames // 2, size // 14
    pixels = torch.randn(t * hw * hw, 3 * 2 * 14 * 14, generator=g)
    return SyntheticVideo(pixels, torch.tensor([t, hw, hw]), f"video-{seed}-{frames}x{size}")


def video_tokens(grid_thw: torch.Tensor, merge: int = 2) -> int:
    """Number of `<|video_pad|>` tokens (merged patches) of a grid."""
    return int(grid_thw.prod()) // (merge * merge)


def synthetic_prompt(
    grid_thw: torch.Tensor,
    n_before: int = 5,
    n_after: int = 7,
    seed: int = 0,
    vocab: int = 256,
    special: tuple[int, int, int] = (VISION_START, VIDEO, VISION_END),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt ids around one video block, and their mm_token_type_ids (2 on video tokens).

    Args:
        grid_thw: `[3]` the video's patch grid.
        n_before: Random text tokens before the video.
        n_after: Random text tokens after it.
        seed: RNG seed of the text.
        vocab: Text ids are drawn from [FIRST_TEXT_ID, vocab).
        special: (vision_start, video_pad, vision_end) ids of the model.

    Returns:
        (`[P]` ids, `[P]` types).
    """
    g = torch.Generator().manual_seed(seed)
    n_video = video_tokens(grid_thw)
    before = torch.randint(FIRST_TEXT_ID, vocab, (n_before,), generator=g)
    after = torch.randint(FIRST_TEXT_ID, vocab, (n_after,), generator=g)
    start, video, end = special
    ids = torch.cat(
        [
            before,
            torch.tensor([start]),
            torch.full((n_video,), video),
            torch.tensor([end]),
            after,
        ]
    )
    types = torch.zeros_like(ids)
    types[n_before + 1 : n_before + 1 + n_video] = 2
    return ids, types


def random_response(n: int, seed: int = 0, vocab: int = 256) -> torch.Tensor:
    """`[n]` random text ids (a stand-in for sampled responses)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(FIRST_TEXT_ID, vocab, (n,), generator=g)


def model_prompt(
    model: torch.nn.Module, frames: int = 4, size: int = 112, seed: int = 1
) -> PromptInput:
    """A `PromptInput` for a real Qwen2.5-VL `model`: a synthetic video encoded by its own tower
    and random text ids around it (the model's special ids and vocabulary).

    Returns:
        The prompt with the video embeddings filled in.
    """
    cfg = model.config
    v = synthetic_video(frames, size=size, seed=seed)
    special = (cfg.vision_start_token_id, cfg.video_token_id, cfg.vision_end_token_id)
    ids, types = synthetic_prompt(v.grid_thw, vocab=cfg.text_config.vocab_size, special=special)
    with torch.no_grad():
        emb = encode_video(model, v.pixel_values_videos, v.grid_thw)
    return PromptInput(ids, types, v.grid_thw, 1.0, emb, key=v.video_id)
