"""Batch collation and the model's own position ids, shared by SFT, RL rollout and eval.

Padding sides:
- "left" for generation: every prompt ends at the last column, so new tokens are appended to all rows
  at once. Also fine for training: positions come from the attention mask, not the column.
- "right" for training: prompt starts line up at column 0 and the padding sits after the labels.

Either way each per-token tensor (input_ids, attention_mask, mm_token_type_ids, labels) is padded
identically, so they stay aligned; per-video/per-image tensors are concatenated in sample order, which
is the order in which the model meets their placeholder tokens in the flattened batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

from lvr.models import family
from lvr.models.family import find_rope_owner
from lvr.models.inputs import IGNORE_INDEX, BatchDict

PaddingSide = Literal["left", "right"]

# Per-token tensors [1, L] and the value that pads them.
_TOKEN_KEYS = {
    "input_ids": None,
    "attention_mask": 0,
    "mm_token_type_ids": 0,
    "labels": IGNORE_INDEX,
}
# Per-visual-input tensors, concatenated along dim 0.
_VISUAL_KEYS = (
    "pixel_values_videos",
    "video_grid_thw",
    "second_per_grid_ts",
    "pixel_values",
    "image_grid_thw",
)


def _pad_row(row: torch.Tensor, length: int, value: int, side: PaddingSide) -> torch.Tensor:
    pad = torch.full((1, length - row.shape[1]), value, dtype=row.dtype, device=row.device)
    return torch.cat([pad, row] if side == "left" else [row, pad], dim=1)  # [1, length]


def _check_keys(samples: Sequence[BatchDict]) -> list[str]:
    allowed = set(_TOKEN_KEYS) | set(_VISUAL_KEYS)
    token_keys = [k for k in _TOKEN_KEYS if k in samples[0]]
    for i, sample in enumerate(samples):
        unknown = set(sample) - allowed
        if unknown:
            raise ValueError(f"sample {i} has keys collate does not know: {sorted(unknown)}")
        if [k for k in _TOKEN_KEYS if k in sample] != token_keys:
            raise ValueError(
                f"sample {i} has per-token keys {sorted(sample)}, sample 0 {token_keys}"
            )
        if sample["input_ids"].ndim != 2 or sample["input_ids"].shape[0] != 1:
            raise ValueError(
                f"sample {i}: input_ids must be [1, L], got {sample['input_ids'].shape}"
            )
    return token_keys


def collate(
    samples: Sequence[BatchDict],
    pad_token_id: int,
    padding_side: PaddingSide = "right",
) -> BatchDict:
    """Pad and stack samples from `build_sample` into one batch.

    Args:
        samples: Dicts with batch size 1 (input_ids [1, L_i], ...).
        pad_token_id: Id written into padded input_ids (e.g. `tokenizer.pad_token_id`).
        padding_side: "left" for generation, "right" for training (see module docstring).

    Returns:
        input_ids / attention_mask / mm_token_type_ids / labels [B, max L] (those present), and
        the visual tensors concatenated in sample order (pixel_values_videos [sum N, D],
        video_grid_thw [V, 3], second_per_grid_ts [V], and the image equivalents).

    Raises:
        ValueError: Empty list, unknown keys, samples with different per-token keys, bad shapes,
            bad padding side, whole videos of different frame counts.
    """
    if not samples:
        raise ValueError("collate got no samples")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    token_keys = _check_keys(samples)
    length = max(s["input_ids"].shape[1] for s in samples)
    batch: BatchDict = {}
    for key in token_keys:
        value = pad_token_id if key == "input_ids" else _TOKEN_KEYS[key]
        rows = [_pad_row(s[key], length, int(value), padding_side) for s in samples]
        batch[key] = torch.cat(rows, dim=0)  # [B, length]
    for key in _VISUAL_KEYS:
        parts = [s[key] for s in samples if key in s]
        if parts:
            _check_stackable(key, parts)
            batch[key] = torch.cat(parts, dim=0)
    return batch


def _check_stackable(key: str, parts: Sequence[torch.Tensor]) -> None:
    """Whole videos (`[1, F, C, H, W]`, LLaVA-OneVision) stack only with equal frame counts."""
    shapes = {tuple(p.shape[1:]) for p in parts}
    if parts[0].ndim == 5 and len(shapes) > 1:
        frames = sorted({s[0] for s in shapes})
        raise ValueError(
            f"{key}: videos of {frames} frames cannot share a batch of this model (its processor "
            "stacks whole videos); use micro_batch 1, or frames every video has"
        )


def rope_index(model: Any, batch: BatchDict) -> tuple[torch.Tensor, torch.Tensor]:
    """Compute the model's own position ids for a batch, and the M-RoPE deltas.

    For M-RoPE models (every Qwen-VL family) this calls the model's `get_rope_index` with
    mm_token_type_ids, grids, the family's timing inputs (`second_per_grid_ts` for Qwen2.5-VL)
    and the attention mask — the same call the model makes inside `forward`/`generate`. For 1-D
    RoPE models it returns `cumsum(mask) - 1`, which is what `generate` uses (a plain forward
    without position_ids would use the column index instead, wrong for left-padded rows).

    Args:
        model: The model (wrappers are looked through).
        batch: Output of `build_sample` or `collate`.

    Returns:
        (position_ids, deltas): [3, B, L] and [B, 1] for M-RoPE models, [B, L] and zeros [B, 1]
        otherwise. Padding positions are 0. A generated token at column j (0-based, counting the
        non-pad tokens before it as n) has position n + delta on all three axes.

    Raises:
        ValueError: An M-RoPE model and a batch without mm_token_type_ids.
    """
    mask = batch["attention_mask"]
    if find_rope_owner(model) is None:  # a text model, or a VLM with 1-D positions
        return family.token_positions(mask)
    if "mm_token_type_ids" not in batch:
        raise ValueError("batch lacks mm_token_type_ids: M-RoPE positions cannot be computed")
    return family.rope_index(
        model,
        batch["input_ids"],
        batch["mm_token_type_ids"],
        mask,
        video_grid_thw=batch.get("video_grid_thw"),
        second_per_grid_ts=batch.get("second_per_grid_ts"),
        image_grid_thw=batch.get("image_grid_thw"),
    )


def rope_position_ids(model: Any, batch: BatchDict) -> torch.Tensor:
    """Return the model's own position ids for `batch` (see `rope_index`).

    Pass them as `model(..., position_ids=...)` so training, reference and rollout forwards use
    identical positions, also when inputs are split or embedded by hand (sequence parallelism).

    Args:
        model: The model.
        batch: Output of `build_sample` or `collate`.

    Returns:
        [3, B, L] for M-RoPE models, [B, L] for 1-D RoPE models.
    """
    return rope_index(model, batch)[0]


def response_mask(tokens: torch.Tensor, eos_token_ids: Sequence[int]) -> torch.Tensor:
    """Mask generated tokens up to and including the first end token of each row.

    Args:
        tokens: Generated tokens [B, N] (what `generate` appended after the prompt columns).
        eos_token_ids: Ids that end a response (e.g. `generation_config.eos_token_id`).

    Returns:
        Long mask [B, N]: 1 for real response tokens, 0 for what follows the first end token.

    >>> response_mask(torch.tensor([[5, 2, 0, 0], [5, 6, 7, 8]]), [2]).tolist()
    [[1, 1, 0, 0], [1, 1, 1, 1]]
    """
    is_end = torch.isin(tokens, torch.tensor(list(eos_token_ids), device=tokens.device))
    ends_before = torch.cumsum(is_end.long(), dim=1) - is_end.long()  # ends strictly before j
    return (ends_before == 0).long()  # [B, N]


def append_tokens(
    batch: BatchDict, tokens: torch.Tensor, mask: torch.Tensor | None = None
) -> BatchDict:
    """Append generated (text) tokens to a left-padded prompt batch, keeping per-token keys aligned.

    The result is what RL scores: `rope_position_ids(model, result)` gives the positions generate
    used, so a teacher-forced forward reproduces the rollout logits.

    Args:
        batch: Prompt batch (`collate(..., padding_side="left")`), without labels.
        tokens: Generated tokens [B, N].
        mask: Attention mask of the tokens [B, N] (e.g. `response_mask`); default all ones.

    Returns:
        A new batch with input_ids / attention_mask / mm_token_type_ids (zeros: text) of length
        L + N; visual tensors unchanged.

    Raises:
        ValueError: Batch size mismatch, or the batch carries labels.
    """
    if "labels" in batch:
        raise ValueError("append_tokens expects a prompt batch without labels")
    if tokens.ndim != 2 or tokens.shape[0] != batch["input_ids"].shape[0]:
        raise ValueError(f"tokens must be [B, N] with B = {batch['input_ids'].shape[0]}")
    ones = torch.ones_like(tokens)
    mask = ones if mask is None else mask
    out = dict(batch)
    out["input_ids"] = torch.cat([batch["input_ids"], tokens.to(batch["input_ids"].dtype)], 1)
    attn = batch["attention_mask"]
    out["attention_mask"] = torch.cat([attn, mask.to(attn.dtype)], 1)  # [B, L + N]
    if "mm_token_type_ids" in batch:
        mm = batch["mm_token_type_ids"]
        out["mm_token_type_ids"] = torch.cat([mm, torch.zeros_like(tokens, dtype=mm.dtype)], 1)
    return out
