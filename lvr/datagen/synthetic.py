"""Procedural synthetic videos with exact ground truth, for tests, benchmarks, the demo and learning checks.

Every video is an H.264 (libx264, yuv420p) MP4 rendered from a seed, plus a sidecar JSON next to it
(``foo.mp4`` -> ``foo.json``) that states what is in the video: scenes separated by hard cuts at known
frame-exact times, moving colored shapes with known appearance times and paths, one caption per scene,
and the facts needed to ask checkable questions.

Sidecar schema (``"schema": "lvr.synthetic/v1"``); all times are seconds from the first frame, intervals
are half-open ``[start, end)``, and every time is a whole number of frames (``frame / fps``):

- ``render_version`` (bumped when rendering changes), ``video`` (file name), ``seed``, ``duration_s``
  (= ``num_frames / fps``), ``fps``, ``width``, ``height``, ``num_frames``, ``spec`` (the VideoSpec as
  a dict, or the arguments of ``lvr.demo.color_task.render_color_order_video``).
- ``scenes``: ``[{index, start_s, end_s, start_frame, end_frame, background, background_style}]``;
  ``background`` is a color name of ``BACKGROUNDS``, ``background_style`` is ``solid``,
  ``horizontal gradient`` or ``vertical gradient``. Consecutive scenes never share a background color.
- ``cuts_s`` / ``cut_frames``: scene boundaries, excluding 0 and the end. Frame ``cut_frames[k]`` is the
  first frame of scene ``k + 1`` (its background is the new one).
- ``objects``: ``[{id, shape, color, appear_s, disappear_s, appear_frame, disappear_frame, scene, size_px,
  motion, start_xy, end_xy}]``. Ids follow the order of appearance (no two objects appear on the same
  frame). The object is visible on frames ``appear_frame <= i < disappear_frame``; its center moves
  linearly from ``start_xy`` (at ``appear_frame``) to ``end_xy`` (at ``disappear_frame - 1``), in pixels
  from the top-left corner; ``size_px`` is the side of its bounding square.
- ``clips``: ``[{start_s, end_s, caption}]``, one natural-English caption per scene.
- ``facts``: ``color_order`` (colors in order of first appearance, each once), ``object_order`` (ids),
  ``first_object`` and ``last_object`` (``{id, shape, color, appear_s}`` of the first/last object to
  appear), ``count_by_color``, ``count_by_shape``, ``scene_of_object`` (list indexed by id),
  ``num_scenes``, ``num_objects``.

The plan (hence the sidecar) is a pure function of the seed and spec; the bytes, hence the decoded
frames, are deterministic for a given libx264 build and ``encoder_threads`` (x264's mb-tree rate
control is off: with it, repeated encodes of identical frames differed now and then).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np

from lvr.artifacts import atomic_write_json

SCHEMA = "lvr.synthetic/v1"
# Bump when rendering or planning changes, so that cached videos (make_videos) are re-rendered.
RENDER_VERSION = 2

# Bright, saturated, well-separated object colors (RGB).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (40, 200, 60),
    "blue": (40, 80, 240),
    "yellow": (245, 220, 30),
    "cyan": (30, 220, 230),
    "magenta": (220, 40, 220),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
}
# Dark, muted backgrounds so that every object color stands out on every background.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "navy": (20, 28, 90),
    "maroon": (105, 20, 30),
    "dark green": (20, 80, 35),
    "dark gray": (55, 55, 60),
    "brown": (100, 62, 28),
    "teal": (10, 90, 95),
    "olive": (92, 92, 20),
    "indigo": (62, 20, 105),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
MOTIONS: tuple[str, ...] = ("left to right", "right to left", "top to bottom", "bottom to top")
BG_STYLES: tuple[str, ...] = ("solid", "horizontal gradient", "vertical gradient")


@dataclass
class VideoSpec:
    """What to render. Times in seconds; the frame count is ``round(duration_s * fps)``.

    Attributes:
        duration_s: Video length.
        fps: Frame rate (constant).
        width: Frame width in pixels (even).
        height: Frame height in pixels (even).
        scene_len_s: (min, max) scene length; a short remainder at the end joins the last scene.
        objects_per_scene: (min, max) number of objects per scene, inclusive.
        seed: Seed of everything random.
        crf: libx264 constant rate factor (quality).
        gop: Maximum keyframe interval in frames (x264 also puts keyframes at cuts).
        preset: libx264 preset (speed/size trade-off).
        noise: Amplitude of the per-frame luma noise (0 disables it).
        texture: Amplitude of the slowly panning background texture (0 disables it).
        encoder_threads: libx264 threads (output depends on it: keep it fixed for reproducible bytes).
    """

    duration_s: float = 10.0
    fps: float = 24.0
    width: int = 320
    height: int = 240
    scene_len_s: tuple[float, float] = (2.0, 6.0)
    objects_per_scene: tuple[int, int] = (1, 3)
    seed: int = 0
    crf: int = 23
    gop: int = 250
    preset: str = "veryfast"
    noise: int = 4
    texture: int = 20
    encoder_threads: int = 1

    def __post_init__(self) -> None:
        if self.width % 2 or self.height % 2 or self.width < 32 or self.height < 32:
            raise ValueError(f"width/height must be even and >= 32, got {self.width}x{self.height}")
        if self.duration_s <= 0 or self.fps <= 0:
            raise ValueError(f"duration_s and fps must be > 0, got {self.duration_s}, {self.fps}")
        lo, hi = self.scene_len_s
        if not 0 < lo <= hi:
            raise ValueError(f"scene_len_s must be 0 < min <= max, got {self.scene_len_s}")
        if not 1 <= self.objects_per_scene[0] <= self.objects_per_scene[1]:
            raise ValueError(
                f"objects_per_scene must be 1 <= min <= max, got {self.objects_per_scene}"
            )

    @property
    def num_frames(self) -> int:
        """Number of frames rendered."""
        return max(1, round(self.duration_s * self.fps))


# ----------------------------------------------------------------------------------------------
# Planning: everything random is decided here, in frames, before any pixel is drawn.


def _plan_scenes(spec: VideoSpec, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Split the frames into scenes with distinct consecutive backgrounds."""
    n, fps = spec.num_frames, spec.fps
    lo, hi = (max(1, round(x * fps)) for x in spec.scene_len_s)
    bounds = [0]
    while n - bounds[-1] > hi:
        bounds.append(bounds[-1] + int(rng.integers(lo, hi + 1)))
    if n - bounds[-1] < lo and len(bounds) > 1:
        bounds.pop()  # a remainder shorter than a scene joins the last scene
    bounds.append(n)
    names, scenes, prev = list(BACKGROUNDS), [], None
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        bg = str(rng.choice([x for x in names if x != prev]))
        style = str(rng.choice(BG_STYLES))
        scenes.append(
            {
                "index": i,
                "start_frame": a,
                "end_frame": b,
                "background": bg,
                "background_style": style,
            }
        )
        prev = bg
    return scenes


def _plan_object(
    scene: dict[str, Any], appear: int, spec: VideoSpec, rng: np.random.Generator
) -> dict[str, Any]:
    """One object: shape, color, size, lifetime and a straight path inside the frame."""
    a, b = appear, scene["end_frame"]
    min_life = min(b - a, max(1, round(spec.fps)))
    disappear = b if rng.random() < 0.5 else int(rng.integers(a + min_life, b + 1))
    w, h = spec.width, spec.height
    size = int(min(w, h) * rng.uniform(0.14, 0.24))
    half, motion = size / 2 + 2, str(rng.choice(MOTIONS))
    cx, cy = rng.uniform(half, w - half), rng.uniform(half, h - half)
    start, end = {
        "left to right": ((half, cy), (w - half, cy)),
        "right to left": ((w - half, cy), (half, cy)),
        "top to bottom": ((cx, half), (cx, h - half)),
        "bottom to top": ((cx, h - half), (cx, half)),
    }[motion]
    return {
        "shape": str(rng.choice(SHAPES)),
        "color": str(rng.choice(list(COLORS))),
        "appear_frame": a,
        "disappear_frame": disappear,
        "scene": scene["index"],
        "size_px": size,
        "motion": motion,
        "start_xy": [round(float(start[0]), 1), round(float(start[1]), 1)],
        "end_xy": [round(float(end[0]), 1), round(float(end[1]), 1)],
    }


def _plan_objects(
    scenes: list[dict[str, Any]], spec: VideoSpec, rng: np.random.Generator
) -> list[dict[str, Any]]:
    """Objects of every scene, appearing one after another (distinct frames) early in the scene."""
    objects: list[dict[str, Any]] = []
    for sc in scenes:
        a, b = sc["start_frame"], sc["end_frame"]
        window = max(1, int((b - a) * 0.6))  # objects appear within the first 60% of the scene
        k = min(int(rng.integers(spec.objects_per_scene[0], spec.objects_per_scene[1] + 1)), window)
        appears = np.sort(rng.choice(window, size=k, replace=False)) + a
        appears[0] = a + min(int(rng.integers(0, max(1, round(spec.fps / 4)))), int(appears[0]) - a)
        objects += [_plan_object(sc, int(t), spec, rng) for t in appears]
    for i, ob in enumerate(objects):
        ob["id"] = i
    return objects


# ----------------------------------------------------------------------------------------------
# Sidecar: captions and facts derived from the plan.


def _bg_phrase(scene: dict[str, Any]) -> str:
    """'a navy background' or 'a navy vertical gradient background'."""
    style = "" if scene["background_style"] == "solid" else f" {scene['background_style']}"
    return f"a {scene['background']}{style} background"


def _scene_caption(scene: dict[str, Any], objs: list[dict[str, Any]]) -> str:
    """'A red circle moves from left to right across a navy background. Then a ...'."""
    first = objs[0]
    parts = [
        f"A {first['color']} {first['shape']} moves from {first['motion']} across {_bg_phrase(scene)}."
    ]
    for ob in objs[1:]:
        parts.append(f"Then a {ob['color']} {ob['shape']} appears and moves from {ob['motion']}.")
    return " ".join(parts)


def refresh_facts(side: dict[str, Any]) -> dict[str, Any]:
    """A sidecar whose objects were edited (e.g. a deliberately wrong annotation), with its
    derived ``facts`` recomputed from them."""
    return {**side, "facts": _facts(side["objects"], len(side["scenes"]))}


def _facts(objects: list[dict[str, Any]], num_scenes: int) -> dict[str, Any]:
    order = sorted(objects, key=lambda o: o["appear_frame"])

    def brief(o: dict[str, Any]) -> dict[str, Any]:
        return {"id": o["id"], "shape": o["shape"], "color": o["color"], "appear_s": o["appear_s"]}

    return {
        "color_order": list(dict.fromkeys(o["color"] for o in order)),
        "object_order": [o["id"] for o in order],
        "first_object": brief(order[0]),
        "last_object": brief(order[-1]),
        "count_by_color": dict(sorted(Counter(o["color"] for o in objects).items())),
        "count_by_shape": dict(sorted(Counter(o["shape"] for o in objects).items())),
        "scene_of_object": [o["scene"] for o in objects],
        "num_scenes": num_scenes,
        "num_objects": len(objects),
    }


def build_sidecar(
    path: Path,
    spec: VideoSpec,
    spec_dict: dict[str, Any],
    plan: tuple[list, list],
    captions: list[str],
) -> dict[str, Any]:
    scenes, objects = plan

    def sec(frame: int) -> float:
        return round(frame / spec.fps, 6)

    for sc in scenes:
        sc["start_s"], sc["end_s"] = sec(sc["start_frame"]), sec(sc["end_frame"])
    for ob in objects:
        ob["appear_s"], ob["disappear_s"] = sec(ob["appear_frame"]), sec(ob["disappear_frame"])
    return {
        "schema": SCHEMA,
        "render_version": RENDER_VERSION,
        "video": path.name,
        "seed": spec.seed,
        "duration_s": sec(spec.num_frames),
        "fps": spec.fps,
        "width": spec.width,
        "height": spec.height,
        "num_frames": spec.num_frames,
        "spec": spec_dict,
        "scenes": scenes,
        "cuts_s": [sc["start_s"] for sc in scenes[1:]],
        "cut_frames": [sc["start_frame"] for sc in scenes[1:]],
        "objects": objects,
        "clips": [
            {"start_s": sc["start_s"], "end_s": sc["end_s"], "caption": cap}
            for sc, cap in zip(scenes, captions, strict=True)
        ],
        "facts": _facts(objects, len(scenes)),
    }


# ----------------------------------------------------------------------------------------------
# Rendering: vectorised numpy per frame, objects drawn through precomputed boolean sprites.


def _sprite(shape: str, s: int) -> np.ndarray:
    """Boolean mask [s, s] of a shape filling its bounding square."""
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
    c, r = s / 2, s / 2
    if shape == "circle":
        return (xx - c) ** 2 + (yy - c) ** 2 <= r * r
    if shape == "square":
        return np.ones((s, s), bool)
    if shape == "triangle":  # apex up, base at the bottom
        return np.abs(xx - c) <= yy / 2
    if shape == "diamond":
        return np.abs(xx - c) + np.abs(yy - c) <= r
    if shape == "cross":
        return (np.abs(xx - c) <= s / 6) | (np.abs(yy - c) <= s / 6)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


class Renderer:
    """Draws frames of a plan; textures and sprites are built once per scene/object."""

    def __init__(self, spec: VideoSpec, plan: tuple[list, list]) -> None:
        width, height, noise = spec.width, spec.height, spec.noise
        self.w, self.h, (self.scenes, self.objects) = width, height, plan
        self.rng = np.random.default_rng([spec.seed, 1])
        self.pad = 64  # texture margin for panning
        # A small bank of noise fields cycled with a stride: fresh-looking noise at no per-frame cost.
        self.noise = [
            self.rng.integers(-noise, noise + 1, (height, width, 1), dtype=np.int16)
            for _ in range(16 if noise else 0)
        ]
        self.texture_amp = spec.texture
        self.sprites = {o["id"]: _sprite(o["shape"], o["size_px"]) for o in self.objects}
        self._scene_idx, self._bg = -1, np.zeros(0, np.int16)

    def _background(self, scene: dict[str, Any]) -> np.ndarray:
        """Background [h + pad, w + pad, 3] int16 of a scene: color, gradient and blocky texture."""
        h, w = self.h + self.pad, self.w + self.pad
        base, style = (
            np.array(BACKGROUNDS[scene["background"]], np.float32),
            scene["background_style"],
        )
        ramp = np.linspace(0.6, 1.5, w if style == "horizontal gradient" else h, dtype=np.float32)
        scale = {
            "solid": np.ones((1, 1, 1), np.float32),
            "horizontal gradient": ramp[None, :, None],
        }
        scale["vertical gradient"] = ramp[:, None, None]
        bg = np.broadcast_to(scale[style] * base, (h, w, 3)).astype(np.float32)  # [h, w, 3]
        if self.texture_amp:
            lo = self.rng.integers(
                -self.texture_amp, self.texture_amp + 1, (h // 8 + 1, w // 8 + 1, 1)
            )
            bg += np.repeat(np.repeat(lo, 8, 0), 8, 1)[:h, :w].astype(np.float32)
        return np.clip(bg, 0, 255).astype(np.int16)

    def frame(self, i: int, scene: dict[str, Any], visible: list[dict[str, Any]]) -> np.ndarray:
        """RGB frame i [h, w, 3] uint8."""
        if scene["index"] != self._scene_idx:
            self._scene_idx, self._bg = scene["index"], self._background(scene)
        o = i % (2 * self.pad)
        o = o if o < self.pad else 2 * self.pad - o  # pan back and forth, 1 px per frame
        f = self._bg[o // 2 : o // 2 + self.h, o : o + self.w].copy()  # [h, w, 3] int16
        if self.noise:
            f += self.noise[(i * 7) % len(self.noise)]
        out = np.clip(f, 0, 255).astype(np.uint8)
        for ob in visible:
            self._draw(out, ob, i)
        return out

    def _draw(self, out: np.ndarray, ob: dict[str, Any], i: int) -> None:
        a, b, s = ob["appear_frame"], ob["disappear_frame"], ob["size_px"]
        u = 0.0 if b - a <= 1 else (i - a) / (b - 1 - a)
        cx = ob["start_xy"][0] + u * (ob["end_xy"][0] - ob["start_xy"][0])
        cy = ob["start_xy"][1] + u * (ob["end_xy"][1] - ob["start_xy"][1])
        x0, y0 = int(round(cx - s / 2)), int(round(cy - s / 2))
        x0, y0 = min(max(x0, 0), self.w - s), min(max(y0, 0), self.h - s)
        out[y0 : y0 + s, x0 : x0 + s][self.sprites[ob["id"]]] = COLORS[ob["color"]]

    def frames(self) -> Iterator[np.ndarray]:
        """All frames in order."""
        for sc in self.scenes:
            objs = [o for o in self.objects if o["scene"] == sc["index"]]
            for i in range(sc["start_frame"], sc["end_frame"]):
                yield self.frame(
                    i, sc, [o for o in objs if o["appear_frame"] <= i < o["disappear_frame"]]
                )


# ----------------------------------------------------------------------------------------------
# Encoding and files.


def encode_video(
    path: Path, frames: Iterator[np.ndarray], spec: VideoSpec, faststart: bool = False
) -> None:
    """Encode RGB frames to H.264 yuv420p MP4 at ``path`` atomically (temp file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        # bitexact: no library version in the file ("Lavf62.12.103"), so that an FFmpeg micro
        # release does not change the bytes, hence the content ids (and the splits they hash to).
        options = {"fflags": "+bitexact"} | ({"movflags": "+faststart"} if faststart else {})
        with av.open(str(tmp), "w", format="mp4", options=options) as out:
            st = out.add_stream("libx264", rate=Fraction(spec.fps).limit_denominator(1001))
            st.width, st.height, st.pix_fmt = spec.width, spec.height, "yuv420p"
            st.options = {
                "crf": str(spec.crf),
                "g": str(spec.gop),
                "preset": spec.preset,
                "threads": str(spec.encoder_threads),
                # With mb-tree on, this libx264 gave different bytes (and pixels) in 2-40% of repeated
                # encodes of identical frames; with it off, 120 of 120 were identical.
                "x264-params": "mbtree=0",
            }
            for i, rgb in enumerate(frames):
                vf = av.VideoFrame.from_ndarray(rgb, format="rgb24")
                vf.pts = i
                out.mux(st.encode(vf))
            out.mux(st.encode(None))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def sidecar_path(video: str | os.PathLike[str]) -> Path:
    """The sidecar JSON path of a video (``foo.mp4`` -> ``foo.json``)."""
    return Path(video).with_suffix(".json")


def read_sidecar(video: str | os.PathLike[str]) -> dict[str, Any]:
    """Load the sidecar of a synthetic video.

    Raises:
        FileNotFoundError: If the video has no sidecar.
    """
    return json.loads(sidecar_path(video).read_text())


def render_video(path: str | os.PathLike[str], spec: VideoSpec | None = None) -> dict[str, Any]:
    """Render a synthetic video and its sidecar JSON.

    Args:
        path: Output ``.mp4`` path; the sidecar goes to the same path with ``.json``.
        spec: What to render (defaults to ``VideoSpec()``).

    Returns:
        The sidecar dict (see the module docstring for the schema).
    """
    spec, path = spec or VideoSpec(), Path(path)
    scenes, objects = plan_video(spec)
    captions = [
        _scene_caption(sc, [o for o in objects if o["scene"] == sc["index"]]) for sc in scenes
    ]
    side = build_sidecar(path, spec, asdict(spec), (scenes, objects), captions)
    encode_video(path, Renderer(spec, (scenes, objects)).frames(), spec)
    atomic_write_json(sidecar_path(path), side)
    return side


def make_videos(
    out_dir: str | os.PathLike[str],
    n: int,
    seed: int = 0,
    on_video: Callable[[Path], None] | None = None,
    **spec_overrides: Any,
) -> list[Path]:
    """Render ``n`` synthetic videos into ``out_dir``, reusing those already there (a cache).

    Video ``i`` is ``synth_s{seed}_{i:04d}.mp4`` rendered with ``VideoSpec(seed=seed * 100_003 + i,
    **spec_overrides)``. A video is reused when both the mp4 and a sidecar with the same spec exist.

    Args:
        out_dir: Folder for the videos and sidecars (created if needed).
        n: Number of videos.
        seed: Base seed.
        on_video: Called with each video's path once it is rendered or reused (progress).
        **spec_overrides: VideoSpec fields other than ``seed``.

    Returns:
        The video paths, in order.
    """
    out = Path(out_dir)
    paths = []
    for i in range(n):
        spec = VideoSpec(**{**spec_overrides, "seed": seed * 100_003 + i})
        path = out / f"synth_s{seed}_{i:04d}.mp4"
        if not _is_cached(path, asdict(spec)):
            render_video(path, spec)
        paths.append(path)
        if on_video is not None:
            on_video(path)
    return paths


def _is_cached(path: Path, spec: dict[str, Any]) -> bool:
    side = sidecar_path(path)
    if not (path.is_file() and path.stat().st_size > 0 and side.is_file()):
        return False
    try:
        # JSON turns tuples into lists: compare through a JSON round trip.
        old = json.loads(side.read_text())
        return old.get("render_version") == RENDER_VERSION and old.get("spec") == json.loads(
            json.dumps(spec)
        )
    except (json.JSONDecodeError, OSError):
        return False


def plan_video(spec: VideoSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(scenes, objects) of a spec; all randomness of the plan comes from ``spec.seed``."""
    rng = np.random.default_rng([spec.seed, 0])
    scenes = _plan_scenes(spec, rng)
    return scenes, _plan_objects(scenes, spec, rng)
