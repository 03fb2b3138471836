"""Synthetic videos: determinism, sidecar schema, and that the sidecar tells the truth about the pixels."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest

from lvr.datagen.synthetic import (
    COLORS,
    SCHEMA,
    VideoSpec,
    make_videos,
    read_sidecar,
    render_video,
)
from lvr.demo.color_task import render_color_order_video


def decode_all(path: Path) -> np.ndarray:
    """Every frame [T, H, W, 3] uint8, decoded independently of lvr.media."""
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def border_ring(frames: np.ndarray) -> np.ndarray:
    """Pixels [T, P, 3] of the 2-pixel frame border, which objects never cover."""
    top, bottom = (
        frames[:, :2].reshape(len(frames), -1, 3),
        frames[:, -2:].reshape(len(frames), -1, 3),
    )
    left, right = (
        frames[:, :, :2].reshape(len(frames), -1, 3),
        frames[:, :, -2:].reshape(len(frames), -1, 3),
    )
    return np.concatenate([top, bottom, left, right], axis=1).astype(np.int16)


def test_same_seed_same_bytes_and_other_seed_differs(tmp_path: Path) -> None:
    spec = VideoSpec(duration_s=2.0, width=64, height=48, gop=12, seed=11)
    a = render_video(tmp_path / "a.mp4", spec)
    b = render_video(tmp_path / "b.mp4", spec)
    for k in range(4):  # libx264 with mb-tree on gave different bytes in some repeated encodes
        render_video(tmp_path / f"again{k}.mp4", spec)
        assert (tmp_path / f"again{k}.mp4").read_bytes() == (tmp_path / "a.mp4").read_bytes()
    c = render_video(
        tmp_path / "c.mp4", VideoSpec(duration_s=2.0, width=64, height=48, gop=12, seed=12)
    )
    assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "b.mp4").read_bytes()
    assert {k: v for k, v in a.items() if k != "video"} == {
        k: v for k, v in b.items() if k != "video"
    }
    assert not np.array_equal(decode_all(tmp_path / "a.mp4"), decode_all(tmp_path / "c.mp4"))
    assert a["scenes"] != c["scenes"] or a["objects"] != c["objects"]


def test_sidecar_schema(short_video: Path) -> None:
    side = json.loads(short_video.with_suffix(".json").read_text())
    assert side == read_sidecar(short_video)
    assert side["schema"] == SCHEMA and side["video"] == short_video.name
    assert (side["fps"], side["width"], side["height"], side["num_frames"]) == (24.0, 160, 120, 144)
    assert side["duration_s"] == pytest.approx(6.0)
    scenes = side["scenes"]
    assert scenes[0]["start_s"] == 0.0 and scenes[-1]["end_s"] == side["duration_s"]
    for prev, nxt in zip(scenes, scenes[1:], strict=False):
        assert prev["end_s"] == nxt["start_s"] and prev["background"] != nxt["background"]
    assert side["cuts_s"] == [s["start_s"] for s in scenes[1:]] and len(side["cuts_s"]) >= 2
    assert side["cut_frames"] == [round(t * 24) for t in side["cuts_s"]]
    objs = side["objects"]
    assert [o["id"] for o in objs] == list(range(len(objs)))
    assert [o["appear_frame"] for o in objs] == sorted(
        {o["appear_frame"] for o in objs}
    )  # distinct, ordered
    for o in objs:
        sc = scenes[o["scene"]]
        assert sc["start_s"] <= o["appear_s"] < o["disappear_s"] <= sc["end_s"]
        assert o["color"] in COLORS and o["shape"] in {
            "circle",
            "square",
            "triangle",
            "diamond",
            "cross",
        }
    assert [c["start_s"] for c in side["clips"]] == [s["start_s"] for s in scenes]
    for clip, sc in zip(side["clips"], scenes, strict=True):
        first = next(o for o in objs if o["scene"] == sc["index"])
        assert clip["caption"].startswith(
            f"A {first['color']} {first['shape']} moves from {first['motion']}"
        )
        assert sc["background"] in clip["caption"]
    facts = side["facts"]
    assert facts["color_order"] == list(dict.fromkeys(o["color"] for o in objs))
    assert facts["first_object"]["id"] == 0 and facts["last_object"]["id"] == len(objs) - 1
    assert (
        sum(facts["count_by_color"].values()) == sum(facts["count_by_shape"].values()) == len(objs)
    )
    assert facts["scene_of_object"] == [o["scene"] for o in objs]
    assert facts["num_scenes"] == len(scenes) and facts["num_objects"] == len(objs)


def test_cuts_are_exact_background_changes(short_video: Path) -> None:
    """The frame at each cut shows the new background; no other frame changes background."""
    side = read_sidecar(short_video)
    ring = border_ring(decode_all(short_video))  # [T, P, 3]
    jump = np.abs(ring[1:] - ring[:-1]).mean(axis=(1, 2))  # [T-1]; jump[i-1] = change into frame i
    cut_frames = side["cut_frames"]
    in_scene = np.delete(jump, [c - 1 for c in cut_frames])
    assert min(jump[c - 1] for c in cut_frames) > 3 * in_scene.max()
    # Every frame's border is closest to the median border of its own scene.
    medians = np.stack(
        [np.median(ring[s["start_frame"] : s["end_frame"]], axis=0) for s in side["scenes"]]
    )
    dist = np.abs(ring[:, None] - medians[None]).mean(axis=(2, 3))  # [T, S]
    truth = np.concatenate(
        [[s["index"]] * (s["end_frame"] - s["start_frame"]) for s in side["scenes"]]
    )
    assert np.array_equal(dist.argmin(axis=1), truth)


def center_at(o: dict, i: int) -> tuple[int, int]:
    """Rounded (x, y) center of object ``o`` at frame ``i`` (linear path, see the schema)."""
    a, b = o["appear_frame"], o["disappear_frame"]
    u = 0.0 if b - a <= 1 else (i - a) / (b - 1 - a)
    x = o["start_xy"][0] + u * (o["end_xy"][0] - o["start_xy"][0])
    y = o["start_xy"][1] + u * (o["end_xy"][1] - o["start_xy"][1])
    return round(x), round(y)


def covered(objects: list[dict], i: int, xy: tuple[int, int], skip: int) -> bool:
    """Whether another object visible at frame ``i`` has ``xy`` inside its bounding square."""
    for p in objects:
        if p["id"] != skip and p["appear_frame"] <= i < p["disappear_frame"]:
            px, py = center_at(p, i)
            if abs(px - xy[0]) <= p["size_px"] / 2 + 1 and abs(py - xy[1]) <= p["size_px"] / 2 + 1:
                return True
    return False


def test_objects_are_where_the_sidecar_says(short_video: Path) -> None:
    """An object's color is at its center while it is visible, and not there the frame before."""
    side = read_sidecar(short_video)
    frames = decode_all(short_video).astype(int)
    objs, seen, absent = side["objects"], 0, 0
    for o in objs:
        color = np.array(COLORS[o["color"]])
        for i in (o["appear_frame"], (o["appear_frame"] + o["disappear_frame"] - 1) // 2):
            x, y = center_at(o, i)
            if not covered(objs, i, (x, y), o["id"]):
                assert np.abs(frames[i, y, x] - color).max() < 60, (o, i, frames[i, y, x])
                seen += 1
        i, xy = o["appear_frame"] - 1, center_at(o, o["appear_frame"])
        if i >= 0 and not covered(objs, i, xy, o["id"]):
            assert np.abs(frames[i, xy[1], xy[0]] - color).max() > 60, (o, frames[i, xy[1], xy[0]])
            absent += 1
    assert seen >= len(objs) and absent >= 3


def test_color_order_video(color_order_video: Path) -> None:
    side = read_sidecar(color_order_video)
    assert side["facts"]["color_order"] == ["red", "blue", "green"]
    assert side["num_frames"] == 16 and (side["width"], side["height"]) == (112, 112)
    frames = decode_all(color_order_video).astype(int)  # [16, 112, 112, 3]
    names = list(COLORS)
    palette = np.array([COLORS[c] for c in names])  # [C, 3]
    for o in side["objects"]:
        for i in range(o["appear_frame"], o["disappear_frame"]):
            px = frames[i].reshape(-1, 3)
            near = np.abs(px[:, None] - palette[None]).max(axis=2) < 50  # [P, C]
            counts = near.sum(axis=0)
            assert names[int(counts.argmax())] == o["color"] and counts.max() > 0.1 * len(px)


def test_color_order_rejects_bad_colors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="colors"):
        render_color_order_video(tmp_path / "x.mp4", ["red", "chartreuse"], seed=0)
    with pytest.raises(ValueError, match="colors"):
        render_color_order_video(tmp_path / "x.mp4", ["red", "red"], seed=0)


def test_make_videos_caches_by_spec(tmp_path: Path) -> None:
    kw = {"duration_s": 1.0, "width": 64, "height": 48, "gop": 12}
    paths = make_videos(tmp_path, 2, seed=4, **kw)
    assert [p.name for p in paths] == ["synth_s4_0000.mp4", "synth_s4_0001.mp4"]
    assert read_sidecar(paths[0])["seed"] != read_sidecar(paths[1])["seed"]
    stamp = [p.stat().st_mtime_ns for p in paths]
    assert make_videos(tmp_path, 2, seed=4, **kw) == paths
    assert [p.stat().st_mtime_ns for p in paths] == stamp  # reused, not re-rendered
    make_videos(tmp_path, 2, seed=4, **{**kw, "crf": 30})  # another spec: rendered again
    assert all(p.stat().st_mtime_ns != s for p, s in zip(paths, stamp, strict=True))
    assert read_sidecar(paths[0])["spec"]["crf"] == 30
    paths[1].with_suffix(".json").write_text("{broken")
    make_videos(tmp_path, 2, seed=4, **{**kw, "crf": 30})
    assert read_sidecar(paths[1])["spec"]["crf"] == 30
    assert not list(tmp_path.glob(".*tmp*"))  # no temp files left behind


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="even"):
        VideoSpec(width=161)
    with pytest.raises(ValueError, match="scene_len_s"):
        VideoSpec(scene_len_s=(3.0, 1.0))


@pytest.mark.slow
def test_ten_minute_video(tmp_path: Path) -> None:
    side = render_video(tmp_path / "long.mp4", VideoSpec(duration_s=600, width=640, height=360))
    assert side["num_frames"] == 14400 and len(side["scenes"]) > 90
    with av.open(str(tmp_path / "long.mp4")) as c:
        assert c.streams.video[0].frames == 14400
