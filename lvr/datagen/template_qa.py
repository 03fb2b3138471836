"""The ``template`` QA backend: checkable questions from facts, without any language model.

Facts come from the synthetic sidecar (exact ground truth) or are parsed from structured captions
("A red circle moves from left to right across a navy background. Then a blue square appears...").
Question kinds, by category:

- temporal: order of first appearance of the colors, first / last shape to appear, what appears
  right after a given shape, and (with ``qa.template_palette``) "Which color appears first?" with
  the palette as fixed options in a fixed order (`first_color`, the learning task of `lvr demo`);
- counting: shapes of one color, shapes of one kind, all shapes;
- spatial: the direction a given shape moves in;
- plot: the background when a given shape appears, how many times the scene changes.

Every question has one provably correct answer (ambiguous targets, such as two identical shapes,
are never asked about), distractors drawn from the video itself first (plausible) and then from the
vocabulary, a uniformly placed answer letter, a natural reasoning text (no "step", no time stamps)
and evidence ranges. ``raw`` records the kind and the fact behind each question, for audits.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lvr.datagen.qa_parse import LETTERS, norm
from lvr.datagen.synthetic import BACKGROUNDS, COLORS, MOTIONS, SHAPES

GENERATOR = "template"
PROMPT_VERSION = "template-v1"
CATEGORIES = ("temporal", "counting", "spatial", "plot")


@dataclass(frozen=True)
class Obj:
    """One object of the video: what it looks like, when it is visible, how it moves."""

    color: str
    shape: str
    appear_s: float
    disappear_s: float
    motion: str | None
    background: str | None

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Facts:
    """What the template may ask about one video."""

    objects: tuple[Obj, ...]  # in order of appearance
    scenes: tuple[tuple[float, float, str], ...]  # (start_s, end_s, background)
    duration_s: float


@dataclass
class Question:
    """A generated question before it becomes a row."""

    kind: str
    question: str
    options: list[str]
    answer: str
    reasoning: str
    evidence: list[dict[str, float]]
    truth: Any


class TemplateError(ValueError):
    """No question of the asked category can be written for this video."""


# ---------------------------------------------------------------------------------------------
# Facts
# ---------------------------------------------------------------------------------------------


def facts_from_sidecar(side: dict[str, Any]) -> Facts:
    """Facts of a synthetic video from its sidecar (exact)."""
    scenes = tuple(
        (float(s["start_s"]), float(s["end_s"]), str(s["background"])) for s in side["scenes"]
    )
    objs = sorted(side["objects"], key=lambda o: o["appear_s"])
    out = tuple(
        Obj(o["color"], o["shape"], float(o["appear_s"]), float(o["disappear_s"]), o.get("motion"),
            scenes[o["scene"]][2] if o.get("scene") is not None and o["scene"] < len(scenes) else None)
        for o in objs
    )  # fmt: skip
    return Facts(out, scenes, float(side["duration_s"]))


_COLOR_RE = "|".join(sorted(map(re.escape, COLORS), key=len, reverse=True))
_SHAPE_RE = "|".join(SHAPES)
_BG_RE = "|".join(sorted(map(re.escape, BACKGROUNDS), key=len, reverse=True))
_MENTION = re.compile(
    rf"\b(?:an?|the)\s+({_COLOR_RE})\s+({_SHAPE_RE})\b(?:\s+appears)?(?:\s+and)?"
    rf"(?:\s+moves\s+from\s+({'|'.join(MOTIONS)}))?",
    re.IGNORECASE,
)
_BACKGROUND = re.compile(rf"\b({_BG_RE})\b[\w\s]*?\bbackground\b", re.IGNORECASE)


def facts_from_captions(captions: list[tuple[float, float, str]], duration_s: float) -> Facts:
    """Facts parsed from structured captions: each "a <color> <shape>" mention is one object.

    Appearance times are only known to the caption's clip, so the clip range stands for them.
    """
    objs, scenes = [], []
    for s, e, text in sorted(captions):
        bg = _BACKGROUND.search(text)
        background = bg.group(1).lower() if bg else None
        if background and (not scenes or scenes[-1][2] != background):
            scenes.append((s, e, background))
        elif scenes and background:
            scenes[-1] = (scenes[-1][0], e, background)
        for m in _MENTION.finditer(text):
            motion = m.group(3).lower() if m.group(3) else None
            objs.append(Obj(m.group(1).lower(), m.group(2).lower(), s, e, motion, background))
    return Facts(tuple(objs), tuple(scenes), duration_s)


# ---------------------------------------------------------------------------------------------
# Helpers: options, evidence, wording
# ---------------------------------------------------------------------------------------------


def _ev(a: float, b: float) -> dict[str, float]:
    return {"start_s": round(a, 3), "end_s": round(max(b, a + 1e-3), 3)}


def _obj_ev(o: Obj) -> dict[str, float]:
    return _ev(o.appear_s, min(o.disappear_s, o.appear_s + 2.0))


def _unique(facts: Facts) -> list[Obj]:
    """Objects whose color + shape occurs once (safe to name in a question)."""
    counts: dict[str, int] = {}
    for o in facts.objects:
        counts[o.name] = counts.get(o.name, 0) + 1
    return [o for o in facts.objects if counts[o.name] == 1]


def _pick_options(
    correct: str, pools: list[list[str]], rng: random.Random, n: int = 4
) -> tuple[list[str], str]:
    """``n`` distinct options (correct at a uniformly drawn letter) with distractors from ``pools``.

    Pools are tried in order (plausible ones first); each pool is shuffled.

    Raises:
        TemplateError: Fewer than ``n - 1`` distinct distractors exist.
    """
    seen, wrong = {norm(correct)}, []
    for pool in pools:
        pool = list(pool)
        rng.shuffle(pool)
        for cand in pool:
            if len(wrong) == n - 1:
                break
            if norm(cand) not in seen:
                seen.add(norm(cand))
                wrong.append(cand)
    if len(wrong) < n - 1:
        raise TemplateError(f"only {len(wrong)} distinct distractors for {correct!r}")
    k = rng.randrange(n)
    options = wrong[:k] + [correct] + wrong[k:]
    return options, LETTERS[k]


def _say(rng: random.Random, *variants: str) -> str:
    return rng.choice(variants)


def _a(name: str) -> str:
    """Indefinite article + name: 'an orange square', 'a red circle'."""
    return ("an " if name[:1].lower() in "aeiou" else "a ") + name


_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _ordinal_list(names: list[str]) -> str:
    if len(names) == 1:
        return names[0]
    return ", ".join(names[:-1]) + " and " + names[-1]


# ---------------------------------------------------------------------------------------------
# Question kinds. Each returns (question, correct answer text, distractor pools, reasoning,
# evidence, truth) or raises TemplateError when the video does not support it.
# ---------------------------------------------------------------------------------------------

Kind = Callable[
    [Facts, random.Random], tuple[str, str, list[list[str]], str, list[dict[str, float]], Any]
]


def _color_order(f: Facts, rng: random.Random) -> tuple:
    firsts: dict[str, Obj] = {}
    for o in f.objects:
        firsts.setdefault(o.color, o)
    colors = list(firsts)[:5]
    if len(colors) < 2:
        raise TemplateError("fewer than two colors")
    correct = ", ".join(colors)
    perms = [", ".join(p) for p in itertools.permutations(colors) if list(p) != colors]
    absent = [c for c in COLORS if c not in firsts]
    swaps = [
        ", ".join(colors[:i] + [a] + colors[i + 1 :]) for i in range(len(colors)) for a in absent
    ]
    if len(firsts) > len(colors):
        q = f"Which list gives the first {_NUMBER_WORDS[len(colors)]} colors to appear, in order of appearance?"
    else:
        q = "In which order do the colors of the shapes first appear in the video?"
    walk = [_a(firsts[c].name) for c in colors]
    reasoning = (
        _say(rng, "Checking the video from the beginning, ", "Watching the video from the start, ")
        + f"the first shape to show up is {walk[0]}. "
        + " ".join(
            _say(rng, f"After that {w} appears.", f"Later, {w} comes in.", f"Then {w} shows up.")
            for w in walk[1:]
        )
        + f" Ordering the colors by their first appearance gives {_ordinal_list(colors)}."
    )
    return q, correct, [perms, swaps], reasoning, [_obj_ev(firsts[c]) for c in colors], colors


class FixedOptions(list):
    """Options a kind fixes itself (text and order), instead of drawing distractors."""


def _first_color(palette: tuple[str, ...]) -> Kind:
    """ "Which color appears first?" with the palette as the options, always in that order.

    Question and options are the same text for every video, so only the frames can tell the
    answer; the reasoning is one short sentence a small model can imitate.
    """

    def kind(f: Facts, rng: random.Random) -> tuple:
        order = [o.color for o in f.objects]
        if not order:
            raise TemplateError("no shape to ask about")
        if order[0] not in palette:
            raise TemplateError(f"first color {order[0]!r} is not in qa.template_palette")
        letter = LETTERS[palette.index(order[0])]
        then = next((c for c in order[1:] if c != order[0]), None)
        reasoning = f"The first color is {order[0]} ({letter})" + (
            f", then {then}." if then else "."
        )
        evidence = [_obj_ev(f.objects[0])]
        return (
            "Which color appears first?",
            order[0],
            FixedOptions(palette),
            reasoning,
            evidence,
            order[0],
        )

    return kind


def _first_last(which: str) -> Kind:
    def kind(f: Facts, rng: random.Random) -> tuple:
        if len(f.objects) < 2:
            raise TemplateError("fewer than two shapes")
        target = f.objects[0] if which == "first" else f.objects[-1]
        others = [o.name for o in f.objects if o.name != target.name]
        vocab = [f"{c} {s}" for c in COLORS for s in SHAPES]
        q = (
            "Which shape is the first to appear in the video?" if which == "first"
            else "What is the final new shape that shows up before the video ends?"
        )  # fmt: skip
        where = "at the very beginning" if which == "first" else "near the end"
        reasoning = (
            _say(rng, "Analyzing the video, ", "Looking through the video, ")
            + f"several shapes appear one after another: {_ordinal_list([o.name for o in f.objects[:6]])}"
            + ("" if len(f.objects) <= 6 else " and more")
            + f". Checking {where}, the {which} one to show up is the {target.name}, "
            + "so that is the answer."
        )
        return q, target.name, [others, vocab], reasoning, [_obj_ev(target)], target.name

    return kind


def _after(f: Facts, rng: random.Random) -> tuple:
    uniq = set(o.name for o in _unique(f))
    pairs = [
        (a, b) for a, b in itertools.pairwise(f.objects) if a.name in uniq and b.name != a.name
    ]
    if not pairs:
        raise TemplateError("no uniquely named shape with a successor")
    a, b = rng.choice(pairs)
    others = [o.name for o in f.objects if o.name not in (a.name, b.name)]
    vocab = [f"{c} {s}" for c in COLORS for s in SHAPES]
    q = f"Which shape appears right after the {a.name} shows up?"
    reasoning = (
        f"Checking the video, the {a.name} appears at some point. Looking at what comes next, "
        f"the next new shape to show up is the {b.name}, before any other shape appears."
    )
    return q, b.name, [others, vocab], reasoning, [_obj_ev(a), _obj_ev(b)], b.name


def _count(what: str) -> Kind:
    def kind(f: Facts, rng: random.Random) -> tuple:
        if not f.objects:
            raise TemplateError("no shapes")
        if what == "total":
            hits, label = list(f.objects), "shapes appear in the video in total"
        else:
            values = sorted({getattr(o, what) for o in f.objects})
            value = rng.choice(values)
            hits = [o for o in f.objects if getattr(o, what) == value]
            plural = value + ("es" if value.endswith(("s", "x")) else "s")
            label = (
                f"{value} shapes appear in the video"
                if what == "color"
                else f"{plural} appear in the video"
            )
        n = len(hits)
        near = [str(n + d) for d in (1, -1, 2, 3, -2) if n + d >= 0]
        q = f"How many {label}?"
        reasoning = (
            _say(
                rng,
                "Going through the video scene by scene, ",
                "Counting while watching the video, ",
            )
            + f"I find {_ordinal_list([_a(o.name) for o in hits[:8]])}"
            + ("" if n <= 8 else f" and {n - 8} more")
            + f". That makes {n} in total."
        )
        return q, str(n), [near], reasoning, [_obj_ev(o) for o in hits[:8]], n

    return kind


def _motion(f: Facts, rng: random.Random) -> tuple:
    cands = [o for o in _unique(f) if o.motion in MOTIONS]
    if not cands:
        raise TemplateError("no uniquely named shape with a known motion")
    o = rng.choice(cands)
    q = f"In which direction does the {o.name} move across the frame?"
    reasoning = (
        f"Analyzing the scene where the {o.name} appears, it starts near one edge of the frame and "
        f"travels steadily to the opposite side, moving from {o.motion}."
    )
    return (
        q,
        o.motion,
        [[m for m in MOTIONS if m != o.motion]],
        reasoning,
        [_ev(o.appear_s, o.disappear_s)],
        o.motion,
    )


def _mover(f: Facts, rng: random.Random) -> tuple:
    uniq = _unique(f)
    by_motion: dict[str, list[Obj]] = {}
    for o in f.objects:
        if o.motion in MOTIONS:
            by_motion.setdefault(o.motion, []).append(o)
    cands = [(m, objs[0]) for m, objs in by_motion.items() if len(objs) == 1 and objs[0] in uniq]
    if not cands:
        raise TemplateError("no motion direction that exactly one shape has")
    motion, o = rng.choice(sorted(cands, key=lambda c: c[0]))
    others = [x.name for x in f.objects if x.motion != motion]
    vocab = [f"{c} {s}" for c in COLORS for s in SHAPES]
    q = f"Which shape travels from {motion} across the frame?"
    reasoning = (
        f"Analyzing how each shape moves, most of them travel in other directions. Checking the "
        f"scene with the {o.name}, it is the only one that goes from {motion}."
    )
    return q, o.name, [others, vocab], reasoning, [_ev(o.appear_s, o.disappear_s)], o.name


def _background(f: Facts, rng: random.Random) -> tuple:
    cands = [o for o in _unique(f) if o.background]
    if not cands:
        raise TemplateError("no uniquely named shape with a known background")
    o = rng.choice(cands)
    seen = [s[2] for s in f.scenes if s[2] != o.background]
    q = f"What color is the background when the {o.name} appears?"
    reasoning = (
        f"Checking the moment the {o.name} shows up, the scene behind it is {_a(o.background)} "
        "background, which is different from the backgrounds of the other scenes."
    )
    return q, o.background, [seen, list(BACKGROUNDS)], reasoning, [_obj_ev(o)], o.background


def _scene_changes(f: Facts, rng: random.Random) -> tuple:
    if not f.scenes:
        raise TemplateError("no scene information")
    n = len(f.scenes) - 1
    near = [str(n + d) for d in (1, -1, 2, 3, -2) if n + d >= 0]
    q = "How many times does the background of the video change to a new scene?"
    reasoning = (
        "Watching the video from start to end, the backgrounds are "
        + _ordinal_list([s[2] for s in f.scenes[:10]])
        + ("" if len(f.scenes) <= 10 else " and more")
        + f". Each switch to a new background is a scene change, so there are {n} changes."
    )
    return (
        q,
        str(n),
        [near],
        reasoning,
        [_ev(s[0], min(s[1], s[0] + 1.0)) for s in f.scenes[1:9]] or [_ev(0, f.duration_s)],
        n,
    )


KINDS: dict[str, list[tuple[str, Kind]]] = {
    "temporal": [("color_order", _color_order), ("first", _first_last("first")),
                 ("last", _first_last("last")), ("after", _after)],
    "counting": [("count_color", _count("color")), ("count_shape", _count("shape")), ("count_total", _count("total"))],
    "spatial": [("motion", _motion), ("mover", _mover)],
    "plot": [("background", _background), ("scene_changes", _scene_changes)],
}  # fmt: skip


def kinds_of(
    category: str, names: Sequence[str] = (), palette: Sequence[str] = ()
) -> list[tuple[str, Kind]]:
    """The question kinds of a category (only `names` when given; `first_color` needs a palette).

    Raises:
        TemplateError: An unknown category, or none of `names` belongs to it.
    """
    if category not in KINDS:
        raise TemplateError(f"template writes categories {', '.join(KINDS)}, not {category!r}")
    kinds = list(KINDS[category])
    if category == "temporal" and palette:
        kinds.append(("first_color", _first_color(tuple(palette))))
    if names:
        kinds = [(n, k) for n, k in kinds if n in names]
        if not kinds:
            raise TemplateError(f"qa.template_kinds {list(names)} has no {category} kind")
    return kinds


def generate(
    facts: Facts,
    category: str,
    fmt: str,
    rng: random.Random,
    taken: set[str],
    kinds: Sequence[str] = (),
    palette: Sequence[str] = (),
) -> Question:
    """One question of ``category`` and ``fmt`` whose text is not in ``taken``.

    Args:
        facts: What the video shows.
        category: Question category.
        fmt: ``mc`` or ``open``.
        rng: The question's seeded choices.
        taken: Normalized questions (and kinds) this video already has; updated.
        kinds: Only these kinds (default: all of the category).
        palette: Fixed options of the `first_color` kind.

    Raises:
        TemplateError: The category is unknown or no new question of it fits this video.
    """
    kinds = kinds_of(category, kinds, palette)
    rng.shuffle(kinds)
    # Kinds not yet asked about this video first: the same kind twice reads like a near-duplicate.
    kinds.sort(key=lambda nk: f"kind:{nk[0]}" in taken)
    reasons = []
    for name, kind in kinds:
        for _ in range(4):  # kinds with a random target may need a few draws to find a new one
            try:
                q, correct, pools, reasoning, evidence, truth = kind(facts, rng)
                if fmt != "mc":
                    options, answer = [], correct
                elif isinstance(pools, FixedOptions):
                    options, answer = list(pools), LETTERS[pools.index(correct)]
                else:
                    options, answer = _pick_options(correct, pools, rng)
            except TemplateError as exc:
                reasons.append(f"{name}: {exc}")
                break
            if norm(q) not in taken:
                taken.update((norm(q), f"kind:{name}"))
                return Question(name, q, options, answer, reasoning, evidence, truth)
        else:
            reasons.append(f"{name}: no new target")
    raise TemplateError(f"no new {category} question fits this video ({'; '.join(reasons)})")


def raw_record(q: Question) -> str:
    """The audit record stored in ``raw``: kind and ground truth."""
    return json.dumps({"kind": q.kind, "truth": q.truth}, sort_keys=True)
