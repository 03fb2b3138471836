"""MR-SP pieces in one process: layout, vision split exactness, prefill vs the model's own forward,
3-D positions (prefill == get_rope_index == what generate used), rollouts, the embedding cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lvr.mrsp.batch import PromptInput, pack_batch, rope_positions
from lvr.mrsp.comm import MrspError
from lvr.mrsp.encode import EmbeddingCache, VideoKey, encode_video, split_counts
from lvr.mrsp.prefill import sp_prefill_logprobs
from lvr.mrsp.rollout import HFRolloutEngine
from lvr.mrsp.synthetic import (
    EOS,
    PAD,
    random_response,
    synthetic_prompt,
    synthetic_video,
    tiny_model,
)
from lvr.mrsp.ulysses import StridedLayout


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model(seed=0)


def _prompt(model: torch.nn.Module, frames: int, seed: int, secs: float = 1.0) -> PromptInput:
    v = synthetic_video(frames, seed=seed)
    ids, types = synthetic_prompt(v.grid_thw, n_before=2 + seed, seed=seed)
    with torch.no_grad():
        emb = encode_video(model, v.pixel_values_videos, v.grid_thw)
    return PromptInput(ids, types, v.grid_thw, secs, emb, key=v.video_id)


@pytest.mark.parametrize("length,sp,block", [(13, 2, 1), (64, 4, 2), (7, 2, 3), (1, 2, 1)])
def test_layout_partitions_and_round_trips(length: int, sp: int, block: int) -> None:
    lay = StridedLayout(length, sp, block)
    owned = torch.cat([lay.positions(r) for r in range(sp)])
    assert sorted(owned.tolist()) == list(range(lay.padded))
    x = torch.arange(lay.padded * 2.0).reshape(1, lay.padded, 2)  # [B, Lp, k]
    blocks = torch.stack([x[:, lay.positions(r)] for r in range(sp)])  # what ranks hold
    assert torch.equal(lay.to_global(blocks, seq_dim=1), x)
    assert torch.equal(lay.to_blocks(x, seq_dim=1), blocks)


def test_layout_spreads_the_response_over_ranks() -> None:
    # A long video prompt then a 40-token response: contiguous shards would give it all to rank 1.
    lay = StridedLayout(1000, 2)
    response = set(range(960, 1000))
    per_rank = [len(response & set(lay.positions(r).tolist())) for r in range(2)]
    assert per_rank == [20, 20]


def test_split_counts_covers_any_frame_count() -> None:
    assert split_counts(5, 2) == [3, 2]
    assert split_counts(1, 4) == [1, 0, 0, 0]
    assert sum(split_counts(37, 8)) == 37


def test_encoding_whole_temporal_patches_separately_is_exact(model: torch.nn.Module) -> None:
    v = synthetic_video(8, size=224, seed=3)  # 4 temporal patches, 4 windows per frame
    t, h, w = v.grid_thw.tolist()
    with torch.no_grad():
        whole = encode_video(model, v.pixel_values_videos, v.grid_thw).tokens
        parts = [
            encode_video(
                model, v.pixel_values_videos[i * h * w : (i + 1) * h * w], torch.tensor([1, h, w])
            ).tokens
            for i in range(t)
        ]
    assert torch.allclose(torch.cat(parts), whole, atol=1e-5)


def test_prefill_matches_the_models_own_forward(model: torch.nn.Module) -> None:
    prompts = [_prompt(model, 6, 0, 0.5), _prompt(model, 4, 1, 2.0)]
    resps = [random_response(5, seed=0), random_response(9, seed=1)]
    out = sp_prefill_logprobs(model, pack_batch(model, prompts, resps, PAD))
    for i, (p, r) in enumerate(zip(prompts, resps, strict=True)):
        v = synthetic_video([6, 4][i], seed=i)
        ids = torch.cat([p.input_ids, r])[None]
        types = torch.cat([p.mm_token_type_ids, torch.zeros_like(r)])[None]
        with torch.no_grad():
            logits = model(
                input_ids=ids,
                mm_token_type_ids=types,
                pixel_values_videos=v.pixel_values_videos,
                video_grid_thw=v.grid_thw[None],
                second_per_grid_ts=torch.tensor([p.second_per_grid_ts]),
            ).logits[0, :-1]
        logp = torch.log_softmax(logits, -1)
        ref = logp.gather(-1, ids[0, 1:, None])[-r.numel() :, 0]
        ref_ent = -(logp.exp() * logp).sum(-1)[-r.numel() :]
        assert torch.allclose(out.logprobs[i, : r.numel()], ref, atol=1e-5)
        assert torch.allclose(out.entropy[i, : r.numel()], ref_ent, atol=1e-5)
        assert out.mask[i].sum() == r.numel()


def test_prefill_is_sensitive_to_3d_positions(model: torch.nn.Module) -> None:
    # Guards the tolerance used everywhere: 1-D positions (the public code's defect) differ.
    batch = pack_batch(model, [_prompt(model, 6, 0)], [random_response(6)], PAD)
    good = sp_prefill_logprobs(model, batch).logprobs
    length = batch.input_ids.shape[1]
    batch.position_ids = torch.arange(length).expand(3, 1, length).clone()
    bad = sp_prefill_logprobs(model, batch).logprobs
    assert (good - bad).abs().max() > 1e-4


def test_positions_do_not_depend_on_batch_padding(model: torch.nn.Module) -> None:
    prompts = [_prompt(model, 6, 0), _prompt(model, 2, 1)]
    resps = [random_response(3), random_response(20)]
    batch = pack_batch(model, prompts, resps, PAD)
    for i, (p, r) in enumerate(zip(prompts, resps, strict=True)):
        ids = torch.cat([p.input_ids, r])[None]
        types = torch.cat([p.mm_token_type_ids, torch.zeros_like(r)])[None]
        alone = rope_positions(
            model, ids, types, p.video_grid_thw[None], torch.tensor([p.second_per_grid_ts])
        )
        assert torch.equal(batch.position_ids[:, i, : ids.shape[1]], alone[:, 0])


def test_video_attached_to_the_wrong_prompt_is_an_error(model: torch.nn.Module) -> None:
    a, b = _prompt(model, 6, 0), _prompt(model, 4, 1)
    swapped = PromptInput(a.input_ids, a.mm_token_type_ids, a.video_grid_thw, 1.0, b.video_embeds)
    with pytest.raises(MrspError, match="embedding rows"):
        pack_batch(model, [swapped], [random_response(3)], PAD)


def test_rollout_positions_and_logprobs_equal_the_prefill(model: torch.nn.Module) -> None:
    p = _prompt(model, 6, 0, secs=0.5)
    seen: list[torch.Tensor] = []
    hook = model.model.language_model.rotary_emb.register_forward_hook(
        lambda mod, args, out: seen.append(args[1].clone())
    )
    try:
        ro = HFRolloutEngine(model, [EOS], PAD).generate([p], n=3, max_new_tokens=6, seed=0)
    finally:
        hook.remove()
    assert ro.prompt_index == [0, 0, 0] and len({tuple(r.tolist()) for r in ro.response_ids}) > 1
    batch = pack_batch(model, [p] * 3, ro.response_ids, PAD)
    # The shared prompt prefill is [3, 1, P-1]; decode steps may pass one text row [1, n, 1].
    used = torch.cat([s.expand(3, 3, -1) for s in seen], dim=-1)  # [3, n, P + T - 1]
    assert used.shape[-1] == p.input_ids.numel() + 5
    assert torch.equal(used, batch.position_ids[:, :, : used.shape[-1]])
    assert batch.position_ids[0].max() > batch.input_ids.shape[1] // 4  # not trivial 1-D
    out = sp_prefill_logprobs(model, batch)
    for k, lp in enumerate(ro.logprobs):
        assert torch.allclose(out.logprobs[k, : lp.numel()], lp, atol=1e-5)


def test_rollouts_are_reproducible_by_seed(model: torch.nn.Module) -> None:
    eng = HFRolloutEngine(model, [EOS], PAD)
    p = _prompt(model, 4, 2)
    a = eng.generate([p], n=2, max_new_tokens=4, seed=7)
    b = eng.generate([p], n=2, max_new_tokens=4, seed=7)
    assert all(torch.equal(x, y) for x, y in zip(a.response_ids, b.response_ids, strict=True))


def test_embedding_cache_encodes_once_per_step_and_reuses_disk(
    model: torch.nn.Module, tmp_path: Path
) -> None:
    v = synthetic_video(4, seed=5)
    key = VideoKey(v.video_id, (0, 1, 2, 3), (112, 112))
    cache = EmbeddingCache(model, cache_dir=tmp_path)
    first = cache.get(key, v.pixel_values_videos, v.grid_thw)
    for _ in range(10):  # G rollouts + old/ref/policy prefills
        assert cache.get(key, v.pixel_values_videos, v.grid_thw) is first
    assert cache.encodes == 1
    later = EmbeddingCache(model, cache_dir=tmp_path)  # next step / next run
    again = later.get(key, v.pixel_values_videos, v.grid_thw)
    assert later.encodes == 0 and later.disk_hits == 1 and torch.equal(again.tokens, first.tokens)
    bumped = VideoKey(v.video_id, (0, 1, 2, 3), (112, 112), weights_version=1)
    later.get(bumped, v.pixel_values_videos, v.grid_thw)
    assert later.encodes == 1
    cache.new_step()
    cache.get(key, v.pixel_values_videos, v.grid_thw)
    assert cache.disk_hits == 1 and cache.encodes == 1
    with pytest.raises(MrspError, match="frozen"):
        EmbeddingCache(model, cache_dir=tmp_path, trainable=True)


def test_trainable_cache_keeps_the_graph(model: torch.nn.Module) -> None:
    v = synthetic_video(4, seed=6)
    cache = EmbeddingCache(model, trainable=True)
    emb = cache.get(VideoKey(v.video_id, (0,), (112, 112)), v.pixel_values_videos, v.grid_thw)
    emb.tokens.sum().backward()
    assert model.model.visual.merger.mlp[0].weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_left_padded_rows_are_rejected(model: torch.nn.Module) -> None:
    batch = pack_batch(model, [_prompt(model, 2, 0)], [random_response(4)], PAD)
    batch.attention_mask = torch.cat(
        [torch.zeros(1, 1, dtype=torch.long), batch.attention_mask[:, 1:]], 1
    )
    with pytest.raises(MrspError, match="right-padded"):
        sp_prefill_logprobs(model, batch)


def test_policy_gradient_reaches_the_decoder(model: torch.nn.Module) -> None:
    batch = pack_batch(model, [_prompt(model, 2, 0)], [random_response(4)], PAD)
    out = sp_prefill_logprobs(model, batch)
    (-(out.logprobs * out.mask).sum()).backward()
    grad = model.model.language_model.layers[0].self_attn.q_proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
