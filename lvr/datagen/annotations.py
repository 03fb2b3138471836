"""Import existing captions (the ``annotations`` caption backend).

Annotation files name a video and time ranges with captions. Accepted layouts, in JSON, JSONL, CSV
or Parquet (a folder is read file by file):

- flat rows: ``{video, start_s, end_s, caption}`` with common aliases (``video_id``/``path``/
  ``video_name``; ``start``/``start_time``; ``end``/``end_time``; ``text``/``description``);
- one record per video with parallel lists: ``{video, captions: [...], timestamps: [[s, e], ...]}``;
- Shot2Story-style records: ``{video, captions: [...], video_names: ["<stem>_<f0>_<f1>.mp4", ...]}``
  whose shot names carry frame ranges (converted to seconds with the video's fps);
- lvr synthetic sidecars (``{video, clips: [{start_s, end_s, caption}]}``), also via
  ``caption.annotations=sidecar``, which reads ``<video>.json`` next to each video.

A clip takes the texts of every segment it overlaps (by more than ``min_overlap_s``), in time
order, joined by a space. A clip with no overlapping segment, or a video with no annotations, gets
an error row: nothing is invented.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from lvr.datagen.synthetic import sidecar_path
from lvr.errors import LvrError

_VIDEO_KEYS = (
    "video_id",
    "video",
    "video_path",
    "path",
    "video_name",
    "videoID",
    "vid",
    "file",
    "name",
)
_START_KEYS = ("start_s", "start", "start_time", "begin", "t0")
_END_KEYS = ("end_s", "end", "end_time", "stop", "t1")
_TEXT_KEYS = ("caption", "text", "description", "desc", "sentence")
_SHOT_NAME = re.compile(r"_(\d+)_(\d+)\.\w+$")
_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


class AnnotationError(LvrError):
    """An annotation source that cannot be read or understood."""


@dataclass(frozen=True)
class Segment:
    """One annotated time range (seconds), or frames when ``in_frames`` (Shot2Story shot names)."""

    start: float
    end: float
    text: str
    in_frames: bool = False


def load_annotations(source: str | Path) -> dict[str, list[Segment]]:
    """Read annotation files into ``video reference -> segments``.

    Args:
        source: A file or a folder of files (``.json``, ``.jsonl``, ``.csv``, ``.parquet``).

    Returns:
        Segments per video reference exactly as written in the files (an id, a path or a name).

    Raises:
        AnnotationError: Missing source, unreadable file, or records without video/time/text fields.
    """
    path = Path(source)
    if not path.exists():
        raise AnnotationError(f"caption.annotations {path} does not exist")
    files = (
        [path]
        if path.is_file()
        else sorted(p for p in path.rglob("*") if p.suffix.lower() in _SUFFIXES)
    )
    if not files:
        raise AnnotationError(f"caption.annotations {path} holds no {'/'.join(_SUFFIXES)} files")
    out: dict[str, list[Segment]] = {}
    for f in files:
        for ref, seg in _records(f):
            out.setdefault(ref, []).append(seg)
    return out


def _read(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return pq.read_table(path).to_pylist()
        text = path.read_text(encoding="utf-8")
        if suffix == ".csv":
            return list(csv.DictReader(text.splitlines()))
        if suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as exc:
        raise AnnotationError(f"cannot read annotations {path}: {exc}") from None
    except Exception as exc:  # pyarrow raises its own error types for broken Parquet files
        raise AnnotationError(f"cannot read annotations {path}: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("clips"), list):
        return [{**data, "video": data.get("video") or path.stem}]  # one sidecar
    if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):
        return [{"video": k, "segments": v} for k, v in data.items()]  # {video: [segments]}
    if isinstance(data, list) and all(isinstance(r, dict) for r in data):
        return data
    raise AnnotationError(
        f"{path}: expected a list of records, a sidecar or a {{video: segments}} mapping"
    )


def _first(rec: dict[str, Any], keys: tuple[str, ...]) -> Any:
    return next((rec[k] for k in keys if k in rec and rec[k] not in (None, "")), None)


def _records(path: Path) -> list[tuple[str, Segment]]:
    out = []
    for i, rec in enumerate(_read(path)):
        ref = _first(rec, _VIDEO_KEYS)
        if ref is None:
            raise AnnotationError(
                f"{path} record {i}: no video field (one of {', '.join(_VIDEO_KEYS)})"
            )
        try:
            segs = _segments(rec)
        except (TypeError, ValueError, KeyError) as exc:
            raise AnnotationError(f"{path} record {i} ({ref}): {exc}") from None
        out += [(str(ref), s) for s in segs]
    return out


def _segments(rec: dict[str, Any]) -> list[Segment]:
    """Segments of one record in any accepted layout."""
    for key in ("clips", "segments"):
        if isinstance(rec.get(key), list):
            return [_flat(r) for r in rec[key]]
    caps = rec.get("captions")
    if isinstance(caps, list):
        spans = rec.get("timestamps") or rec.get("times")
        if isinstance(spans, list) and len(spans) == len(caps):
            return [
                Segment(float(a), float(b), str(c)) for (a, b), c in zip(spans, caps, strict=True)
            ]
        names = rec.get("video_names")
        if isinstance(names, list) and len(names) == len(caps):
            return [_shot(n, c) for n, c in zip(names, caps, strict=True)]
        raise ValueError(
            "'captions' list needs a 'timestamps' or 'video_names' list of the same length"
        )
    return [_flat(rec)]


def _flat(rec: dict[str, Any]) -> Segment:
    start, end, text = _first(rec, _START_KEYS), _first(rec, _END_KEYS), _first(rec, _TEXT_KEYS)
    if start is None or end is None or text is None:
        raise ValueError(f"needs start/end/text fields, got keys {sorted(rec)}")
    return Segment(float(start), float(end), str(text))


def _shot(name: str, caption: Any) -> Segment:
    m = _SHOT_NAME.search(str(name))
    if not m:
        raise ValueError(f"shot name {name!r} does not end in _<first frame>_<last frame>.<ext>")
    return Segment(float(m.group(1)), float(m.group(2)) + 1, str(caption), in_frames=True)


def references(video_id: str, path: str) -> dict[str, str]:
    """The ways an annotation can name a video: id, path (as given and absolute), name, stem."""
    p = Path(path)
    return {
        "id": video_id,
        "path": str(p),
        "abspath": str(p.resolve()),
        "name": p.name,
        "stem": p.stem,
    }


def find_segments(
    table: dict[str, list[Segment]], video_id: str, path: str, key: str = "auto"
) -> list[Segment] | None:
    """The segments annotated for one video, looked up by ``key`` (``auto``: id, path, name, stem)."""
    refs = references(video_id, path)
    order = {"auto": ("id", "path", "abspath", "name", "stem"), "path": ("path", "abspath")}.get(
        key, (key,)
    )
    for k in order:
        if refs[k] in table:
            return table[refs[k]]
    return None


def sidecar_segments(path: str) -> list[Segment] | None:
    """Segments from the lvr synthetic sidecar next to a video (None when there is none)."""
    side = sidecar_path(path)
    if not side.is_file():
        return None
    recs = _read(side)
    return _segments(recs[0]) if recs else []


def caption_for(
    segs: list[Segment], start_s: float, end_s: float, fps: float | None, min_overlap_s: float
) -> str | None:
    """Join the texts of the segments overlapping ``[start_s, end_s)``; None when none overlaps.

    Raises:
        ValueError: Frame-based segments (Shot2Story shot names) without an fps.
    """
    hits = []
    for s in segs:
        if s.in_frames and not fps:
            raise ValueError("annotations give frame ranges but the video's fps is unknown")
        a, b = (s.start / fps, s.end / fps) if s.in_frames and fps else (s.start, s.end)
        if min(b, end_s) - max(a, start_s) > min_overlap_s:
            hits.append((a, b, s.text.strip()))
    texts = [t for _, _, t in sorted(hits) if t]
    return " ".join(dict.fromkeys(texts)) if texts else None
