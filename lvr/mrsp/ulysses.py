"""Ulysses attention over the SP group, registered as a transformers attention function.

Sequence layout (`StridedLayout`): the padded sequence (length `Lp`, a multiple of `sp * block`) is cut
into blocks of `block` tokens dealt round-robin to the ranks: rank r owns blocks r, r + sp, r + 2sp, ...
Every rank therefore holds `Lp / sp` tokens AND about `1/sp` of every row's response, whatever the
prompt length (contiguous shards would put a long video's whole response on the last rank, the
public code's defect). Position-wise work (embeddings, norms, MLP, rotary, lm_head) does not care
about order; attention does, and after the all-to-all each rank holds all `Lp` tokens of `H/sp` heads,
which one reshape puts back into true sequence order. Causal SDPA over the full padded sequence is
then exact: padding is on the right (the layout pad and the batch's right padding), so no real token
ever attends to a pad token and no mask is needed.

The function is registered in `ALL_ATTENTION_FUNCTIONS` under "lvr_ulysses" and switched on only for
the duration of an SP prefill (`ulysses_attention_enabled`), so rollouts and ordinary forwards keep
the model's own implementation.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as functional
from transformers import AttentionInterface

from lvr.mrsp.comm import MrspError, all_to_all, sp_size

ATTN_NAME = "lvr_ulysses"


@dataclass(frozen=True)
class StridedLayout:
    """Which padded positions each SP rank owns (blocks of `block` tokens dealt round-robin).

    Attributes:
        length: Unpadded sequence length L.
        sp: SP degree.
        block: Tokens per block.
    """

    length: int
    sp: int
    block: int = 1

    @property
    def padded(self) -> int:
        """Padded length Lp: the smallest multiple of sp * block >= length."""
        unit = self.sp * self.block
        return max(1, math.ceil(self.length / unit)) * unit

    @property
    def local(self) -> int:
        """Tokens per rank, Lp / sp."""
        return self.padded // self.sp

    def positions(self, rank: int) -> torch.Tensor:
        """Padded positions owned by `rank`, in local order.

        Args:
            rank: Rank in the SP group.

        Returns:
            `[Lp / sp]` long tensor; local index j*block + k is position (j*sp + rank)*block + k.
        """
        n_blocks = self.local // self.block
        starts = (torch.arange(n_blocks) * self.sp + rank) * self.block  # [J]
        return (starts[:, None] + torch.arange(self.block)[None, :]).reshape(-1)

    def to_global(self, y: torch.Tensor, seq_dim: int) -> torch.Tensor:
        """Put per-rank blocks back in sequence order.

        Args:
            y: `[sp, ..., Lp/sp (at seq_dim + 1), ...]` block i from rank i.
            seq_dim: Sequence dimension of one block (without the leading sp dim).

        Returns:
            `[..., Lp, ...]` in true order.
        """
        d = seq_dim + 1
        shape = list(y.shape)
        j = shape[d] // self.block
        y = y.reshape(*shape[:d], j, self.block, *shape[d + 1 :])  # [sp, .., J, c, ..]
        y = y.movedim(0, d)  # [.., J, sp, c, ..]
        return y.reshape(*shape[1:d], self.padded, *shape[d + 1 :])

    def to_blocks(self, x: torch.Tensor, seq_dim: int) -> torch.Tensor:
        """Inverse of `to_global`: `[..., Lp, ...]` -> `[sp, ..., Lp/sp, ...]` (block j for rank j)."""
        shape = list(x.shape)
        j = self.local // self.block
        x = x.reshape(*shape[:seq_dim], j, self.sp, self.block, *shape[seq_dim + 1 :])
        x = x.movedim(seq_dim + 1, 0)  # [sp, .., J, c, ..]
        return x.reshape(self.sp, *shape[:seq_dim], self.local, *shape[seq_dim + 1 :])


def heads_to_seq(x: torch.Tensor, layout: StridedLayout, group: dist.ProcessGroup) -> torch.Tensor:
    """[B, h, Lp/sp, d] (all heads, local tokens) -> [B, h/sp, Lp, d] (some heads, all tokens)."""
    b, h, n, d = x.shape
    x = x.reshape(b, layout.sp, h // layout.sp, n, d).transpose(0, 1)  # [sp, B, h/sp, n, d]
    y = all_to_all(x, group)  # [sp(source rank), B, h/sp, n, d]
    return layout.to_global(y, seq_dim=2)  # [B, h/sp, Lp, d]


def seq_to_heads(o: torch.Tensor, layout: StridedLayout, group: dist.ProcessGroup) -> torch.Tensor:
    """[B, h/sp, Lp, d] -> [B, Lp/sp, h, d] (the layout attention functions return)."""
    y = layout.to_blocks(o, seq_dim=2)  # [sp(dest rank), B, h/sp, n, d]
    x = all_to_all(y, group)  # [sp(head chunk), B, h/sp, n, d]
    sp, b, hs, n, d = x.shape
    return x.permute(1, 3, 0, 2, 4).reshape(b, n, sp * hs, d)


def _repeat_heads(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, h_kv, L, d] -> [B, h_kv * n_rep, L, d], each KV head repeated next to itself (GQA order)."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def _causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """Causal attention on [B, h, L, d] (k/v may have fewer heads); flash-attn on CUDA when installed."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        try:
            from flash_attn import flash_attn_func  # optional GPU extra

            out = flash_attn_func(
                q.transpose(1, 2),
                k.transpose(1, 2),
                v.transpose(1, 2),
                softmax_scale=scale,
                causal=True,
            )
            return out.transpose(1, 2)
        except ImportError:
            pass
    k = _repeat_heads(k, q.shape[1] // k.shape[1])
    v = _repeat_heads(v, q.shape[1] // v.shape[1])
    return functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def ulysses_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sp_group: dist.ProcessGroup | None = None,
    sp_layout: StridedLayout | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """Attention function for `ALL_ATTENTION_FUNCTIONS`: all-to-all, causal SDPA, all-to-all back.

    Args:
        module: The attention module (unused; part of the interface).
        query: `[B, H, Lp/sp, d]` rotary already applied with each token's true 3-D position.
        key: `[B, H_kv, Lp/sp, d]`.
        value: `[B, H_kv, Lp/sp, d]`.
        attention_mask: Must be None (right padding + causal needs no mask; see module docstring).
        scaling: Softmax scale (default 1/sqrt(d)).
        dropout: Must be 0 (log-prob prefills are deterministic).
        sp_group: The SP group (None = single rank).
        sp_layout: The sequence layout the inputs were sharded with.
        **kwargs: Ignored extras of the interface (position_ids, sliding_window, ...).

    Returns:
        (`[B, Lp/sp, H, d]`, None).

    Raises:
        MrspError: On a mask, dropout, or a head count the SP degree does not divide.
    """
    if attention_mask is not None or dropout:
        raise MrspError("Ulysses prefill takes right-padded inputs without a mask and no dropout")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    sp = sp_size(sp_group)
    if sp == 1:
        return _causal_attention(query, key, value, scale).transpose(1, 2), None
    if sp_layout is None or sp_layout.sp != sp:
        raise MrspError(f"Ulysses attention needs the layout of an SP={sp} prefill")
    n_heads, n_kv = query.shape[1], key.shape[1]
    if n_heads % sp:
        raise MrspError(f"{n_heads} attention heads cannot be split over SP={sp}; pick SP | heads")
    if n_kv % sp:
        # Fewer KV heads than ranks: give every query head its own KV copy before the exchange.
        key, value = _repeat_heads(key, n_heads // n_kv), _repeat_heads(value, n_heads // n_kv)
    q, k, v = (heads_to_seq(t, sp_layout, sp_group) for t in (query, key, value))
    out = _causal_attention(q, k, v, scale)  # [B, H/sp, Lp, d]
    return seq_to_heads(out, sp_layout, sp_group), None


AttentionInterface.register(ATTN_NAME, ulysses_attention)


@contextmanager
def ulysses_attention_enabled(text_config: object) -> Iterator[None]:
    """Route the decoder's attention through `ulysses_attention` inside the block.

    Args:
        text_config: The decoder's config object (shared by its attention layers).

    Yields:
        Nothing; the previous implementation is restored on exit.
    """
    previous = text_config._attn_implementation  # type: ignore[attr-defined]
    text_config._attn_implementation = ATTN_NAME  # type: ignore[attr-defined]
    try:
        yield
    finally:
        text_config._attn_implementation = previous  # type: ignore[attr-defined]
