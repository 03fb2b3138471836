"""The ``vllm`` backend of ``lvr eval run``: offline batched generation with vLLM on video frames.

``lvr eval run --backend vllm`` answers thousands of questions at hundreds of frames, which is not
a job for HF ``generate``: requests go to one in-process ``vllm.LLM`` in batches of
``batch_size`` and vLLM schedules them together (continuous batching, paged KV cache, prefix
cache). Each request is the frames ``lvr.media`` sampled (the same frames the ``hf`` and
``openai`` backends get) passed as ONE raw video with its metadata (``fps`` = frames per second
of video covered, ``do_sample_frames`` False: vLLM's processor must not resample them), and the
prompt rendered with the model's own chat template, a video placeholder in the last user turn —
the layout of the ``hf`` backend, so greedy answers of the two backends agree
(``tests/test_eval_vllm.py``). vLLM runs the vision tower itself.

Same ``Backend`` contract as ``lvr.backends`` (it reuses ``HFBackend.run``): one ``Response`` per
request, in order; a request that fails (too long for ``max_model_len``, a bad frame) gets an
error row and the others go on; only an engine that cannot start raises, once.

Runs where vLLM runs: the ``gpu`` extra on CUDA machines, or the CPU venv of
``scripts/vllm_env.sh`` (``make test-vllm``). Engine start takes 15-25 s on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lvr.backends.base import BackendError, Request, one_line
from lvr.backends.hf import HFBackend, times_of
from lvr.models.family import FamilyError, check_vllm_family
from lvr.models.family import video_metadata as family_video_metadata


@dataclass
class VLLMOptions:
    """Options of the ``vllm`` eval backend (``--set vllm.<key>=...``).

    Attributes:
        batch_size: Requests handed to one ``LLM.generate`` call (vLLM batches inside it; a
            failed call is retried request by request).
        dtype: Model dtype (``auto``, ``bfloat16``, ``float32``...).
        max_model_len: Context length; long videos need room for their video tokens.
        gpu_memory_utilization: Share of GPU memory vLLM may take (None: vLLM's default).
        tensor_parallel_size: GPUs per engine.
        llm: Any other ``vllm.LLM`` argument (``enforce_eager``, ``kv_cache_memory_bytes``...).
        schema_in_prompt: Read by the rendering shared with ``HFBackend`` (no JSON schema here).
    """

    batch_size: int = 64
    dtype: str = "auto"
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None
    tensor_parallel_size: int = 1
    llm: dict[str, Any] = field(default_factory=dict)
    schema_in_prompt: bool = False


def video_metadata(frames: int, fps: float) -> dict[str, Any]:
    """vLLM's metadata of an already-sampled clip: ``frames`` consecutive samples at ``fps``.

    >>> video_metadata(4, 2.0)["duration"]
    2.0
    """
    return {
        "fps": float(fps),
        "duration": frames / fps if fps > 0 else 0.0,
        "total_num_frames": frames,
        "frames_indices": list(range(frames)),
        "video_backend": "pyav",
        "do_sample_frames": False,
    }


class VLLMBackend(HFBackend):
    """Offline vLLM engine behind the ``Backend`` interface.

    It shares the ``hf`` backend's request handling (``HFBackend.run``: checks, batches of
    requests with the same sampling settings, a failed batch retried row by row, progress) and
    its prompt rendering (``HFBackend.render``: the model's chat template, a video placeholder in
    the last user turn), so both backends see the same prompt; only loading and ``generate``
    differ.

    Args:
        model: Hub id or local model folder (a VLM with a chat template).
        options: ``VLLMOptions``.
    """

    name = "vllm"

    def __init__(self, model: str | Path, options: VLLMOptions | None = None):
        super().__init__(model)
        self.opts: Any = options or VLLMOptions()
        if self.opts.batch_size < 1:
            raise BackendError(f"vllm batch_size must be >= 1, got {self.opts.batch_size}")
        self._llm: Any = None

    def load(self) -> None:
        """Start the engine and load the processor once (the first ``run`` calls it).

        Raises:
            BackendError: The engine or the processor cannot be built (one line).
        """
        if self._llm is not None:
            return
        from transformers import AutoProcessor
        from vllm import LLM

        kwargs: dict[str, Any] = {
            "dtype": self.opts.dtype,
            "tensor_parallel_size": self.opts.tensor_parallel_size,
            "limit_mm_per_prompt": {"video": 1, "image": 0},
        }
        if self.opts.max_model_len:
            kwargs["max_model_len"] = self.opts.max_model_len
        if self.opts.gpu_memory_utilization is not None:
            kwargs["gpu_memory_utilization"] = self.opts.gpu_memory_utilization
        kwargs.update(self.opts.llm)
        try:
            check_vllm_family(self.model)
        except FamilyError as exc:
            raise BackendError(f"{one_line(str(exc))}; use --backend hf") from None
        try:
            self._proc = AutoProcessor.from_pretrained(self.model)
            self._llm = LLM(model=self.model, **kwargs)
        except Exception as exc:  # vLLM raises many types for a model it cannot serve
            raise BackendError(
                f"vllm cannot start {self.model!r}: {type(exc).__name__}: {one_line(str(exc))}"
            ) from exc
        self.is_vlm = True

    def _inputs(self, req: Request) -> dict[str, Any]:
        if req.images and not req.fps:
            raise BackendError("the vllm backend takes frames as one video: give the request fps")
        inputs: dict[str, Any] = {"prompt": self.render(req)}
        if req.images:
            video = np.stack(req.images)  # [T, H, W, 3] uint8
            meta = video_metadata(len(req.images), float(req.fps or 1.0))
            # The frames' true times, as the model's family takes them (Qwen3-VL: every frame's
            # time; vLLM computes them as frames_indices / fps, like the HF processor).
            meta.update(family_video_metadata(self._proc, times_of(req), *video.shape[1:3]))
            inputs["multi_modal_data"] = {"video": (video, meta)}
        return inputs

    def placeholder_ids(self) -> list[int]:
        """The served model's vision placeholder tokens ([] for a family lvr does not know)."""
        from lvr.models.family import FamilyError, placeholder_ids

        try:
            return placeholder_ids(self._llm.llm_engine.model_config.hf_config)
        except FamilyError:
            return []

    def _params(self, req: Request) -> Any:
        from vllm import SamplingParams

        # Vision placeholders are never generated (each is one token: `bad_words` bans it always).
        tok = self._llm.get_tokenizer()
        banned = [tok.convert_ids_to_tokens(i) for i in self.placeholder_ids()]
        return SamplingParams(
            n=req.n,
            temperature=req.temperature,
            top_p=req.top_p if req.temperature > 0 else 1.0,
            max_tokens=req.max_tokens,
            seed=req.seed,
            bad_words=banned or None,
        )

    def generate(self, reqs: list[Request]) -> list[list[str]]:
        """One ``LLM.generate`` call over a batch (vLLM schedules the requests together).

        Args:
            reqs: Requests of one batch (``HFBackend.run`` groups and retries them).

        Returns:
            n texts per request.
        """
        self.load()
        inputs = [self._inputs(r) for r in reqs]
        outs = self._llm.generate(inputs, [self._params(r) for r in reqs], use_tqdm=False)
        return [[c.text for c in out.outputs] for out in outs]
