"""lvr.media on real encoded videos: probe, every way of sampling, backend equality, approx mode, errors."""

from __future__ import annotations

import doctest
import pickle
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from media_defects import remux

import lvr.media.indices
import lvr.media.sample
from lvr.datagen.synthetic import read_sidecar
from lvr.media import (
    VideoDecodeError,
    load_index,
    plan_decode,
    probe,
    sample_frames,
    select_indices,
)
from lvr.media.decord_backend import available as decord_available

needs_decord = pytest.mark.skipif(not decord_available(), reason="decord not installed")


def reference(path: Path) -> tuple[np.ndarray, list[bool]]:
    """All frames [T, H, W, 3] and their key flags, decoded front to back without lvr.media."""
    with av.open(str(path)) as c:
        frames = [(f.to_ndarray(format="rgb24"), bool(f.key_frame)) for f in c.decode(video=0)]
    return np.stack([f for f, _ in frames]), [k for _, k in frames]


@pytest.fixture(scope="module")
def ref(short_video: Path) -> tuple[np.ndarray, list[bool]]:
    return reference(short_video)


def test_docstring_examples() -> None:
    for mod in (lvr.media.indices, lvr.media.sample):
        assert doctest.testmod(mod).failed == 0


def test_probe(short_video: Path, ref: tuple[np.ndarray, list[bool]]) -> None:
    info = probe(short_video)
    assert (info.num_frames, info.width, info.height, info.codec) == (144, 160, 120, "h264")
    assert info.duration_s == 6.0 and info.fps == 24.0 and not info.has_audio
    assert info.path == str(short_video) and info.index_source == "container"
    key_times = tuple(round(i / 24, 6) for i, k in enumerate(ref[1]) if k)
    assert info.keyframe_times_s == key_times and info.num_keyframes == len(key_times) >= 12


@pytest.mark.parametrize("name", ["short.ts", "short.mkv"])
def test_probe_counts_packets_without_container_index(
    short_video: Path, tmp_path: Path, name: str
) -> None:
    """MPEG-TS and Matroska have no full sample table: the index comes from reading the packets."""
    other = remux(short_video, tmp_path / name)
    a, b = probe(short_video), probe(other)
    assert b.index_source == "demux"
    assert (b.num_frames, b.fps, b.width, b.height) == (144, 24.0, 160, 120)
    assert b.duration_s == pytest.approx(6.0)
    assert b.keyframe_times_s == pytest.approx(a.keyframe_times_s, abs=1e-3)  # Matroska: 1 ms ticks
    idx = [3, 70, 140, 141]
    fr_a = sample_frames(short_video, indices=idx, backend="pyav")
    fr_b = sample_frames(other, indices=idx, backend="pyav")
    assert np.array_equal(fr_a.frames, fr_b.frames)
    approx = sample_frames(other, num_frames=5, approx=True, backend="pyav")
    assert np.array_equal(
        approx.indices, sample_frames(short_video, num_frames=5, approx=True).indices
    )


@needs_decord
def test_decord_falls_back_on_containers_without_index(short_video: Path, tmp_path: Path) -> None:
    """decord skipped the first GOP of an MPEG-TS file (wrong frames): PyAV reads it instead, and
    the result says why."""
    ts = remux(short_video, tmp_path / "short.ts")
    fr = sample_frames(ts, num_frames=4, backend="decord")
    assert fr.backend == "pyav" and "sample table" in fr.backend_note
    assert np.array_equal(fr.frames, sample_frames(short_video, num_frames=4).frames)


def test_truncated_matroska_raises(short_video: Path, tmp_path: Path) -> None:
    """No index to check against the file size, but the header's duration gives truncation away."""
    data = remux(short_video, tmp_path / "full.mkv").read_bytes()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoDecodeError, match="truncated") as err:
        sample_frames(cut, num_frames=4, backend="pyav")
    assert str(cut) in str(err.value)


def test_probe_sees_audio(tmp_path: Path) -> None:
    path = tmp_path / "av.mp4"
    with av.open(str(path), "w") as out:
        v = out.add_stream("libx264", rate=10)
        v.width, v.height, v.pix_fmt = 64, 48, "yuv420p"
        a = out.add_stream("aac", rate=16000)
        for i in range(10):
            frame = av.VideoFrame.from_ndarray(
                np.full((48, 64, 3), 20 * i, np.uint8), format="rgb24"
            )
            frame.pts = i
            out.mux(v.encode(frame))
        tone = av.AudioFrame.from_ndarray(
            np.zeros((1, 16000), np.float32), format="fltp", layout="mono"
        )
        tone.sample_rate, tone.pts = 16000, 0
        out.mux(a.encode(tone))
        out.mux(v.encode(None))
        out.mux(a.encode(None))
    info = probe(path)
    assert info.has_audio and info.num_frames == 10 and info.fps == 10.0


def test_select_indices_rule() -> None:
    assert select_indices(0, 144, 8).tolist() == [9, 27, 45, 63, 81, 99, 117, 135]
    for start, end, n in [(0, 1, 1), (5, 17, 3), (0, 14400, 128), (10, 13, 7)]:
        idx = select_indices(start, end, n)
        assert len(idx) == n and idx.min() >= start and idx.max() < end
        assert np.all(np.diff(idx) >= 0) and np.array_equal(idx, select_indices(start, end, n))
        if n <= end - start:
            assert len(set(idx.tolist())) == n
        else:
            assert set(idx.tolist()) == set(range(start, end))
    with pytest.raises(ValueError):
        select_indices(5, 5, 1)


def test_sample_by_indices_keeps_order_and_duplicates(short_video: Path, ref: tuple) -> None:
    idx = [143, 0, 50, 50, 7]
    fr = sample_frames(short_video, indices=idx, backend="pyav")
    assert (
        fr.indices.tolist() == idx
        and fr.frames.shape == (5, 120, 160, 3)
        and fr.frames.dtype == np.uint8
    )
    assert np.array_equal(fr.frames, ref[0][idx])
    assert fr.timestamps_s.tolist() == pytest.approx([i / 24 for i in idx])


def test_sample_by_timestamps(short_video: Path, ref: tuple) -> None:
    fr = sample_frames(short_video, timestamps_s=[0.0, 0.5, 1.0 - 1e-4, 2.99, 5.99], backend="pyav")
    assert fr.indices.tolist() == [0, 12, 24, 71, 143]
    assert np.array_equal(fr.frames, ref[0][[0, 12, 24, 71, 143]])


def test_sample_uniform_fps_and_range(short_video: Path, ref: tuple) -> None:
    fr = sample_frames(short_video, num_frames=8, backend="pyav")
    assert fr.indices.tolist() == select_indices(0, 144, 8).tolist()
    assert np.array_equal(fr.frames, ref[0][fr.indices])
    fr = sample_frames(short_video, fps=2, backend="pyav")
    assert fr.indices.tolist() == select_indices(0, 144, 12).tolist()
    fr = sample_frames(short_video, fps=2, start_s=1.0, end_s=3.0, backend="pyav")
    assert fr.indices.tolist() == select_indices(24, 72, 4).tolist()
    assert np.all((fr.timestamps_s >= 1.0) & (fr.timestamps_s < 3.0))
    fr = sample_frames(short_video, num_frames=5, start_s=4.0, backend="pyav")
    assert fr.indices.tolist() == select_indices(96, 144, 5).tolist()
    assert sample_frames(short_video, fps=100, backend="pyav").indices.tolist() == list(range(144))
    assert len(sample_frames(short_video, fps=24, max_frames=10, backend="pyav").indices) == 10


def test_scene_cut_frames_come_from_the_right_scene(short_video: Path) -> None:
    """A clip requested by its sidecar times starts exactly on the cut frame."""
    side = read_sidecar(short_video)
    for scene in side["scenes"]:
        fr = sample_frames(
            short_video, fps=100, start_s=scene["start_s"], end_s=scene["end_s"], backend="pyav"
        )
        assert fr.indices[0] == scene["start_frame"] and fr.indices[-1] == scene["end_frame"] - 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"indices": [144]},
        {"indices": [-1]},
        {"indices": []},
        {"timestamps_s": [6.0]},
        {"num_frames": 4, "start_s": 5.0, "end_s": 7.0},
        {"num_frames": 4, "start_s": 3.0, "end_s": 2.0},
        {"num_frames": 0},
        {"num_frames": 4, "fps": 1.0},
        {"indices": [1], "start_s": 1.0},
        {},
    ],
)
def test_bad_requests_raise_value_error(short_video: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        sample_frames(short_video, backend="pyav", **kwargs)


def test_cost_model_picks_strategy(short_video: Path) -> None:
    index = load_index(short_video)
    sparse = sample_frames(short_video, num_frames=3, backend="pyav")  # gaps of 48 frames >> GOP 12
    dense = sample_frames(short_video, num_frames=72, backend="pyav")  # gaps of 2 frames
    assert (sparse.strategy, dense.strategy) == ("seek", "sequential")
    targets = np.unique(select_indices(0, 144, 20))
    seq = plan_decode(targets, index.keyframes, "sequential")
    seek = plan_decode(targets, index.keyframes, "seek")
    assert len(seq) == 1 and seq[0].keyframe == 0
    for seg in seek:  # every segment decodes within one GOP
        assert (index.keyframes <= seg.targets[-1]).sum() == (index.keyframes <= seg.keyframe).sum()
    for plan in (seq, seek, plan_decode(targets, index.keyframes, "auto")):
        assert sorted(t for s in plan for t in s.targets) == targets.tolist()


@pytest.mark.parametrize("strategy", ["sequential", "seek", "auto"])
def test_pyav_strategies_are_exact(short_video: Path, ref: tuple, strategy: str) -> None:
    idx = [0, 1, 11, 12, 13, 40, 41, 100, 143]
    fr = sample_frames(short_video, indices=idx, backend="pyav", strategy=strategy)
    assert np.array_equal(fr.frames, ref[0][idx])


@needs_decord
@pytest.mark.parametrize("strategy", ["sequential", "seek", "auto"])
@pytest.mark.parametrize(
    "request_", [{"num_frames": 16}, {"fps": 1.5, "start_s": 1.0}, {"indices": [143, 12, 5, 5]}]
)
def test_decord_equals_pyav(short_video: Path, ref: tuple, strategy: str, request_: dict) -> None:
    a = sample_frames(short_video, backend="pyav", strategy=strategy, **request_)
    b = sample_frames(short_video, backend="decord", strategy=strategy, **request_)
    assert (a.backend, b.backend) == ("pyav", "decord")
    assert np.array_equal(a.indices, b.indices) and np.array_equal(a.timestamps_s, b.timestamps_s)
    assert np.array_equal(a.frames, b.frames) and np.array_equal(b.frames, ref[0][b.indices])


@pytest.mark.parametrize("backend", ["pyav", pytest.param("decord", marks=needs_decord)])
def test_approx_returns_true_keyframes(short_video: Path, ref: tuple, backend: str) -> None:
    info = probe(short_video)
    keys = np.array([i for i, k in enumerate(ref[1]) if k])
    fr = sample_frames(short_video, num_frames=10, approx=True, backend=backend)
    targets = select_indices(0, 144, 10)
    nearest = keys[np.abs(keys[None, :] - targets[:, None]).argmin(axis=1)]
    assert fr.approx and fr.strategy == "keyframes"
    assert fr.indices.tolist() == nearest.tolist()
    assert fr.timestamps_s.tolist() == pytest.approx([i / 24 for i in nearest])
    assert set(np.round(fr.timestamps_s, 6)) <= set(info.keyframe_times_s)
    assert np.array_equal(fr.frames, ref[0][fr.indices])


def test_max_pixels_keeps_aspect(short_video: Path) -> None:
    fr = sample_frames(short_video, num_frames=3, max_pixels=80 * 60, backend="pyav")
    assert fr.frames.shape == (3, 60, 80, 3)
    same = sample_frames(short_video, num_frames=3, max_pixels=10**6, backend="pyav")
    assert same.frames.shape == (3, 120, 160, 3)
    if decord_available():
        other = sample_frames(short_video, num_frames=3, max_pixels=80 * 60, backend="decord")
        assert np.array_equal(fr.frames, other.frames)


def test_auto_backend_and_threads(short_video: Path, ref: tuple) -> None:
    fr = sample_frames(short_video, num_frames=6, threads=2)
    assert (
        fr.backend == "pyav"
    )  # measured faster than decord on the same plan (benchmarks/frames.py)
    assert np.array_equal(fr.frames, ref[0][fr.indices])
    with pytest.raises(ValueError, match="backend"):
        sample_frames(short_video, num_frames=2, backend="opencv")


BAD_BACKENDS = ["pyav", pytest.param("decord", marks=needs_decord)]


@pytest.mark.parametrize("backend", BAD_BACKENDS)
@pytest.mark.parametrize(
    "name", ["corrupt", "truncated", "truncated_noindex", "empty", "audio_only", "not_video"]
)
def test_bad_files_raise_video_decode_error(bad_video_files: dict, name: str, backend: str) -> None:
    path = bad_video_files[name]
    for call in (lambda: probe(path), lambda: sample_frames(path, num_frames=4, backend=backend)):
        with pytest.raises(VideoDecodeError) as err:
            call()
        msg = str(err.value)
        assert (
            str(path) in msg
            and "\n" not in msg
            and err.value.path == str(path)
            and err.value.reason
        )


def test_missing_file_and_error_pickles(tmp_path: Path) -> None:
    with pytest.raises(VideoDecodeError, match="no such file") as err:
        probe(tmp_path / "nope.mp4")
    again = pickle.loads(pickle.dumps(err.value))
    assert (again.path, again.reason, str(again)) == (
        err.value.path,
        err.value.reason,
        str(err.value),
    )


@pytest.mark.parametrize("backend", BAD_BACKENDS)
def test_corrupt_middle_raises_not_garbage(short_video: Path, tmp_path: Path, backend: str) -> None:
    """Index intact, data zeroed in the middle: frames there must raise, not come back black or wrong."""
    moov_first = remux(short_video, tmp_path / "faststart.mp4", movflags="+faststart")
    data = bytearray(moov_first.read_bytes())
    n = len(data)
    data[int(n * 0.45) : int(n * 0.75)] = bytes(int(n * 0.75) - int(n * 0.45))
    bad = tmp_path / "corrupt_middle.mp4"
    bad.write_bytes(bytes(data))
    assert probe(bad).num_frames == 144  # the damage is invisible to the index
    with pytest.raises(VideoDecodeError) as err:
        sample_frames(bad, fps=24, backend=backend)
    assert str(bad) in str(err.value)


def test_media_does_not_import_torch() -> None:
    """datagen with API backends must run without torch; media is on its path."""
    code = "import sys, lvr.media; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_index_time_base_is_exact(short_video: Path) -> None:
    index = load_index(short_video)
    assert index.time_base == Fraction(1, 12288)
    assert np.array_equal(index.pts, np.arange(144) * 512)


@pytest.mark.slow
def test_ten_minute_video_backends_and_modes_agree(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The benchmark's video (10 min, 640x360, GOP 250 + scene cuts): every path returns the same frames."""
    from lvr.datagen.synthetic import VideoSpec, render_video

    path = tmp_path_factory.mktemp("long") / "long.mp4"
    render_video(path, VideoSpec(duration_s=600, width=640, height=360, gop=250))
    info = probe(path)
    assert info.num_frames == 14400 and info.duration_s == 600.0
    results = [
        sample_frames(path, num_frames=32, backend="pyav", strategy=s)
        for s in ("auto", "seek", "sequential")
    ]
    if decord_available():
        results.append(sample_frames(path, num_frames=32, backend="decord", strategy="seek"))
    for r in results[1:]:
        assert np.array_equal(r.indices, results[0].indices) and np.array_equal(
            r.frames, results[0].frames
        )
    approx = [
        sample_frames(path, num_frames=32, approx=True, backend=b)
        for b in ("pyav", "decord")[: 1 + decord_available()]
    ]
    keys = set(info.keyframe_times_s)
    assert all(np.array_equal(a.frames, approx[0].frames) for a in approx)
    assert set(np.round(approx[0].timestamps_s, 6)) <= keys
