"""Rollout engines for the RL recipe: build one, check vLLM's arguments, sync weights into it.

`hf` samples with the policy's own module (nothing to sync); `vllm` keeps its own copy of the
weights on the SP leader and is reloaded in place after every step that changed the policy.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from lvr.mrsp.comm import MrspError
from lvr.mrsp.rollout import HFRolloutEngine

EngineKind = Literal["hf", "vllm"]


def make_rollout_engine(
    kind: EngineKind,
    model: torch.nn.Module,
    eos_ids: list[int],
    pad_id: int,
    folder: str | Path,
    is_leader: bool,
    vllm_args: Mapping[str, Any],
) -> Any:
    """The sampler. `hf` runs `model` itself; `vllm` holds its own copy of the weights, started
    from `folder`, on the SP leader only (the leader generates and broadcasts; None elsewhere)."""
    if kind == "hf":
        return HFRolloutEngine(model, eos_ids, pad_id)
    if not is_leader:
        return None
    from lvr.mrsp.vllm_engine import VLLMRolloutEngine  # the optional `gpu` extra

    video_id = int(model.config.video_token_id)
    return VLLMRolloutEngine(folder, video_id, stop_token_ids=eos_ids, **vllm_args)


def check_vllm(kwargs: Mapping[str, Any]) -> None:
    """vLLM must be importable, and `rollout.vllm` hold only arguments it takes (its own error is a
    bare TypeError deep in the engine setup). `model` is ours: it is the policy's folder.

    Raises:
        MrspError: vLLM is missing, or an argument is unknown (with a did-you-mean).
    """
    try:
        from vllm import LLM, EngineArgs
    except ImportError:
        raise MrspError(
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
            raise MrspError(
                f"unknown vLLM argument 'rollout.vllm.{key}'{hint}; the keys are `vllm.LLM` "
                "arguments, e.g. dtype, gpu_memory_utilization, max_model_len, "
                "kv_cache_memory_bytes, tensor_parallel_size (the model is set from model.path)"
            )


def needs_sync(engine: Any) -> bool:
    """Whether `engine` keeps its own weights (vLLM): the HF engine samples with the policy."""
    return engine is not None and not isinstance(engine, HFRolloutEngine)


def sync_weights(engine: Any, weights: torch.nn.Module | Mapping[str, torch.Tensor]) -> None:
    """Load the policy's current weights into an engine that keeps its own copy (`needs_sync`).

    Args:
        engine: The rollout engine.
        weights: The plain model, or a state dict under its names (LoRA merged).
    """
    engine.update_weights(weights)
