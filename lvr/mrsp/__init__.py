"""MR-SP: Multi-modal Reinforcement Sequence Parallelism — the only place that knows about SP.

The RL recipe uses this narrow API, per step:

    cache = EmbeddingCache(model, group=sp_group)          # once; cache.new_step() every step
    emb = cache.get(VideoKey(vid, frame_idx, (h, w), vision_version), pixels, grid_thw)  # VideoEmbeds
    prompt = PromptInput(input_ids, mm_token_type_ids, grid_thw, second_per_grid_ts, emb, key=vid)
    rollouts = engine.generate(prompts, n=G, temperature=1.0, top_p=0.99, max_new_tokens=..., seed=step)
    batch = pack_batch(model, [prompts[i] for i in rollouts.prompt_index], rollouts.response_ids, pad_id)
    out = sp_prefill_logprobs(model, batch, group=sp_group)  # out.logprobs/entropy/mask: [B, R]
    loss.backward(); sync_sp_grads(model.parameters(), sp_group)

- Stage 1 (`encode`): a video's units (temporal patches; LLaVA-OneVision's frames) are split over
  the SP group, encoded, all-gathered;
  the embeddings are encoded once per step and reused by the G rollouts and the old/ref/policy
  prefills. Default: frozen vision tower + projector (what cached embeddings imply); `trainable=True`
  keeps the graph (differentiable gather).
- Stage 2 (`prefill`, `ulysses`): the sequence is sharded round-robin over the group, decoder layers
  run on the shard, attention goes through Ulysses all-to-all; log-probs are computed only at
  response tokens and returned as `[B, R]`, identical on every rank and to SP=1.
- Positions: the model's own `get_rope_index` with `mm_token_type_ids` (3-D M-RoPE; 1-D token
  positions for LLaVA-OneVision), the same as `generate` uses; rollouts and prefills see
  identical positions (tested).
- Families (`lvr.models.family`): every family lvr knows (five Qwen-VL, LLaVA-OneVision); a
  video's `VideoEmbeds` are its merged tokens plus Qwen3-VL's DeepStack features (cached,
  gathered and prefilled together); Qwen3.5's gated delta-net layers are split over heads
  (`linear_attention`).
- Gradient convention: sum over the SP group (`sync_sp_grads`); see `lvr.mrsp.comm`.
- Engines (`rollout`): `HFRolloutEngine` (CPU/GPU) and `VLLMRolloutEngine` (`lvr.mrsp.vllm_engine`,
  imported lazily: vLLM is optional).

Check SP numerics on any machine: `torchrun --nproc_per_node 2 -m lvr.mrsp.selftest`.
"""

from __future__ import annotations

from lvr.mrsp.batch import (
    PrefillBatch,
    PromptInput,
    pack_batch,
    prompt_from_sample,
    rope_positions,
)
from lvr.mrsp.comm import MrspError, gather_rows, sync_sp_grads
from lvr.mrsp.encode import EmbeddingCache, VideoKey, encode_video, encode_video_sp
from lvr.mrsp.prefill import PrefillOutput, sp_prefill_logprobs
from lvr.mrsp.rollout import HFRolloutEngine, RolloutEngine, Rollouts
from lvr.mrsp.ulysses import StridedLayout

__all__ = [
    "EmbeddingCache",
    "HFRolloutEngine",
    "MrspError",
    "PrefillBatch",
    "PrefillOutput",
    "PromptInput",
    "RolloutEngine",
    "Rollouts",
    "StridedLayout",
    "VideoKey",
    "encode_video",
    "encode_video_sp",
    "gather_rows",
    "pack_batch",
    "prompt_from_sample",
    "rope_positions",
    "sp_prefill_logprobs",
    "sync_sp_grads",
]
