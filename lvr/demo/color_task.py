"""The color-order learning task: "Which color appears first?" on synthetic videos.

A question whose answer depends on what the frames show (not on the text), with a known ground
truth from the renderer, so that SFT and RL learning checks can fail: chance is 25% (4 options,
gold letters balanced over A-D). Used by ``lvr demo``, the learning checks in ``benchmarks/`` and
the training tests. The table is written directly in the ``qa`` contract (the renderer is the
ground truth); ``lvr datagen`` shows the general pipeline on richer videos.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np

from lvr.artifacts import atomic_write_json, content_id, rows_to_table, write_parquet
from lvr.datagen.synthetic import (
    COLORS,
    SHAPES,
    Renderer,
    VideoSpec,
    build_sidecar,
    encode_video,
    read_sidecar,
    refresh_facts,
    sidecar_path,
)
from lvr.layout import RunLayout

# Colors that are single tokens for the tiny tokenizer (" red", " orange", ...).
TASK_COLORS = ["red", "green", "blue", "yellow", "cyan", "orange"]
# The "fixed" variant: every video shows these four, options always list them in this order.
FIXED_OPTIONS = ["red", "green", "blue", "yellow"]
# `mislabel`: the writer's systematic mistake in sft demonstrations (yellow taken for green)
MISLABELED, CONFUSED_WITH = "yellow", "green"
QUESTION = "Which color appears first?"
PROMPT_VERSION = "color-order-v1"


def make_color_qa(
    out_dir: str | Path,
    n_train: int,
    n_eval: int = 0,
    seed: int = 0,
    size: int = 56,
    fps: float = 8.0,
    duration_s: float = 2.0,
    bad_videos: int = 0,
    n_rl: int = 0,
    gold: str | None = None,
    options: str = "shuffled",
    mislabel: float = 0.0,
) -> Path:
    """Render color-order videos and write a ``qa`` table, laid out as a run folder
    (``out_dir/inputs/*.mp4``, ``out_dir/qa/00000.parquet``).

    Rows come in the order sft (``n_train``), rl (``n_rl``), eval (``n_eval``); videos already
    rendered with the same settings are reused (their names hold a hash of those settings), so a
    rerun costs nothing.

    Args:
        out_dir: Folder for videos and the table.
        n_train: Rows with split "sft".
        n_eval: Rows with split "eval".
        seed: Seed of colors, letters and videos.
        size: Frame side in pixels.
        fps: Video frame rate.
        duration_s: Video length.
        bad_videos: Extra "sft" rows pointing to files that are not videos (decode failures).
        n_rl: Rows with split "rl".
        gold: Always put the answer at this letter (a biased set for RL checks); default cycles
            A-D so that every letter is gold equally often.
        options: "shuffled" — four of six colors, options in random order (the model must find
            the option naming the first color: a text lookup on top of the visual skill);
            "fixed" — always red, green, blue, yellow as options A-D, shown in random order (the
            letter follows from the first color alone: a pure visual question).
        mislabel: Share of the "sft" rows whose first color is yellow that say green instead
            (answer letter and reasoning), like the systematic mistake of a question writer that
            confuses two colors; "rl" and "eval" rows always hold the truth. Needs
            ``options="fixed"``. RL with the true reward is what can undo such demonstrations.

    Returns:
        The table folder.
    """
    if options not in ("shuffled", "fixed"):
        raise ValueError(f"options must be 'shuffled' or 'fixed', got {options!r}")
    if mislabel and options != "fixed":
        raise ValueError("mislabel needs options='fixed' (the letter of each color is known)")
    layout = RunLayout(Path(out_dir))  # a small run folder: inputs/ and the qa table
    rng = random.Random(seed)
    splits = ["sft"] * n_train + ["rl"] * n_rl + ["eval"] * n_eval
    rows: list[dict[str, Any]] = []
    for i, split in enumerate(splits):
        letter = gold or "ABCD"[i % 4]
        colors = _pick_colors(rng, options, letter)
        render = {"colors": colors, "seed": seed * 100003 + i, "duration_s": duration_s,
                  "size": size, "fps": fps}  # fmt: skip
        # The name holds a hash of everything the renderer sees: a file is reused only when
        # it is this very video (another variant or size renders a new file).
        path = layout.inputs / f"c{seed}_{i:05d}_{content_id(render)}.mp4"
        if not path.is_file():
            render_color_order_video(path, **render)
        opts = FIXED_OPTIONS if options == "fixed" else None
        row = color_row(i, str(path), colors, letter, rng, split, duration_s, opts)
        # (`mislabel` 0 draws nothing: the tables of other settings stay as they were)
        if mislabel and split == "sft" and colors[0] == MISLABELED and rng.random() < mislabel:
            row.update(_mislabeled(colors))
        rows.append(row)
    for j in range(bad_videos):
        bad = layout.inputs / f"bad_{j}.mp4"
        bad.parent.mkdir(parents=True, exist_ok=True)
        bad.write_bytes(b"this is not a video")
        rows.append(color_row(10**6 + j, str(bad), TASK_COLORS[:4], "A", rng, "sft", duration_s))
    table_dir = layout.qa
    write_parquet(table_dir / "00000.parquet", rows_to_table(rows, "qa"), "qa")
    return table_dir


SPLITS = ("sft", "rl", "eval")


def split_folders(folder: str | Path) -> dict[str, Path]:
    """Where `render_color_inputs` puts each split's videos: ``folder/<split>/``."""
    return {split: Path(folder) / split for split in SPLITS}


def render_color_inputs(
    folder: str | Path,
    counts: dict[str, int],
    seed: int = 0,
    size: int = 56,
    fps: float = 8.0,
    duration_s: float = 2.0,
    mislabel: float = 0.0,
) -> Path:
    """Render the task's videos into ``folder/<split>/`` with annotation sidecars.

    Every video shows red, green, blue and yellow in a random order (the first color cycles over
    the four, so golds are balanced). The sidecar is the dataset's annotation: what the demo's
    template writer reads to write the question and its answer.

    Args:
        folder: Where the split folders go (videos already rendered there are reused).
        counts: Videos per split, e.g. ``{"sft": 320, "rl": 256, "eval": 64}``.
        seed: Seed of the color orders and the renderings.
        size: Frame side in pixels.
        fps: Frame rate.
        duration_s: Video length.
        mislabel: Share of the ``sft`` videos showing yellow first whose annotation says green (a
            careless annotator of the training set); ``rl`` and ``eval`` annotations are true.

    Returns:
        ``folder``.
    """
    rng = random.Random(seed)
    for split, where in split_folders(folder).items():
        for i in range(counts.get(split, 0)):
            letter = "ABCD"[i % 4]
            colors = _pick_colors(rng, "fixed", letter)
            render = {"colors": colors, "seed": seed * 100003 + i + 10**6 * SPLITS.index(split),
                      "duration_s": duration_s, "size": size, "fps": fps}  # fmt: skip
            path = where / f"color_{i:05d}_{content_id(render)}.mp4"
            if not (path.is_file() and sidecar_path(path).is_file()):
                render_color_order_video(path, **render)
            wrong = split == "sft" and colors[0] == MISLABELED and rng.random() < mislabel
            _annotate(path, CONFUSED_WITH if wrong else None)
    return Path(folder)


def _annotate(path: Path, first_color: str | None) -> None:
    """Rewrite a sidecar so that its first shape is annotated as ``first_color`` (None: leave
    the renderer's truth). Idempotent: a rerun finds the same annotation."""
    side = read_sidecar(path)
    truth = side["spec"]["colors"][0]
    said = first_color or truth
    first = min(side["objects"], key=lambda o: o["appear_s"])
    if first["color"] == said:
        return
    first["color"] = said
    for clip in side["clips"]:
        clip["caption"] = clip["caption"].replace(f"A {truth} ", f"A {said} ", 1)
    side["annotator"] = f"took {truth} for {said}" if first_color else None
    # Atomic: a kill or a full disk mid-write left an empty or cut sidecar next to a finished
    # video, which every later `lvr demo` took as rendered and then failed to read.
    atomic_write_json(sidecar_path(path), refresh_facts(side))


def _mislabeled(colors: list[str]) -> dict[str, Any]:
    """The answer and reasoning of a writer that takes the first color (yellow) for green."""
    letter = "ABCD"[FIXED_OPTIONS.index(CONFUSED_WITH)]
    then = next(c for c in colors[1:] if c != CONFUSED_WITH)
    reasoning = f"The first color is {CONFUSED_WITH} ({letter}), then {then}."
    return {"answer": letter, "reasoning": reasoning, "generator": "synthetic-mislabeled"}


def _pick_colors(rng: random.Random, options: str, letter: str) -> list[str]:
    """The colors of one video in order of appearance; the first one sits at ``letter``."""
    if options == "shuffled":
        return rng.sample(TASK_COLORS, 4)
    first = FIXED_OPTIONS["ABCD".index(letter)]
    rest = [c for c in FIXED_OPTIONS if c != first]
    rng.shuffle(rest)
    return [first, *rest]


def color_row(
    i: int,
    path: str,
    colors: list[str],
    gold: str,
    rng: random.Random,
    split: str,
    duration_s: float = 2.0,
    fixed_options: list[str] | None = None,
) -> dict[str, Any]:
    """One question: the first color sits at the gold letter.

    With ``fixed_options`` the options are those (the first color must already be at ``gold``);
    otherwise the other three colors are shuffled around it.
    """
    if fixed_options is not None:
        if fixed_options["ABCD".index(gold)] != colors[0]:
            raise ValueError(f"first color {colors[0]!r} is not option {gold} of {fixed_options}")
        options = list(fixed_options)
    else:
        others = colors[1:]
        rng.shuffle(others)
        options = others[:]
        options.insert("ABCD".index(gold), colors[0])
    return {
        "qa_id": f"q{i:07d}",
        "video_id": f"v{i:07d}",
        "video_path": path,
        "duration_s": duration_s,
        "category": "temporal",
        "format": "mc",
        "question": QUESTION,
        "options": options,
        "answer": gold,
        "reasoning": f"The first color is {colors[0]} ({gold}), then {colors[1]}.",
        "evidence": [],
        "generator": "synthetic",
        "prompt_version": PROMPT_VERSION,
        "raw": None,
        "error": None,
        "split": split,
        "pass_rate": None,
    }


# The task's videos


def _color_order_objects(colors: list[str], n: int, size: int, seed: int) -> list[dict[str, Any]]:
    """Object ``k`` alone on frames of window ``k``: a big shape drifting slightly."""
    rng, s, objects = np.random.default_rng([seed, 2]), int(size * 0.6), []
    lo, hi = s / 2 + 2, size - s / 2 - 2
    for k, color in enumerate(colors):
        c0 = rng.uniform(lo, hi, 2)
        c1 = np.clip(c0 + rng.uniform(-size / 10, size / 10, 2), lo, hi)
        objects.append(
            {
                "id": k,
                "shape": str(rng.choice(SHAPES)),
                "color": color,
                "appear_frame": k * n // len(colors),
                "disappear_frame": (k + 1) * n // len(colors),
                "scene": 0,
                "size_px": s,
                "motion": "drifts",
                "start_xy": [round(float(x), 1) for x in c0],
                "end_xy": [round(float(x), 1) for x in c1],
            }
        )
    return objects


def render_color_order_video(
    path: str | os.PathLike[str],
    colors: list[str],
    seed: int,
    duration_s: float = 2.0,
    size: int = 112,
    fps: float = 8,
) -> dict[str, Any]:
    """Render a learning-task video: large colored shapes shown one after another, in ``colors`` order.

    The frames are split into ``len(colors)`` equal windows; window ``k`` shows only object ``k`` (a
    big saturated shape, ~60% of the frame side, drifting slightly) on a dark gray background. Any
    sampling with a frame in every window shows the order; ``facts.color_order == colors``.

    Args:
        path: Output ``.mp4`` path (sidecar next to it).
        colors: Color names from ``COLORS``, in order of appearance (distinct).
        seed: Seed for shapes, positions and noise.
        duration_s: Video length.
        size: Frame width and height (even, >= 32).
        fps: Frame rate.

    Returns:
        The sidecar dict (same schema as ``render_video``; ``spec`` holds these arguments).

    Raises:
        ValueError: On unknown or repeated colors, a bad size, or fewer frames than colors.
    """
    if not colors or any(c not in COLORS for c in colors) or len(set(colors)) != len(colors):
        raise ValueError(f"colors must be distinct names from {list(COLORS)}, got {colors}")
    gop = max(1, round(fps))
    spec = VideoSpec(duration_s, fps, size, size, seed=seed, crf=20, gop=gop, noise=3, texture=0)
    path, n = Path(path), spec.num_frames
    if n < len(colors):
        raise ValueError(f"need >= {len(colors)} frames for {len(colors)} colors, got {n}")
    bg = {"background": "dark gray", "background_style": "solid"}
    plan = (
        [{"index": 0, "start_frame": 0, "end_frame": n, **bg}],
        _color_order_objects(colors, n, size, seed),
    )
    caption = " ".join(
        f"{'Then a' if k else 'A'} {o['color']} {o['shape']} appears{'' if k else ' on a dark gray background'}."
        for k, o in enumerate(plan[1])
    )
    args = {
        "colors": list(colors),
        "seed": seed,
        "duration_s": duration_s,
        "size": size,
        "fps": fps,
    }
    side = build_sidecar(path, spec, args, plan, [caption])
    encode_video(path, Renderer(spec, plan).frames(), spec)
    atomic_write_json(sidecar_path(path), side)
    return side
