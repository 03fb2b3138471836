"""Stage ``caption``: one caption per clip, from a VLM (``openai``/``hf``) or existing annotations.

Reads ``runs/<run>/segment/clips``, writes ``runs/<run>/caption/captions``: every clip gets exactly
one row, with a caption or an ``error`` (clip errors, undecodable frames, model failures).

Model calls go through ``lvr.backends`` with the persistent request cache in ``<run>/cache/``, so a
rerun pays only for rows that failed (shards holding error rows are redone by default; their
successful calls are cache hits) and a prompt change pays only for what changed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pyarrow as pa

from lvr.artifacts import Shard, Stage, StageResult, manifest_name, rows_to_table, run_stage
from lvr.datagen.common import (
    CallReport,
    drop_orphans,
    error_line,
    read_shard,
    retry_failed_shards,
    settings_id,
    shard_limiter,
    upstream_shards,
)
from lvr.datagen.config import CaptionConfig, DatagenConfig
from lvr.datagen.prompts import Prompt, inline_prompt, load_prompt
from lvr.errors import LvrError

TABLES = ("captions",)
_BATCH_CLIPS = 32  # clips whose frames are held in memory at once (8 frames x 448^2 each ~ 150 MB)


def caption_prompt(cfg: CaptionConfig) -> Prompt:
    """The configured caption prompt (inline text or a prompt file)."""
    if cfg.prompt_text:
        return inline_prompt(cfg.prompt_text, cfg.prompt_version)
    return load_prompt(cfg.prompt)


def cache_path(run_dir: Path, shard: int, num_shards: int) -> Path:
    """Request cache of a run; one file per machine when sharded (SQLite WAL needs a local lock).

    Lookups also read the other ``requests*.sqlite`` files of the folder, so a rerun with another
    number of shards reuses every answer (see `lvr.backends.cache`).
    """
    name = "requests.sqlite" if num_shards == 1 else f"requests-{shard}of{num_shards}.sqlite"
    return run_dir / "cache" / name


def shard_items(upstream: Stage, k: int, cfg: CaptionConfig) -> list[dict[str, Any]]:
    """Work items of caption shard ``k``: the clips of segment shard ``k``."""
    videos = read_shard(upstream, "videos", k).select(["video_id", "fps"]).to_pylist()
    fps = {v["video_id"]: v["fps"] for v in videos if v["fps"]}
    return plan_items(read_shard(upstream, "clips", k), cfg, fps)


def plan_items(clips: pa.Table, cfg: CaptionConfig, fps: dict[str, float]) -> list[dict[str, Any]]:
    """One work item per clip, ordered by (video_id, start_s)."""
    settings = settings_id(_settings(cfg))
    items = [
        {"clip_id": r["clip_id"], "video_id": r["video_id"], "video_path": r["video_path"],
         "start_s": r["start_s"], "end_s": r["end_s"], "clip_error": r["error"],
         "fps": fps.get(r["video_id"]), "settings": settings}
        for r in clips.to_pylist()
    ]  # fmt: skip
    return sorted(items, key=lambda it: (it["video_id"], it["start_s"], it["clip_id"]))


def _settings(cfg: CaptionConfig) -> dict[str, Any]:
    """Settings that change captions (backend options such as concurrency do not)."""
    out = asdict(cfg)
    out.pop("options")
    return out


def _row(it: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"clip_id": it["clip_id"], "video_id": it["video_id"], "start_s": it["start_s"],
            "end_s": it["end_s"], **fields}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Annotations backend
# ---------------------------------------------------------------------------------------------


class AnnotationCaptioner:
    """Captions from existing annotation files or synthetic sidecars (no model)."""

    def __init__(self, cfg: CaptionConfig):
        from lvr.datagen.annotations import load_annotations

        self.cfg = cfg
        self.sidecar = cfg.annotations == "sidecar"
        self.table = {} if self.sidecar else load_annotations(cfg.annotations)
        self.model = "sidecar" if self.sidecar else Path(cfg.annotations).name

    def __call__(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from lvr.datagen.annotations import caption_for, find_segments, sidecar_segments

        base = {"backend": "annotations", "model": self.model, "prompt_version": None,
                "frames": 0, "attempts": 0, "latency_s": 0.0}  # fmt: skip
        rows, cache = [], {}
        for it in items:
            if it["clip_error"]:
                rows.append(_row(it, **base, error=f"clip has an error: {it['clip_error']}"))
                continue
            vid = it["video_id"]
            if vid not in cache:
                cache[vid] = (
                    sidecar_segments(it["video_path"]) if self.sidecar
                    else find_segments(self.table, vid, it["video_path"], self.cfg.annotation_key)
                )  # fmt: skip
            segs = cache[vid]
            if segs is None:
                where = (
                    "no sidecar next to the video"
                    if self.sidecar
                    else f"no entry in {self.cfg.annotations}"
                )
                rows.append(
                    _row(it, **base, error=f"no annotations for {it['video_path']}: {where}")
                )
                continue
            try:
                text = caption_for(
                    segs, it["start_s"], it["end_s"], it["fps"], self.cfg.min_overlap_s
                )
            except ValueError as exc:
                rows.append(_row(it, **base, error=str(exc)))
                continue
            err = (
                None
                if text
                else f"no annotated segment overlaps [{it['start_s']:g}, {it['end_s']:g}) s"
            )
            rows.append(_row(it, **base, caption=text, error=err))
        return rows


# ---------------------------------------------------------------------------------------------
# Model backends
# ---------------------------------------------------------------------------------------------


class ModelCaptioner:
    """Captions from a VLM through ``lvr.backends`` (built on first use, cached requests).

    ``limiter`` is this process's share of the job's request budget (`shard_limiter`).
    """

    def __init__(self, cfg: CaptionConfig, cache_file: Path, progress: bool, limiter: Any = None):
        self.cfg = cfg
        self.prompt = caption_prompt(cfg)
        self.cache_file = cache_file
        self.progress = progress
        self.limiter = limiter
        self._backend: Any = None

    @property
    def backend(self) -> Any:
        if self._backend is None:
            from lvr.backends import make_backend

            self._backend = make_backend(self.cfg.backend, self.cfg.model, cache_path=self.cache_file,
                                         limiter=self.limiter, **self.cfg.options)  # fmt: skip
        return self._backend

    def backends(self) -> list[Any]:
        """The backends built so far (for usage reports)."""
        return [self._backend] if self._backend is not None else []

    def close(self) -> None:
        if self._backend is not None and hasattr(self._backend, "close"):
            self._backend.close()

    def __call__(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        rows: dict[str, dict[str, Any]] = {}
        good = []
        for it in items:
            if it["clip_error"]:
                rows[it["clip_id"]] = self._error(it, f"clip has an error: {it['clip_error']}")
            else:
                good.append(it)
        batches = [good[i : i + _BATCH_CLIPS] for i in range(0, len(good), _BATCH_CLIPS)]
        for batch, frames in _prefetched(batches, self._frames):
            rows.update(self._caption(batch, frames))
        return [rows[it["clip_id"]] for it in items]

    def _error(self, it: dict[str, Any], msg: str, frames: int = 0) -> dict[str, Any]:
        return _row(it, backend=self.cfg.backend, model=self.cfg.model, prompt_version=self.prompt.version,
                    frames=frames, attempts=0, latency_s=0.0, error=msg)  # fmt: skip

    def _frames(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        """clip_id -> [N, H, W, 3] uint8 frames, or an error line."""
        from lvr.media import VideoDecodeError, sample_frames

        out: dict[str, Any] = {}
        for it in batch:
            try:
                fr = sample_frames(it["video_path"], num_frames=self.cfg.frames, start_s=it["start_s"],
                                   end_s=it["end_s"], max_pixels=self.cfg.max_pixels or None)  # fmt: skip
                out[it["clip_id"]] = fr.frames
            except (VideoDecodeError, ValueError) as exc:
                out[it["clip_id"]] = f"frames not decoded: {error_line(exc)}"
        return out

    def _caption(
        self, batch: list[dict[str, Any]], frames: dict[str, Any]
    ) -> dict[str, dict[str, Any]]:
        from lvr.backends import Request

        rows, reqs, owners = {}, [], []
        for it in batch:
            fr = frames[it["clip_id"]]
            if isinstance(fr, str):
                rows[it["clip_id"]] = self._error(it, fr)
                continue
            span = max(it["end_s"] - it["start_s"], 1e-3)
            reqs.append(Request(item_id=it["clip_id"], messages=self.prompt.messages(), images=list(fr),
                                fps=len(fr) / span, max_tokens=self.cfg.max_tokens,
                                temperature=self.cfg.temperature, prompt_version=self.prompt.version))  # fmt: skip
            owners.append((it, len(fr)))
        responses = self.backend.run(reqs, progress=self.progress) if reqs else []
        for (it, n), resp in zip(owners, responses, strict=True):
            text = (resp.texts[0].strip() or None) if resp.ok and resp.texts else None
            err = resp.error if not resp.ok else (None if text else "empty caption")
            rows[it["clip_id"]] = _row(
                it, caption=text, backend=self.cfg.backend, model=self.cfg.model,
                prompt_version=self.prompt.version, frames=n, attempts=resp.attempts,
                latency_s=resp.latency_s, error=err,
            )  # fmt: skip
        return rows


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


def make_captioner(
    cfg: CaptionConfig, run_dir: Path, shard: int, num_shards: int, progress: bool
) -> Any:
    """The captioner of ``cfg.backend``."""
    if cfg.backend == "annotations":
        return AnnotationCaptioner(cfg)
    if not cfg.model:
        raise LvrError(
            f"caption.backend={cfg.backend} needs caption.model (served name or local folder)"
        )
    limiter = shard_limiter(cfg.backend, cfg.options, num_shards)
    return ModelCaptioner(cfg, cache_path(run_dir, shard, num_shards), progress, limiter)


def run_caption(
    cfg: DatagenConfig,
    run_dir: str | Path,
    shard: int = 0,
    num_shards: int = 1,
    progress: bool = True,
    retry_errors: bool = True,
) -> StageResult:
    """Run the caption stage (resumable; shards with error rows are redone when ``retry_errors``).

    Args:
        cfg: The datagen config (``caption`` section).
        run_dir: Run folder; reads ``segment/clips``, writes ``caption/captions``. Caption shard
            ``k`` holds the clips of segment shard ``k``.
        shard: This machine's index.
        num_shards: Number of machines.
        progress: Show progress bars.
        retry_errors: Redo finished shards that hold error rows (cached successes are free).

    Returns:
        The stage result.
    """
    run_dir = Path(run_dir)
    upstream = Stage(run_dir / "segment", ("videos", "clips"))
    stage = Stage(run_dir / "caption", TABLES)
    ready = upstream_shards(upstream, shard, num_shards, "segment")
    drop_orphans(stage, upstream)
    shards = [Shard(k, shard_items(upstream, k, cfg.caption)) for k in ready]
    if retry_errors:
        retry_failed_shards(stage, shards)
    captioner = make_captioner(cfg.caption, run_dir, shard, num_shards, progress)
    manifest = manifest_name(shard, num_shards)
    report = CallReport(stage.dir / manifest, cfg.prices, getattr(captioner, "backends", list),
                        getattr(captioner, "limiter", None), num_shards)  # fmt: skip

    def fn(s: Shard) -> dict[str, pa.Table]:
        return {"captions": rows_to_table(captioner(s.items), "captions")}

    try:
        return run_stage(stage, shards, fn, cfg, inputs=[upstream.dir / "clips"],
                         description="caption", progress=progress, manifest=manifest, report=report)  # fmt: skip
    finally:
        if hasattr(captioner, "close"):
            captioner.close()
