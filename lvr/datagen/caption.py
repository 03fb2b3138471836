"""Stage ``caption``: one caption per clip, from a VLM (``openai``/``hf``) or existing annotations.

Reads the tables ``videos`` and ``clips`` of segment shard ``k``, writes ``captions`` shard ``k``:
every clip gets exactly one row, with a caption or an ``error`` (clip errors, undecodable frames,
model failures). A row carries its video's path and duration, all that ``qa`` needs.

Model calls go through ``lvr.backends`` with the run's persistent request cache, so a rerun pays
only for rows that failed (shards holding error rows are redone by default; their successful
calls are cache hits) and a prompt change pays only for what changed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from lvr.backends import Request, Response, check_options
from lvr.datagen.annotations import caption_for, find_segments, load_annotations, sidecar_segments
from lvr.datagen.common import ModelBackends, error_line, settings_id
from lvr.datagen.config import CaptionConfig, DatagenConfig
from lvr.datagen.prompts import Prompt, inline_prompt, load_prompt
from lvr.datagen.runner import (
    DatagenStage,
    Rows,
    StageContext,
    require_model,
    run_datagen_stage,
)
from lvr.errors import LvrError
from lvr.media import VideoDecodeError, sample_frames

_BATCH_CLIPS = 32  # clips whose frames are held in memory at once (8 frames x 448^2 each ~ 150 MB)


@dataclass(frozen=True)
class ClipItem:
    """One clip to caption (its fields but ``duration_s`` are its shard fingerprint)."""

    clip_id: str
    video_id: str
    video_path: str
    start_s: float
    end_s: float
    clip_error: str | None
    fps: float | None  # of the video, when known (annotations count frames)
    settings: str  # id of the caption settings that change rows
    # of the video; carried into the row for qa. Not fingerprinted: a function of the video, and
    # runs written before captions carried it recorded fingerprints without it.
    duration_s: float | None = field(default=None, metadata={"fingerprint": False})


def caption_prompt(cfg: CaptionConfig) -> Prompt:
    """The configured caption prompt (inline text or a prompt file)."""
    if cfg.prompt_text:
        return inline_prompt(cfg.prompt_text, cfg.prompt_version)
    return load_prompt(cfg.prompt)


class CaptionConfigError(LvrError):
    """A caption setting that would fail every clip alike (a missing annotation file...)."""


def check_settings(cfg: DatagenConfig) -> None:
    """What would fail every clip alike, checked before any stage of a run works.

    Raises:
        LvrError: A missing annotation file, model name, bad backend options or a bad prompt.
    """
    section = cfg.caption
    if section.backend == "annotations":
        if section.annotations != "sidecar" and not Path(section.annotations).exists():
            raise CaptionConfigError(
                f"caption.annotations {section.annotations} does not exist (a file or folder of "
                "JSON/JSONL/CSV/Parquet annotations, or `sidecar`)"
            )
        return
    require_model("caption", section.backend, section.model)
    check_options(section.backend, section.options, "caption.options")
    caption_prompt(section).check(known=())  # frames are the only input: no placeholders


def plan_items(cfg: DatagenConfig, upstream: dict[str, pa.Table]) -> list[ClipItem]:
    """Items of caption shard ``k``: the clips of segment shard ``k``, by (video_id, start_s)."""
    videos = upstream["videos"].select(["video_id", "fps", "duration_s"]).to_pylist()
    fps = {v["video_id"]: v["fps"] for v in videos if v["fps"]}
    duration = {v["video_id"]: v["duration_s"] for v in videos}
    settings = settings_id(_settings(cfg.caption))
    items = [
        ClipItem(clip_id=r["clip_id"], video_id=r["video_id"], video_path=r["video_path"],
                 start_s=r["start_s"], end_s=r["end_s"], clip_error=r["error"],
                 fps=fps.get(r["video_id"]), settings=settings,
                 duration_s=duration.get(r["video_id"]))
        for r in upstream["clips"].to_pylist()
    ]  # fmt: skip
    return sorted(items, key=lambda it: (it.video_id, it.start_s, it.clip_id))


def _settings(cfg: CaptionConfig) -> dict[str, Any]:
    """Settings that change captions (backend options such as concurrency do not)."""
    out = asdict(cfg)
    out.pop("options")
    return out


def _row(it: ClipItem, **fields: Any) -> dict[str, Any]:
    return {"clip_id": it.clip_id, "video_id": it.video_id, "video_path": it.video_path,
            "duration_s": it.duration_s, "start_s": it.start_s, "end_s": it.end_s, **fields}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Annotations backend
# ---------------------------------------------------------------------------------------------


class AnnotationCaptioner:
    """Captions from existing annotation files or synthetic sidecars (no model)."""

    def __init__(self, cfg: CaptionConfig):
        self.cfg = cfg
        self.sidecar = cfg.annotations == "sidecar"
        self.table = {} if self.sidecar else load_annotations(cfg.annotations)
        self.model = "sidecar" if self.sidecar else Path(cfg.annotations).name

    def __call__(self, items: list[ClipItem]) -> Rows:
        segments: dict[str, Any] = {}  # video_id -> its annotated segments (None: none), read once
        return {"captions": [self._caption(it, segments) for it in items]}

    def _caption(self, it: ClipItem, segments: dict[str, Any]) -> dict[str, Any]:
        base = {"backend": "annotations", "model": self.model, "prompt_version": None,
                "frames": 0, "attempts": 0, "latency_s": 0.0}  # fmt: skip
        if it.clip_error:
            return _row(it, **base, error=f"clip has an error: {it.clip_error}")
        if it.video_id not in segments:
            segments[it.video_id] = (
                sidecar_segments(it.video_path) if self.sidecar
                else find_segments(self.table, it.video_id, it.video_path, self.cfg.annotation_key)
            )  # fmt: skip
        segs = segments[it.video_id]
        if segs is None:
            where = (
                "no sidecar next to the video"
                if self.sidecar
                else f"no entry in {self.cfg.annotations}"
            )
            return _row(it, **base, error=f"no annotations for {it.video_path}: {where}")
        try:
            text = caption_for(segs, it.start_s, it.end_s, it.fps, self.cfg.min_overlap_s)
        except ValueError as exc:
            return _row(it, **base, error=str(exc))
        err = None if text else f"no annotated segment overlaps [{it.start_s:g}, {it.end_s:g}) s"
        return _row(it, **base, caption=text, error=err)


# ---------------------------------------------------------------------------------------------
# Model backends
# ---------------------------------------------------------------------------------------------


class ModelCaptioner:
    """Captions from a VLM through ``lvr.backends``.

    Args:
        cfg: The caption settings.
        models: The stage's model backends (built on first use over the run's request cache,
            spending this machine's share of the request budget; the runner closes them).
        progress: Show progress bars.
    """

    def __init__(self, cfg: CaptionConfig, models: ModelBackends, progress: bool):
        self.cfg = cfg
        self.prompt = caption_prompt(cfg)
        self.backends = models
        self.progress = progress

    def __call__(self, items: list[ClipItem]) -> Rows:
        rows: dict[str, dict[str, Any]] = {}
        good = []
        for it in items:
            if it.clip_error:
                rows[it.clip_id] = self._error(it, f"clip has an error: {it.clip_error}")
            else:
                good.append(it)
        batches = [good[i : i + _BATCH_CLIPS] for i in range(0, len(good), _BATCH_CLIPS)]
        for batch, frames in _prefetched(batches, self._frames):
            rows.update(self._caption(batch, frames))
        return {"captions": [rows[it.clip_id] for it in items]}

    def _error(self, it: ClipItem, msg: str) -> dict[str, Any]:
        return _row(it, backend=self.cfg.backend, model=self.cfg.model, prompt_version=self.prompt.version,
                    frames=0, attempts=0, latency_s=0.0, error=msg)  # fmt: skip

    def _frames(self, batch: list[ClipItem]) -> dict[str, np.ndarray | str]:
        """clip_id -> [N, H, W, 3] uint8 frames, or an error line."""
        out: dict[str, np.ndarray | str] = {}
        for it in batch:
            try:
                fr = sample_frames(it.video_path, num_frames=self.cfg.frames, start_s=it.start_s,
                                   end_s=it.end_s, max_pixels=self.cfg.max_pixels or None)  # fmt: skip
                out[it.clip_id] = fr.frames
            except (VideoDecodeError, ValueError) as exc:
                out[it.clip_id] = f"frames not decoded: {error_line(exc)}"
        return out

    def _caption(
        self, batch: list[ClipItem], frames: dict[str, np.ndarray | str]
    ) -> dict[str, dict[str, Any]]:
        rows, reqs, owners = {}, [], []
        for it in batch:
            fr = frames[it.clip_id]
            if isinstance(fr, str):
                rows[it.clip_id] = self._error(it, fr)
                continue
            span = max(it.end_s - it.start_s, 1e-3)
            reqs.append(Request(item_id=it.clip_id, messages=self.prompt.messages(), images=list(fr),
                                fps=len(fr) / span, max_tokens=self.cfg.max_tokens,
                                temperature=self.cfg.temperature, prompt_version=self.prompt.version))  # fmt: skip
            owners.append((it, len(fr)))
        responses = self.backends(self.cfg.model).run(reqs, progress=self.progress) if reqs else []
        for (it, n), resp in zip(owners, responses, strict=True):
            rows[it.clip_id] = self._caption_row(it, n, resp)
        return rows

    def _caption_row(self, it: ClipItem, frames: int, resp: Response) -> dict[str, Any]:
        text = (resp.texts[0].strip() or None) if resp.ok and resp.texts else None
        err = resp.error if not resp.ok else (None if text else "empty caption")
        return _row(it, caption=text, backend=self.cfg.backend, model=self.cfg.model,
                    prompt_version=self.prompt.version, frames=frames, attempts=resp.attempts,
                    latency_s=resp.latency_s, error=err)  # fmt: skip


def _prefetched(batches: list[Any], load: Callable[[Any], Any]) -> Iterator[tuple[Any, Any]]:
    """Yield (batch, load(batch)) while the next batch loads in a thread (decode overlaps calls)."""
    if not batches:
        return
    with ThreadPoolExecutor(1) as pool:
        nxt: Future = pool.submit(load, batches[0])
        for i, batch in enumerate(batches):
            loaded = nxt.result()
            if i + 1 < len(batches):
                nxt = pool.submit(load, batches[i + 1])
            yield batch, loaded


def make_captioner(cfg: DatagenConfig, ctx: StageContext) -> AnnotationCaptioner | ModelCaptioner:
    """The captioner of ``caption.backend``."""
    section = cfg.caption
    if section.backend == "annotations":  # the sidecar's or a file's captions, no model
        return AnnotationCaptioner(section)
    backends = ctx.model_backends("caption", section.backend, section.model)
    return ModelCaptioner(section, backends, ctx.progress)


STAGE = DatagenStage(
    name="caption",
    tables=("captions",),
    upstream="segment",
    reads=("videos", "clips"),
    plan=plan_items,
    open_worker=make_captioner,
    models=lambda cfg: (cfg.caption.backend, cfg.caption.options),
    check=check_settings,
    transient_errors=True,  # model calls: a rerun retries the failed rows (cache hits for the rest)
)

run_caption = partial(run_datagen_stage, STAGE)
"""``run_caption(cfg, run, shard=0, num_shards=1, progress=True, retry_errors=True)``."""
