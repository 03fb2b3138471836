"""Rollout engines of `lvr rl`: build the sampler, check vLLM's arguments, sync weights into it.

`hf` samples with the policy's own module (nothing to sync); `vllm` keeps its own copy of the
weights on rank 0 and is reloaded in place after every RL step that stepped the optimizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lvr.train import common as C
from lvr.train import rl_state as S
from lvr.train.rl_config import RLConfig


def rollout_engine(
    cfg: RLConfig,
    info: C.DistInfo,
    base: torch.nn.Module,
    eos_ids: list[int],
    pad_id: int,
    folder: str | Path,
) -> Any:
    """The sampler. `hf` runs the policy module itself; `vllm` holds its own copy of the weights,
    started from `folder`, on rank 0 only (rank 0 generates and broadcasts; None elsewhere)."""
    from lvr.mrsp.rollout import HFRolloutEngine

    if cfg.rollout.engine == "hf":
        return HFRolloutEngine(base, eos_ids, pad_id)
    if not info.is_main:
        return None
    from lvr.mrsp.vllm_engine import VLLMRolloutEngine

    # In one process vLLM seeds the global RNGs with its `seed`: make that the run's seed.
    kwargs = {"seed": cfg.seed, **cfg.rollout.vllm}
    video_id = int(base.config.video_token_id)
    return VLLMRolloutEngine(folder, video_id, stop_token_ids=eos_ids, **kwargs)


def check_vllm(kwargs: dict[str, Any]) -> None:
    """vLLM must be importable, and `rollout.vllm` hold only arguments it takes (its own error is a
    bare TypeError deep in the engine setup). `model` is ours: it is the policy's folder."""
    import dataclasses
    import difflib
    import inspect

    try:
        from vllm import LLM, EngineArgs
    except ImportError:
        raise C.TrainError(
            "rollout.engine=vllm but vLLM is not installed here: use the `gpu` extra, or the CPU "
            "venv built by scripts/vllm_env.sh (or rollout.engine=hf)"
        ) from None

    valid = {f.name for f in dataclasses.fields(EngineArgs)}
    valid |= set(inspect.signature(LLM.__init__).parameters)
    valid -= {"self", "kwargs", "model"}
    for key in kwargs:
        if key not in valid:
            close = difflib.get_close_matches(key, sorted(valid), n=1)
            hint = f" (did you mean 'rollout.vllm.{close[0]}'?)" if close else ""
            raise C.TrainError(
                f"unknown vLLM argument 'rollout.vllm.{key}'{hint}; the keys are `vllm.LLM` "
                "arguments, e.g. dtype, gpu_memory_utilization, max_model_len, "
                "kv_cache_memory_bytes, tensor_parallel_size (the model is set from model.path)"
            )


def sync_engine(st: S.State) -> None:
    """Load the policy's current weights into an engine that keeps its own copy (vLLM).

    The HF engine samples with the policy module itself, and ranks other than 0 have no engine:
    nothing to do. With LoRA the engine gets W + scale * B @ A under the plain model's names,
    computed into fresh tensors so the PEFT modules that train stay as they are.
    """
    from lvr.mrsp.rollout import HFRolloutEngine

    if st.engine is None or isinstance(st.engine, HFRolloutEngine):
        return
    merged = S.merged_state(st)
    st.engine.update_weights(merged if merged is not None else st.base)
    st.counts["weight_syncs"] = st.counts.get("weight_syncs", 0) + 1
