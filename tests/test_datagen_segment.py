"""Segment stage: inputs, probing with error rows, stride clips, shot detection, shards, clip files."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import media_defects
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lvr.artifacts import clip_id, read_table, video_id
from lvr.config import load_config
from lvr.datagen.config import DatagenConfig
from lvr.datagen.segment import run_segment
from lvr.datagen.shots import (
    ShotDetectionError,
    boundary_f1,
    detect_shots,
    shots_to_clips,
    stride_clips,
)
from lvr.datagen.sources import InputError, resolve_inputs
from lvr.datagen.synthetic import VideoSpec, read_sidecar, render_video
from lvr.media import probe
from lvr.testing.bad_files import write_bad_files

SMALL = {
    "duration_s": 6.0,
    "fps": 24.0,
    "width": 160,
    "height": 120,
    "gop": 48,
    "scene_len_s": (1.5, 2.5),
}


def cfg_for(source: Path | str, *sets: str) -> DatagenConfig:
    return load_config(DatagenConfig, None, [f"input.source={source}", *sets])


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two good videos, every kind of broken file, a stray PDF and sidecars (ignored by name)."""
    d = tmp_path_factory.mktemp("mixed")
    for i in range(2):
        render_video(d / "good" / f"v{i}.mp4", VideoSpec(**SMALL, seed=20 + i))
    write_bad_files(d / "bad")
    (d / "notes.pdf").write_bytes(b"%PDF-1.4 not a video")
    (d / ".hidden.mp4").write_bytes(b"temp file of another tool")
    return d


def test_folder_with_good_corrupt_and_non_video_files(mixed_dir: Path, tmp_path: Path) -> None:
    result = run_segment(cfg_for(mixed_dir), tmp_path, progress=False)
    videos = {Path(r["path"]).name: r for r in read_table(tmp_path / "videos").to_pylist()}
    # sidecars (.json) and hidden files are not inputs; everything else is a row
    assert set(videos) == {"v0.mp4", "v1.mp4", "corrupt.mp4", "truncated.mp4", "truncated_noindex.mp4",
                           "empty.mp4", "audio_only.mp4", "not_video.mp4", "notes.pdf"}  # fmt: skip
    for name in ("v0.mp4", "v1.mp4"):
        row = videos[name]
        assert row["error"] is None and row["duration_s"] == pytest.approx(6.0, abs=0.05)
        assert (row["width"], row["height"], row["codec"]) == (160, 120, "h264")
        assert row["video_id"] == video_id(row["path"])
    bad = {k: v["error"] for k, v in videos.items() if k not in ("v0.mp4", "v1.mp4")}
    assert all(bad.values()), bad
    assert "empty" in bad["empty.mp4"] and "audio" in bad["audio_only.mp4"]
    assert "not a video file" in bad["notes.pdf"] and ".pdf" in bad["notes.pdf"]
    assert "truncated" in bad["truncated.mp4"]
    clips = read_table(tmp_path / "clips").to_pylist()
    good_ids = {videos["v0.mp4"]["video_id"], videos["v1.mp4"]["video_id"]}
    assert {c["video_id"] for c in clips} == good_ids
    assert result.errors["videos"] == 7 and result.errors["clips"] == 0


def test_stride_clips_cover_the_video(mixed_dir: Path, tmp_path: Path) -> None:
    cfg = cfg_for(mixed_dir / "good", "segment.stride_s=2.5", "segment.min_clip_s=1.2")
    run_segment(cfg, tmp_path, progress=False)
    clips = read_table(tmp_path / "clips").to_pylist()
    for vid in {c["video_id"] for c in clips}:
        mine = sorted((c for c in clips if c["video_id"] == vid), key=lambda c: c["clip_index"])
        # 6 s at stride 2.5: [0, 2.5), [2.5, 5), [5, 6) (remainder 1 s < 1.2 s joins the last clip)
        assert [(c["start_s"], c["end_s"]) for c in mine] == [(0.0, 2.5), (2.5, 6.0)]
        assert [c["clip_id"] for c in mine] == [
            clip_id(vid, c["start_s"], c["end_s"]) for c in mine
        ]
        assert all(c["method"] == "stride" and c["error"] is None for c in mine)


def test_stride_and_shot_clip_rules() -> None:
    assert stride_clips(25.0, 10.0, 2.0) == [(0.0, 10.0), (10.0, 20.0), (20.0, 25.0)]
    assert stride_clips(21.0, 10.0, 2.0) == [(0.0, 10.0), (10.0, 21.0)]
    assert stride_clips(4.0, 10.0, 2.0) == [(0.0, 4.0)]
    clips = shots_to_clips([0.5, 1.0, 3.0, 25.0, 29.5], 30.0, 2.0, 10.0)
    lengths = [b - a for a, b in clips]
    assert clips[0][0] == 0.0 and clips[-1][1] == 30.0
    assert all(x[1] == y[0] for x, y in zip(clips, clips[1:], strict=False))  # contiguous
    assert all(2.0 <= n <= 10.0 for n in lengths), clips
    assert {3.0, 25.0} <= {a for a, _ in clips}  # long shot split, cut boundaries kept


@pytest.fixture(scope="module")
def shot_videos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    d = tmp_path_factory.mktemp("shots")
    specs = [
        VideoSpec(
            duration_s=12.0, fps=24.0, width=160, height=120, scene_len_s=(1.0, 3.0), seed=31
        ),
        VideoSpec(
            duration_s=12.0,
            fps=25.0,
            width=192,
            height=108,
            scene_len_s=(1.0, 3.0),
            seed=32,
            gop=30,
        ),
        VideoSpec(
            duration_s=10.0,
            fps=30.0,
            width=160,
            height=120,
            scene_len_s=(1.5, 2.5),
            seed=33,
            noise=8,
        ),
    ]
    for i, spec in enumerate(specs):
        render_video(d / f"s{i}.mp4", spec)
    return sorted(d.glob("*.mp4"))


def test_shot_detection_matches_known_cuts(shot_videos: list[Path]) -> None:
    total = 0
    for path in shot_videos:
        side = read_sidecar(path)
        result = detect_shots(path)
        f1 = boundary_f1(result.cuts_s, side["cuts_s"], 0.5)[2]
        assert f1 >= 0.95, (path.name, result.cuts_s, side["cuts_s"])
        # boundaries are frame-exact, not just within the tolerance
        assert set(result.cut_frames) == set(side["cut_frames"]), path.name
        total += len(side["cuts_s"])
    assert total >= 12  # the check is not vacuous


def test_shot_method_clips_follow_cuts(shot_videos: list[Path], tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(shot_videos[0], src / "a.mp4")
    cfg = cfg_for(src, "segment.method=shots", "segment.min_clip_s=0.5", "segment.max_clip_s=4.0")
    run_segment(cfg, tmp_path / "run", progress=False)
    clips = read_table(tmp_path / "run" / "clips").to_pylist()
    cuts = read_sidecar(shot_videos[0])["cuts_s"]
    starts = [c["start_s"] for c in sorted(clips, key=lambda c: c["start_s"])]
    assert all(c["method"] == "shots" and c["end_s"] - c["start_s"] <= 4.0 + 1e-6 for c in clips)
    for cut in cuts:  # every cut starts a clip (no shot here is shorter than 0.5 s)
        assert min(abs(cut - s) for s in starts) < 1e-3, (cut, starts)


def test_shot_detection_error_on_broken_file(tmp_path: Path) -> None:
    files = write_bad_files(tmp_path)
    with pytest.raises(ShotDetectionError):
        detect_shots(files["corrupt"])


def _table(run: Path, name: str) -> list[dict[str, Any]]:
    return read_table(run / name, name).to_pylist()


def test_shards_are_disjoint_and_complete(mixed_dir: Path, tmp_path: Path) -> None:
    full = tmp_path / "full"
    run_segment(cfg_for(mixed_dir, "shards.videos_per_shard=2"), full, progress=False)
    split = tmp_path / "split"
    for i in range(3):
        res = run_segment(
            cfg_for(mixed_dir, "shards.videos_per_shard=2"), split, i, 3, progress=False
        )
        assert res.shards_run == len([k for k in range(5) if k % 3 == i])  # 9 inputs -> 5 shards
    one = sorted(r["path"] for r in _table(full, "videos"))
    many = [r["path"] for r in _table(split, "videos")]
    assert sorted(many) == one and len(set(many)) == len(many)
    assert sorted(r["clip_id"] for r in _table(split, "clips")) == sorted(
        r["clip_id"] for r in _table(full, "clips")
    )
    # the same file names on both: shard k holds the same videos whichever machine ran it
    for f in sorted((full / "videos").glob("*.parquet")):
        assert (
            pq.read_table(f).column("path").to_pylist()
            == pq.read_table(split / "videos" / f.name).column("path").to_pylist()
        )


def test_rerun_skips_and_changed_settings_recompute(mixed_dir: Path, tmp_path: Path) -> None:
    cfg = cfg_for(mixed_dir / "good", "segment.stride_s=3")
    assert run_segment(cfg, tmp_path, progress=False).shards_run == 1
    assert run_segment(cfg, tmp_path, progress=False).shards_skipped == 1
    res = run_segment(cfg_for(mixed_dir / "good", "segment.stride_s=2"), tmp_path, progress=False)
    assert res.shards_run == 1
    assert {c["end_s"] - c["start_s"] for c in _table(tmp_path, "clips")} == {2.0}


def test_list_parquet_glob_and_duplicate_inputs(mixed_dir: Path, tmp_path: Path) -> None:
    good = sorted((mixed_dir / "good").glob("*.mp4"))
    copy = tmp_path / "copy_of_v0.mp4"
    shutil.copy(good[0], copy)
    lst = tmp_path / "videos.txt"
    lst.write_text(f"# my videos\n{good[0].name}\n\n{good[1]}\n{copy}\n")
    res = resolve_inputs(cfg_for(lst, f"input.root={good[0].parent}").input)
    assert [f.path for f in res.files] == sorted([str(good[0]), str(good[1]), str(copy)])
    pq.write_table(pa.table({"video": [str(p) for p in good]}), tmp_path / "v.parquet")
    res = resolve_inputs(cfg_for(tmp_path / "v.parquet", "input.column=video").input)
    assert [f.path for f in res.files] == [str(p) for p in good]
    with pytest.raises(InputError, match="no column 'path'"):
        resolve_inputs(cfg_for(tmp_path / "v.parquet").input)
    res = resolve_inputs(cfg_for(f"{mixed_dir}/**/v*.mp4").input)
    assert [Path(f.path).name for f in res.files] == ["v0.mp4", "v1.mp4"]
    with pytest.raises(InputError, match="does not exist"):
        resolve_inputs(cfg_for(tmp_path / "nope").input)
    # the copy has the same content: one of the two rows explains it is a duplicate
    run_segment(cfg_for(lst, f"input.root={good[0].parent}"), tmp_path / "run", progress=False)
    rows = read_table(tmp_path / "run" / "videos").to_pylist()
    dup = [r for r in rows if r["error"]]
    assert len(rows) == 3 and len(dup) == 1 and "duplicate of" in dup[0]["error"]


def test_datasets_folder_input(mixed_dir: Path, tmp_path: Path) -> None:
    import datasets

    good = sorted(str(p) for p in (mixed_dir / "good").glob("*.mp4"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"path": good})}).save_to_disk(
        tmp_path / "ds"
    )
    res = resolve_inputs(cfg_for(tmp_path / "ds").input)
    assert [f.path for f in res.files] == good


def test_clip_files_by_stream_copy(mixed_dir: Path, tmp_path: Path) -> None:
    cfg = cfg_for(mixed_dir / "good", "segment.stride_s=3", "segment.write_clips=true")
    run_segment(cfg, tmp_path, progress=False)
    clips = _table(tmp_path, "clips")
    assert clips and all(c["clip_path"] and c["error"] is None for c in clips)
    for c in clips:
        info = probe(c["clip_path"])
        # stream copy starts at a keyframe at/before the clip start (GOP 48 = 2 s here)
        assert (
            c["end_s"] - c["start_s"] - 0.05 <= info.duration_s <= c["end_s"] - c["start_s"] + 2.1
        )


@pytest.mark.parametrize(
    ("codec", "pix_fmt", "suffix"),
    [("png", "rgb24", ".mov"), ("libx264", "yuv420p10le", ".mp4"), ("mjpeg", "yuvj422p", ".avi")],
)
def test_shot_detection_on_other_pixel_formats(
    tmp_path: Path, codec: str, pix_fmt: str, suffix: str
) -> None:
    """RGB frames go through the small swscale fallback, 10-bit and 4:2:2 planes are read in place."""
    import av

    spec = VideoSpec(duration_s=6.0, width=96, height=64, seed=9, scene_len_s=(1.0, 2.0))
    side = render_video(tmp_path / "src.mp4", spec)
    out = tmp_path / f"v{suffix}"
    with av.open(str(tmp_path / "src.mp4")) as src, av.open(str(out), "w") as dst:
        st = dst.add_stream(codec, rate=24)
        st.width, st.height, st.pix_fmt = 96, 64, pix_fmt
        for k, frame in enumerate(src.decode(video=0)):
            rgb = av.VideoFrame.from_ndarray(frame.to_ndarray(format="rgb24"), format="rgb24")
            rgb.pts = k
            dst.mux(st.encode(rgb))
        dst.mux(st.encode(None))
    assert len(side["cut_frames"]) >= 2
    assert detect_shots(out).cut_frames == side["cut_frames"]


# --- real-footage defect classes (generated look-alikes, see media_defects) ---


def _rows(run: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    return _table(run, "videos"), sorted(_table(run, "clips"), key=lambda c: c["start_s"])


def test_stride_clips_never_cover_undecodable_time(tmp_path: Path) -> None:
    """The index promises 50 frames (2 s), the data decodes fewer: the clean clip ends where
    decoding stops and an error row covers the rest."""
    src = tmp_path / "in"
    src.mkdir()
    media_defects.partly_decodable_mp4(src / "partly.mp4")
    decodable = len(media_defects.reference(src / "partly.mp4"))
    assert 0 < decodable < 50
    run_segment(cfg_for(src, "segment.min_clip_s=0.1"), tmp_path / "run", progress=False)
    videos, clips = _rows(tmp_path / "run")
    assert videos[0]["error"] is None and videos[0]["num_frames"] == 50
    good, bad = [c for c in clips if c["error"] is None], [c for c in clips if c["error"]]
    assert [(c["start_s"], c["end_s"]) for c in good] == [(0.0, decodable / 25)]
    assert len(bad) == 1 and (bad[0]["start_s"], bad[0]["end_s"]) == (decodable / 25, 2.0)
    assert "undecodable" in bad[0]["error"] and "\n" not in bad[0]["error"]
    off = cfg_for(src, "segment.min_clip_s=0.1", "segment.verify_decode=false")
    run_segment(off, tmp_path / "unverified", progress=False)  # opting out: probing only
    assert [(c["start_s"], c["end_s"]) for c in _rows(tmp_path / "unverified")[1]] == [(0.0, 2.0)]


def test_segment_reads_the_best_stream_and_keeps_rotation(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    media_defects.two_streams_mp4(src / "two.mp4")
    media_defects.rotated_mp4(src / "rot.mp4", 90)
    cfg = cfg_for(src, "segment.stride_s=0.6", "segment.min_clip_s=0.1", "segment.write_clips=true")
    run_segment(cfg, tmp_path / "run", progress=False)
    videos, clips = _rows(tmp_path / "run")
    size = {Path(v["path"]).name: (v["width"], v["height"]) for v in videos}
    assert size == {"two.mp4": (96, 54), "rot.mp4": (64, 96)}  # upright display size
    for c in clips:
        assert c["error"] is None, c
        info = probe(c["clip_path"])
        expected = size[Path(c["video_path"]).name]
        assert (info.width, info.height) == expected and info.video_streams == 1
        assert info.rotation == (90 if c["video_path"].endswith("rot.mp4") else 0)


def test_shots_on_packed_b_frames_avi(tmp_path: Path) -> None:
    """The decoder's timestamps are shuffled: frames are numbered in output order, no error."""
    path = media_defects.packed_avi(tmp_path / "packed.avi")
    result = detect_shots(path)
    assert result.num_frames == 40 and result.undecodable_from_s is None


def _dark_scene(i: int) -> np.ndarray:
    """Frame ``i`` of a very dark scene (RGB 2-14: bars and checks), drifting slowly."""
    yy, xx = np.mgrid[0:64, 0:96]
    a = np.zeros((64, 96, 3), np.uint8)  # [H, W, 3]
    a[..., 0] = 4 + 10 * ((xx + i) // 12 % 2)
    a[..., 1] = 3 + 8 * (yy // 16 % 2)
    a[..., 2] = 2 + 6 * (((xx + yy + 2 * i) // 10) % 2)
    return a


def test_cut_from_black_to_a_very_dark_scene(tmp_path: Path) -> None:
    frames = [np.zeros((64, 96, 3), np.uint8)] * 25 + [_dark_scene(i) for i in range(25)]
    result = detect_shots(media_defects.encode(tmp_path / "dark.mp4", frames), keep_scores=True)
    assert result.scores.changed[25] >= 0.35  # was 0.0: every cell changes by a few levels only
    assert result.cut_frames == [25]


def test_whole_frame_colour_change_is_not_a_cut(tmp_path: Path) -> None:
    """The same picture re-tinted (PySceneDetect's counter clip): ContentDetector reports no cut."""
    pic = (60 + media_defects.picture(0, 96, 64) * 0.45).astype(np.uint8)  # 60-175: no clipping
    tint = (pic.astype(int) + [60, -30, -30]).astype(np.uint8)  # redder, same picture
    frames = [pic] * 25 + [tint] * 25
    result = detect_shots(media_defects.encode(tmp_path / "tint.mp4", frames), keep_scores=True)
    assert result.cut_frames == [] and result.scores.changed[25] < 0.1


def test_shot_docstrings() -> None:
    import doctest

    from lvr.datagen import shots

    assert doctest.testmod(shots).failed == 0
