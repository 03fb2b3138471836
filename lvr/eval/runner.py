"""``lvr eval run``: questions -> frames -> model -> predictions, scores, pass rates; resumable.

Layout of one evaluation (one benchmark, one model, one frame budget)::

    runs/<run>/eval/<benchmark>-<model-tag>-f<frames>/
        questions/00000.parquet     the adapter's output (malformed rows carry an error)
        predictions/00000.parquet   one row per question per pass
        scores/00000.parquet        metrics x groups with bootstrap CIs and the floor
        pass_rates/00000.parquet    with --passes K > 1 (for `lvr datagen filter`)
        manifest.json               config, settings, counts, versions, notes

Resume: a prediction is keyed by (qa_id, pass_index, settings hash). A rerun reads what exists,
keeps every error-free row with the current settings hash, and asks the model only for the rest
(error rows are retried). New rows are written in parts of ``batch_size`` questions, so a crash
costs at most one part; at the end the parts are merged into one file. Extraction is re-applied
to every stored response on each run (it is cheap), so scores always use the current parser.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from lvr.artifacts import (
    atomic_write_json,
    package_versions,
    read_table,
    remove_temp_files,
    rows_to_table,
    write_parquet,
)
from lvr.config import to_dict
from lvr.errors import LvrError
from lvr.eval import prompting
from lvr.eval.benchmarks import HEADLINE_GROUP, Source, load_questions
from lvr.eval.config import EvalConfig
from lvr.eval.extract import PARSER_VERSION
from lvr.eval.judge import judge_rows
from lvr.eval.official import category_memberships, official_rows
from lvr.eval.scoring import pass_rate_rows, score_base, score_rows
from lvr.layout import EvalRunLayout, RunLayout, check_layout
from lvr.reasons import summarize_errors


@dataclass
class EvalResult:
    """What one evaluation (one frame budget) did.

    Attributes:
        out_dir: Its folder.
        questions: Questions loaded.
        asked: (question, pass) pairs of answerable questions this run had to answer.
        asked_ids: Their qa_ids (one per pair).
        requests: Backend requests sent (one per question, n = missing passes).
        reused: Prediction rows kept from earlier runs.
        errors: Prediction rows with an error after this run.
        answered: Prediction rows with a model response (a judge failure still has one).
        error_summary: The error rows grouped by reason, one line.
        judge_requests: Judge calls sent.
        headline: The headline robust accuracy (errors count as wrong).
        notes: Things the user should know (skipped generation tasks, dropped stale rows).
    """

    out_dir: Path
    questions: int = 0
    asked: int = 0
    asked_ids: list[str] = field(default_factory=list)
    requests: int = 0
    reused: int = 0
    errors: int = 0
    answered: int = 0
    error_summary: str = ""
    judge_requests: int = 0
    headline: float | None = None
    notes: list[str] = field(default_factory=list)


def model_tag(model: str) -> str:
    """Folder-safe tag of a model: served name, hub name, or folder name + short hash.

    >>> model_tag("openai:Qwen/Qwen2.5-VL-7B")
    'openai-Qwen2.5-VL-7B'
    >>> model_tag("Qwen/Qwen2.5-VL-7B-Instruct")
    'Qwen2.5-VL-7B-Instruct'
    """
    if model.startswith("openai:"):
        name, prefix = model.split(":", 1)[1], "openai-"
    else:
        name, prefix = model, ""
    path = Path(name).expanduser()
    if path.exists():  # local folders: the name alone may collide ("checkpoint-final")
        digest = hashlib.blake2b(str(path.resolve()).encode(), digest_size=3).hexdigest()
        return _safe(f"{path.resolve().name}-{digest}")
    return _safe(prefix + name.rstrip("/").rsplit("/", 1)[-1])


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-") or "model"


def budget_name(frames: int, fps: float | None) -> str:
    """Folder suffix of a frame budget: ``f16``, or ``fps1-max64`` in fps mode."""
    return f"f{frames}" if fps is None else f"fps{fps:g}-max{frames}"


def settings_for(cfg: EvalConfig, frames: int) -> dict[str, Any]:
    """Everything that changes the model's response, plus the parser; ``hash`` excludes the parser.

    Args:
        cfg: The eval config.
        frames: This run's frame budget.

    Returns:
        A JSON-safe dict recorded in every prediction and score row.
    """
    asked = {
        "model": cfg.model,
        "backend": prompting.resolve_backend_name(cfg),
        "frames": frames,
        "fps": cfg.fps,
        "max_pixels": cfg.max_pixels,
        "prompt": cfg.prompt,
        "prompt_version": prompting.prompt_version(),
        "subtitles": cfg.subtitles,
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "max_tokens": cfg.max_tokens,
        "seed": cfg.seed,
    }
    digest = hashlib.blake2b(json.dumps(asked, sort_keys=True).encode(), digest_size=8).hexdigest()
    return {**asked, "hash": digest, "parser": PARSER_VERSION, "judge": cfg.judge.model or None}


def eval_dir(run: Path, cfg: EvalConfig, frames: int) -> Path:
    """``runs/<run>/eval/<benchmark>-<model-tag>-<budget>``."""
    name = f"{cfg.benchmark}-{model_tag(cfg.model)}-{budget_name(frames, cfg.fps)}"
    return RunLayout(Path(run)).eval_run(name).root


# ---------------------------------------------------------------------------------------------
# Reading and merging predictions
# ---------------------------------------------------------------------------------------------


def read_predictions(out_dir: Path) -> list[dict[str, Any]]:
    """All stored prediction rows of an evaluation (every part), later parts last."""
    folder = EvalRunLayout(out_dir).predictions
    if not folder.is_dir():
        return []
    return read_table(folder, "predictions").to_pylist()


def row_key(row: dict[str, Any]) -> tuple[str, int, str]:
    """Resume key of a prediction row: (qa_id, pass_index, settings hash)."""
    return row["qa_id"], int(row["pass_index"]), json.loads(row["settings"]).get("hash", "")


def _keep_existing(
    rows: list[dict[str, Any]], settings_hash: str, wanted: set[tuple[str, int, str]]
) -> tuple[dict[tuple[str, int, str], dict[str, Any]], int, int]:
    """Latest answered row per wanted key; count rows of other settings and of other questions.

    Returns:
        ``(kept, stale, outside)``: rows to reuse, rows with another settings hash, and rows of
        questions or passes outside this run (``--limit`` or ``--passes`` lowered).
    """
    kept: dict[tuple[str, int, str], dict[str, Any]] = {}
    stale = outside = 0
    for row in rows:
        key = row_key(row)
        if key[2] != settings_hash:
            stale += 1
        elif key not in wanted:
            outside += 1
        elif row["error"] is None or row["error"].startswith(prompting.JUDGE_ERROR_PREFIX):
            kept[key] = row  # a judge failure keeps the model's answer; the judge reruns
    return kept, stale, outside


def _drop_changed(
    kept: dict[tuple[str, int, str], dict[str, Any]], qmap: dict[str, dict[str, Any]]
) -> int:
    """Forget stored answers to questions whose options changed since (the model saw others)."""
    stale = [
        k
        for k, row in kept.items()
        if list(row["options"] or []) != list(qmap[k[0]]["options"] or [])
    ]
    for key in stale:
        del kept[key]
    return len(stale)


def _next_part(folder: Path) -> Path:
    nums = [int(p.stem) for p in folder.glob("*.parquet") if p.stem.isdigit()]
    return folder / f"{max(nums, default=-1) + 1:05d}.parquet"


def _merge_parts(out_dir: Path, rows: list[dict[str, Any]]) -> None:
    """Replace all prediction parts by one file holding ``rows`` (written first, then cleanup)."""
    folder = EvalRunLayout(out_dir).predictions
    old = sorted(folder.glob("*.parquet"))
    write_parquet(folder / "00000.parquet", rows_to_table(rows, "predictions"), "predictions")
    for part in old:
        if part.name != "00000.parquet":
            part.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def run_eval(
    cfg: EvalConfig, run: Path, backend: Any = None, progress: bool = True
) -> list[EvalResult]:
    """Evaluate ``cfg.model`` on ``cfg.benchmark`` for every frame budget in ``cfg.frames``.

    Args:
        cfg: The eval config.
        run: Run folder (``runs/<name>``).
        backend: A ready backend (tests, callers that share one); built from ``cfg`` when None.
        progress: Show progress bars.

    Returns:
        One ``EvalResult`` per frame budget.

    Raises:
        LvrError: Unreadable benchmark, bad model source, missing optional dependency.
    """
    if not cfg.model:
        raise LvrError("no model given: pass --model <folder|hub id|openai:served-name>")
    src = _source(cfg, run)
    questions = load_questions(src, limit=cfg.limit)
    if questions.num_rows == 0:
        raise LvrError(f"benchmark {cfg.benchmark} at {src.data} has no questions")
    if backend is None:
        backend = prompting.make_model_backend(cfg)
    judge = prompting.make_judge_backend(cfg, RunLayout(Path(run)).judge_cache)
    results = []
    for frames in cfg.frames:
        with _removed_if_nothing_answered(eval_dir(run, cfg, frames)):
            result = _run_budget(cfg, run, frames, questions, backend, judge, progress)
        result.notes = list(src.notes) + result.notes
        _write_manifest(cfg, src, frames, result)
        results.append(result)
        if result.answered == 0:
            raise LvrError(
                f"no question was answered ({result.errors} error rows in {result.out_dir}): "
                f"{result.error_summary}"
            )
    return results


@contextmanager
def _removed_if_nothing_answered(out: Path) -> Iterator[None]:
    """Remove an eval folder this run created when it fails before one prediction is written
    (a model that does not load, an endpoint that closes), so `lvr inspect` and `lvr eval
    report` never show a folder of questions without answers."""
    existed = out.exists()
    try:
        yield
    except BaseException:
        if not existed and not any(EvalRunLayout(out).predictions.glob("*.parquet")):
            shutil.rmtree(out, ignore_errors=True)
        raise


def _source(cfg: EvalConfig, run: Path) -> Source:
    layout = check_layout(run)  # an older run's qa table is elsewhere: name the migration
    data = cfg.data or (str(layout.qa) if cfg.benchmark == "qa" else "")
    if not data:
        raise LvrError(
            f"no benchmark data given for {cfg.benchmark}: pass --data <file|folder|dataset>"
        )
    video_dir = Path(cfg.video_dir).expanduser() if cfg.video_dir else None
    if video_dir is not None and not video_dir.is_dir():
        raise LvrError(f"--video-dir {video_dir} is not a folder")
    return Source(cfg.benchmark, data, video_dir, cfg.split or None, cfg.subtitles)


def _run_budget(
    cfg: EvalConfig,
    run: Path,
    frames: int,
    questions: pa.Table,
    backend: Any,
    judge: Any,
    progress: bool,
) -> EvalResult:
    out = eval_dir(run, cfg, frames)
    paths = EvalRunLayout(out)
    result = EvalResult(out_dir=out, questions=questions.num_rows)
    write_parquet(paths.questions / "00000.parquet", questions, "questions")
    settings = settings_for(cfg, frames)
    qrows = questions.to_pylist()
    wanted = {(q["qa_id"], k, settings["hash"]) for q in qrows for k in range(cfg.passes)}
    kept, stale, outside = _keep_existing(read_predictions(out), settings["hash"], wanted)
    if stale:
        result.notes.append(f"{stale} stored rows had other settings and were replaced")
    if outside:
        result.notes.append(
            f"{outside} stored rows of questions/passes outside this run were dropped"
        )
    changed = _drop_changed(kept, {q["qa_id"]: q for q in qrows})
    if changed:
        result.notes.append(f"{changed} stored rows were asked with other options and are redone")
    result.reused = len(kept)
    todo = [(q, [k for k in range(cfg.passes) if (q["qa_id"], k, settings["hash"]) not in kept])
            for q in qrows]  # fmt: skip
    todo = [(q, missing) for q, missing in todo if missing]
    for start in range(0, len(todo), cfg.batch_size):
        chunk = todo[start : start + cfg.batch_size]
        new_rows, sent = prompting.ask(cfg, backend, chunk, frames, settings, progress)
        result.asked_ids += [q["qa_id"] for q, m in chunk if q["error"] is None for _ in m]
        result.asked = len(result.asked_ids)
        result.requests += sent
        part = _next_part(EvalRunLayout(out).predictions)
        write_parquet(part, rows_to_table(new_rows, "predictions"), "predictions")
        for row in new_rows:
            kept[row_key(row)] = row
    rows = _final_rows(qrows, kept, cfg, settings)
    qmap = {q["qa_id"]: q for q in qrows}
    if judge is not None:
        result.judge_requests = _judge(rows, qmap, judge, cfg)
    _merge_parts(out, rows)
    _write_scores(cfg, out, rows, qrows, settings, result)
    for folder in (paths.questions, paths.predictions, paths.scores, paths.pass_rates):
        remove_temp_files(folder)  # left by a killed earlier run of this folder
    return result


def _final_rows(
    qrows: list[dict[str, Any]],
    kept: dict[tuple[str, int, str], dict[str, Any]],
    cfg: EvalConfig,
    settings: dict[str, Any],
) -> list[dict[str, Any]]:
    """Rows of the current questions and settings, re-scored with the current parser."""
    qmap = {q["qa_id"]: q for q in qrows}
    rows = []
    for q in qrows:
        for k in range(cfg.passes):
            row = kept.get((q["qa_id"], k, settings["hash"]))
            if row is not None:
                rows.append(prompting.rescore(row, qmap[row["qa_id"]], settings))
    return rows


def _judge(
    rows: list[dict[str, Any]], qmap: dict[str, dict[str, Any]], judge: Any, cfg: EvalConfig
) -> int:
    return judge_rows(rows, qmap, judge, max_tokens=cfg.judge.max_tokens)


def _write_scores(
    cfg: EvalConfig,
    out: Path,
    rows: list[dict[str, Any]],
    qrows: list[dict[str, Any]],
    settings: dict[str, Any],
    result: EvalResult,
) -> None:
    table = rows_to_table(rows, "predictions")
    memberships = category_memberships(qrows)
    scored = score_rows(table, cfg.bootstrap, cfg.seed, settings, memberships)
    if table.num_rows:
        base = score_base(table, settings)
        scored += official_rows(cfg.benchmark, rows, qrows, base, cfg.bootstrap, cfg.seed)
    scores = rows_to_table(scored, "scores")
    paths = EvalRunLayout(out)
    write_parquet(paths.scores / "00000.parquet", scores, "scores")
    result.errors = sum(r["error"] is not None for r in rows)
    result.error_summary = summarize_errors(r["error"] for r in rows)
    result.answered = sum(r["response"] is not None for r in rows)
    group = HEADLINE_GROUP.get(cfg.benchmark, "overall")
    result.headline = next(
        (s["accuracy"] for s in scored if s["metric"] == "robust" and s["group_by"] == group), None
    )
    if cfg.passes > 1:
        pr_rows, excluded = pass_rate_rows(table)
        write_parquet(
            paths.pass_rates / "00000.parquet", rows_to_table(pr_rows, "pass_rates"), "pass_rates"
        )
        if excluded:
            result.notes.append(
                f"pass_rates: {len(excluded)} questions left out because a pass had an error "
                f"(e.g. {next(iter(excluded.items()))[1][:80]})"
            )


def _write_manifest(cfg: EvalConfig, src: Source, frames: int, result: EvalResult) -> None:
    atomic_write_json(
        EvalRunLayout(result.out_dir).manifest,
        {
            "stage": "eval",
            "benchmark": cfg.benchmark,
            "model": cfg.model,
            "config": to_dict(cfg),
            "settings": settings_for(cfg, frames),
            "headline_group": HEADLINE_GROUP.get(cfg.benchmark, "overall"),
            "headline_denominator": "all questions (errors count as wrong)",
            "inputs": {"data": src.data, "video_dir": str(src.video_dir or "")},
            "counts": {
                "questions": result.questions,
                "asked": result.asked,
                "requests": result.requests,
                "reused": result.reused,
                "errors": result.errors,
                "answered": result.answered,
                "judge_requests": result.judge_requests,
            },
            "headline": result.headline,
            "errors_by_reason": result.error_summary,
            "notes": result.notes,
            "versions": package_versions(),
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    )


def load_eval_dirs(run: Path) -> list[Path]:
    """Evaluation folders of a run (those with scores), sorted by name."""
    root = RunLayout(Path(run)).eval
    if not root.is_dir():
        return []
    found = [EvalRunLayout(p) for p in root.iterdir()]
    return sorted(e.root for e in found if e.scores.is_dir() and e.manifest.is_file())


def describe(results: Sequence[EvalResult]) -> list[str]:
    """Summary lines per evaluation for the CLI (errors grouped by reason, not per video)."""
    lines = []
    for r in results:
        acc = "n/a" if r.headline is None else f"{100 * r.headline:.1f}%"
        lines.append(
            f"{r.out_dir}: {r.questions} questions, asked {r.asked} (reused {r.reused}), "
            f"error rows {r.errors}, robust accuracy {acc} (errors count as wrong)"
        )
        if r.errors:
            lines.append(f"  errors: {r.error_summary}")
        lines.extend(f"  note: {n}" for n in r.notes)
    return lines
