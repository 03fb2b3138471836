"""The few ISO-BMFF (MP4/MOV) boxes lvr reads itself: a track's presentation offsets (``ctts``).

FFmpeg's ``index_entries`` (all PyAV exposes of an MP4 sample table) hold decode timestamps only.
Where frames are shown in another order than decoded (B-frames, open GOPs, an uneven tail), the
presentation time of each sample is its decode time plus its ``ctts`` offset; reading that box from
the ``moov`` keeps the probe of an MP4 free (no packet read) and right. Anything unexpected (a cut
or damaged box, fragments, a sample count that does not match) answers None, and the probe then
counts the packets instead.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

import numpy as np


def _boxes(data: bytes, start: int = 0, end: int | None = None) -> Iterator[tuple[bytes, int, int]]:
    """(type, payload start, box end) of the ISO-BMFF boxes in ``data[start:end]``."""
    end = len(data) if end is None else end
    while start + 8 <= end:
        size, kind = struct.unpack(">I4s", data[start : start + 8])
        head = 8
        if size == 1 and start + 16 <= end:
            size, head = struct.unpack(">Q", data[start + 8 : start + 16])[0], 16
        elif size == 0:
            size = end - start
        if size < head or start + size > end:
            return  # damaged or cut box: stop, the caller falls back to counting packets
        yield kind, start + head, start + size
        start += size


def _child(data: bytes, start: int, end: int, path: tuple[bytes, ...]) -> tuple[int, int] | None:
    """(payload start, end) of the first box along ``path`` below ``data[start:end]``."""
    for name in path:
        found = next(((s, e) for k, s, e in _boxes(data, start, end) if k == name), None)
        if found is None:
            return None
        start, end = found
    return start, end


def _read_moov(path: str) -> bytes | None:
    """The ``moov`` box of an MP4/MOV file (a few MB at most: sample tables), or None."""
    with open(path, "rb") as f:
        pos, size = 0, os.fstat(f.fileno()).st_size
        while pos + 8 <= size:
            f.seek(pos)
            head = f.read(16)
            box, kind = struct.unpack(">I4s", head[:8])
            if box == 1 and len(head) == 16:
                box = struct.unpack(">Q", head[8:16])[0]
            elif box == 0:
                box = size - pos
            if box < 8:
                return None
            if kind == b"moov":
                f.seek(pos)
                return f.read(box)
            pos += box
    return None


def _traks(moov: bytes) -> Iterator[tuple[int, tuple[int, int] | None]]:
    """(track_ID, its ``stbl`` box) of each ``trak`` in a ``moov`` box."""
    for kind, s, e in _boxes(moov, 8):
        tkhd = _child(moov, s, e, (b"tkhd",)) if kind == b"trak" else None
        if tkhd is not None:
            at = tkhd[0] + (20 if moov[tkhd[0]] == 1 else 12)  # version 1: 64-bit times
            yield (
                struct.unpack(">I", moov[at : at + 4])[0],
                _child(moov, s, e, (b"mdia", b"minf", b"stbl")),
            )


def composition_offsets(path: str, track_id: int, n: int) -> np.ndarray | None:
    """[n] int64 pts - dts of every sample of the stream's track (ISO-BMFF ``ctts``), or None.

    FFmpeg's ``index_entries`` hold decode timestamps only; presentation order (B-frames, open
    GOPs, a late last frame) lives in ``ctts``, which PyAV does not expose, so it is read here from
    the ``moov`` box. None when the track cannot be matched with certainty or a box is damaged
    (then: count packets).
    """
    try:
        return _offsets(path, track_id, n)
    except (struct.error, ValueError, OSError):
        return None


def _offsets(path: str, track_id: int, n: int) -> np.ndarray | None:
    moov = _read_moov(path)
    if moov is None:
        return None
    stbl = next((t for t in _traks(moov) if t[0] == track_id), (0, None))[1]
    if stbl is None:
        return None
    sizes = _child(moov, *stbl, (b"stsz",)) or _child(moov, *stbl, (b"stz2",))
    if sizes is None or struct.unpack(">I", moov[sizes[0] + 8 : sizes[0] + 12])[0] != n:
        return None  # fragments or edits add/drop samples: the table is not one row per frame
    ctts = _child(moov, *stbl, (b"ctts",))
    if ctts is None:
        return np.zeros(n, np.int64)  # no reordering: pts = dts
    count = struct.unpack(">I", moov[ctts[0] + 4 : ctts[0] + 8])[0]
    rows = np.frombuffer(moov, ">i4", 2 * count, ctts[0] + 8).reshape(count, 2).astype(np.int64)
    if rows[:, 0].min(initial=0) < 0 or rows[:, 0].sum() != n:
        return None
    return np.repeat(rows[:, 1], rows[:, 0])
