"""GRPO-family RL algorithms as small tensor functions: advantages, policy loss, KL, aggregation.

Conventions (verl/EasyR1, see /work/shared/reference.md §2), so numerics can be checked by hand:

- Rewards of one step are flat and prompt-major: `[num_prompts * G]`, the G rollouts of prompt 0
  first. Advantages are per sequence and broadcast to every response token.
- GRPO: `(r_i - mean_g) / (std_g + 1e-6)`, unbiased std; a group whose rewards are all equal gets 0
  (also when G = 1). Dr.GRPO: `r_i - mean_g`. RLOO: `r_i - mean of the other G - 1 rollouts`.
- Policy loss per token: `max(-A * ratio, -A * clip(ratio, 1 - eps_low, 1 + eps_high))`, and for
  A < 0 the dual clip `min(that, -A * c)`; `ratio = exp(clamp(logp - logp_old, -20, 20))`.
- KL estimators of KL(policy || reference) per token, with `d = logp_ref - logp`: k1 = -d,
  k2 = d^2 / 2, k3 (= "low_var_kl") = exp(d) - d - 1 clamped to [-10, 10].
- Aggregation over the WHOLE update batch: "token-mean" divides the summed token losses by the
  number of response tokens of the batch; "seq-mean" divides the summed per-sequence means by the
  number of (non-empty) sequences of the batch. When a batch is split into micro-batches (and ranks),
  pass the global counts as `num_tokens` / `num_seqs`, so the summed micro-batch losses equal the
  loss of the whole batch (a per-micro-batch mean would weight short micro-batches more).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

AdvantageKind = Literal["grpo", "drgrpo", "dapo", "rloo"]
KLKind = Literal["k1", "k2", "k3", "low_var_kl", "none"]
AggMode = Literal["token-mean", "seq-mean"]

LOG_RATIO_CLAMP = 20.0
KL_CLAMP = 10.0


# ---------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N] -> [N / G, G], checking the layout."""
    if group_size < 1 or rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(
            f"rewards must be flat [num_prompts * G] with G = {group_size}, got {tuple(rewards.shape)}"
        )
    return rewards.float().view(-1, group_size)


def identical_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Which groups have all-equal rewards (no learning signal; dropped by dynamic sampling).

    Args:
        rewards: `[num_prompts * G]`, prompt-major.
        group_size: G.

    Returns:
        Bool `[num_prompts]`.

    >>> identical_groups(torch.tensor([1.0, 1.0, 0.0, 1.0]), 2).tolist()
    [True, False]
    """
    g = _grouped(rewards, group_size)  # [P, G]
    return g.max(dim=1).values == g.min(dim=1).values


def compute_advantages(
    rewards: torch.Tensor, group_size: int, kind: AdvantageKind = "grpo", eps: float = 1e-6
) -> torch.Tensor:
    """Group-relative advantages of each rollout.

    Args:
        rewards: `[num_prompts * G]` scalar rewards, prompt-major.
        group_size: G, rollouts per prompt.
        kind: "grpo" (and "dapo": same estimator), "drgrpo" (no std division) or "rloo"
            (leave-one-out baseline).
        eps: Added to the std (GRPO).

    Returns:
        `[num_prompts * G]` float advantages; 0 for every rollout of an all-equal group.

    Raises:
        ValueError: Bad shape or unknown kind.

    >>> [round(a, 4) for a in compute_advantages(torch.tensor([1.0, 0.0, 0.5, 0.5]), 2).tolist()]
    [0.7071, -0.7071, 0.0, 0.0]
    >>> compute_advantages(torch.tensor([1.0, 0.0, 0.0]), 3, "rloo").tolist()
    [1.0, -0.5, -0.5]
    """
    g = _grouped(rewards, group_size)  # [P, G]
    mean = g.mean(dim=1, keepdim=True)  # [P, 1]
    if kind in ("grpo", "dapo"):
        std = (
            g.std(dim=1, unbiased=True, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
        )
        adv = (g - mean) / (std + eps)
    elif kind == "drgrpo":
        adv = g - mean
    elif kind == "rloo":
        if group_size == 1:
            adv = torch.zeros_like(g)
        else:  # r_i - (sum - r_i) / (G - 1)
            adv = g - (g.sum(dim=1, keepdim=True) - g) / (group_size - 1)
    else:
        raise ValueError(f"unknown advantage kind {kind!r}; use grpo, drgrpo, dapo or rloo")
    # Exact zeros for all-equal groups: mean() of equal floats can differ from them by an ulp.
    same = identical_groups(rewards, group_size)[:, None]  # [P, 1]
    return torch.where(same, torch.zeros_like(adv), adv).reshape(-1)


# ---------------------------------------------------------------------------------------------
# Policy loss and KL
# ---------------------------------------------------------------------------------------------


@dataclass
class PolicyLossOutput:
    """Per-token policy loss and indicator tensors for the clip statistics (all `[B, T]`)."""

    loss: torch.Tensor
    ratio: torch.Tensor
    clipped_low: torch.Tensor
    clipped_high: torch.Tensor
    dual_clipped: torch.Tensor


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.3,
    dual_clip: float | None = 3.0,
) -> PolicyLossOutput:
    """Clipped surrogate loss per token (PPO/GRPO), with clip-higher and dual clip.

    Args:
        logp: `[B, T]` log-probs of the response tokens under the policy (differentiable).
        old_logp: `[B, T]` log-probs under the policy that sampled (no grad).
        advantages: `[B]` per-sequence (broadcast to tokens) or `[B, T]` per-token advantages.
        clip_low: eps_low; ratios below 1 - eps_low stop improving a negative-advantage token.
        clip_high: eps_high (0.28 for DAPO's clip-higher).
        dual_clip: c > 1 caps the loss of negative-advantage tokens at -A * c; None disables.

    Returns:
        `PolicyLossOutput` (loss `[B, T]`, to be aggregated with the response mask).

    >>> out = policy_loss(torch.tensor([[0.0]]), torch.tensor([[0.0]]), torch.tensor([2.0]))
    >>> out.loss.tolist()
    [[-2.0]]
    """
    adv = advantages[:, None] if advantages.ndim == 1 else advantages  # [B, 1] or [B, T]
    adv = adv.to(logp.dtype)
    log_ratio = (logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # [B, T]
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)  # [B, T]
    clip_active = clipped > unclipped
    dual = torch.zeros_like(clip_active)
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        cap = -adv * dual_clip
        dual = (adv < 0) & (loss > cap)
        loss = torch.where(adv < 0, torch.minimum(loss, cap), loss)
    ones = torch.ones_like(ratio, dtype=torch.bool)
    return PolicyLossOutput(
        loss=loss,
        ratio=ratio.detach(),
        clipped_low=(clip_active & (ratio < 1.0) & ones).detach(),
        clipped_high=(clip_active & (ratio > 1.0) & ones).detach(),
        dual_clipped=(dual & ones).detach(),
    )


def kl_penalty(
    logp: torch.Tensor, ref_logp: torch.Tensor, kind: KLKind = "low_var_kl"
) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from sampled tokens.

    Args:
        logp: `[B, T]` policy log-probs (differentiable).
        ref_logp: `[B, T]` reference log-probs.
        kind: "k1" (logp - ref), "k2" ((logp - ref)^2 / 2), "k3" / "low_var_kl"
            (exp(d) - d - 1 with d = ref - logp, clamped to [-10, 10]) or "none" (zeros).

    Returns:
        `[B, T]` KL terms.

    >>> kl_penalty(torch.tensor([0.0]), torch.tensor([1.0]), "k3").item()  # e - 2
    0.7182817459106445
    """
    if kind == "none":
        return torch.zeros_like(logp)
    if kind == "k1":
        return logp - ref_logp
    if kind == "k2":
        return 0.5 * (logp - ref_logp) ** 2
    if kind in ("k3", "low_var_kl"):
        d = ref_logp - logp
        return (torch.exp(d) - d - 1.0).clamp(-KL_CLAMP, KL_CLAMP)
    raise ValueError(f"unknown KL estimator {kind!r}; use k1, k2, k3, low_var_kl or none")


# ---------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------


def batch_counts(mask: torch.Tensor) -> tuple[int, int]:
    """Response tokens and non-empty sequences of a `[B, T]` mask (the global normalisers)."""
    return int(mask.sum()), int((mask.sum(dim=1) > 0).sum())


def aggregate(
    values: torch.Tensor,
    mask: torch.Tensor,
    mode: AggMode = "token-mean",
    num_tokens: float | None = None,
    num_seqs: float | None = None,
) -> torch.Tensor:
    """Reduce per-token values to a scalar normalised by the whole update batch.

    Args:
        values: `[B, T]` per-token losses.
        mask: `[B, T]` 1 on response tokens.
        mode: "token-mean" or "seq-mean" (mean over sequences of each sequence's token mean;
            all-masked rows contribute nothing and are not counted).
        num_tokens: Response tokens of the whole batch (default: this `mask`'s).
        num_seqs: Non-empty sequences of the whole batch (default: this `mask`'s).

    Returns:
        Scalar. Summing it over the micro-batches of a batch (with global counts) gives the
        batch's loss.

    >>> v = torch.tensor([[1.0, 3.0], [5.0, 0.0]]); m = torch.tensor([[1, 1], [1, 0]])
    >>> aggregate(v, m, "token-mean").item(), aggregate(v, m, "seq-mean").item()
    (3.0, 3.5)
    """
    m = mask.to(values.dtype)
    local_tokens, local_seqs = batch_counts(mask)
    if mode == "token-mean":
        denom = float(num_tokens if num_tokens is not None else local_tokens)
        return (values * m).sum() / max(denom, 1.0)
    if mode == "seq-mean":
        per_seq = (values * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)  # [B]; 0 for empty rows
        denom = float(num_seqs if num_seqs is not None else local_seqs)
        return per_seq.sum() / max(denom, 1.0)
    raise ValueError(f"unknown aggregation {mode!r}; use token-mean or seq-mean")


# ---------------------------------------------------------------------------------------------
# Dynamic sampling (DAPO)
# ---------------------------------------------------------------------------------------------


@dataclass
class DynamicSampling:
    """Result of `dynamic_sampling`: the kept groups and what it took."""

    groups: list[Any] = field(default_factory=list)
    rounds: int = 0
    drawn: int = 0
    dropped: int = 0


def dynamic_sampling(
    draw: Callable[[int], Sequence[tuple[Any, Sequence[float]]]],
    target_groups: int,
    max_rounds: int,
) -> DynamicSampling:
    """Drop groups whose rewards are all equal and refill from further prompts (DAPO).

    Args:
        draw: `draw(round)` samples a fresh batch of prompts and returns, per prompt, the group
            (anything: its rollouts) and its G rewards.
        target_groups: Groups the update batch needs.
        max_rounds: At most this many draws; if the batch is still short, it trains on fewer
            groups (reported in `rounds`/`groups`) rather than looping forever.

    Returns:
        `DynamicSampling` with at most `target_groups` kept groups in draw order.

    >>> batches = [[("a", [1, 1]), ("b", [0, 1])], [("c", [0, 0]), ("d", [1, 0])]]
    >>> res = dynamic_sampling(lambda k: batches[k], target_groups=2, max_rounds=2)
    >>> res.groups, res.rounds, res.dropped
    (['b', 'd'], 2, 2)
    """
    out = DynamicSampling()
    while len(out.groups) < target_groups and out.rounds < max_rounds:
        batch = draw(out.rounds)
        out.rounds += 1
        for group, rewards in batch:
            out.drawn += 1
            if len(set(float(r) for r in rewards)) <= 1:
                out.dropped += 1
            elif len(out.groups) < target_groups:
                out.groups.append(group)
    return out
