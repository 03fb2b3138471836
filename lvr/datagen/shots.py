"""Fast hard-cut (shot boundary) detection on decoded luma/chroma planes, no RGB conversion.

How it works, and why it is fast:

1. Decode every frame with PyAV (frame threading, in-loop deblocking skipped: the deblocking filter
   only smooths block edges, which does not move a cut). Decoding is the floor of any exact detector;
   everything after it is kept to a few microseconds per frame.
2. Read the Y, U and V planes *in place* through the buffer protocol and take a coarse grid of about
   50 x 40 samples (a strided view, no copy, no colour conversion, no scaling filter).
3. Per frame pair, the score is the fraction of grid cells whose change exceeds a threshold. A cut
   replaces (nearly) the whole picture, so it scores close to 1, while an object that appears, moves
   or vanishes changes a few percent of the cells; a global mean difference (PySceneDetect's content
   score) mixes these up, the changed fraction does not. Each plane is first centred on its frame
   mean, so a change of the whole frame's colour or brightness (a tint, a lighting change, a fade
   step) moves no cell, where ContentDetector also sees no cut. In detail:

   - absolute: the fraction of cells whose |dY| + |dU| + |dV| exceeds ``pixel_threshold``;
   - structure: the same fraction on planes centred on their frame mean. Below ``min_structure``
     the picture did not change, only its colour or brightness did (a tint, a lighting change, a
     fade step): the score is the structure fraction, not the absolute one. ContentDetector scores
     such a change high too but then, in PySceneDetect's own test clip, drops it by its 15-frame
     minimum scene length; a cut that brings a new background colour *and* new objects keeps its
     absolute score.
   - edges of flat frames: a cut from black to a very dark scene changes every cell by a few grey
     levels only, below any threshold that ignores noise. But the black frame is flat (contrast at
     most ``contrast_floor``) and the dark scene is not (at least 1.5 times that): such a step
     scores ``1 - low/high`` contrast (0.5 for a scene with twice the floor's contrast). A fade from
     black grows its contrast gradually and does not score.

   Chroma matters: two dark backgrounds can share their luma (maroon vs indigo) and differ only in
   colour.
4. A frame starts a new shot when its score is a local peak that exceeds ``min_score`` and beats the
   median of its neighbours (``window_s`` each side) by ``min_jump``: an adaptive threshold, so
   continuous fast motion (high baseline) does not fire while a cut inside it still does.
   Peaks closer than ``min_shot_s`` keep the larger one (flashes, double cuts).

The score is computed between every pair of consecutive frames, so a cut is located at the exact
frame; its time is that frame's timestamp, ``(pts - pts_first) * time_base`` seconds, the same
convention as :mod:`lvr.media`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import av
import numpy as np

from lvr.errors import LvrError
from lvr.media import VideoDecodeError, load_index

# Planar 8/10-bit YUV layouts we read in place: name -> (chroma x subsampling, y subsampling, bytes).
_PLANAR: dict[str, tuple[int, int, int]] = {
    "yuv420p": (2, 2, 1),
    "yuvj420p": (2, 2, 1),
    "yuv422p": (2, 1, 1),
    "yuvj422p": (2, 1, 1),
    "yuv444p": (1, 1, 1),
    "yuvj444p": (1, 1, 1),
    "yuv420p10le": (2, 2, 2),
    "yuv422p10le": (2, 1, 2),
    "yuv444p10le": (1, 1, 2),
}
_GRID_WIDTH = 48  # target number of grid columns; the row count follows the aspect ratio


class ShotDetectionError(LvrError):
    """A video whose frames could not be read for shot detection (message names path and reason)."""


@dataclass
class ShotParams:
    """Detector settings (defaults tuned on synthetic and real-looking H.264; see module docstring).

    Attributes:
        pixel_threshold: A grid cell counts as changed when |dY| + |dU| + |dV| exceeds this (0-255 units).
        contrast_floor: A frame whose contrast (mean absolute deviation from its mean, summed over
            Y, U and V, 0-255 units) is at most this is flat (black, a flat fade); see step 3.
        min_structure: Changed fraction of the mean-centred planes below which a change is a
            recolouring of the same picture (its absolute score is not used).
        min_score: Smallest changed fraction (0-1) that can be a cut.
        min_jump: How much a cut's fraction must exceed the median of its neighbourhood.
        window_s: Neighbourhood half-width for that median, in seconds.
        min_shot_s: Two cuts are at least this far apart (the larger peak wins).
        skip_loop_filter: Skip H.264/HEVC deblocking while decoding (faster, same cuts).
        threads: Decoder threads (0 = one per core). One thread is the most work-efficient: frame
            threading costs ~50% more CPU for its wall-time gain, so run videos in parallel instead
            (``segment.workers``).
    """

    pixel_threshold: float = 24.0
    contrast_floor: float = 2.0
    min_structure: float = 0.1
    min_score: float = 0.35
    min_jump: float = 0.25
    window_s: float = 0.5
    min_shot_s: float = 0.4
    skip_loop_filter: bool = True
    threads: int = 1


@dataclass
class FrameScores:
    """Per-frame scores of one video.

    Attributes:
        times_s: [N] float64 timestamps of the frames (first frame at 0).
        changed: [N] float32 changed-cell fraction between frame i-1 and i (0 for frame 0).
        fps: Frames per second estimated from the timestamps.
        duration_s: Timestamp of the last frame plus one frame duration.
        undecodable_from_s: Where the video stops decoding (the time of the first frame of its
            index that a full decode did not produce), None when every frame decoded.
        decode_error: Why, in one line ('' when every frame decoded).
        frame_numbers: [N] int64 media-index frame number of each scored frame (None: 0..N-1).
    """

    times_s: np.ndarray
    changed: np.ndarray
    fps: float
    duration_s: float
    undecodable_from_s: float | None = None
    decode_error: str = ""
    frame_numbers: np.ndarray | None = None


@dataclass
class ShotResult:
    """Cuts of one video.

    Attributes:
        cuts_s: Timestamps of the first frame of every shot except the first, ascending.
        cut_frames: Frame numbers of those frames.
        duration_s: Video duration as decoded.
        num_frames: Frames decoded.
        scores: The per-frame scores (for debugging and tuning).
        undecodable_from_s: Where the video stops decoding (None: every frame decoded).
        decode_error: Why, in one line.
    """

    cuts_s: list[float]
    cut_frames: list[int]
    duration_s: float
    num_frames: int
    scores: FrameScores | None = field(default=None, repr=False)
    undecodable_from_s: float | None = None
    decode_error: str = ""


def _grid_step(width: int) -> int:
    """Even sampling step so that the grid is about ``_GRID_WIDTH`` cells wide."""
    return max(2, 2 * round(width / _GRID_WIDTH / 2))


def _plane_view(
    plane: Any, rows: int, cols: int, step_y: int, step_x: int, nbytes: int
) -> np.ndarray:
    """Strided view [rows', cols'] of one plane (no copy); 10-bit samples are scaled to 8 bits."""
    line = plane.line_size // nbytes
    arr = np.frombuffer(plane, np.uint8 if nbytes == 1 else np.uint16)
    view = arr[: rows * line].reshape(rows, line)[::step_y, :cols:step_x]
    return view if nbytes == 1 else view >> 2


class _Sampler:
    """Copies the Y, U, V grids of decoded frames into a batch buffer; scores a full batch at once.

    Per frame only three strided copies happen in Python; the differences of a whole batch are one
    vectorised numpy expression (per-call overhead dominates at this grid size, so batching is what
    keeps scoring well below the cost of decoding).
    """

    def __init__(self, width: int, height: int, params: ShotParams, batch: int = 256):
        self.w, self.h, self.step = width, height, _grid_step(width)
        self.params = params
        self.batch = batch
        self.buf: np.ndarray | None = None  # [batch + 1, 3, gh, gw] int16; slot 0 = previous frame
        self.fill = 0  # frames in the buffer after slot 0
        self.first = True
        self.scores: list[np.ndarray] = []

    def _grids(self, frame: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        fmt = frame.format.name
        layout = _PLANAR.get(fmt)
        if layout is None:  # rare formats (nv12, rgb, ...): let swscale make a small yuv444p copy
            small = frame.reformat(width=max(2, self.w // self.step), height=max(2, self.h // self.step),
                                   format="yuv444p")  # fmt: skip
            y, u, v = (_plane_view(p, small.height, small.width, 1, 1, 1) for p in small.planes)
            return y, u, v
        sx, sy, nbytes = layout
        s, planes = self.step, frame.planes
        ch, cw = -(-self.h // sy), -(-self.w // sx)
        return (
            _plane_view(planes[0], self.h, self.w, s, s, nbytes),
            _plane_view(planes[1], ch, cw, s // sy, s // sx, nbytes),
            _plane_view(planes[2], ch, cw, s // sy, s // sx, nbytes),
        )

    def add(self, frame: Any) -> None:
        """Append one frame's grids; score the batch when it is full."""
        y, u, v = self._grids(frame)
        if self.buf is None:
            gh, gw = min(y.shape[0], u.shape[0]), min(y.shape[1], u.shape[1])
            self.buf = np.empty((self.batch + 1, 3, gh, gw), np.int16)
            self.tmp = np.empty((self.batch, 3, gh, gw), np.int16)
        buf, gh, gw = self.buf, self.buf.shape[2], self.buf.shape[3]
        slot = 0 if self.first else self.fill + 1
        buf[slot, 0], buf[slot, 1], buf[slot, 2] = y[:gh, :gw], u[:gh, :gw], v[:gh, :gw]
        if self.first:
            self.first = False
            self.scores.append(np.zeros(1, np.float32))  # frame 0 has no predecessor
            return
        self.fill += 1
        if self.fill == self.batch:
            self.flush()

    def flush(self) -> None:
        """Score the buffered frames against their predecessors."""
        if self.buf is None or self.fill == 0:
            return
        k = self.fill
        self.scores.append(pair_scores(self.buf[: k + 1], self.params))
        self.buf[0] = self.buf[self.fill]
        self.fill = 0


def pair_scores(grids: np.ndarray, params: ShotParams) -> np.ndarray:
    """Score of each frame against its predecessor (see the module docstring, step 3).

    Kept to a few passes over the batch: the structure check runs only on the pairs whose absolute
    score is high enough for it to matter, and the contrast of each frame is estimated on every
    other row and column of its grid, then measured on all cells where it is low.

    Args:
        grids: [k + 1, 3, gh, gw] int16 Y, U, V grids of consecutive frames.
        params: Thresholds.

    Returns:
        [k] float32 scores in [0, 1] of frames 1..k.

    >>> flat, tinted = np.full((1, 3, 4, 4), 60, np.int16), np.full((1, 3, 4, 4), 140, np.int16)
    >>> tinted[0, 0, :2] += 30  # same picture, whole frame brighter and redder
    >>> flat[0, 0, :2] += 30
    >>> pair_scores(np.concatenate([flat, tinted]), ShotParams()).tolist()
    [0.0]
    """
    k, cells = len(grids) - 1, grids[0, 0].size
    thr = params.pixel_threshold
    d = np.abs(grids[1:] - grids[:-1])  # [k, 3, gh, gw] int16
    total = d[:, 0] + d[:, 1] + d[:, 2]  # |dY| + |dU| + |dV| in int16 (<= 765): no upcast
    score = np.count_nonzero((total > thr).reshape(k, -1), axis=1) / cells  # [k] absolute
    sums = grids.reshape(k + 1, 3, -1).sum(axis=2, dtype=np.int32)
    means = (sums / cells).astype(np.float32)  # [k+1, 3]
    # A whole-frame colour/brightness shift over an unchanged picture is no cut: where many cells
    # changed, compare the planes centred on their frame means.
    cand = np.flatnonzero(score >= params.min_structure)
    if cand.size:
        before = grids[cand] - means[cand][:, :, None, None]  # [c, 3, gh, gw] float32
        after = grids[cand + 1] - means[cand + 1][:, :, None, None]
        structure = (np.abs(after - before).sum(axis=1) > thr).mean(axis=(1, 2))  # [c]
        score[cand] = np.where(structure >= params.min_structure, score[cand], structure)
    # Out of (or into) a flat frame such as black: a dark scene's contrast appears at once.
    level = _contrast(np.ascontiguousarray(grids[:, :, ::2, ::2]), means)  # [k+1] on 1/4 of cells
    near = np.flatnonzero(level <= 3 * params.contrast_floor)  # could be flat: measure exactly
    if near.size:
        level[near] = _contrast(grids[near], means[near])
    flat, lit = level <= params.contrast_floor, level >= 1.5 * params.contrast_floor
    hi, lo = np.maximum(level[1:], level[:-1]), np.minimum(level[1:], level[:-1])
    edge = np.where((flat[:-1] & lit[1:]) | (lit[:-1] & flat[1:]), 1 - lo / np.maximum(hi, 1e-6), 0)
    return np.maximum(score, edge).astype(np.float32)


def _contrast(grids: np.ndarray, means: np.ndarray) -> np.ndarray:
    """[n] mean absolute deviation of each frame from its channel means, summed over Y, U, V."""
    return np.abs(grids - means[:, :, None, None]).sum(axis=1).mean(axis=(1, 2))


def frame_scores(path: str | os.PathLike[str], params: ShotParams | None = None) -> FrameScores:
    """Decode a video once and score every consecutive frame pair.

    Reads the stream ``lvr.media`` reads (the best one, not stream 0) and numbers frames in decoder
    output order, like ``lvr.media``. A video that stops decoding part-way is scored up to there,
    and ``undecodable_from_s`` says where (decoders may also drop damaged frames silently: every
    frame of the media index must come out).

    Args:
        path: Video file.
        params: Detector settings (decoder threads, loop filter, thresholds).

    Returns:
        The per-frame scores and timestamps.

    Raises:
        ShotDetectionError: The file cannot be opened, holds no video, or not one frame decodes.
    """
    params = params or ShotParams()
    path = str(path)
    try:
        index = load_index(path)
        container = av.open(path, metadata_errors="ignore")
    except VideoDecodeError as exc:
        raise ShotDetectionError(f"cannot read {path}: {exc.reason}") from None
    except (av.error.FFmpegError, ValueError, UnicodeDecodeError) as exc:
        raise ShotDetectionError(f"cannot open {path}: {exc}") from None
    with container:
        st = container.streams[index.info.stream_index]
        st.thread_type = "AUTO"
        st.codec_context.thread_count = params.threads
        if params.skip_loop_filter:
            st.codec_context.options = {"skip_loop_filter": "all"}  # deblocking moves no cut
        pts, changed, error = _scan(container, st, path, params)
    return _to_scores(pts, changed, index, error)


def _scan(container: Any, st: Any, path: str, params: ShotParams) -> tuple[list, np.ndarray, str]:
    """(pts per frame, changed fraction per frame, decode error or '') in decode-output order."""
    sampler: _Sampler | None = None
    pts: list[int | None] = []
    error = ""
    try:
        for frame in container.decode(st):
            if sampler is None:
                sampler = _Sampler(frame.width, frame.height, params)
            sampler.add(frame)
            pts.append(frame.pts)
    except av.error.FFmpegError as exc:
        error = f"decoding failed after {len(pts)} frames ({type(exc).__name__}: {exc})"
    if sampler is None:
        raise ShotDetectionError(f"cannot decode {path}: {error or 'no video frames'}")
    sampler.flush()
    return pts, np.concatenate(sampler.scores), error


def _to_scores(pts: list, changed: np.ndarray, index: Any, error: str) -> FrameScores:
    """Timestamps of the decoded frames and where decoding stopped, from the media index.

    Frame ``i`` of the output is index frame ``i`` when the decoder's timestamps are unusable
    (packed B-frames in AVI); otherwise each frame is placed by its pts, and index frames whose pts
    never came out are undecodable.
    """
    n, total = len(pts), len(index.pts)
    pos = None
    if not index.counted and all(p is not None for p in pts):
        pos = np.searchsorted(index.pts, np.asarray(pts, np.int64))  # [n] index position per frame
        known = (pos < total) & (index.pts[np.minimum(pos, total - 1)] == np.asarray(pts))
        if not known.all() or (np.diff(pos) <= 0).any():
            pos = None  # timestamps do not follow the index: fall back to output order
    if pos is None:
        pos = np.arange(n)
    pos = pos[pos < total]
    times = index.times_s[pos]
    got = np.zeros(total, bool)
    got[pos] = True
    missing = np.flatnonzero(~got)
    bad_from = float(index.times_s[missing[0]]) if missing.size else None
    if missing.size and not error:
        error = f"{missing.size} of {total} frames did not decode (first: frame {missing[0]})"
    step = float(np.median(np.diff(times))) if len(times) > 1 else 1.0 / index.info.fps
    fps = 1.0 / step if step > 0 else index.info.fps
    duration = index.info.duration_s if bad_from is None else float(times[-1] + step)
    return FrameScores(times, changed[: len(times)], fps, duration, bad_from, error, pos)


def find_cuts(scores: FrameScores, params: ShotParams | None = None) -> list[int]:
    """Frame numbers that start a new shot, from per-frame scores (adaptive threshold + NMS).

    Args:
        scores: Output of :func:`frame_scores`.
        params: Thresholds.

    Returns:
        Ascending frame numbers (never 0).

    >>> s = FrameScores(np.arange(10) / 10, np.array([0, .02, .01, .9, .03, .02, .01, .8, .02, .01], np.float32), 10.0, 1.0)
    >>> find_cuts(s, ShotParams(min_shot_s=0.2, window_s=0.2))
    [3, 7]
    """
    params = params or ShotParams()
    c = scores.changed.astype(np.float32)  # [N]
    n = len(c)
    if n < 2:
        return []
    w = max(1, int(round(params.window_s * scores.fps)))
    padded = np.pad(c, w, mode="edge")
    win = np.lib.stride_tricks.sliding_window_view(padded, 2 * w + 1)  # [N, 2w+1]
    neighbours = np.delete(win, w, axis=1)  # the frame itself does not set its own baseline
    baseline = np.median(neighbours, axis=1)  # [N]
    ok = (c >= params.min_score) & (c - baseline >= params.min_jump)
    ok[0] = False
    candidates = np.flatnonzero(ok)
    # Non-maximum suppression: strongest first, drop anything closer than min_shot frames.
    gap = max(1, int(math.ceil(params.min_shot_s * scores.fps - 1e-6)))
    kept: list[int] = []
    for i in sorted(candidates.tolist(), key=lambda k: (-float(c[k]), k)):
        if all(abs(i - j) >= gap for j in kept):
            kept.append(i)
    return sorted(kept)


def detect_shots(
    path: str | os.PathLike[str], params: ShotParams | None = None, keep_scores: bool = False
) -> ShotResult:
    """Detect hard cuts in one video.

    Args:
        path: Video file.
        params: Detector settings.
        keep_scores: Attach the per-frame scores to the result.

    Returns:
        Cut times/frames, duration and frame count.

    Raises:
        ShotDetectionError: The video cannot be decoded.
    """
    params = params or ShotParams()
    scores = frame_scores(path, params)
    frames = find_cuts(scores, params)
    numbers = (
        scores.frame_numbers if scores.frame_numbers is not None else np.arange(len(scores.times_s))
    )
    return ShotResult(
        cuts_s=[round(float(scores.times_s[i]), 6) for i in frames],
        cut_frames=[int(numbers[i]) for i in frames],
        duration_s=scores.duration_s,
        num_frames=len(scores.times_s),
        scores=scores if keep_scores else None,
        undecodable_from_s=scores.undecodable_from_s,
        decode_error=scores.decode_error,
    )


def count_matches(predicted: list[float], truth: list[float], tolerance_s: float = 0.5) -> int:
    """Number of one-to-one matches between predicted and true cut times within ``tolerance_s``.

    Greedy by distance, closest pairs first (optimal for points on a line when the tolerance is
    smaller than half the spacing of the cuts).

    >>> count_matches([1.0, 5.1, 9.0], [1.0, 5.0])
    2
    """
    pairs = sorted(
        (abs(p - t), i, j)
        for i, p in enumerate(predicted)
        for j, t in enumerate(truth)
        if abs(p - t) <= tolerance_s
    )
    used_p: set[int] = set()
    used_t: set[int] = set()
    for _, i, j in pairs:
        if i not in used_p and j not in used_t:
            used_p.add(i)
            used_t.add(j)
    return len(used_p)


def f1_from_counts(tp: int, n_pred: int, n_true: int) -> tuple[float, float, float]:
    """(precision, recall, F1) from match counts; no cuts predicted and none true scores 1."""
    if n_pred == 0 and n_true == 0:
        return 1.0, 1.0, 1.0
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_true if n_true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def boundary_f1(
    predicted: list[float], truth: list[float], tolerance_s: float = 0.5
) -> tuple[float, float, float]:
    """Precision, recall and F1 of predicted cut times against true ones (one-to-one matching).

    >>> boundary_f1([1.0, 5.1, 9.0], [1.0, 5.0])
    (0.6666666666666666, 1.0, 0.8)
    """
    tp = count_matches(predicted, truth, tolerance_s)
    return f1_from_counts(tp, len(predicted), len(truth))


def shots_to_clips(
    cuts_s: list[float], duration_s: float, min_clip_s: float, max_clip_s: float
) -> list[tuple[float, float]]:
    """Turn shots into clips whose lengths lie in ``[min_clip_s, max_clip_s]`` where possible.

    Short shots are merged into the following shot (the last one into its predecessor), so clip
    boundaries stay on cuts; shots longer than ``max_clip_s`` are split into equal parts. A video
    shorter than ``min_clip_s`` stays one clip.

    Args:
        cuts_s: Ascending cut times inside ``(0, duration_s)``.
        duration_s: Video duration.
        min_clip_s: Shortest clip.
        max_clip_s: Longest clip (>= 2 * min_clip_s keeps split parts above the minimum).

    Returns:
        Ascending, contiguous (start_s, end_s) ranges covering ``[0, duration_s)``.

    >>> shots_to_clips([1.0, 8.0], 30.0, 2.0, 10.0)
    [(0.0, 8.0), (8.0, 15.333333), (15.333333, 22.666667), (22.666667, 30.0)]
    """
    bounds = [0.0] + [c for c in cuts_s if 0.0 < c < duration_s] + [duration_s]
    merged: list[list[float]] = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        if merged and merged[-1][1] - merged[-1][0] < min_clip_s:
            merged[-1][1] = b  # the previous segment is too short: extend it over this shot
        else:
            merged.append([a, b])
    if len(merged) > 1 and merged[-1][1] - merged[-1][0] < min_clip_s:
        last = merged.pop()
        merged[-1][1] = last[1]
    clips: list[tuple[float, float]] = []
    for a, b in merged:
        parts = max(1, math.ceil((b - a) / max_clip_s - 1e-9))
        edges = [a + (b - a) * k / parts for k in range(parts + 1)]
        clips += [(round(x, 6), round(y, 6)) for x, y in zip(edges[:-1], edges[1:], strict=True)]
    return clips


def stride_clips(
    duration_s: float, stride_s: float, min_clip_s: float
) -> list[tuple[float, float]]:
    """Fixed-length clips of ``stride_s`` (the paper's 10 s); a remainder below ``min_clip_s`` joins the last.

    >>> stride_clips(25.0, 10.0, 2.0)
    [(0.0, 10.0), (10.0, 20.0), (20.0, 25.0)]
    >>> stride_clips(21.0, 10.0, 2.0)
    [(0.0, 10.0), (10.0, 21.0)]
    """
    n = max(1, int(duration_s // stride_s))
    edges = [round(k * stride_s, 6) for k in range(n)] + [round(duration_s, 6)]
    if duration_s - n * stride_s >= min_clip_s - 1e-9 and duration_s - n * stride_s > 1e-6:
        edges.insert(-1, round(n * stride_s, 6))
    return list(zip(edges[:-1], edges[1:], strict=True))


__all__ = [
    "FrameScores",
    "ShotDetectionError",
    "ShotParams",
    "ShotResult",
    "boundary_f1",
    "count_matches",
    "f1_from_counts",
    "detect_shots",
    "find_cuts",
    "frame_scores",
    "shots_to_clips",
    "stride_clips",
]
