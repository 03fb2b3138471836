"""Autograd-aware collectives for the sequence-parallel (SP) group.

Three collectives are all MR-SP needs:

- `all_to_all`: Ulysses' exchange (heads <-> sequence). Backward is the same all-to-all on the gradient
  (sending block j to rank j is a permutation whose inverse is the same exchange).
- `gather_rows(..., grad="sum")`: reassemble a tensor whose row blocks live on different ranks, every
  rank then using *different parts* of the result (the video embeddings: each rank scatters only its
  sequence shard). Backward sums the gradient over the group, then keeps this rank's rows
  (an all-reduce + slice, i.e. a reduce-scatter with uneven blocks).
- `gather_rows(..., grad="own")`: the same gather when every rank computes the *same* function of the
  result (the per-token log-probs feeding a replicated loss). Backward keeps this rank's rows only:
  summing would count every token `sp` times.

Convention for parameter gradients under SP: after `loss.backward()` each rank holds the gradient of
the computation it ran (its sequence shard, its frames); the full gradient is their sum over the SP
group (`sync_sp_grads`). Block sizes may differ per rank (any frame count, any sequence length).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist

from lvr.errors import LvrError


class MrspError(LvrError):
    """A bad input to MR-SP (wrong shapes, a video/prompt mismatch, an unsupported layout)."""


def sp_size(group: dist.ProcessGroup | None) -> int:
    """Return the SP degree: 1 when `group` is None or torch.distributed is not initialised."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def sp_rank(group: dist.ProcessGroup | None) -> int:
    """Return this process's rank inside the SP group (0 without a group)."""
    if sp_size(group) == 1:
        return 0
    return dist.get_rank(group)


class _AllToAll(torch.autograd.Function):
    """x [sp, ...] (block j goes to rank j) -> y [sp, ...] (block i came from rank i)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        x = x.contiguous()
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad, group=ctx.group)
        return out, None


def all_to_all(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Exchange equal blocks along dim 0 with every rank of `group`, differentiably.

    Args:
        x: `[sp, ...]`; block `j` is sent to rank `j`.
        group: The SP group (None = identity).

    Returns:
        `[sp, ...]`; block `i` is the one rank `i` sent here.
    """
    if sp_size(group) == 1:
        return x
    return _AllToAll.apply(x, group)


def _gather_padded(
    x: torch.Tensor, counts: Sequence[int], group: dist.ProcessGroup
) -> torch.Tensor:
    """All-gather row blocks of uneven sizes (padded to the largest), concatenated in rank order."""
    width = max(counts)
    pad = x.new_zeros((width - x.shape[0], *x.shape[1:]))
    buf = torch.cat([x, pad]).contiguous()  # [width, ...]
    parts = [torch.empty_like(buf) for _ in counts]
    dist.all_gather(parts, buf, group=group)
    return torch.cat([p[:n] for p, n in zip(parts, counts, strict=True)])


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: torch.Tensor, counts: list[int], group: dist.ProcessGroup, grad_mode: str
    ) -> torch.Tensor:
        ctx.counts, ctx.group, ctx.grad_mode = counts, group, grad_mode
        ctx.rank = dist.get_rank(group)
        return _gather_padded(x, counts, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:  # type: ignore[override]
        grad = grad.contiguous()
        if ctx.grad_mode == "sum":
            # Every rank used different rows of the gathered tensor: add their contributions.
            dist.all_reduce(grad, group=ctx.group)
        start = sum(ctx.counts[: ctx.rank])
        return grad[start : start + ctx.counts[ctx.rank]], None, None, None


def gather_counts(
    n: int, group: dist.ProcessGroup, device: torch.device | None = None
) -> list[int]:
    """All-gather one integer per rank (the row counts of a variable-size gather).

    Args:
        n: This rank's count.
        group: The group.
        device: Where the collective runs (CUDA for NCCL groups).

    Returns:
        The counts in rank order.
    """
    mine = torch.tensor([n], dtype=torch.long, device=device)
    out = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, mine, group=group)
    return [int(t.item()) for t in out]


def gather_rows(
    x: torch.Tensor,
    group: dist.ProcessGroup | None,
    grad: str = "sum",
    counts: Sequence[int] | None = None,
) -> torch.Tensor:
    """Concatenate every rank's `x` along dim 0 in rank order (row counts may differ), differentiably.

    Args:
        x: `[n_rank, ...]` this rank's rows.
        group: The SP group (None = identity).
        grad: "sum" when ranks consume different parts of the result, "own" when every rank
            computes the same function of it (see the module docstring).
        counts: Rows per rank if already known on every rank; gathered first otherwise.

    Returns:
        `[sum(n_rank), ...]`, identical on every rank.

    Raises:
        MrspError: On an unknown `grad` mode or counts that disagree with `x`.
    """
    if grad not in ("sum", "own"):
        raise MrspError(f"gather_rows grad must be 'sum' or 'own', got {grad!r}")
    if sp_size(group) == 1:
        return x
    counts = list(counts) if counts is not None else gather_counts(x.shape[0], group, x.device)
    if counts[dist.get_rank(group)] != x.shape[0]:
        raise MrspError(f"rank holds {x.shape[0]} rows but counts say {counts}")
    if not (torch.is_grad_enabled() and x.requires_grad):
        # Callers keep this decision identical on all ranks (backward "sum" is a collective).
        return _gather_padded(x, counts, group)
    return _GatherRows.apply(x, counts, group, grad)


def sync_sp_grads(params: Iterable[torch.nn.Parameter], group: dist.ProcessGroup | None) -> None:
    """Sum parameter gradients over the SP group so each rank holds the full gradient.

    Args:
        params: Parameters; those that require grad but got none here (e.g. the vision tower on a
            rank that encoded no frames) get zeros, so every rank joins every all-reduce.
        group: The SP group (None = no-op).
    """
    if sp_size(group) == 1:
        return
    for p in params:
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, group=group)
