"""vLLM rollout engine vs the HF engine (opt-in: `pytest -m vllm` inside the venv made by
scripts/vllm_env.sh, or on a GPU machine with the `gpu` extra). Skipped when vLLM is absent.
Every family vLLM serves here gets its cached embeddings (the refused ones:
tests/test_families.py::test_vllm_is_refused_in_one_line)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm")

from lvr.models import family  # noqa: E402
from lvr.models.inputs import build_sample  # noqa: E402
from lvr.models.loading import load_vlm  # noqa: E402
from lvr.models.tiny import TINY_FAMILIES, build_tiny_vlm  # noqa: E402
from lvr.mrsp.batch import prompt_from_sample  # noqa: E402
from lvr.mrsp.encode import encode_video  # noqa: E402
from lvr.mrsp.rollout import HFRolloutEngine  # noqa: E402
from lvr.mrsp.synthetic import model_prompt  # noqa: E402
from lvr.mrsp.vllm_engine import VLLMRolloutEngine  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine inside pytest's process
    folder = build_tiny_vlm(Path(tmp_path_factory.mktemp("vlm")) / "tiny")
    model, _ = load_vlm(folder, dtype=torch.float32)
    cfg = model.config
    prompt = model_prompt(model, frames=4, size=112, seed=1)
    eos = cfg.text_config.eos_token_id
    eos_ids = eos if isinstance(eos, list) else [eos]
    hf = HFRolloutEngine(model, eos_ids, cfg.text_config.pad_token_id)
    vl = VLLMRolloutEngine(
        folder,
        cfg.video_token_id,
        dtype="float32",
        max_model_len=2048,
        kv_cache_memory_bytes=1 << 28,
    )
    return model, prompt, hf, vl


def test_first_token_logprobs_match_hf(setup: tuple) -> None:
    _, prompt, hf, vl = setup
    a = hf.generate([prompt], n=1, temperature=0.0, max_new_tokens=4)
    b = vl.generate([prompt], n=1, temperature=0.0, max_new_tokens=4)
    assert int(a.response_ids[0][0]) == int(b.response_ids[0][0])
    assert abs(float(a.logprobs[0][0]) - float(b.logprobs[0][0])) < 1e-2


def test_n_samples_with_logprobs(setup: tuple) -> None:
    _, prompt, _, vl = setup
    out = vl.generate([prompt], n=4, temperature=1.0, max_new_tokens=5, seed=3)
    assert out.prompt_index == [0, 0, 0, 0]
    assert all(
        lp.numel() == ids.numel() and (lp <= 0).all()
        for lp, ids in zip(out.logprobs, out.response_ids, strict=True)
    )


def test_weight_update_changes_output(setup: tuple) -> None:
    model, prompt, _, vl = setup
    before = vl.generate([prompt], n=1, temperature=0.0, max_new_tokens=4)
    with torch.no_grad():
        for p in model.model.language_model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    vl.update_weights(model)
    after = vl.generate([prompt], n=1, temperature=0.0, max_new_tokens=4)
    assert float(before.logprobs[0][0]) != pytest.approx(float(after.logprobs[0][0]), abs=1e-4)


VLLM_FAMILIES = [f for f in TINY_FAMILIES if not family.get_family(f).vllm_refusal]


@pytest.mark.parametrize("name", VLLM_FAMILIES)
def test_family_from_cached_embeddings_matches_hf(
    name: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # Real prompts of each family (Qwen3-VL: timestamp texts, DeepStack features side by side).
    folder = build_tiny_vlm(Path(tmp_path_factory.mktemp(name)) / "tiny", family=name)
    model, proc = load_vlm(folder, dtype=torch.float32)
    frames = np.random.default_rng(0).integers(0, 256, (4, 112, 112, 3), dtype=np.uint8)
    sample = build_sample(proc, "What color?", ["red", "blue"], frames=frames,
                          timestamps=[0.5, 1.0, 1.5, 2.0])  # fmt: skip
    with torch.no_grad():
        emb = encode_video(model, sample["pixel_values_videos"], sample["video_grid_thw"][0])
    prompt = prompt_from_sample(sample, emb, key=name)
    eos = [proc.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    hf = HFRolloutEngine(model, eos, proc.tokenizer.pad_token_id)
    vl = VLLMRolloutEngine(folder, family.video_token_id(model), stop_token_ids=eos,
                           dtype="float32", max_model_len=2048, kv_cache_memory_bytes=1 << 28)  # fmt: skip
    a = hf.generate([prompt], n=1, temperature=0.0, max_new_tokens=4)
    b = vl.generate([prompt], n=1, temperature=0.0, max_new_tokens=4)
    assert a.response_ids[0].tolist() == b.response_ids[0].tolist()
    assert torch.allclose(a.logprobs[0], b.logprobs[0], atol=1e-3)
