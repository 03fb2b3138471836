"""lvr.media on generated files that reproduce each defect class seen in real footage.

Each file is written at test time (``media_defects``); the reference is a plain front-to-back PyAV
decode of the stream ffmpeg would pick, turned upright with numpy (not with lvr's code).
"""

from __future__ import annotations

import doctest
from pathlib import Path

import av
import media_defects
import numpy as np
import pytest

import lvr.media.orientation
from lvr.media import VideoDecodeError, load_index, probe, sample_frames
from lvr.media.decord_backend import available as decord_available

needs_decord = pytest.mark.skipif(not decord_available(), reason="decord not installed")
BACKENDS = ["pyav", pytest.param("decord", marks=needs_decord)]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("defects")
    return {
        "packed_avi": media_defects.packed_avi(d / "packed.avi"),
        "headers_avi": media_defects.headers_in_first_packet_avi(d / "headers.avi"),
        "rot90": media_defects.rotated_mp4(d / "rot90.mp4", 90),
        "rot180": media_defects.rotated_mp4(d / "rot180.mp4", 180),
        "rot270_mirror": media_defects.rotated_mp4(d / "rot270m.mp4", -90, hflip=True),
        "two_streams": media_defects.two_streams_mp4(d / "two.mp4"),
        "two_busy": media_defects.two_streams_mp4(d / "two_busy.mp4", busy_preview=True),
        "mpeg2_ps": media_defects.mpeg2_ps(d / "ps.mpg"),
        "partly": media_defects.partly_decodable_mp4(d / "partly.mp4"),
        "dropped": media_defects.dropped_frame_mkv(d / "dropped.mkv"),
        "hevc": media_defects.hevc_mp4(d / "hevc.mp4"),
        "delayed": media_defects.delayed_start_mkv(d / "delayed.mkv"),
    }


def every_frame_alone(path: Path, strategy: str, backend: str = "pyav") -> list[np.ndarray]:
    """Each frame asked for on its own (one seek each with ``seek``): the worst case for a decoder
    that loses state or lands wrong."""
    n = probe(path).num_frames
    return [sample_frames(path, indices=[i], strategy=strategy, backend=backend).frames[0]
            for i in range(n)]  # fmt: skip


def assert_frames_equal(got: list[np.ndarray], ref: list[np.ndarray]) -> None:
    assert len(got) == len(ref)
    wrong = [i for i, (a, b) in enumerate(zip(got, ref, strict=True)) if not np.array_equal(a, b)]
    assert not wrong, f"frames {wrong[:10]} differ from a full decode"


def test_orientation_docstrings() -> None:
    assert doctest.testmod(lvr.media.orientation).failed == 0


@pytest.mark.parametrize("strategy", ["seek", "sequential"])
def test_packed_b_frames_avi_gives_every_frame_in_order(files: dict, strategy: str) -> None:
    """DivX packed B-frames: the decoder's timestamps are shuffled against the container's, so
    frames are counted in output order; before, some indices returned the previous frame."""
    path = files["packed_avi"]
    ref = media_defects.reference(path)
    with av.open(str(path)) as c:  # the defect is present: decoder pts are not in order
        pts = [f.pts for f in c.decode(video=0)]
    assert pts != sorted(pts)
    info = probe(path)
    assert (info.num_frames, info.frame_order, info.fps) == (len(ref), "decoder", 25.0)
    assert_frames_equal(every_frame_alone(path, strategy), ref)
    fr = sample_frames(path, num_frames=7, approx=True)  # no keyframe numbering: exact frames
    assert not fr.approx and all(
        np.array_equal(f, ref[i]) for f, i in zip(fr.frames, fr.indices, strict=True)
    )


@needs_decord
def test_decord_is_not_used_on_packed_avi(files: dict) -> None:
    fr = sample_frames(files["packed_avi"], indices=[3, 4, 5], backend="decord")
    assert fr.backend == "pyav" and "decord" in fr.backend_note and "mpeg4" in fr.backend_note
    ref = media_defects.reference(files["packed_avi"])
    assert all(np.array_equal(f, ref[i]) for f, i in zip(fr.frames, [3, 4, 5], strict=True))


def test_seeks_keep_what_only_the_first_packet_says(files: dict) -> None:
    """Stream headers and encoder user data only in packet 0 (no repeat at later keyframes)."""
    path = files["headers_avi"]
    assert probe(path).frame_order == "pts"
    assert_frames_equal(every_frame_alone(path, "seek"), media_defects.reference(path))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("name", "rotation", "size"),
    [("rot90", 90, (64, 96)), ("rot180", 180, (96, 64)), ("rot270_mirror", -90, (64, 96))],
)
def test_rotated_files_come_back_upright(
    files: dict, name: str, rotation: int, size: tuple, backend: str
) -> None:
    path = files[name]
    info = probe(path)
    assert (info.rotation % 360, (info.width, info.height)) == (rotation % 360, size)
    assert (info.coded_width, info.coded_height) == (96, 64)
    ref = media_defects.reference(path)
    if name == "rot270_mirror":  # rotation then a mirror (what ffmpeg's autorotate does)
        ref = [np.ascontiguousarray(f[:, ::-1]) for f in ref]
    fr = sample_frames(path, indices=[0, 5, 17, 29], backend=backend)
    assert fr.frames.shape[1:3] == (size[1], size[0])
    assert all(np.array_equal(f, ref[i]) for f, i in zip(fr.frames, [0, 5, 17, 29], strict=True))
    approx = sample_frames(path, num_frames=3, approx=True, backend=backend)
    assert all(
        np.array_equal(f, ref[i]) for f, i in zip(approx.frames, approx.indices, strict=True)
    )


def test_two_video_streams_read_the_one_ffmpeg_shows(files: dict) -> None:
    path = files["two_streams"]
    info = probe(path)
    assert (info.stream_index, info.video_streams, info.width, info.height) == (1, 2, 96, 54)
    ref = media_defects.reference(path, stream=1)
    assert_frames_equal(list(sample_frames(path, num_frames=30).frames), ref)


def test_mpeg2_program_stream_decodes_to_its_last_frame(files: dict) -> None:
    """Seeking near the end of an MPEG-PS file lands past the last keyframe: earlier keyframes
    must be tried instead of reporting "stream ended" for frames that decode."""
    path = files["mpeg2_ps"]
    ref = media_defects.reference(path)
    info = probe(path)
    assert info.num_frames == len(ref) == 190
    tail = list(range(150, 190))
    for i in tail + [0, 1, 89, 90, 91]:
        fr = sample_frames(path, indices=[i], strategy="seek")
        assert np.array_equal(fr.frames[0], ref[i]), i
    fr = sample_frames(path, indices=tail[::-1], strategy="seek")
    assert all(np.array_equal(f, ref[i]) for f, i in zip(fr.frames, tail[::-1], strict=True))


@pytest.mark.parametrize("strategy", ["seek", "sequential"])
def test_partly_decodable_file_gives_frames_or_typed_errors(files: dict, strategy: str) -> None:
    """The index promises 50 frames, the data holds fewer: every index is its frame or an error."""
    path = files["partly"]
    ref = media_defects.reference(path)
    info = probe(path)
    assert info.num_frames == 50 and 0 < len(ref) < 50
    for i in range(50):
        try:
            got = sample_frames(path, indices=[i], strategy=strategy).frames[0]
        except VideoDecodeError as e:
            assert i >= len(ref) and str(path) in str(e), (i, e)
            continue
        assert i < len(ref) and np.array_equal(got, ref[i]), i


def test_last_frame_starting_at_the_declared_end_is_sampled(files: dict) -> None:
    """Timestamps 0, 2, 3, ..., 30 at 25 fps: the declared rate ends the video where the last frame
    starts. The duration must reach past it, so sampling to the end includes it."""
    path = files["dropped"]
    index = load_index(path)
    info = index.info
    assert info.num_frames == 30 and index.times_s[-1] == pytest.approx(1.2)
    assert info.duration_s > index.times_s[-1]
    assert sample_frames(path, fps=25).indices[-1] == 29
    assert sample_frames(path, timestamps_s=[index.times_s[-1]]).indices.tolist() == [29]
    ref = media_defects.reference(path)
    assert np.array_equal(sample_frames(path, indices=[29]).frames[0], ref[29])


def test_start_offset_is_reported_and_times_start_at_zero(files: dict) -> None:
    path = files["delayed"]
    info = probe(path)
    assert info.start_s == pytest.approx(1.0) and info.duration_s == pytest.approx(1.2)
    fr = sample_frames(path, timestamps_s=[0.0, 0.5])
    assert fr.indices.tolist() == [0, 12]
    ref = media_defects.reference(path)
    assert np.array_equal(fr.frames[1], ref[12])


@needs_decord
def test_decord_only_where_checked(files: dict, short_video: Path) -> None:
    """decord shifted frames on H.265 without an error: not used there. On H.264 MP4 it is used
    after a spread of its frames matched PyAV's."""
    hevc = sample_frames(files["hevc"], num_frames=10, backend="decord")
    assert hevc.backend == "pyav" and "hevc" in hevc.backend_note
    ref = media_defects.reference(files["hevc"])
    assert all(np.array_equal(f, ref[i]) for f, i in zip(hevc.frames, hevc.indices, strict=True))
    h264 = sample_frames(short_video, num_frames=10, backend="decord")
    assert (h264.backend, h264.backend_note) == ("decord", "")


@needs_decord
def test_decord_disagreeing_on_a_file_falls_back(files: dict) -> None:
    """decord reads the stream av_find_best_stream picks (here the busy 64x36 preview, by
    bitrate); lvr reads the one ffmpeg shows. The per-file check sees the difference."""
    path = files["two_busy"]
    with av.open(str(path)) as c:
        assert c.streams.best("video").index == 0  # the disagreement is real
    fr = sample_frames(path, num_frames=5, backend="decord")
    assert fr.backend == "pyav" and "differ from a full decode" in fr.backend_note
    ref = media_defects.reference(path, stream=1)
    assert all(np.array_equal(f, ref[i]) for f, i in zip(fr.frames, fr.indices, strict=True))
