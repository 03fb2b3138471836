"""RL algorithm numerics against hand-computed values (lvr.train.algos)."""

from __future__ import annotations

import math

import pytest
import torch

from lvr.train import algos


def test_grpo_advantage_matches_hand_values() -> None:
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.3, 0.3, 0.3, 0.3])
    adv = algos.compute_advantages(r, 4, "grpo")
    # group 0: mean 0.5, unbiased std sqrt(1/3)
    std = math.sqrt(((0.5**2) * 4) / 3)
    expected = [0.5 / (std + 1e-6), -0.5 / (std + 1e-6)] * 1
    assert adv[:2].tolist() == pytest.approx(expected, rel=1e-6)
    assert adv[2].item() == pytest.approx(-0.5 / (std + 1e-6), rel=1e-6)
    assert adv[4:].tolist() == [0.0, 0.0, 0.0, 0.0]  # identical rewards -> exactly 0


def test_identical_group_of_non_representable_floats_is_exact_zero() -> None:
    adv = algos.compute_advantages(torch.tensor([0.1, 0.1, 0.1]), 3, "grpo")
    assert adv.tolist() == [0.0, 0.0, 0.0]


def test_drgrpo_and_rloo() -> None:
    r = torch.tensor([1.0, 0.0, 0.0, 0.0])
    assert algos.compute_advantages(r, 4, "drgrpo").tolist() == [0.75, -0.25, -0.25, -0.25]
    # RLOO: r_i - mean of the 3 others
    assert algos.compute_advantages(r, 4, "rloo").tolist() == pytest.approx(
        [1.0, -1 / 3, -1 / 3, -1 / 3]
    )
    assert (
        algos.compute_advantages(r, 4, "dapo").tolist()
        == algos.compute_advantages(r, 4, "grpo").tolist()
    )


def test_advantage_bad_shape_and_kind() -> None:
    with pytest.raises(ValueError, match="num_prompts"):
        algos.compute_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="unknown advantage"):
        algos.compute_advantages(torch.zeros(4), 2, "ppo")  # type: ignore[arg-type]


def test_policy_loss_clip_regions() -> None:
    # ratios e^0 = 1, e^0.5 = 1.6487, e^-0.5 = 0.6065; advantages +1 / -1
    logp = torch.tensor([[0.0, 0.5, -0.5], [0.0, 0.5, -0.5]])
    old = torch.zeros(2, 3)
    adv = torch.tensor([1.0, -1.0])
    out = algos.policy_loss(logp, old, adv, clip_low=0.2, clip_high=0.3, dual_clip=None)
    r = math.exp(0.5), math.exp(-0.5)
    # A>0: max(-r, -clip(r)) -> high ratio clipped at 1.3, low ratio unclipped
    assert out.loss[0].tolist() == pytest.approx([-1.0, -1.3, -r[1]], rel=1e-6)
    # A<0: max(r, clip(r)) -> high ratio unclipped, low ratio clipped at 0.8
    assert out.loss[1].tolist() == pytest.approx([1.0, r[0], 0.8], rel=1e-6)
    assert out.clipped_high.tolist() == [[False, True, False], [False, False, False]]
    assert out.clipped_low.tolist() == [[False, False, False], [False, False, True]]


def test_dual_clip_caps_negative_advantage_loss() -> None:
    logp = torch.tensor([[2.0, 0.0]])  # ratio e^2 = 7.39 > c = 3
    out = algos.policy_loss(logp, torch.zeros(1, 2), torch.tensor([-0.5]), dual_clip=3.0)
    assert out.loss.tolist()[0] == pytest.approx([1.5, 0.5])  # min(0.5 * 7.39, 0.5 * 3)
    assert out.dual_clipped.tolist() == [[True, False]]
    pos = algos.policy_loss(logp, torch.zeros(1, 2), torch.tensor([0.5]), dual_clip=3.0)
    assert pos.loss.tolist()[0] == pytest.approx([-0.65, -0.5])  # dual clip only for A < 0


def test_extreme_ratios_stay_finite_and_have_gradients() -> None:
    logp = torch.tensor([[100.0, -100.0]], requires_grad=True)
    out = algos.policy_loss(logp, torch.zeros(1, 2), torch.tensor([-1.0]), dual_clip=3.0)
    assert torch.isfinite(out.loss).all()
    assert out.ratio[0, 0].item() == pytest.approx(math.exp(20.0), rel=1e-5)  # clamped log-ratio
    assert out.loss.tolist()[0] == pytest.approx([3.0, 0.8])
    out.loss.sum().backward()
    assert torch.isfinite(logp.grad).all()


def test_kl_estimators() -> None:
    logp, ref = torch.tensor([0.0, -1.0]), torch.tensor([1.0, -1.0])
    assert algos.kl_penalty(logp, ref, "k1").tolist() == [-1.0, 0.0]
    assert algos.kl_penalty(logp, ref, "k2").tolist() == [0.5, 0.0]
    assert algos.kl_penalty(logp, ref, "k3").tolist() == pytest.approx([math.e - 2, 0.0])
    assert algos.kl_penalty(logp, ref, "low_var_kl").tolist() == pytest.approx([math.e - 2, 0.0])
    assert algos.kl_penalty(logp, ref, "none").tolist() == [0.0, 0.0]
    # clamp at 10: d = 5 -> e^5 - 6 = 142.4
    assert algos.kl_penalty(torch.tensor([0.0]), torch.tensor([5.0]), "k3").item() == 10.0


def test_aggregation_modes_with_masked_rows() -> None:
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
    m = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])  # last row all masked
    assert algos.aggregate(v, m, "token-mean").item() == pytest.approx(10 / 4)
    assert algos.aggregate(v, m, "seq-mean").item() == pytest.approx((2.0 + 4.0) / 2)
    assert (
        algos.aggregate(v * 0, m * 0, "token-mean").item() == 0.0
    )  # nothing to average: 0, not nan


def test_micro_batch_sums_equal_whole_batch() -> None:
    torch.manual_seed(0)
    v = torch.randn(6, 5)
    m = (torch.rand(6, 5) > 0.4).long()
    m[2] = 0
    tokens, seqs = algos.batch_counts(m)
    for mode in ("token-mean", "seq-mean"):
        whole = algos.aggregate(v, m, mode)  # type: ignore[arg-type]
        parts = sum(
            algos.aggregate(v[i : i + 2], m[i : i + 2], mode, tokens, seqs)  # type: ignore[arg-type]
            for i in range(0, 6, 2)
        )
        assert parts.item() == pytest.approx(whole.item(), rel=1e-6)
        # a per-micro-batch mean would differ (the bug this guards against)
        naive = sum(algos.aggregate(v[i : i + 2], m[i : i + 2], mode) for i in range(0, 6, 2)) / 3  # type: ignore[arg-type]
        assert naive.item() != pytest.approx(whole.item(), rel=1e-3)


def test_dynamic_sampling_refills_from_further_draws() -> None:
    draws = [
        [("p0", [1.0, 1.0]), ("p1", [0.0, 1.0]), ("p2", [0.0, 0.0])],
        [("p3", [0.5, 0.5]), ("p4", [1.0, 0.0]), ("p5", [0.2, 0.9])],
        [("p6", [0.0, 1.0])],
    ]
    seen: list[int] = []

    def draw(k: int) -> list:
        seen.append(k)
        return draws[k]

    res = algos.dynamic_sampling(draw, target_groups=3, max_rounds=5)
    assert res.groups == ["p1", "p4", "p5"]
    assert seen == [0, 1] and res.dropped == 3 and res.drawn == 6
    short = algos.dynamic_sampling(lambda k: draws[0], target_groups=3, max_rounds=2)
    assert short.groups == ["p1", "p1"] and short.rounds == 2  # capped, not an endless loop


def test_identical_groups() -> None:
    r = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    assert algos.identical_groups(r, 2).tolist() == [True, False, True]
