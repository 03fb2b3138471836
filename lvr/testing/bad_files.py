"""Broken and non-video files for the error-handling tests (every one must fail probing and sampling)."""

from __future__ import annotations

import os
from pathlib import Path

import av
import numpy as np

from lvr.datagen.synthetic import Renderer, VideoSpec, encode_video, plan_video


def write_bad_files(directory: str | os.PathLike[str]) -> dict[str, Path]:
    """Write broken and non-video files for error-handling tests.

    Every file fails ``lvr.media.probe`` and ``sample_frames`` with ``VideoDecodeError``.

    Returns:
        ``{"corrupt": random bytes named .mp4, "truncated": a real faststart MP4 cut in half (its
        index promises frames whose data is missing), "truncated_noindex": a real MP4 with its index
        at the end, cut in half (no index left), "empty": zero-length .mp4, "audio_only": AAC audio in
        an .mp4, "not_video": a text file named .mp4}``.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    names = ("corrupt", "truncated", "truncated_noindex", "empty", "audio_only", "not_video")
    files = {k: d / f"{k}.mp4" for k in names}
    rng = np.random.default_rng(1234)
    files["corrupt"].write_bytes(rng.integers(0, 256, 64 * 1024, dtype=np.uint8).tobytes())
    files["empty"].write_bytes(b"")
    files["not_video"].write_text("This is a text file, not a video.\n" * 50)
    spec = VideoSpec(duration_s=2.0, width=128, height=96, gop=12, seed=7)
    for key, faststart in (("truncated", True), ("truncated_noindex", False)):
        full = d / f".{key}_full.mp4"
        encode_video(full, Renderer(spec, plan_video(spec)).frames(), spec, faststart=faststart)
        data = full.read_bytes()
        files[key].write_bytes(data[: len(data) // 2])
        full.unlink()
    _write_audio_only(files["audio_only"])
    return files


def _write_audio_only(path: Path, seconds: float = 1.0, rate: int = 16000) -> None:
    """An MP4 holding only an AAC sine tone."""
    t = np.arange(int(seconds * rate), dtype=np.float32) / rate
    tone = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]  # [1, samples]
    with av.open(str(path), "w", format="mp4") as out:
        st = out.add_stream("aac", rate=rate)
        frame = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
        frame.sample_rate, frame.pts = rate, 0
        out.mux(st.encode(frame))
        out.mux(st.encode(None))
