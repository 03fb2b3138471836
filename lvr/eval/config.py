"""Configuration of ``lvr eval run`` (one dataclass; YAML file + ``--set key=value`` overrides).

Light on purpose (dataclasses only): the CLI imports it at module top.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Benchmark = Literal[
    "qa",
    "longvideo-reason",
    "videomme",
    "longvideobench",
    "mlvu",
    "videomme-v2",
    "lvbench",
    "video-holmes",
    "nextqa",
]
BackendName = Literal["auto", "hf", "openai", "vllm"]
PromptMode = Literal["think", "direct"]


@dataclass
class JudgeConfig:
    """Optional LLM judge for open-ended questions (an OpenAI-compatible endpoint).

    Attributes:
        model: Served judge model; empty = no judge (normalized exact match only).
        base_url: Endpoint root including /v1.
        max_tokens: Budget of the judge's reply (it must answer Yes or No).
    """

    model: str = ""
    base_url: str = "http://127.0.0.1:8000/v1"
    max_tokens: int = 8


@dataclass
class EvalConfig:
    """Everything that decides what ``lvr eval run`` asks and how it scores.

    Attributes:
        model: Model folder, hub id, or ``openai:<served name>``.
        backend: ``auto`` (``openai:`` prefix -> openai, else hf), ``hf``, ``openai`` or ``vllm``.
        benchmark: Which adapter reads ``data``.
        data: Benchmark file/folder or ``datasets`` name (``org/name@split``); for ``qa`` the
            default is ``<run>/qa``.
        video_dir: Folder holding the benchmark's videos.
        split: Dataset split (hub names) or, for ``qa``, the qa split (``eval``; ``all``).
        subtitles: Add subtitles to the prompt (Video-MME).
        frames: Frame budgets; several values run a frame-scaling sweep.
        fps: Sample F frames per second instead (``frames`` then caps the count).
        max_pixels: Per-frame pixel cap (frames are downscaled to fit, aspect kept).
        prompt: ``think`` (reasoning then <answer>) or ``direct`` (answer only).
        temperature: 0 = greedy.
        top_p: Nucleus sampling mass.
        max_tokens: Generation budget.
        passes: Samples per question (``--passes K``; writes the pass_rates table).
        seed: Sampling seed (pass k of a request uses ``seed`` + first missing pass index).
        batch_size: Questions per backend call and per written part (a crash costs one part).
        limit: Only the first N questions (smoke runs).
        bootstrap: Bootstrap resamples for the CIs.
        base_url: OpenAI-compatible endpoint for ``openai:`` models.
        concurrency: Requests in flight (openai backend).
        device: Device of the hf backend (``cpu``, ``cuda``...).
        vllm: Options of the ``vllm`` backend (``lvr.eval.vllm_backend.VLLMOptions``: batch size,
            dtype, memory use, max model length, extra ``vllm.LLM`` arguments under ``llm``).
        judge: Open-ended judge settings.
    """

    model: str = ""
    backend: BackendName = "auto"
    benchmark: Benchmark = "longvideo-reason"
    data: str = ""
    video_dir: str = ""
    split: str = ""
    subtitles: bool = False
    frames: list[int] = field(default_factory=lambda: [16])
    fps: float | None = None
    max_pixels: int = 448 * 448
    prompt: PromptMode = "think"
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 1024
    passes: int = 1
    seed: int = 0
    batch_size: int = 8
    limit: int | None = None
    bootstrap: int = 1000
    base_url: str = "http://127.0.0.1:8000/v1"
    concurrency: int = 16
    device: str = "cpu"
    vllm: dict[str, Any] = field(default_factory=dict)
    judge: JudgeConfig = field(default_factory=JudgeConfig)

    def __post_init__(self) -> None:
        if not self.frames or any(f < 1 for f in self.frames):
            raise ValueError(f"frames must be positive integers, got {self.frames}")
        if self.passes < 1:
            raise ValueError(f"passes must be >= 1, got {self.passes}")
        if self.passes > 1 and self.temperature == 0:
            raise ValueError(
                f"passes={self.passes} with temperature=0 gives {self.passes} identical greedy "
                "answers; set temperature (e.g. 1.0) for pass rates"
            )
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"fps must be > 0, got {self.fps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
