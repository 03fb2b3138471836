"""Stage ``qa``: reasoning questions per video from its timestamped clip captions.

Reads ``caption/captions`` and ``segment/videos``, writes ``qa/qa_raw``. Per video, the captions are
rendered in time order as ``From 20 to 30, <caption>`` lines; each of ``qa.questions_per_video``
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
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pyarrow as pa

from lvr.artifacts import (
    Shard,
    Stage,
    StageResult,
    content_id,
    manifest_name,
    qa_id,
    rows_to_table,
    run_stage,
)
from lvr.datagen.caption import cache_path
from lvr.datagen.common import (
    CallReport,
    drop_orphans,
    error_line,
    read_shard,
    retry_failed_shards,
    settings_id,
    shard_limiter,
    upstream_shards,
)
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
from lvr.errors import LvrError

TABLES = ("qa_raw",)


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


def plan_items(videos: pa.Table, captions: pa.Table, cfg: QAConfig) -> list[dict[str, Any]]:
    """One item per video that has clips: its path, duration and successful captions (time order)."""
    by_video: dict[str, list[list[Any]]] = {}
    failed: dict[str, int] = {}
    for r in captions.select(["video_id", "start_s", "end_s", "caption", "error"]).to_pylist():
        if r["error"] is None and r["caption"]:
            by_video.setdefault(r["video_id"], []).append([r["start_s"], r["end_s"], r["caption"]])
        else:
            failed[r["video_id"]] = failed.get(r["video_id"], 0) + 1
    settings = settings_id({k: v for k, v in asdict(cfg).items() if k != "options"})
    items = []
    for v in videos.select(["video_id", "path", "duration_s", "error"]).to_pylist():
        vid = v["video_id"]
        if v["error"] is not None or (vid not in by_video and vid not in failed):
            continue  # the videos table already explains it; no clips, nothing to ask
        items.append({"video_id": vid, "video_path": v["path"], "duration_s": v["duration_s"],
                      "captions": sorted(by_video.get(vid, [])), "caption_errors": failed.get(vid, 0),
                      "settings": settings})  # fmt: skip
    return sorted(items, key=lambda it: it["video_id"])


def _base(
    it: dict[str, Any],
    k: int | str,
    category: str | None,
    fmt: str | None,
    generator: str,
    version: str,
) -> dict[str, Any]:
    return {"qa_id": qa_id(it["video_id"], generator, version, k), "video_id": it["video_id"],
            "video_path": it["video_path"], "duration_s": it["duration_s"], "category": category,
            "format": fmt, "generator": generator, "prompt_version": version}  # fmt: skip


def _too_few(
    it: dict[str, Any], cfg: QAConfig, generator: str, version: str
) -> dict[str, Any] | None:
    if len(it["captions"]) >= cfg.min_captions:
        return None
    return {**_base(it, "too-few-captions", None, None, generator, version),
            "error": f"{len(it['captions'])} captioned clips (< qa.min_captions={cfg.min_captions}); "
                     f"{it['caption_errors']} caption errors"}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Template backend
# ---------------------------------------------------------------------------------------------


class TemplateWriter:
    """Questions from sidecar facts or structured captions (no model)."""

    def __init__(self, cfg: QAConfig):
        from lvr.datagen.template_qa import CATEGORIES

        unknown = [c.name for c in cfg.categories if c.name not in CATEGORIES]
        if unknown:
            raise QAConfigError(
                f"qa.backend=template writes categories {', '.join(CATEGORIES)}; qa.categories has "
                f"{unknown}: remove them or use an LLM backend"
            )
        self.cfg = cfg

    def __call__(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from lvr.datagen import template_qa as tq

        rows = []
        for it in items:
            early = _too_few(it, self.cfg, tq.GENERATOR, tq.PROMPT_VERSION)
            if early:
                rows.append(early)
                continue
            facts, err = self._facts(it)
            taken: set[str] = set()
            for k, cat, fmt in slots(it["video_id"], self.cfg):
                base = _base(it, k, cat, fmt, tq.GENERATOR, tq.PROMPT_VERSION)
                if facts is None:
                    rows.append({**base, "error": err})
                    continue
                try:
                    q = tq.generate(
                        facts, cat, fmt, random.Random(f"{self.cfg.seed}:{base['qa_id']}"), taken
                    )
                except tq.TemplateError as exc:
                    rows.append({**base, "error": str(exc)})
                    continue
                rows.append({**base, "question": q.question, "options": q.options, "answer": q.answer,
                             "reasoning": q.reasoning, "evidence": q.evidence, "raw": tq.raw_record(q),
                             "error": None})  # fmt: skip
        return rows

    def _facts(self, it: dict[str, Any]) -> tuple[Any, str | None]:
        from lvr.datagen import template_qa as tq
        from lvr.datagen.synthetic import read_sidecar

        if self.cfg.template_source == "captions":
            return tq.facts_from_captions(
                [tuple(c) for c in it["captions"]], it["duration_s"]
            ), None
        try:
            return tq.facts_from_sidecar(read_sidecar(it["video_path"])), None
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            return (
                None,
                f"qa.template_source=sidecar: no usable sidecar for {it['video_path']} ({error_line(exc)})",
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
    """Questions from an LLM through ``lvr.backends`` (cached requests, validated outputs)."""

    def __init__(self, cfg: QAConfig, cache_file: Path, progress: bool, limiter: Any = None):
        self.cfg = cfg
        # This process's share of the job's request budget, spent by the qa and rewrite calls
        # alike (they go to the same endpoint with the same options).
        self.limiter = limiter
        self.prompt: Prompt = load_prompt(cfg.prompt)
        self.rewrite: Prompt | None = load_prompt(cfg.rewrite_prompt) if cfg.rewrite else None
        self.generator = f"{cfg.backend}:{cfg.model}"
        self.version = self.prompt.version + (f"+{self.rewrite.version}" if self.rewrite else "")
        self.cache_file, self.progress = cache_file, progress
        self._backends: dict[str, Any] = {}
        self.instructions = {c.name: c.instruction for c in cfg.categories}

    def backend(self, model: str) -> Any:
        if model not in self._backends:
            from lvr.backends import make_backend

            self._backends[model] = make_backend(self.cfg.backend, model, cache_path=self.cache_file,
                                                 limiter=self.limiter, **self.cfg.options)  # fmt: skip
        return self._backends[model]

    def backends(self) -> list[Any]:
        """The backends built so far (for usage reports)."""
        return list(self._backends.values())

    def close(self) -> None:
        for b in self._backends.values():
            if hasattr(b, "close"):
                b.close()

    def request(self, it: dict[str, Any], k: int, cat: str, fmt: str, qid: str) -> Any:
        from lvr.backends import Request

        fields = (
            "question, options, reasoning, answer, evidence"
            if fmt == "mc"
            else "question, reasoning, answer, evidence"
        )
        messages = self.prompt.messages(
            captions=render_captions(it["captions"]), duration=fmt_s(it["duration_s"] or 0.0),
            category=cat, instruction=self.instructions.get(cat, ""), format_rules=_FORMAT_RULES[fmt],
            fields=fields,
        )  # fmt: skip
        return Request(item_id=qid, messages=messages, json_schema=qa_schema(fmt), max_tokens=self.cfg.max_tokens,
                       temperature=self.cfg.temperature, seed=int(qid[:8], 16), prompt_version=self.prompt.version)  # fmt: skip

    def __call__(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        reqs, owners = [], []
        for it in items:
            early = _too_few(it, self.cfg, self.generator, self.version)
            if early:
                rows.append(early)
                continue
            for k, cat, fmt in slots(it["video_id"], self.cfg):
                base = _base(it, k, cat, fmt, self.generator, self.version)
                reqs.append(self.request(it, k, cat, fmt, base["qa_id"]))
                owners.append((base, it))
        responses = self.backend(self.cfg.model).run(reqs, progress=self.progress) if reqs else []
        parsed = [
            self._parse(base, it, resp) for (base, it), resp in zip(owners, responses, strict=True)
        ]
        if self.rewrite is not None:
            parsed = self._rewrite(parsed)
        return rows + parsed

    def _parse(self, base: dict[str, Any], it: dict[str, Any], resp: Any) -> dict[str, Any]:
        if not resp.ok:
            return {**base, "error": f"model call failed: {resp.error}"}
        raw = resp.texts[0] if resp.texts else ""
        try:
            qa = parse_qa(raw, base["format"], it["duration_s"])
        except QAParseError as exc:
            return {**base, "raw": raw, "error": f"invalid output: {exc}"}
        return {**base, "question": qa.question, "options": qa.options, "answer": qa.answer,
                "reasoning": qa.reasoning, "evidence": qa.evidence, "raw": raw, "error": None}  # fmt: skip

    def _rewrite(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Second pass: natural chain of thought for every valid row (failures become error rows)."""
        from lvr.backends import Request

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
        responses = self.backend(model).run(reqs, progress=self.progress) if reqs else []
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


def make_writer(cfg: QAConfig, run_dir: Path, shard: int, num_shards: int, progress: bool) -> Any:
    """The question writer of ``cfg.backend``."""
    if cfg.backend == "template":
        return TemplateWriter(cfg)
    if not cfg.model:
        raise QAConfigError(f"qa.backend={cfg.backend} needs qa.model (the served model name)")
    limiter = shard_limiter(cfg.backend, cfg.options, num_shards)
    return LLMWriter(cfg, cache_path(run_dir, shard, num_shards), progress, limiter)


def run_qa(
    cfg: DatagenConfig,
    run_dir: str | Path,
    shard: int = 0,
    num_shards: int = 1,
    progress: bool = True,
    retry_errors: bool = True,
) -> StageResult:
    """Run the qa stage (resumable; shards with error rows are redone when ``retry_errors``).

    Args:
        cfg: The datagen config (``qa`` section).
        run_dir: Run folder; reads ``segment/videos`` and ``caption/captions``, writes ``qa/qa_raw``.
            QA shard ``k`` covers the videos of segment shard ``k``.
        shard: This machine's index.
        num_shards: Number of machines.
        progress: Show progress bars.
        retry_errors: Redo finished shards that hold error rows (cached successes are free).

    Returns:
        The stage result.
    """
    run_dir = Path(run_dir)
    segment = Stage(run_dir / "segment", ("videos", "clips"))
    upstream = Stage(run_dir / "caption", ("captions",))
    stage = Stage(run_dir / "qa", TABLES)
    ready = upstream_shards(upstream, shard, num_shards, "caption")
    drop_orphans(stage, upstream)
    shards = [
        Shard(
            k,
            plan_items(
                read_shard(segment, "videos", k), read_shard(upstream, "captions", k), cfg.qa
            ),
        )
        for k in ready
    ]
    if retry_errors:
        retry_failed_shards(stage, shards)
    writer = make_writer(cfg.qa, run_dir, shard, num_shards, progress)
    manifest = manifest_name(shard, num_shards)
    report = CallReport(stage.dir / manifest, cfg.prices, getattr(writer, "backends", list),
                        getattr(writer, "limiter", None), num_shards)  # fmt: skip

    def fn(s: Shard) -> dict[str, pa.Table]:
        return {"qa_raw": rows_to_table(writer(s.items), "qa_raw")}

    try:
        return run_stage(stage, shards, fn, cfg, inputs=[upstream.dir / "captions"],
                         description="qa", progress=progress, manifest=manifest, report=report)  # fmt: skip
    finally:
        if hasattr(writer, "close"):
            writer.close()
