"""MR-SP on the shared tiny Qwen2.5-VL with its real tokenizer, processor and chat template:
processor pixels -> cached embeddings -> rollouts -> prefill, with identical log-probs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lvr.models.inputs import build_sample, end_of_turn_ids
from lvr.models.loading import load_vlm
from lvr.models.tiny import build_tiny_vlm
from lvr.mrsp import (
    EmbeddingCache,
    HFRolloutEngine,
    VideoKey,
    pack_batch,
    prompt_from_sample,
    sp_prefill_logprobs,
)


@pytest.fixture(scope="module")
def vlm(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    folder = build_tiny_vlm(Path(tmp_path_factory.mktemp("mrsp")) / "tiny-vlm")
    return load_vlm(folder, dtype=torch.float32)


def test_rollout_and_prefill_agree_on_a_processor_built_prompt(vlm: tuple) -> None:
    model, proc = vlm
    frames = np.random.default_rng(0).integers(0, 255, (6, 112, 112, 3), dtype=np.uint8)
    sample = build_sample(proc, "What color is the ball?", ["red", "blue"], frames=frames, fps=2.0)
    cache = EmbeddingCache(model)
    key = VideoKey("clip-0", tuple(range(6)), (112, 112))
    grid = sample["video_grid_thw"][0]
    emb = cache.get(key, sample["pixel_values_videos"], grid)
    prompt = prompt_from_sample(sample, emb, key)
    pad = model.config.text_config.pad_token_id
    engine = HFRolloutEngine(model, end_of_turn_ids(proc), pad)
    ro = engine.generate([prompt], n=2, temperature=1.0, top_p=0.99, max_new_tokens=5, seed=1)
    batch = pack_batch(model, [prompt] * 2, ro.response_ids, pad)
    out = sp_prefill_logprobs(model, batch)
    for k, lp in enumerate(ro.logprobs):
        assert torch.allclose(out.logprobs[k, : lp.numel()], lp, atol=1e-5)
    assert cache.encodes == 1
    # 3-D positions are in use: video tokens share temporal positions (1-D would be all distinct).
    video = batch.mm_token_type_ids[0] == 2
    assert batch.position_ids[0, 0, video].unique().numel() < int(video.sum())
