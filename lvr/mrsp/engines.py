"""Rollout engines for the RL recipe: build one, check vLLM's arguments, sync weights into it.

`hf` samples with the policy's own module (nothing to sync); `vllm` keeps its own copy of the
weights and is reloaded in place after every step that changed the policy. There is one vLLM
engine per SP group, on the group's leader (SP rank 0): with dp data-parallel groups, dp engines
sample their own groups' prompts at the same time, each from the embeddings its group cached, and
each gets the new weights after every step (every rank holds the whole policy, so each leader
sends its own copy: no weight traffic between nodes).

Inside a multi-process job each engine runs in a process of its own, started with `spawn` and
shown only its leader's GPU (`engine_process_env`).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist

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
    from `folder`, on each SP group's leader (`is_leader`: the leader generates its group's
    prompts and broadcasts the rollouts to the group; None on the other ranks)."""
    if kind == "hf":
        return HFRolloutEngine(model, eos_ids, pad_id)
    if not is_leader:
        return None
    from lvr.mrsp.vllm_engine import VLLMRolloutEngine  # the optional `gpu` extra

    video_id = int(model.config.video_token_id)
    with engine_process_env(next(model.parameters()).device):
        return VLLMRolloutEngine(folder, video_id, stop_token_ids=eos_ids, **vllm_args)


@contextmanager
def engine_process_env(device: torch.device) -> Iterator[None]:
    """The environment a vLLM engine starts in from a rank of a multi-process job.

    - Its own process, spawned: an engine in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``)
      or forked from it would find the training world's process group initialized and take it
      for its own world, so each group's engine would wait in collectives for ranks that never
      join. The engine core then runs in a fresh process with a world of its own.
    - Only this rank's GPU: the engine process sees just the leader's device while it starts
      (``CUDA_VISIBLE_DEVICES``), or every group's engine would start on GPU 0. Restored after.

    A single process (no process group) keeps vLLM's settings as they are.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        yield
        return
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if device.type == "cuda":
        ids = visible.split(",") if visible else None
        index = device.index if device.index is not None else torch.cuda.current_device()
        os.environ["CUDA_VISIBLE_DEVICES"] = ids[index] if ids else str(index)
    try:
        yield
    finally:
        if visible is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible


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
