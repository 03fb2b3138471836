"""MR-SP across 2 real gloo processes: SP=2 must equal SP=1 (log-probs, entropies, gradients,
paralleled encoding), for 3 (uneven), 2 (even) and 1 (fewer than ranks) temporal patches, with
2 heads / 1 KV head (KV repeated before the all-to-all) and 4 heads / 2 KV heads; and for the
tiny model of every family on real prompts from its processor (Qwen3-VL: DeepStack features in
the cache, the gather and the prefill; Qwen3.5: gated delta-net layers split over heads)."""

from __future__ import annotations

import pytest

from lvr.models.tiny import TINY_FAMILIES
from lvr.mrsp.selftest import spawn_sp_checks

TOL = 1e-5
MODELS = ("h2kv1", "h4kv2", *TINY_FAMILIES)


@pytest.fixture(scope="module")
def sp() -> dict[str, float]:
    return spawn_sp_checks(world=2, families=TINY_FAMILIES)


def test_ran_on_two_ranks(sp: dict[str, float]) -> None:
    assert sp["world"] == 2


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("block", [1, 3])
def test_response_logprobs_and_entropy_match_single_process(
    sp: dict[str, float], model: str, block: int
) -> None:
    assert sp[f"{model}/logprob_block{block}"] < TOL
    assert sp[f"{model}/entropy_block{block}"] < TOL
    assert sp[f"{model}/mask"] == 0


@pytest.mark.parametrize("model", MODELS)
def test_gradients_match_single_process(sp: dict[str, float], model: str) -> None:
    assert sp[f"{model}/grad_names_match"] == 0  # same parameters received gradients
    # Non-trivial gradients, equal after summing over the SP group (LM and trained vision tower).
    assert sp[f"{model}/grad_lm_norm"] > 0.1 and sp[f"{model}/grad_vision_norm"] > 0.1
    assert sp[f"{model}/grad_lm"] < TOL
    assert sp[f"{model}/grad_vision"] < TOL


@pytest.mark.parametrize("model", MODELS)
def test_shuffled_batch_keeps_each_video_with_its_prompt(sp: dict[str, float], model: str) -> None:
    assert sp[f"{model}/pairing"] < TOL


@pytest.mark.parametrize("prefix", ["", *(f"{f}/" for f in TINY_FAMILIES)])
@pytest.mark.parametrize("t", [3, 2, 1])
def test_paralleled_encoding_matches_single_process(
    sp: dict[str, float], prefix: str, t: int
) -> None:
    assert sp[f"{prefix}encode_t{t}"] < TOL  # tokens and DeepStack features


@pytest.mark.parametrize("prefix", ["", *(f"{f}/" for f in TINY_FAMILIES)])
def test_encoder_runs_once_per_video(sp: dict[str, float], prefix: str) -> None:
    # 3 videos, each asked for 3 times.
    assert sp[f"{prefix}encode_count"] == 3
