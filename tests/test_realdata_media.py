"""lvr.media and the segment stage on real clips that lvr did not make (``../shared/realdata``).

Runs when the folder exists (or ``LVR_REALDATA`` points at one) and skips otherwise, so a clone
without it still passes. For every clip: metadata against a plain PyAV decode of the stream ffmpeg
shows, frames at a spread of indices equal to that decode turned upright (numpy rotation, not lvr's
code), typed errors only past what the decode delivers; then the segment stage over the whole
folder, and the shot detector against PySceneDetect's goldens.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import av
import media_defects
import numpy as np
import pytest

from lvr.datagen.shots import detect_shots
from lvr.layout import RunLayout
from lvr.media import VideoDecodeError, load_index, plan_indices, probe, sample_frames

ROOT = Path(
    os.environ.get("LVR_REALDATA", Path(__file__).parents[1].parent / "shared" / "realdata")
)
VIDEO = ROOT / "video"
EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".mpg", ".ts")
CLIPS = sorted(
    p.relative_to(VIDEO).as_posix() for p in VIDEO.rglob("*") if p.suffix.lower() in EXTENSIONS
) if VIDEO.is_dir() else []  # fmt: skip

pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(not CLIPS, reason=f"no real clips at {VIDEO} (set LVR_REALDATA)"),
]


@dataclass
class Reference:
    """A full front-to-back decode of the stream ffmpeg shows, keeping only some frames."""

    stream: int
    count: int
    frames: dict[int, np.ndarray]
    size: tuple[int, int]  # upright (width, height)
    rotation: int


def ffmpeg_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream:
    """ffmpeg's own choice: default streams first, then the most pixels (cover art excluded)."""
    real = [
        s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic
    ]
    default = av.stream.Disposition.default
    return max(real, key=lambda s: (bool(s.disposition & default), s.width * s.height, -s.index))


def upright(frame: av.VideoFrame) -> tuple[np.ndarray, int]:
    a = frame.to_ndarray(format="rgb24")
    has = "DISPLAYMATRIX" in [
        getattr(s, "type", s).name for s in frame.side_data
    ]  # PyAV 18.1.1+: types
    rot = frame.rotation if has else 0
    return np.ascontiguousarray(np.rot90(a, k=round(rot / 90) % 4)), rot


def reference(path: Path, keep: set[int]) -> Reference:
    frames, count, size, rotation = {}, 0, (0, 0), 0
    with av.open(str(path)) as c:
        st = ffmpeg_stream(c)
        try:
            for f in c.decode(st):
                if count == 0 or count in keep:
                    a, rotation = upright(f)
                    size = (a.shape[1], a.shape[0])
                    if count in keep:
                        frames[count] = a
                count += 1
        except av.error.FFmpegError:
            pass  # damaged: the frames before the damage are the reference
        return Reference(st.index, count, frames, size, rotation)


def spread(n: int, keyframes: list[int]) -> list[int]:
    """First, last, a few inside, and both sides of two keyframes (where seeks land)."""
    pick = {0, 1, n // 3, n // 2, (2 * n) // 3, n - 2, n - 1}
    for k in keyframes[1:3]:
        pick |= {k - 1, k, k + 1}
    return sorted(i for i in pick if 0 <= i < n)


@pytest.mark.parametrize("name", CLIPS)
def test_clip_frames_equal_a_full_decode(name: str) -> None:
    path = VIDEO / name
    index = load_index(path)
    info = index.info
    idx = spread(info.num_frames, index.keyframes.tolist())
    ref = reference(path, set(idx))
    assert info.stream_index == ref.stream
    assert (info.width, info.height) == ref.size and info.rotation == ref.rotation
    assert info.num_frames == ref.count, "the index and a full decode disagree on the frame count"
    assert info.duration_s > index.times_s[-1]  # the last frame can be sampled
    for i in idx:  # one seek each: the worst case for lost decoder state and wrong landings
        got = sample_frames(path, indices=[i], strategy="seek").frames[0]
        assert np.array_equal(got, ref.frames[i]), i
    together = sample_frames(path, indices=idx[::-1], strategy="sequential")
    assert all(
        np.array_equal(f, ref.frames[i]) for f, i in zip(together.frames, idx[::-1], strict=True)
    )


@pytest.mark.parametrize("name", CLIPS)
def test_decord_only_where_it_agrees(name: str) -> None:
    pytest.importorskip("decord")
    path = VIDEO / name
    info = probe(path)
    idx = spread(info.num_frames, [])
    ref = reference(path, set(idx))
    fr = sample_frames(path, indices=idx, backend="decord")
    assert fr.backend == "decord" or fr.backend_note, "fell back without saying why"
    assert all(np.array_equal(f, ref.frames[i]) for f, i in zip(fr.frames, idx, strict=True)), (
        fr.backend
    )


def test_timestamps_sample_to_the_last_frame() -> None:
    """Every clip can be sampled to its end (a last frame starting at the declared end used to be
    out of reach: ``num_frames=N`` stopped two frames short on two of these clips)."""
    for name in CLIPS:
        index = load_index(VIDEO / name)
        n = index.info.num_frames
        assert plan_indices(index, num_frames=n).tolist() == list(range(n)), name
        last = sample_frames(VIDEO / name, timestamps_s=[float(index.times_s[-1])])
        assert last.indices.tolist() == [n - 1], name


def test_errors_are_typed_beyond_what_decodes(tmp_path: Path) -> None:
    """A real clip whose index is intact but whose last 40% of data is zeroed: every index gives
    its frame or a one-line VideoDecodeError, never another frame."""
    src = VIDEO / "pyscenedetect" / "counter.mp4"
    if not src.is_file():
        pytest.skip(f"{src} not in this copy of the real data")
    damaged = media_defects.remux(src, tmp_path / "counter_damaged.mp4", movflags="+faststart")
    media_defects.zero_tail(damaged, 0.6)
    n = probe(damaged).num_frames
    ref = reference(damaged, set(range(n)))
    assert 0 < ref.count < n
    for i in range(n):
        try:
            got = sample_frames(damaged, indices=[i], strategy="seek").frames[0]
        except VideoDecodeError as e:
            assert i >= ref.count and str(damaged) in str(e) and "\n" not in str(e), (i, e)
            continue
        assert np.array_equal(got, ref.frames[i]), i


def test_segment_stage_over_the_whole_folder(tmp_path: Path) -> None:
    from lvr.artifacts import read_table
    from lvr.config import load_config
    from lvr.datagen.config import DatagenConfig
    from lvr.datagen.segment import run_segment

    cfg = load_config(
        DatagenConfig,
        None,
        [f"input.source={VIDEO}", "segment.stride_s=5", "segment.write_clips=true"],
    )
    run_segment(cfg, tmp_path, progress=False)
    layout = RunLayout(tmp_path)
    videos = {r["path"]: r for r in read_table(layout.videos).to_pylist()}
    clips = read_table(layout.clips).to_pylist()
    assert {Path(p).relative_to(VIDEO).as_posix() for p in videos} >= set(CLIPS)
    for name in CLIPS:
        row, info = videos[str(VIDEO / name)], probe(VIDEO / name)
        assert row["error"] is None, (name, row["error"])
        assert (row["width"], row["height"]) == (info.width, info.height)
        mine = sorted((c for c in clips if c["video_path"] == str(VIDEO / name)),
                      key=lambda c: c["start_s"])  # fmt: skip
        assert all(c["error"] is None for c in mine), (name, [c["error"] for c in mine])
        assert all(Path(c["clip_path"]).is_file() for c in mine), name
        assert mine[0]["start_s"] == 0.0 and mine[-1]["end_s"] == pytest.approx(info.duration_s)


GOLDENS = VIDEO / "pyscenedetect" / "goldens"


def golden_cases() -> list[str]:
    if not GOLDENS.is_dir():
        return []
    return sorted(
        p.name.split(".ContentDetector")[0]
        for p in GOLDENS.glob("*.ContentDetector.default.json")
        if (VIDEO / "pyscenedetect" / p.name.split(".ContentDetector")[0]).is_file()
    )


@pytest.mark.parametrize("name", golden_cases())
def test_cuts_agree_with_content_detector_goldens(name: str) -> None:
    """PySceneDetect's ContentDetector (default settings) output, kept in its repository: our
    cuts must be the same, in time (its frame numbers count at the stream's base rate, which for
    a variable-rate clip with dropped frames differs from our frame numbers)."""
    path = VIDEO / "pyscenedetect" / name
    gold = json.loads((GOLDENS / f"{name}.ContentDetector.default.json").read_text())["cuts"]
    with av.open(str(path)) as c:
        rate = float(c.streams.video[0].base_rate)
    ours = detect_shots(path).cuts_s
    assert len(ours) == len(gold), (ours, [g / rate for g in gold])
    for t, g in zip(ours, gold, strict=True):
        assert abs(t - g / rate) <= 1.5 / rate, (ours, [g / rate for g in gold])


def _decoded(path: Path, upto: int) -> list[np.ndarray]:
    """The first ``upto`` frames of a plain PyAV decode of the best video stream (not upright)."""
    out: list[np.ndarray] = []
    with av.open(str(path)) as c:
        for f in c.decode(c.streams.best("video")):
            out.append(f.to_ndarray(format="rgb24"))
            if len(out) == upto:
                break
    return out


@pytest.mark.parametrize("name", CLIPS)
def test_clip_file_holds_every_frame_of_its_range(name: str, tmp_path: Path) -> None:
    """Clip files (segment stage) hold every frame of their range, in order, whatever the codec:
    stream copied from the keyframe before the range, or re-encoded (``.lossless.*``) to exactly the
    range. Seen failing on an HEVC MP4 whose key packets are not the index's keyframes, and on VP8
    and AV1 sources, which MP4 clip files could not take."""
    from lvr.artifacts import clip_id
    from lvr.datagen.clip_files import write_clip_files

    path = VIDEO / name
    try:
        index = load_index(path)
    except VideoDecodeError:
        pytest.skip("not readable by lvr.media (covered above)")
    s = round(0.4 * index.info.duration_s, 3)
    e = min(s + 1.5, index.info.duration_s)
    want = np.flatnonzero((index.times_s >= s - 1e-3) & (index.times_s < e - 1e-3))
    row = {"clip_id": clip_id("v", s, e), "start_s": s, "end_s": e, "error": None,
           "clip_path": None}  # fmt: skip
    write_clip_files(str(path), [row], tmp_path)
    assert row["error"] is None, row["error"]
    ref = _decoded(path, int(want[-1]) + 1)
    clip = _decoded(Path(row["clip_path"]), 10**9)
    if ".lossless." in Path(row["clip_path"]).name:
        assert len(clip) == len(want), "a re-encoded clip holds exactly its range"
    first = [o for o, a in enumerate(clip) if np.array_equal(a, ref[want[0]])]
    assert first, f"frame {want[0]} (the range's first) is not in the clip"
    got = clip[first[0] : first[0] + len(want)]
    bad = [
        int(i) for j, i in enumerate(want) if j >= len(got) or not np.array_equal(got[j], ref[i])
    ]
    assert not bad, f"frames {bad[:5]} of [{s}, {e}) s are missing from the clip or differ"
