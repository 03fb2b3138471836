"""``sample_frames``: one entry point for every way of taking frames out of a video.

Exact mode returns exactly the requested frames (by index, by timestamp, N uniform, or F per second,
optionally within a time range). Approximate mode (``approx=True``) snaps each target to the nearest
keyframe and decodes keyframes only — several times cheaper on long videos — and reports the keyframes'
true frame numbers and timestamps, never the requested ones.

Every frame is the one a full decode of the file's best video stream gives at that index, turned
upright (display matrix applied), or a ``VideoDecodeError`` where the file cannot be decoded there.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from lvr.media import decord_backend, pyav_backend
from lvr.media.indices import (
    SEEK_COST_FRAMES,
    check_indices,
    indices_at,
    nearest_keyframes,
    plan_decode,
    plan_indices,
)
from lvr.media.probe import VideoIndex, VideoInfo, load_index
from lvr.media.probe import clear_cache as clear_index_cache

BACKENDS = ("auto", "pyav", "decord")


@dataclass(frozen=True, eq=False)
class Frames:
    """Frames taken from one video, with exactly which frames they are.

    Attributes:
        frames: [N, H, W, 3] uint8 RGB, in request order (duplicates repeated).
        indices: [N] int64 true frame numbers of the returned frames.
        timestamps_s: [N] float64 their timestamps, seconds from the first frame.
        info: The video's ``VideoInfo``.
        backend: ``pyav`` or ``decord``.
        strategy: ``sequential`` (one forward pass), ``seek`` (one seek per frame), ``mixed``, or
            ``keyframes`` (approximate mode).
        approx: Whether frames were snapped to keyframes.
        backend_note: Why the backend asked for was not used ('' when it was), e.g. decord on a
            kind of file where it has not been checked, or that disagreed with PyAV on this file.
    """

    frames: np.ndarray
    indices: np.ndarray
    timestamps_s: np.ndarray
    info: VideoInfo
    backend: str
    strategy: str
    approx: bool
    backend_note: str = ""


def clear_cache() -> None:
    """Forget cached indexes and decord checks (benchmarks use it to time cold calls)."""
    clear_index_cache()
    decord_backend.clear_verdicts()


def resolve_backend(backend: str) -> str:
    """``auto`` -> ``pyav``; ``decord`` only when asked for.

    Why not decord first: on the same decode plan decord was 1.5-3x slower than PyAV here (it converts
    every decoded frame to RGB, skipped ones included, and cannot drop non-reference frames), its
    inexact ``seek`` fails on some long MP4s, and on several kinds of file it returns wrong frames
    (see ``decord_backend``). ``auto`` takes PyAV; see benchmarks/frames.py.

    Raises:
        ValueError: Unknown backend, or ``decord`` asked for but not installed.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "decord" and not decord_backend.available():
        raise ValueError(
            "backend='decord' but decord is not installed (pip install 'decord>=0.6,<1')"
        )
    return "pyav" if backend == "auto" else backend


def resized_shape(height: int, width: int, max_pixels: int | None) -> tuple[int, int]:
    """(h, w) scaled down, aspect kept, so that h * w <= max_pixels (unchanged if it already fits).

    >>> resized_shape(360, 640, 320 * 180)
    (180, 320)
    """
    if max_pixels is None or height * width <= max_pixels:
        return height, width
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
    scale = math.sqrt(max_pixels / (height * width))
    return max(1, math.floor(height * scale + 1e-9)), max(1, math.floor(width * scale + 1e-9))


def _resize(frames: np.ndarray, max_pixels: int | None) -> np.ndarray:
    """Resize after decoding, identically for both backends (Pillow bicubic, antialiased)."""
    n, h, w, _ = frames.shape
    nh, nw = resized_shape(h, w, max_pixels)
    if (nh, nw) == (h, w):
        return frames
    out = np.empty((n, nh, nw, 3), np.uint8)  # [N, h', w', 3]
    for i in range(n):
        out[i] = np.asarray(Image.fromarray(frames[i]).resize((nw, nh), Image.Resampling.BICUBIC))
    return out


def _request(
    index: VideoIndex,
    indices: Sequence[int] | np.ndarray | None,
    timestamps_s: Sequence[float] | None,
    num_frames: int | None,
    fps: float | None,
    start_s: float | None,
    end_s: float | None,
    max_frames: int | None,
) -> np.ndarray:
    """Requested frame numbers [N] from exactly one way of asking."""
    given = sum(x is not None for x in (indices, timestamps_s, num_frames, fps))
    if given != 1:
        raise ValueError("give exactly one of indices, timestamps_s, num_frames, fps")
    if (indices is not None or timestamps_s is not None) and (
        start_s is not None or end_s is not None
    ):
        raise ValueError("start_s/end_s apply to num_frames/fps requests only")
    if indices is not None:
        return check_indices(index, indices)
    if timestamps_s is not None:
        return indices_at(index, timestamps_s)
    return plan_indices(
        index, num_frames=num_frames, fps=fps, start_s=start_s, end_s=end_s, max_frames=max_frames
    )


def _checked_backend(index: VideoIndex, backend: str, threads: int) -> tuple[str, str]:
    """(backend to use, note): decord only where its kind and this file were checked."""
    if backend != "decord":
        return backend, ""
    reason = decord_backend.unsupported(index) or decord_backend.check(index, threads)
    return ("pyav", f"{reason}; used pyav") if reason else ("decord", "")


def _exact(
    index: VideoIndex, req: np.ndarray, backend: str, strategy: str, threads: int
) -> tuple[np.ndarray, np.ndarray, str]:
    uniq = np.unique(req)  # [U] ascending
    # Frame threading delays output by about one frame per thread, which every seek pays again.
    workers = (os.cpu_count() or 2) if threads == 0 else threads
    seek_cost = SEEK_COST_FRAMES + (workers if workers > 1 else 0)
    segments = plan_decode(uniq, index.keyframes, strategy, seek_cost)
    decode = decord_backend.decode_exact if backend == "decord" else pyav_backend.decode_exact
    got = decode(index, segments, threads)
    frames = np.stack([got[int(i)] for i in req])  # [N, H, W, 3]
    if index.counted:
        return frames, req, "sequential"  # decoded from the start (see pyav_backend)
    used = "sequential" if len(segments) == 1 else "seek" if len(segments) == len(uniq) else "mixed"
    return frames, req, used


def _approx(
    index: VideoIndex, req: np.ndarray, backend: str, threads: int
) -> tuple[np.ndarray, np.ndarray, str]:
    pos = nearest_keyframes(req, index.keyframes)  # [N] positions in index.keyframes
    uniq = np.unique(pos)
    decode = (
        decord_backend.decode_keyframes if backend == "decord" else pyav_backend.decode_keyframes
    )
    got = decode(index, uniq, threads)
    frames = np.stack([got[int(p)][1] for p in pos])  # [N, H, W, 3]
    true_idx = np.array([got[int(p)][0] for p in pos], np.int64)
    return frames, true_idx, "keyframes"


def sample_frames(
    path: str | os.PathLike[str],
    *,
    indices: Sequence[int] | np.ndarray | None = None,
    timestamps_s: Sequence[float] | None = None,
    num_frames: int | None = None,
    fps: float | None = None,
    start_s: float | None = None,
    end_s: float | None = None,
    max_frames: int | None = None,
    max_pixels: int | None = None,
    approx: bool = False,
    backend: str = "auto",
    strategy: str = "auto",
    threads: int = 1,
) -> Frames:
    """Take frames from a video.

    Ask in exactly one way: ``indices`` (frame numbers), ``timestamps_s`` (the frame shown at each
    time), ``num_frames`` (N uniform frames: centers of N equal segments, see ``select_indices``) or
    ``fps`` (F frames per second of video, same rule), the last two optionally within
    ``[start_s, end_s)`` and capped by ``max_frames``.

    Args:
        path: Video file.
        indices: Frame numbers (any order, duplicates allowed).
        timestamps_s: Times in seconds from the first frame.
        num_frames: Number of uniformly spread frames.
        fps: Frames per second of video to take.
        start_s: Range start (num_frames/fps only).
        end_s: Range end, exclusive (num_frames/fps only).
        max_frames: Cap on the number of frames (num_frames/fps only).
        max_pixels: Downscale (aspect kept) so that H * W <= max_pixels.
        approx: Snap each frame to the nearest keyframe (ties: the earlier) and decode keyframes
            only; ``indices``/``timestamps_s`` of the result are the keyframes'. Targets sharing a
            nearest keyframe give repeated frames. ``strategy`` does not apply. On files without
            usable timestamps (``info.frame_order == "decoder"``) the exact frames are returned.
        backend: ``auto`` (PyAV, the faster here), ``pyav`` or ``decord``. decord is used only on
            H.264 MP4/MOV files where a spread of its frames matched PyAV's; elsewhere PyAV is
            used and ``Frames.backend_note`` says why.
        strategy: ``auto`` (cost model), ``sequential`` or ``seek``; see ``lvr.media.indices``.
        threads: Decoder threads; 1 suits data loaders with many workers, 0 = all cores.

    Returns:
        ``Frames`` with pixels, true frame numbers and timestamps.

    Raises:
        VideoDecodeError: The file is missing, empty, corrupt, truncated, audio-only, not a video, or a
            requested frame cannot be decoded. Never black frames or frames of another video.
        ValueError: A malformed request: indices or times out of range, bad range, unknown backend.
    """
    if threads < 0:
        raise ValueError(f"threads must be >= 0, got {threads}")
    index = load_index(path)
    req = _request(index, indices, timestamps_s, num_frames, fps, start_s, end_s, max_frames)
    used_backend, note = _checked_backend(index, resolve_backend(backend), threads)
    approx = approx and not index.counted  # no keyframe numbering without timestamps
    if approx:
        frames, idx, used = _approx(index, req, used_backend, threads)
    else:
        frames, idx, used = _exact(index, req, used_backend, strategy, threads)
    return Frames(
        frames=_resize(frames, max_pixels),
        indices=idx,
        timestamps_s=index.times_s[idx],
        info=index.info,
        backend=used_backend,
        strategy=used,
        approx=approx,
        backend_note=note,
    )
