"""Display matrices: turn decoded frames upright, as ffmpeg (autorotate) and decord do.

A phone video is usually stored sideways with a *display matrix* (MP4 ``tkhd`` matrix, FFmpeg
``AV_FRAME_DATA_DISPLAYMATRIX`` side data) saying how to show it. FFmpeg's decoders leave pixels as
stored; the ``ffmpeg`` command line and decord apply the matrix. lvr applies it too, so that every
backend returns the same upright frames.

The matrix maps a stored pixel ``(x, y)`` to the display position ``(a*x + c*y, b*x + d*y)`` plus a
translation (``a, b, c, d`` are entries 0, 1, 3 and 4, in 16.16 fixed point). For right angles with
optional mirroring, ``[[a, b], [c, d]]`` is a signed permutation: either no transpose (``b = c = 0``:
``a < 0`` mirrors columns, ``d < 0`` mirrors rows) or a transpose (``a = d = 0``: then ``b < 0``
mirrors the rows and ``c < 0`` the columns of the transposed picture). Other angles are refused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lvr.media.errors import VideoDecodeError


@dataclass(frozen=True)
class Orientation:
    """How to turn a stored frame upright.

    Attributes:
        transpose: Swap rows and columns first (90/270 degree rotations).
        flip_rows: Then reverse the row order (upside down).
        flip_cols: Then reverse the column order (mirror).
        rotation: Counter-clockwise rotation in degrees, as FFmpeg and ffprobe report it
            (``-90`` for a clip that must be turned 90 degrees clockwise).
    """

    transpose: bool = False
    flip_rows: bool = False
    flip_cols: bool = False
    rotation: int = 0

    @property
    def identity(self) -> bool:
        """Whether frames are stored upright."""
        return not (self.transpose or self.flip_rows or self.flip_cols)

    def size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of the upright frame for a stored ``width x height`` one."""
        return (height, width) if self.transpose else (width, height)

    def apply(self, frame: np.ndarray) -> np.ndarray:
        """Upright copy of one frame ([H, W, C] -> [H', W', C]); the frame itself if upright.

        >>> a = np.arange(6).reshape(2, 3, 1)
        >>> Orientation(transpose=True, flip_cols=True).apply(a)[..., 0].tolist()  # 90 clockwise
        [[3, 0], [4, 1], [5, 2]]
        """
        if self.identity:
            return frame
        out = frame.transpose(1, 0, 2) if self.transpose else frame
        if self.flip_rows:
            out = out[::-1]
        if self.flip_cols:
            out = out[:, ::-1]
        return np.ascontiguousarray(out)


UPRIGHT = Orientation()


def from_matrix(matrix: Sequence[int] | None, path: str) -> Orientation:
    """The ``Orientation`` a 3x3 display matrix (9 int32, row-major) asks for.

    Args:
        matrix: The side data as integers, or None when the stream has none.
        path: For the error message.

    Returns:
        The orientation (``UPRIGHT`` for None or the identity).

    Raises:
        VideoDecodeError: The matrix rotates by an angle that is not a multiple of 90 degrees, or
            scales/shears (lvr would have to resample and fill borders; ffmpeg does, decord does not).

    >>> from_matrix([0, 65536, 0, -65536, 0, 0, 0, 0, 1 << 30], "v.mp4")  # ffprobe: rotation -90
    Orientation(transpose=True, flip_rows=False, flip_cols=True, rotation=-90)
    """
    if matrix is None:
        return UPRIGHT
    a, b, c, d = (int(matrix[i]) for i in (0, 1, 3, 4))
    # FFmpeg's av_display_rotation_get: the counter-clockwise angle of the matrix' rotation part.
    scale0, scale1 = math.hypot(a, c), math.hypot(b, d)
    rotation = 0
    if scale0 and scale1:
        rotation = -round(math.degrees(math.atan2(b / scale1, a / scale0)))
    if b == 0 and c == 0 and a and d:
        return Orientation(False, d < 0, a < 0, rotation)
    if a == 0 and d == 0 and b and c:
        return Orientation(True, b < 0, c < 0, rotation)
    raise VideoDecodeError(
        path,
        f"display matrix {[a, b, c, d]} rotates by {rotation} degrees; only multiples of 90 "
        "(with or without mirroring) are supported",
    )


def side_data(frame: object) -> list[Any]:
    """A decoded PyAV frame's side data items (each with `.type`), whatever the PyAV version:
    iterating `frame.side_data` gives the items up to PyAV 18.1.0 and their types (the keys of
    a mapping) from 18.1.1 on."""
    container = frame.side_data  # type: ignore[attr-defined]
    return [entry if hasattr(entry, "type") else container[entry] for entry in container]


def display_matrix(frame: object) -> tuple[int, ...] | None:
    """The 9 integers of a decoded PyAV frame's display-matrix side data, or None."""
    for item in side_data(frame):
        if item.type.name == "DISPLAYMATRIX":
            return tuple(np.frombuffer(bytes(item), np.int32).tolist())
    return None
