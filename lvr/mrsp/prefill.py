"""Sequence-parallel prefill: per-token response log-probs and entropies of a VLM's decoder.

Every rank of the SP group receives the same `PrefillBatch` (token ids, masks, 3-D positions, the
gathered video embeddings: a few MB) and builds only the embeddings of the tokens it owns
(`StridedLayout`: round-robin blocks, so each rank holds `Lp/sp` tokens and ~`1/sp` of every
response). The decoder layers run on the local shard with Ulysses attention; rotary uses each
token's true 3-D position. Logits are computed only where the next token is a response token (on
each rank its own share): no full-vocabulary logits over the prompt or the video.

What the families add, each at its own place: Qwen3-VL's DeepStack features are added to the
hidden states of the first decoder layers at the video positions (each rank adds the rows of
the positions it owns, as the model's `_deepstack_process` does for the whole sequence); Qwen3.5's
gated delta-net layers run through `lvr.mrsp.linear_attention` (Ulysses over their heads).

Output layout: `[B, R]` (R = longest response; row b's response tokens in order, zero-padded, with
`mask`), identical on every rank and identical to the SP=1 result. The cross-rank gather is
autograd-aware with the "replicated consumer" backward: each rank computes the same loss from the
`[B, R]` tensor, each token's gradient flows back only on the rank that computed it, and the full
parameter gradient is the SUM over the SP group (`lvr.mrsp.comm.sync_sp_grads`). With DDP/ZeRO over
the world, the sum over an SP group is what the recipe must reduce (ranks of one SP group hold the
same samples: average over data-parallel replicas only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from lvr.models import family
from lvr.mrsp.batch import VIDEO_TYPE, PrefillBatch
from lvr.mrsp.comm import MrspError, gather_rows, sp_rank, sp_size
from lvr.mrsp.linear_attention import linear_decoder_layer
from lvr.mrsp.ulysses import StridedLayout, ulysses_attention_enabled


@dataclass
class PrefillOutput:
    """Per-token results for the response tokens.

    Attributes:
        logprobs: `[B, R]` log p(token) (differentiable), 0 on padding.
        entropy: `[B, R]` entropy of the next-token distribution, 0 on padding.
        mask: `[B, R]` 1 on real response tokens.
    """

    logprobs: torch.Tensor
    entropy: torch.Tensor
    mask: torch.Tensor


def _pad_to(x: torch.Tensor, length: int, dim: int, value: int = 0) -> torch.Tensor:
    """Right-pad `x` along `dim` to `length`."""
    extra = length - x.shape[dim]
    if extra == 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, x.new_full(shape, value)], dim=dim)


def _local_embeds(
    model: torch.nn.Module,
    batch: PrefillBatch,
    ids: torch.Tensor,
    types: torch.Tensor,
    own: torch.Tensor,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Embeddings of the owned positions only: token embeddings with video rows scattered in,
    and the DeepStack addends of the same positions.

    Args:
        model: The VLM.
        batch: The batch (its `video_embeds` are per-row).
        ids: `[B, Lp]` padded token ids.
        types: `[B, Lp]` padded mm_token_type_ids (2 = video).
        own: `[Lp/sp]` positions owned by this rank.

    Returns:
        `[B, Lp/sp, D]` input embeddings, and one `[B, Lp/sp, D]` addend per DeepStack layer
        (zero off the video positions; none for families without DeepStack).
    """
    emb_layer = family.language_model(model).get_input_embeddings()
    local = emb_layer(ids[:, own])  # [B, n, D]
    is_video = types == VIDEO_TYPE  # [B, Lp]
    video_row = is_video.long().cumsum(-1) - 1  # index into the row's video embeddings
    layers = len(batch.video_embeds[0].deepstack) if batch.video_embeds else 0
    rows, deep = [], [[] for _ in range(layers)]
    for b, ve in enumerate(batch.video_embeds):
        if int(is_video[b].sum()) != ve.rows or len(ve.deepstack) != layers:
            raise MrspError(
                f"row {b}: {int(is_video[b].sum())} video tokens but {ve.rows} embedding rows"
            )
        sel = is_video[b, own]  # [n]
        which = video_row[b, own][sel]  # [n_video_owned]
        row = local[b].clone()
        row[sel] = ve.tokens[which].to(row.dtype)
        rows.append(row)
        for k, feat in enumerate(ve.deepstack):
            add = torch.zeros_like(local[b])  # [n, D]
            add[sel] = feat[which].to(add.dtype)
            deep[k].append(add)
    return torch.stack(rows), [torch.stack(d) for d in deep]


def _run_decoder(
    model: torch.nn.Module,
    hidden: torch.Tensor,
    deepstack: list[torch.Tensor],
    positions: torch.Tensor,
    group: dist.ProcessGroup | None,
    layout: StridedLayout,
) -> torch.Tensor:
    """Decoder layers + final norm on the local shard. hidden [B, n, D], positions [3, B, n]
    (M-RoPE) or [B, n];
    `deepstack[k]` [B, n, D] is added after layer k (Qwen3-VL)."""
    lm = family.language_model(model)
    cos_sin = lm.rotary_emb(hidden, positions)  # each token's true (3-D or 1-D) position
    with ulysses_attention_enabled(lm.config):
        for i, layer in enumerate(lm.layers):
            if getattr(layer, "linear_attn", None) is not None:  # Qwen3.5's gated delta-net
                hidden = linear_decoder_layer(layer, hidden, group, layout)
            else:
                hidden = layer(
                    hidden,
                    attention_mask=None,
                    position_embeddings=cos_sin,
                    position_ids=None,
                    use_cache=False,
                    sp_group=group,
                    sp_layout=layout,
                )
            if i < len(deepstack):
                hidden = hidden + deepstack[i]  # zero off the video positions
    return lm.norm(hidden)


def _score(
    model: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """lm_head on the selected hidden states only. hidden [n, D], targets [n] -> logp [n], entropy [n]."""
    logits = model.lm_head(hidden).float() / temperature  # [n, V]
    logp = torch.log_softmax(logits, dim=-1)
    token_logp = logp.gather(-1, targets[:, None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return token_logp, entropy


def _to_response_layout(
    per_pos: torch.Tensor, response_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L, k] values at target positions -> [B, R, k] response tokens in order + mask [B, R]."""
    counts = response_mask.sum(-1)  # [B]
    r = int(counts.max())
    # Stable sort puts the response positions first, in order.
    order = torch.sort((response_mask == 0).to(torch.int8), dim=-1, stable=True).indices[:, :r]
    mask = (torch.arange(r, device=counts.device)[None, :] < counts[:, None]).to(per_pos.dtype)
    vals = per_pos.gather(1, order[..., None].expand(-1, -1, per_pos.shape[-1]))
    return vals * mask[..., None], mask


def sp_prefill_logprobs(
    model: torch.nn.Module,
    batch: PrefillBatch,
    group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
    block: int = 1,
) -> PrefillOutput:
    """Log-probs and entropies of the response tokens, sequence-parallel over `group`.

    Every rank of `group` must call this with the same batch. With `group=None` it is the plain
    single-process computation (same code, no communication).

    Args:
        model: A VLM `...ForConditionalGeneration` of a family lvr knows (sdpa/eager decoder).
        batch: From `pack_batch` (right-padded; positions from `get_rope_index`).
        group: The SP process group, or None.
        temperature: Logits are divided by it before the softmax.
        block: Tokens per round-robin block of the layout.

    Returns:
        A `PrefillOutput` (`[B, R]` tensors, identical on every rank).

    Raises:
        MrspError: On left padding, a response at position 0 or mismatched shapes.
    """
    ids, resp = batch.input_ids, batch.response_mask
    attn = batch.attention_mask
    if (attn[:, 1:] > attn[:, :-1]).any() or (resp.bool() & ~attn.bool()).any():
        raise MrspError("prefill rows must be right-padded with the response inside the mask")
    if resp[:, 0].any():
        raise MrspError("a response token at position 0 has no context to be predicted from")
    if batch.position_ids.shape not in ((3, *ids.shape), ids.shape):
        raise MrspError(
            f"position_ids {tuple(batch.position_ids.shape)} is neither (3, {tuple(ids.shape)}) "
            f"nor {tuple(ids.shape)}"
        )
    sp, rank = sp_size(group), sp_rank(group)
    layout = StridedLayout(ids.shape[1], sp, block)
    own = layout.positions(rank).to(ids.device)  # [n]
    ids_p = _pad_to(ids, layout.padded, 1)  # [B, Lp]
    pos_p = _pad_to(batch.position_ids, layout.padded, -1)  # [3, B, Lp] or [B, Lp] (1-D)
    types_p = _pad_to(batch.mm_token_type_ids, layout.padded, 1)  # [B, Lp]
    hidden, deepstack = _local_embeds(model, batch, ids_p, types_p, own)  # [B, n, D] (+ k x)
    hidden = _run_decoder(model, hidden, deepstack, pos_p[..., own], group, layout)  # [B, n, D]
    # Position q predicts token q+1: score q when q+1 is a response token.
    next_ids = _pad_to(ids_p[:, 1:], layout.padded, 1)  # [B, Lp]
    scored = _pad_to(_pad_to(resp, layout.padded, 1)[:, 1:], layout.padded, 1).bool()
    sel = scored[:, own]  # [B, n]
    lp, ent = _score(model, hidden[sel], next_ids[:, own][sel], temperature)
    local = hidden.new_zeros((*sel.shape, 2), dtype=torch.float32)  # [B, n, 2]
    local = local.masked_scatter(sel[..., None].expand_as(local), torch.stack([lp, ent], -1))
    blocks = gather_rows(local[None], group, grad="own", counts=[1] * sp)  # [sp, B, n, 2]
    per_pred = layout.to_global(blocks, seq_dim=1)[:, : ids.shape[1]]  # [B, L, 2] at predictor q
    per_target = torch.cat([per_pred.new_zeros(per_pred[:, :1].shape), per_pred[:, :-1]], 1)
    vals, mask = _to_response_layout(per_target, resp)  # [B, R, 2]
    return PrefillOutput(vals[..., 0], vals[..., 1], mask)
