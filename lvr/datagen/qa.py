"""Stage ``qa``: reasoning questions per video from its timestamped clip captions.

Reads the table ``captions`` (which carries each video's path and duration), writes ``qa_raw``.
Per video, the captions are rendered in time order as ``From 20 to 30, <caption>`` lines; each of ``qa.questions_per_video``
slots gets a category (target shares) and a format (mc / open) by stratified, hash-seeded
allocation, so the shares hold over the dataset and no shard or machine changes them. One slot is
one model call (as in the paper: one question, one category per call) answering a JSON schema;
the output is validated and safely repaired by :mod:`lvr.datagen.qa_parse`, else it becomes an
error row with the reason. An optional second pass rewrites the reasoning into natural chain of
thought, checked by a deterministic regex. The ``template`` backend writes checkable questions from
facts instead (:mod:`lvr.datagen.template_qa`).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import pyarrow as pa

from lvr.artifacts import content_id, qa_id
from lvr.backends import Request, Response, check_options
from lvr.datagen import template_qa
from lvr.datagen.common import ModelBackends, error_line, settings_id
from lvr.datagen.config import DatagenConfig, QAConfig, category_shares
from lvr.datagen.prompts import Prompt, load_prompt
from lvr.datagen.qa_parse import (
    LETTERS,
    REWRITE_SCHEMA,
    QAParseError,
    parse_qa,
    parse_rewrite,
    qa_schema,
)
from lvr.datagen.runner import (
    DatagenStage,
    Rows,
    StageContext,
    require_model,
    run_datagen_stage,
)
from lvr.datagen.synthetic import read_sidecar
from lvr.errors import LvrError

Caption = tuple[float, float, str]  # (start_s, end_s, caption) of one clip


@dataclass(frozen=True)
class VideoCaptions:
    """One video to ask about: its path, duration and captions (its fields are its fingerprint)."""

    video_id: str
    video_path: str
    duration_s: float | None
    captions: tuple[Caption, ...]  # the successful captions, in time order
    caption_errors: int  # clips of the video without a caption
    settings: str  # id of the qa settings that change rows


class QAConfigError(LvrError):
    """A qa setting that would fail every video alike (e.g. a category the template cannot write)."""


def fmt_s(t: float) -> str:
    """Seconds as the paper writes them: ``20``, or ``12.5`` when not whole.

    >>> fmt_s(20.0), fmt_s(12.5), fmt_s(3.3333)
    ('20', '12.5', '3.3')
    """
    return f"{t:.0f}" if abs(t - round(t)) < 0.05 else f"{t:.1f}"


def render_captions(captions: list[list[Any]]) -> str:
    """``From <start> to <end>, <caption>`` lines in time order (the QA prompt's view of a video)."""
    return "\n".join(
        f"From {fmt_s(s)} to {fmt_s(e)}, {' '.join(str(c).split())}" for s, e, c in sorted(captions)
    )


def _unit(*parts: Any) -> float:
    return int(content_id(*parts), 16) / 16.0**16


def allocate(video_id: str, n: int, shares: dict[str, float], salt: str) -> list[str]:
    """Stratified allocation of ``n`` slots to labels with target ``shares``.

    Slot ``k`` takes the label whose cumulative-share interval holds ``(u + k) / n`` for a random
    offset ``u`` drawn from the video id: each video covers the labels as evenly as ``n`` allows and
    the expected share of every label is exactly its target.

    >>> allocate("v", 4, {"a": 0.5, "b": 0.5}, "s").count("a")
    2
    """
    total = sum(shares.values())
    names = [k for k, v in shares.items() if v > 0]
    edges, acc = [], 0.0
    for name in names:
        acc += shares[name] / total
        edges.append(acc)
    u = _unit("alloc", salt, video_id)
    out = []
    for k in range(n):
        x = (u + k) / n % 1.0
        out.append(names[next((i for i, e in enumerate(edges) if x < e), len(names) - 1)])
    return out


def slots(video_id: str, cfg: QAConfig) -> list[tuple[int, str, str]]:
    """(k, category, format) of every question slot of a video."""
    n = cfg.questions_per_video
    cats = allocate(video_id, n, category_shares(cfg), f"cat{cfg.seed}")
    fmts = allocate(video_id, n, dict(cfg.format_shares), f"fmt{cfg.seed}")
    random.Random(f"{cfg.seed}:{video_id}").shuffle(fmts)  # decorrelate formats from categories
    return [(k, c, f) for k, (c, f) in enumerate(zip(cats, fmts, strict=True))]


def plan_items(cfg: DatagenConfig, upstream: dict[str, pa.Table]) -> list[VideoCaptions]:
    """Items of qa shard ``k``: one per video with clips in caption shard ``k``, by video_id."""
    columns = ["video_id", "video_path", "duration_s", "start_s", "end_s", "caption", "error"]
    videos: dict[str, dict[str, Any]] = {}
    for r in upstream["captions"].select(columns).to_pylist():
        v = videos.setdefault(r["video_id"], {"video_path": r["video_path"],
                                              "duration_s": r["duration_s"], "ok": [], "failed": 0})  # fmt: skip
        if r["error"] is None and r["caption"]:
            v["ok"].append((r["start_s"], r["end_s"], r["caption"]))
        else:
            v["failed"] += 1
    settings = settings_id({k: v for k, v in asdict(cfg.qa).items() if k != "options"})
    return [
        VideoCaptions(vid, v["video_path"], v["duration_s"], tuple(sorted(v["ok"])), v["failed"], settings)
        for vid, v in sorted(videos.items())
    ]  # fmt: skip


def _base(
    it: VideoCaptions, k: int | str, category: str | None, fmt: str | None, generator: str,
    version: str,
) -> dict[str, Any]:  # fmt: skip
    return {"qa_id": qa_id(it.video_id, generator, version, k), "video_id": it.video_id,
            "video_path": it.video_path, "duration_s": it.duration_s, "category": category,
            "format": fmt, "generator": generator, "prompt_version": version}  # fmt: skip


def _too_few(
    it: VideoCaptions, cfg: QAConfig, generator: str, version: str
) -> dict[str, Any] | None:
    if len(it.captions) >= cfg.min_captions:
        return None
    return {**_base(it, "too-few-captions", None, None, generator, version),
            "error": f"{len(it.captions)} captioned clips (< qa.min_captions={cfg.min_captions}); "
                     f"{it.caption_errors} caption errors"}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Template backend
# ---------------------------------------------------------------------------------------------


def _check_template(cfg: QAConfig) -> None:
    """Every configured category must be one the template writes, with a kind left to write.

    Raises:
        QAConfigError: A category the template cannot write, or ``template_kinds`` that leave one
            without a kind (every question of it would be an error row).
    """
    unknown = [c.name for c in cfg.categories if c.name not in template_qa.CATEGORIES]
    if unknown:
        raise QAConfigError(
            f"qa.backend=template writes categories {', '.join(template_qa.CATEGORIES)}; "
            f"qa.categories has {unknown}: remove them or use an LLM backend"
        )
    # Every kind there is (any palette adds `first_color`): a misspelled kind beside valid ones
    # would otherwise be dropped without a word.
    every = {n for cat in template_qa.CATEGORIES for n, _ in template_qa.kinds_of(cat, (), ["x"])}
    misspelled = sorted(set(cfg.template_kinds) - every)
    if misspelled:
        raise QAConfigError(
            f"qa.template_kinds {misspelled} are no template kinds; valid: {', '.join(sorted(every))}"
        )
    for c in cfg.categories:
        if c.share > 0:
            try:
                template_qa.kinds_of(c.name, cfg.template_kinds, cfg.template_palette)
            except template_qa.TemplateError as exc:
                raise QAConfigError(f"qa.categories {c.name!r}: {exc}") from None


class TemplateWriter:
    """Questions from sidecar facts or structured captions (no model)."""

    def __init__(self, cfg: QAConfig):
        _check_template(cfg)
        self.cfg = cfg

    def __call__(self, items: list[VideoCaptions]) -> Rows:
        rows = []
        for it in items:
            early = _too_few(it, self.cfg, template_qa.GENERATOR, template_qa.PROMPT_VERSION)
            rows += [early] if early else self._questions(it)
        return {"qa_raw": rows}

    def _questions(self, it: VideoCaptions) -> list[dict[str, Any]]:
        facts, err = self._facts(it)
        taken: set[str] = set()  # questions of this video so far (no repeats)
        rows = []
        for k, cat, fmt in slots(it.video_id, self.cfg):
            base = _base(it, k, cat, fmt, template_qa.GENERATOR, template_qa.PROMPT_VERSION)
            if facts is None:
                rows.append({**base, "error": err})
                continue
            rng = random.Random(f"{self.cfg.seed}:{base['qa_id']}")
            try:
                q = template_qa.generate(facts, cat, fmt, rng, taken, self.cfg.template_kinds,
                                         self.cfg.template_palette)  # fmt: skip
            except template_qa.TemplateError as exc:
                rows.append({**base, "error": str(exc)})
                continue
            rows.append({**base, "question": q.question, "options": q.options, "answer": q.answer,
                         "reasoning": q.reasoning, "evidence": q.evidence,
                         "raw": template_qa.raw_record(q), "error": None})  # fmt: skip
        return rows

    def _facts(self, it: VideoCaptions) -> tuple[template_qa.Facts | None, str | None]:
        if self.cfg.template_source == "captions":
            return template_qa.facts_from_captions(list(it.captions), it.duration_s), None
        try:
            return template_qa.facts_from_sidecar(read_sidecar(it.video_path)), None
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            return None, (
                f"qa.template_source=sidecar: no usable sidecar for {it.video_path} ({error_line(exc)})"
            )


# ---------------------------------------------------------------------------------------------
# LLM backends
# ---------------------------------------------------------------------------------------------

_FORMAT_RULES = {
    "mc": (
        '- "options": exactly 4 answer options as plain text without letters; exactly one is '
        "correct and the others are plausible but wrong.\n"
        '- "answer": the letter (A, B, C or D) of the correct option.'
    ),
    "open": (
        "- The question is open-ended: there are no options.\n"
        '- "answer": the correct answer, short (a few words or one sentence).'
    ),
}


class LLMWriter:
    """Questions from an LLM through ``lvr.backends`` (cached requests, validated outputs).

    Args:
        cfg: The qa settings.
        models: The stage's model backends: the qa and rewrite calls go to the same endpoint with
            the same options and spend one request budget, this machine's share of the job's
            (the runner builds and closes them).
        progress: Show progress bars.
    """

    def __init__(self, cfg: QAConfig, models: ModelBackends, progress: bool):
        self.cfg = cfg
        self.prompt: Prompt = load_prompt(cfg.prompt)
        self.rewrite: Prompt | None = load_prompt(cfg.rewrite_prompt) if cfg.rewrite else None
        self.generator = f"{cfg.backend}:{cfg.model}"
        self.version = self.prompt.version + (f"+{self.rewrite.version}" if self.rewrite else "")
        self.backends = models
        self.progress = progress
        self.instructions = {c.name: c.instruction for c in cfg.categories}

    def request(self, it: VideoCaptions, cat: str, fmt: str, qid: str) -> Request:
        fields = (
            "question, options, reasoning, answer, evidence"
            if fmt == "mc"
            else "question, reasoning, answer, evidence"
        )
        messages = self.prompt.messages(  # the names of QA_PLACEHOLDERS (check_settings)
            captions=render_captions(list(it.captions)), duration=fmt_s(it.duration_s or 0.0),
            category=cat, instruction=self.instructions.get(cat, ""), format_rules=_FORMAT_RULES[fmt],
            fields=fields,
        )  # fmt: skip
        return Request(item_id=qid, messages=messages, json_schema=qa_schema(fmt), max_tokens=self.cfg.max_tokens,
                       temperature=self.cfg.temperature, seed=int(qid[:8], 16), prompt_version=self.prompt.version)  # fmt: skip

    def __call__(self, items: list[VideoCaptions]) -> Rows:
        rows: list[dict[str, Any]] = []
        reqs, owners = [], []
        for it in items:
            early = _too_few(it, self.cfg, self.generator, self.version)
            if early:
                rows.append(early)
                continue
            for k, cat, fmt in slots(it.video_id, self.cfg):
                base = _base(it, k, cat, fmt, self.generator, self.version)
                reqs.append(self.request(it, cat, fmt, base["qa_id"]))
                owners.append((base, it))
        responses = self.backends(self.cfg.model).run(reqs, progress=self.progress) if reqs else []
        parsed = [
            self._parse(base, it, resp) for (base, it), resp in zip(owners, responses, strict=True)
        ]
        if self.rewrite is not None:
            parsed = self._rewrite(parsed)
        return {"qa_raw": rows + parsed}

    def _parse(self, base: dict[str, Any], it: VideoCaptions, resp: Response) -> dict[str, Any]:
        if not resp.ok:
            return {**base, "error": f"model call failed: {resp.error}"}
        raw = resp.texts[0] if resp.texts else ""
        try:
            qa = parse_qa(raw, base["format"], it.duration_s)
        except QAParseError as exc:
            return {**base, "raw": raw, "error": f"invalid output: {exc}"}
        return {**base, "question": qa.question, "options": qa.options, "answer": qa.answer,
                "reasoning": qa.reasoning, "evidence": qa.evidence, "raw": raw, "error": None}  # fmt: skip

    def _rewrite(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Second pass: natural chain of thought for every valid row (failures become error rows)."""
        todo = [r for r in rows if r["error"] is None]
        reqs = []
        for r in todo:
            opts = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(r["options"]))
            messages = self.rewrite.messages(question=r["question"], options=opts, answer=r["answer"],  # type: ignore[union-attr]
                                             reasoning=r["reasoning"])  # fmt: skip
            reqs.append(Request(item_id=r["qa_id"], messages=messages, json_schema=REWRITE_SCHEMA,
                                max_tokens=self.cfg.max_tokens, temperature=0.0,
                                prompt_version=self.rewrite.version))  # type: ignore[union-attr]  # fmt: skip
        model = self.cfg.rewrite_model or self.cfg.model
        responses = self.backends(model).run(reqs, progress=self.progress) if reqs else []
        for r, resp in zip(todo, responses, strict=True):
            raw2 = resp.texts[0] if resp.ok and resp.texts else ""
            r["raw"] = json.dumps({"qa": r["raw"], "rewrite": raw2}, ensure_ascii=False)
            if not resp.ok:
                r["error"] = f"rewrite call failed: {resp.error}"
                continue
            try:
                r["reasoning"] = parse_rewrite(raw2)
            except QAParseError as exc:
                r["error"] = f"rewrite rejected: {exc}"
        return rows


# What LLMWriter fills into the qa and rewrite prompts, and what each prompt must use: a qa
# prompt without $captions asks about a video the model never sees, one without $category and
# $instruction writes the same kind of question under every category label.
QA_PLACEHOLDERS = ("captions", "duration", "category", "instruction", "format_rules", "fields")
QA_REQUIRED = (("captions",), ("category", "instruction"))
REWRITE_PLACEHOLDERS = ("question", "options", "answer", "reasoning")
REWRITE_REQUIRED = (("reasoning",),)


def check_settings(cfg: DatagenConfig) -> None:
    """What would fail every video alike, checked before any stage of a run works.

    Raises:
        LvrError: A category the template cannot write, a missing model name, bad backend
            options, or a prompt that is missing, malformed or does not use what it needs.
    """
    section = cfg.qa
    if section.backend == "template":
        _check_template(section)
        return
    require_model("qa", section.backend, section.model)
    check_options(section.backend, section.options, "qa.options")
    load_prompt(section.prompt).check(QA_PLACEHOLDERS, QA_REQUIRED)
    if section.rewrite:
        load_prompt(section.rewrite_prompt).check(REWRITE_PLACEHOLDERS, REWRITE_REQUIRED)


def make_writer(cfg: DatagenConfig, ctx: StageContext) -> TemplateWriter | LLMWriter:
    """The question writer of ``qa.backend``."""
    if cfg.qa.backend == "template":  # checkable questions from facts, no model
        return TemplateWriter(cfg.qa)
    backends = ctx.model_backends("qa", cfg.qa.backend, cfg.qa.model)
    return LLMWriter(cfg.qa, backends, ctx.progress)


STAGE = DatagenStage(
    name="qa",
    tables=("qa_raw",),
    upstream="caption",
    reads=("captions",),
    plan=plan_items,
    open_worker=make_writer,
    models=lambda cfg: (cfg.qa.backend, cfg.qa.options),
    check=check_settings,
    transient_errors=True,  # model calls: a rerun retries the failed rows (cache hits for the rest)
)

run_qa = partial(run_datagen_stage, STAGE)
"""``run_qa(cfg, run, shard=0, num_shards=1, progress=True, retry_errors=True)``."""
