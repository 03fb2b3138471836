"""Video probing and frame sampling shared by every stage (PyAV by default, decord on request).

>>> from lvr.media import probe, sample_frames
>>> info = probe("video.mp4")                                         # doctest: +SKIP
>>> fr = sample_frames("video.mp4", num_frames=32, start_s=10, end_s=20)  # doctest: +SKIP
>>> fr.frames.shape, fr.indices, fr.timestamps_s                          # doctest: +SKIP
"""

from __future__ import annotations

from lvr.media.errors import VideoDecodeError
from lvr.media.indices import plan_decode, plan_indices, select_indices
from lvr.media.probe import VideoInfo, load_index, probe
from lvr.media.sample import Frames, clear_cache, resized_shape, sample_frames
from lvr.media.spec import FrameSpec, sample_video

__all__ = [
    "FrameSpec",
    "Frames",
    "VideoDecodeError",
    "VideoInfo",
    "clear_cache",
    "load_index",
    "plan_decode",
    "plan_indices",
    "probe",
    "resized_shape",
    "sample_frames",
    "sample_video",
    "select_indices",
]
