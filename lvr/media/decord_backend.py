"""Exact and keyframe-only decoding with decord 0.6 (never decord2 3.x: it returns wrong frames).

decord numbers frames like ``VideoIndex`` (presentation order) and, as tested, returns the same pixels
as PyAV on MP4. On an MPEG-TS file it silently skipped the first GOP (its frame 0 was frame 12), so
this backend refuses files without a container index (anything but MP4/MOV). It runs the same decode plan: ``seek_accurate`` opens a segment, ``skip_frames`` + ``next``
walk forward through it. decord indexes the whole file when it opens it (one pass over the packets).
"""

from __future__ import annotations

import importlib.util

import numpy as np

from lvr.media.errors import VideoDecodeError
from lvr.media.indices import Segment
from lvr.media.probe import VideoIndex


def available() -> bool:
    """Whether decord can be imported."""
    return importlib.util.find_spec("decord") is not None


def _open(index: VideoIndex, threads: int):  # -> decord.VideoReader
    import decord  # lazy: optional dependency (x86_64 Linux wheels only)

    path = index.info.path
    if index.info.index_source != "container":
        # On an MPEG-TS copy of a test video decord's frame 0 was frame 12 (it skips the first GOP).
        raise ValueError(
            f"backend='decord' is limited to MP4/MOV (container-indexed) files; decord returned "
            f"wrong frames on other containers in tests. Use backend='pyav' for {path}"
        )
    try:
        vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=threads)
    except (decord.DECORDError, RuntimeError) as e:
        raise VideoDecodeError(
            path, f"decord cannot open it ({str(e).splitlines()[0][:200]})"
        ) from e
    if len(vr) != index.info.num_frames:
        raise VideoDecodeError(
            path, f"decord sees {len(vr)} frames, the container index {index.info.num_frames}"
        )
    return vr


def _guard(path: str, what: str, fn):  # -> fn()
    import decord

    try:
        return fn()
    except (decord.DECORDError, RuntimeError, IndexError) as e:
        raise VideoDecodeError(
            path, f"decord failed {what} ({str(e).splitlines()[0][:200]})"
        ) from e


def decode_exact(
    index: VideoIndex, segments: list[Segment], threads: int = 1
) -> dict[int, np.ndarray]:
    """Decode the target frames of a plan with decord (same contract as the PyAV backend).

    Raises:
        VideoDecodeError: decord fails to open or decode.
        ValueError: The file is not MP4/MOV (see the module docstring).
    """
    path, out = index.info.path, {}
    vr = _open(index, threads)
    for seg in segments:
        first = seg.targets[0]
        _guard(path, f"seeking to frame {first}", lambda f=first: vr.seek_accurate(f))
        pos = first
        for t in seg.targets:
            if t > pos:
                _guard(path, f"skipping to frame {t}", lambda n=t - pos: vr.skip_frames(n))
            out[t] = _guard(path, f"decoding frame {t}", lambda: vr.next().asnumpy())
            pos = t + 1
    return out


def decode_keyframes(
    index: VideoIndex, positions: np.ndarray, threads: int = 1
) -> dict[int, tuple[int, np.ndarray]]:
    """Decode keyframes only: ``seek_accurate`` to the keyframe, ``next`` returns it.

    decord's inexact ``seek`` fails on some keyframes of long H.264 MP4s ("Unable to handle EOF"), so
    the accurate seek is used; on a keyframe it decodes that one frame.

    Raises:
        VideoDecodeError: decord fails to open or decode.
    """
    path, out = index.info.path, {}
    vr = _open(index, threads)
    for p in positions.tolist():
        k = int(index.keyframes[p])
        _guard(path, f"seeking to keyframe {k}", lambda k=k: vr.seek_accurate(k))
        out[p] = (k, _guard(path, f"decoding keyframe {k}", lambda: vr.next().asnumpy()))
    return out
