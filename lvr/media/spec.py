"""How a stage asks for frames: one spec, one call, for SFT, RL and evaluation alike."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lvr.media.sample import Frames, sample_frames


@dataclass(frozen=True)
class FrameSpec:
    """How frames are taken from a video.

    Attributes:
        frames: Number of frames, evenly spread over the video (with `fps`, the maximum).
        fps: Sample at this rate instead (0 = uniform `frames`).
        min_frames: The fewest frames a too-long training sample may be truncated to.
        max_pixels: Downscale each frame (aspect kept) to at most this many pixels (0 = as is).
    """

    frames: int = 16
    fps: float = 0.0
    min_frames: int = 2
    max_pixels: int = 0


def sample_video(path: str | Path, spec: FrameSpec) -> Frames:
    """Decode the frames `spec` asks for: `frames` uniform ones, or `fps` per second capped at
    `frames`, each downscaled to `max_pixels`.

    Raises:
        VideoDecodeError: The file cannot be decoded there (callers record it, never substitute).
    """
    px = spec.max_pixels or None
    if spec.fps > 0:
        return sample_frames(path, fps=spec.fps, max_frames=spec.frames, max_pixels=px)
    return sample_frames(path, num_frames=spec.frames, max_pixels=px)
