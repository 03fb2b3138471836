"""Prompt/response batches for MR-SP: one video per row, 3-D positions from the model itself.

A `PromptInput` carries its own video embeddings (`VideoEmbeds`: merged tokens, and DeepStack
features for Qwen3-VL), so a video can never be attached to another prompt's responses (the public
code's re-balancing defect): rows are built from (prompt, response) pairs and every row checks
that its `<|video_pad|>` count equals its embedding rows. Position ids come from the model's own
`get_rope_index` with `mm_token_type_ids` (0 text, 1 image, 2 video) and the family's timing
inputs, the same function `generate` uses, so rollout and training see identical 3-D M-RoPE
positions (without `mm_token_type_ids` transformers silently falls back to 1-D positions). A
Qwen3-VL prompt's video is several runs of placeholders (one per temporal patch, between
timestamp texts); everything here counts placeholders, never assumes one run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from lvr.models import family
from lvr.models.family import FamilyError, VideoEmbeds
from lvr.mrsp.comm import MrspError

VIDEO_TYPE = 2  # mm_token_type_ids value of video tokens (0 text, 1 image)


@dataclass
class PromptInput:
    """One prompt with exactly one video, its embeddings already computed (or cached).

    Attributes:
        input_ids: `[P]` prompt token ids (chat template applied, `<|video_pad|>` expanded).
        mm_token_type_ids: `[P]` 0 text / 2 video.
        video_grid_thw: `[3]` grid of the video (`lvr.models.family.video_grid`: the (t, h, w)
            temporal-patch grid, or (frames, height, width)).
        second_per_grid_ts: Seconds per temporal patch (temporal patch size / sampling fps) for
            the families timed that way (Qwen2.5-VL); None for the others.
        video_embeds: The video's embeddings (`EmbeddingCache.get`): `[N_video_tokens, D]`
            tokens and the DeepStack features.
        key: Identifies the video (for error messages and pairing checks).
    """

    input_ids: torch.Tensor
    mm_token_type_ids: torch.Tensor
    video_grid_thw: torch.Tensor
    second_per_grid_ts: float | None
    video_embeds: VideoEmbeds
    key: object = None


@dataclass
class PrefillBatch:
    """Right-padded prompt + response rows ready for `sp_prefill_logprobs`.

    Attributes:
        input_ids: `[B, L]` prompt then response, right-padded.
        attention_mask: `[B, L]` 1 on real tokens.
        response_mask: `[B, L]` 1 on response tokens (the ones scored).
        mm_token_type_ids: `[B, L]` 2 on the prompt's video tokens (a `<|video_pad|>` id sampled
            inside a response stays text, as it is during generation).
        position_ids: `[3, B, L]` 3-D M-RoPE positions from `get_rope_index`, or `[B, L]`
            for a family with 1-D positions.
        video_embeds: One `VideoEmbeds` (`N_b` rows) per row.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    mm_token_type_ids: torch.Tensor
    position_ids: torch.Tensor
    video_embeds: list[VideoEmbeds]


def prompt_from_sample(
    sample: Mapping[str, torch.Tensor], video_embeds: VideoEmbeds, key: object = None
) -> PromptInput:
    """Turn one `lvr.models.inputs.build_sample` prompt (batch size 1, no target) into a PromptInput.

    Args:
        sample: Its tensors (input_ids, mm_token_type_ids, the video, and second_per_grid_ts
            for the families that take it).
        video_embeds: From `EmbeddingCache.get(key, sample["pixel_values_videos"], grid)`.
        key: The video's cache key (kept for error messages).

    Returns:
        The prompt.

    Raises:
        MrspError: When a tensor is missing, the batch is not 1, or the sample has labels.
    """
    need = ("input_ids", "mm_token_type_ids", "pixel_values_videos")
    missing = [k for k in need if k not in sample]
    if missing or sample["input_ids"].shape[0] != 1 or "labels" in sample:
        raise MrspError(
            f"need one video prompt without a target (missing {missing}, "
            f"batch {sample['input_ids'].shape[0] if 'input_ids' in sample else '?'})"
        )
    secs = sample.get("second_per_grid_ts")
    return PromptInput(
        sample["input_ids"][0],
        sample["mm_token_type_ids"][0],
        family.video_grid(sample),
        None if secs is None else float(secs[0]),
        video_embeds,
        key,
    )


def rope_positions(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    mm_token_type_ids: torch.Tensor,
    video_grid_thw: torch.Tensor,
    second_per_grid_ts: torch.Tensor | None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The model's own positions (what `generate` uses): 3-D from `get_rope_index`, or 1-D.

    Args:
        model: A VLM of a family lvr knows.
        input_ids: `[B, L]`.
        mm_token_type_ids: `[B, L]`.
        video_grid_thw: `[n_videos, 3]` in row order.
        second_per_grid_ts: `[n_videos]` (families timed by it), or None.
        attention_mask: `[B, L]` or None.

    Returns:
        `[3, B, L]` (M-RoPE) or `[B, L]` (1-D) long positions, 0 on padding.

    Raises:
        MrspError: The family needs `second_per_grid_ts` and it is missing.
    """
    try:
        pos, _ = family.rope_index(
            model, input_ids, mm_token_type_ids, attention_mask, video_grid_thw,
            second_per_grid_ts,
        )  # fmt: skip
    except FamilyError as exc:
        raise MrspError(str(exc)) from None
    return pos


def check_prompt(p: PromptInput, video_token_id: int) -> None:
    """Raise MrspError unless the prompt's video tokens, types and embeddings agree."""
    n_tok = int((p.input_ids == video_token_id).sum())
    n_type = int((p.mm_token_type_ids == VIDEO_TYPE).sum())
    embeds = p.video_embeds
    if not (n_tok == n_type == embeds.rows) or any(
        d.shape[0] != embeds.rows for d in embeds.deepstack
    ):
        raise MrspError(
            f"prompt {p.key!r}: {n_tok} <|video_pad|> tokens, {n_type} video-typed tokens and "
            f"{embeds.rows} embedding rows must agree (video attached to the wrong prompt?)"
        )


def pack_batch(
    model: torch.nn.Module,
    prompts: Sequence[PromptInput],
    responses: Sequence[torch.Tensor],
    pad_token_id: int,
) -> PrefillBatch:
    """Pair each prompt with its response into one right-padded batch.

    Args:
        model: The VLM (for `get_rope_index` and the video token id).
        prompts: One prompt per row (repeat a prompt G times for its G rollouts).
        responses: `[R_b]` response ids per row (may include the final eos).
        pad_token_id: Id written on padding.

    Returns:
        The `PrefillBatch`.

    Raises:
        MrspError: On a count mismatch or an empty response.
    """
    if len(prompts) != len(responses):
        raise MrspError(f"{len(prompts)} prompts but {len(responses)} responses")
    video_token_id = family.video_token_id(model)
    rows = []
    for p, r in zip(prompts, responses, strict=True):
        check_prompt(p, video_token_id)
        if r.numel() == 0:
            raise MrspError(f"prompt {p.key!r}: empty response cannot be scored")
        rows.append((p, r.to(p.input_ids.dtype)))
    length = max(p.input_ids.numel() + r.numel() for p, r in rows)
    b = len(rows)
    ids = torch.full((b, length), pad_token_id, dtype=torch.long)
    types = torch.zeros((b, length), dtype=torch.long)
    attn = torch.zeros((b, length), dtype=torch.long)
    resp = torch.zeros((b, length), dtype=torch.long)
    for i, (p, r) in enumerate(rows):
        n_p, n = p.input_ids.numel(), p.input_ids.numel() + r.numel()
        ids[i, :n] = torch.cat([p.input_ids, r])
        types[i, :n_p] = p.mm_token_type_ids
        attn[i, :n] = 1
        resp[i, n_p:n] = 1
    grids = torch.stack([p.video_grid_thw.reshape(3) for p, _ in rows])  # [B, 3]
    timed = all(p.second_per_grid_ts is not None for p, _ in rows)
    secs = torch.tensor([float(p.second_per_grid_ts) for p, _ in rows]) if timed else None  # [B]
    pos = rope_positions(model, ids, types, grids, secs, attn)  # [3, B, L] or [B, L] (1-D)
    embeds = [p.video_embeds for p, _ in rows]
    return PrefillBatch(ids, attn, resp, types, pos, embeds)
