"""Which frames to take (one rule for every stage) and how to decode them cheaply (the cost model).

Frame selection: ``select_indices`` is THE rule. Captioning, SFT, RL rollouts, RL training and
evaluation all call it (through ``plan_indices`` / ``sample_frames``), so one request always means the
same frames everywhere.

Decode planning: H.264/HEVC frames can only be decoded forward from a keyframe. A *segment* is one seek
to a keyframe followed by decoding forward through some targets. For consecutive targets ``pos`` (the
next frame the decoder would output) and ``t`` (with keyframe ``k <= t``), the two options cost, in
decoded frames:

- continue: ``t - pos + 1``                       (decode every frame in the gap)
- seek:     ``seek_cost + t - k + 1``             (jump to the keyframe, decode the rest of its GOP)

``auto`` seeks iff ``k - pos > seek_cost``. Sparse samples on a long video (gaps wider than a GOP) then
seek once per sample (~one GOP decoded per frame), dense samples or short clips decode straight through,
and mixed requests get a mix; summed over a request this is the "N x GOP versus frames in range" choice,
made gap by gap with the real keyframe positions instead of an average GOP. ``sequential`` never seeks
after the first keyframe; ``seek`` seeks whenever the target's keyframe lies ahead (``k > pos``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lvr.media.probe import VideoIndex

# Tolerance when matching seconds to frames: times written with 1 ms precision still hit their frame.
TIME_EPS_S = 1e-3
# Cost of one seek (demuxer seek, decoder flush, reorder-delay refill), in decoded-frame equivalents.
# Measured with PyAV on the 640x360 benchmark video and a 320x240 clip: continuing beats seeking for
# gaps up to ~4 frames, seeking wins from ~8 frames on.
SEEK_COST_FRAMES = 6
STRATEGIES = ("auto", "sequential", "seek")


def select_indices(start: int, end: int, n: int) -> np.ndarray:
    """THE frame-selection rule: the centers of ``n`` equal segments of frames ``[start, end)``.

    Index ``k`` is ``start + floor((2k + 1) * (end - start) / (2n))``. Deterministic, symmetric, never
    takes the very first/last frame of a long range, and with ``n > end - start`` repeats frames (each
    frame at least once) so that callers always get exactly ``n`` frames.

    Args:
        start: First frame of the range.
        end: One past the last frame (``end > start``).
        n: Number of frames (>= 1).

    Returns:
        [n] int64 ascending frame numbers.

    Raises:
        ValueError: Empty range or n < 1.

    >>> select_indices(0, 100, 4).tolist()
    [12, 37, 62, 87]
    >>> select_indices(10, 13, 5).tolist()
    [10, 10, 11, 12, 12]
    """
    if n < 1 or end <= start:
        raise ValueError(f"need n >= 1 and a non-empty range, got n={n}, range=[{start}, {end})")
    k = np.arange(n, dtype=np.int64)
    return start + ((2 * k + 1) * (end - start)) // (2 * n)


def frame_range(index: VideoIndex, start_s: float | None, end_s: float | None) -> tuple[int, int]:
    """Frames ``[a, b)`` whose timestamps lie in ``[start_s, end_s)`` (1 ms tolerance).

    Raises:
        ValueError: A range outside the video or holding no frame.
    """
    info, t = index.info, index.times_s
    s = 0.0 if start_s is None else float(start_s)
    e = info.duration_s if end_s is None else float(end_s)
    if s < -TIME_EPS_S or e > info.duration_s + TIME_EPS_S or e <= s:
        raise ValueError(
            f"range [{s}, {e}) s is empty or outside the video [0, {info.duration_s}) s of {info.path}"
        )
    a = int(np.searchsorted(t, s - TIME_EPS_S, side="left"))
    b = int(np.searchsorted(t, e - TIME_EPS_S, side="left"))
    if b <= a:
        raise ValueError(f"range [{s}, {e}) s holds no frame of {info.path} (fps {info.fps:.3f})")
    return a, b


def indices_at(index: VideoIndex, timestamps_s: Sequence[float]) -> np.ndarray:
    """Frame shown at each timestamp: the last frame starting at or before it (1 ms tolerance).

    Raises:
        ValueError: A timestamp outside ``[0, duration)``.
    """
    ts = np.asarray(timestamps_s, dtype=np.float64).reshape(-1)
    bad = ts[(ts < -TIME_EPS_S) | (ts >= index.info.duration_s)]
    if bad.size:
        raise ValueError(
            f"timestamps {bad[:5].tolist()} s outside [0, {index.info.duration_s}) s of {index.info.path}"
        )
    return np.maximum(np.searchsorted(index.times_s, ts + TIME_EPS_S, side="right") - 1, 0).astype(
        np.int64
    )


def plan_indices(
    index: VideoIndex,
    *,
    num_frames: int | None = None,
    fps: float | None = None,
    start_s: float | None = None,
    end_s: float | None = None,
    max_frames: int | None = None,
) -> np.ndarray:
    """Frames for "N uniform frames" or "F frames per second", optionally within ``[start_s, end_s)``.

    ``fps`` mode takes ``floor(range_duration * fps)`` frames (at least 1, at most the frames in the
    range and ``max_frames``) through ``select_indices``; so both modes share one rule. Where the
    frames in the range do not keep the video's average rate (variable frame rate), a frame count
    is not a duration: the frames are those shown at the centers of equal parts of the range's
    time instead (``_at_times``), so a slow stretch still gives ``fps`` frames per second (a frame
    shown for longer than one part is taken for each part it covers).

    Returns:
        [N] int64 ascending frame numbers.

    Raises:
        ValueError: Not exactly one of ``num_frames``/``fps``, non-positive values, or a bad range.
    """
    if (num_frames is None) == (fps is None):
        raise ValueError("give exactly one of num_frames or fps")
    a, b = frame_range(index, start_s, end_s)
    if num_frames is not None:
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        n = num_frames
    else:
        if fps is None or fps <= 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        if not _regular(index.times_s[a:b], index.info.fps):
            return _at_times(index, a, b, _seconds(index, start_s, end_s), fps, max_frames)
        n = min(b - a, max(1, int(np.floor((b - a) / index.info.fps * fps + 1e-6))))
    if max_frames is not None:
        n = min(n, max_frames)
    return select_indices(a, b, n)


def _seconds(index: VideoIndex, start_s: float | None, end_s: float | None) -> tuple[float, float]:
    """The range ``[start, end)`` in seconds, as ``frame_range`` reads it (None: the video's ends)."""
    s = 0.0 if start_s is None else float(start_s)
    return s, index.info.duration_s if end_s is None else float(end_s)


def _regular(times_s: np.ndarray, fps: float) -> bool:
    """Whether frames start on the average rate's grid (within half a frame): then the frame count
    measures the range's duration, and the frame-count rule (pinned by tests) applies."""
    grid = times_s[0] + np.arange(len(times_s)) / fps  # [n]
    return bool(np.all(np.abs(times_s - grid) <= 0.5 / fps))


def _at_times(
    index: VideoIndex,
    a: int,
    b: int,
    range_s: tuple[float, float],
    fps: float,
    max_frames: int | None,
) -> np.ndarray:
    """``fps`` mode on variable-rate frames ``[a, b)``: ``floor(duration * fps)`` frames (capped as
    in ``plan_indices``), those shown at the centers of that many equal parts of the range."""
    s, e = range_s
    n = min(b - a, max(1, int(np.floor((e - s) * fps + 1e-6))))
    if max_frames is not None:
        n = min(n, max_frames)
    k = np.arange(n, dtype=np.float64)
    times = s + (2 * k + 1) * (e - s) / (2 * n)  # [n]
    shown = np.searchsorted(index.times_s, times + TIME_EPS_S, side="right") - 1
    return np.clip(shown, a, b - 1).astype(np.int64)  # a part before the first frame takes it


def check_indices(index: VideoIndex, indices: Sequence[int] | np.ndarray) -> np.ndarray:
    """Validate explicit frame numbers.

    Raises:
        ValueError: Empty, non-integer or out-of-range indices.
    """
    arr = np.asarray(indices)
    if arr.size == 0 or arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"indices must be a non-empty 1-D list of ints, got {arr.dtype} shape {arr.shape}"
        )
    n = index.info.num_frames
    bad = arr[(arr < 0) | (arr >= n)]
    if bad.size:
        raise ValueError(
            f"frame indices {bad[:5].tolist()} out of range [0, {n}) for {index.info.path}"
        )
    return arr.astype(np.int64)


@dataclass(frozen=True)
class Segment:
    """One seek to ``keyframe`` then forward decoding through ``targets`` (ascending frame numbers)."""

    keyframe: int
    targets: tuple[int, ...]


def plan_decode(
    targets: np.ndarray,
    keyframes: np.ndarray,
    strategy: str = "auto",
    seek_cost: int = SEEK_COST_FRAMES,
) -> list[Segment]:
    """Split sorted unique targets into segments by the cost model of the module docstring.

    Args:
        targets: [N] ascending unique frame numbers.
        keyframes: [K] ascending keyframe numbers (the first frame is a keyframe).
        strategy: ``auto``, ``sequential`` or ``seek``.
        seek_cost: Cost of a seek in decoded frames (``auto`` only).

    Returns:
        Segments in decode order.

    >>> plan_decode(np.array([5, 30, 31, 90]), np.array([0, 25, 50, 75]), "auto", 4)
    [Segment(keyframe=0, targets=(5,)), Segment(keyframe=25, targets=(30, 31)), Segment(keyframe=75, targets=(90,))]
    >>> len(plan_decode(np.array([5, 30, 31, 90]), np.array([0, 25, 50, 75]), "sequential"))
    1
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    kf = keyframes[np.maximum(np.searchsorted(keyframes, targets, side="right") - 1, 0)]  # [N]
    segments: list[tuple[int, list[int]]] = []
    pos = -1
    for t, k in zip(targets.tolist(), kf.tolist(), strict=True):
        if segments and (
            strategy == "sequential" or k <= pos or (strategy == "auto" and k - pos <= seek_cost)
        ):
            segments[-1][1].append(t)
        else:
            segments.append((k, [t]))
        pos = t + 1
    return [Segment(k, tuple(ts)) for k, ts in segments]


def decode_cost(segments: list[Segment], seek_cost: int = SEEK_COST_FRAMES) -> int:
    """Estimated cost of a plan in decoded frames (seeks counted as ``seek_cost`` frames each)."""
    return sum(seek_cost + s.targets[-1] - s.keyframe + 1 for s in segments)


def nearest_keyframes(targets: np.ndarray, keyframes: np.ndarray) -> np.ndarray:
    """Position in ``keyframes`` of the keyframe nearest to each target (ties go to the earlier one).

    >>> nearest_keyframes(np.array([0, 12, 13, 40]), np.array([0, 25, 50])).tolist()
    [0, 0, 1, 2]
    """
    right = np.clip(np.searchsorted(keyframes, targets, side="left"), 0, len(keyframes) - 1)  # [N]
    left = np.maximum(right - 1, 0)
    take_left = np.abs(targets - keyframes[left]) <= np.abs(keyframes[right] - targets)
    return np.where(take_left, left, right).astype(np.int64)
