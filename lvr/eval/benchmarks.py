"""Benchmark adapters: each published format -> rows of the ``questions`` table.

Every adapter reads the benchmark's own files as published (or the same rows through
``datasets.load_dataset(name)``) and maps one record to one question. A record that cannot be
used — a malformed row, a video that is not on disk — becomes a row with an ``error`` that names
the reason; it is never skipped and never replaced by another video. Scores count those rows as
wrong in the headline accuracy.

Sources and the fields read (see ``tests/fixtures/eval/`` for one small file per format):

- ``qa``: our own ``qa`` table (``runs/<run>/filter/qa``), rows with ``split == eval`` by default
  (``--split all`` for every row), or a ``qa_raw`` table (all rows; what the filter rates).
- ``longvideo-reason``: LongVideo-Reason-eval JSON/JSONL rows ``problem_id``, ``problem`` (question
  with "\\nA. ...\\nB. ..." appended), ``answer`` ("<answer>X</answer>"), ``problem_type``
  (category), ``videos`` (path relative to the video folder, e.g. under ``longvila_videos/``).
- ``videomme``: Video-MME rows ``videoID``, ``question_id``, ``duration`` (short|medium|long),
  ``domain``, ``sub_category``, ``task_type`` (category), ``question``, ``options`` ("A. ..."),
  ``answer``; videos ``<videoID>.mp4``, optional subtitles ``subtitle/<videoID>.srt`` (the cues
  are kept with their times; the prompt gets those shown at the sampled frames, as Video-MME's
  protocol prescribes).
- ``longvideobench``: rows ``id``, ``question``, ``option0..option4`` ("N/A" when absent; the
  ``lvb_val.json`` form with a ``candidates`` list works too), ``correct_choice`` (int),
  ``duration_group``, ``question_category`` (category), ``video_path``.
- ``mlvu``: MLVU dev ``json/<k>_<task>.json`` files of ``{video, duration, question, candidates,
  answer (option text), question_type}``; videos under ``video/<k>_<task>/``. The official number
  is the mean of per-task accuracies (``group_by = macro``). The two generation tasks
  (``8_sub_scene``, ``9_summary``) are free-form captioning scored by GPT and are not loaded; the
  loader reports them in ``notes``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa

from lvr.artifacts import rows_to_table
from lvr.eval.sources import (
    BenchmarkError,
    Source,
    as_list,
    duration_bucket_from_seconds,
    read_records,
    resolve_video,
)

__all__ = ["ADAPTERS", "BenchmarkError", "Source", "load_questions", "read_records"]

LETTERS = "ABCDEFGHIJ"
MLVU_GENERATION_TASKS = ("sub_scene", "summary")
_LVB_GROUPS = {15: "8-15s", 60: "15-60s", 600: "180-600s", 3600: "900-3600s"}


def _row(source: Source, qa_id: str, **fields: Any) -> dict[str, Any]:
    extra = fields.pop("extra", None) or {}
    errors = [e for e in fields.pop("errors", []) if e]
    return {
        "qa_id": qa_id,
        "benchmark": source.benchmark,
        "video_path": fields.get("video_path") or "",
        "question": fields.get("question") or "",
        "options": fields.get("options") or [],
        "answer": fields.get("answer"),
        "format": fields.get("format") or "mc",
        "category": fields.get("category"),
        "duration_bucket": fields.get("duration_bucket"),
        "extra": json.dumps(extra, default=str, sort_keys=True),
        "error": "; ".join(errors) if errors else None,
    }


# ---------------------------------------------------------------------------------------------
# LongVideo-Reason-eval
# ---------------------------------------------------------------------------------------------

_OPTION_LINE = re.compile(r"^\s*([A-J])[.)]\s*(.*?)\s*$")
_TAGGED = re.compile(r"^\s*<answer>\s*(.*?)\s*</answer>\s*$", re.DOTALL)


def split_problem(problem: str) -> tuple[str, list[str], str | None]:
    """Split a LongVideo-Reason ``problem`` into question and options.

    Options are the trailing lines "A. ...", "B. ...", in order from A. Anything else after the
    first option line (reasoning that leaked into the options, a skipped letter) is malformed.

    Args:
        problem: The record's problem text.

    Returns:
        ``(question, options, error)``.

    >>> split_problem("Why?\\nA. x\\nB. y")
    ('Why?', ['x', 'y'], None)
    """
    lines = problem.strip().splitlines()
    first = next((i for i, ln in enumerate(lines) if _OPTION_LINE.match(ln)), None)
    if first is None:
        return problem.strip(), [], "problem has no 'A. ...' option lines"
    question = "\n".join(lines[:first]).strip()
    options: list[str] = []
    for offset, line in enumerate(lines[first:]):
        match = _OPTION_LINE.match(line)
        expected = LETTERS[offset] if offset < len(LETTERS) else "?"
        if not match or match.group(1) != expected:
            return question, options, f"option lines malformed at {line.strip()[:60]!r}"
        if not match.group(2):
            return question, options, f"option {expected} is empty"
        options.append(match.group(2))
    if not question:
        return question, options, "problem has no question text before the options"
    if len(options) < 2:
        return question, options, f"only {len(options)} option(s)"
    return question, options, None


def parse_tagged_answer(answer: Any, offered: str) -> tuple[str | None, str | None]:
    """Gold letter from ``"<answer>X</answer>"`` (or a bare letter); error when not offered."""
    text = "" if answer is None else str(answer)
    match = _TAGGED.match(text)
    letter = (match.group(1) if match else text).strip()
    if not re.fullmatch(r"[A-J]", letter):
        return None, f"answer {text[:40]!r} is not one option letter in <answer></answer>"
    if letter not in offered:
        return letter, f"answer {letter} is not among the offered letters {offered or '(none)'}"
    return letter, None


def adapt_longvideo_reason(rec: dict[str, Any], index: int, src: Source) -> dict[str, Any]:
    """Map one LongVideo-Reason-eval record (see module docstring)."""
    if "__raw__" in rec:
        return _row(src, f"longvideo-reason/{index}", errors=["record is not a JSON object"])
    native = rec.get("problem_id", index)
    problem = rec.get("problem")
    errors: list[str | None] = []
    if not isinstance(problem, str) or not problem.strip():
        question, options, err = "", [], "record has no problem text"
    else:
        question, options, err = split_problem(problem)
    errors.append(err)
    letter, err = parse_tagged_answer(rec.get("answer"), LETTERS[: len(options)])
    errors.append(err)
    video = rec.get("videos", rec.get("video"))
    video = video[0] if isinstance(video, list) and video else video
    path, err = resolve_video(src.video_dir, video, subdirs=("longvila_videos",))
    errors.append(err)
    extra = {k: rec.get(k) for k in ("problem_id", "data_type", "videos") if k in rec}
    return _row(
        src,
        f"longvideo-reason/{native}",
        video_path=path,
        question=question,
        options=options,
        answer=letter,
        category=rec.get("problem_type"),
        extra=extra,
        errors=errors,
    )


# ---------------------------------------------------------------------------------------------
# Video-MME
# ---------------------------------------------------------------------------------------------


def _strip_prefixed(options: list[Any]) -> tuple[list[str], str | None]:
    out = []
    for i, opt in enumerate(options):
        match = re.match(rf"^\s*{LETTERS[i]}[.)]\s*(.*)$", str(opt), re.DOTALL)
        if not match:
            return [
                str(o) for o in options
            ], f"option {i} {str(opt)[:30]!r} lacks its '{LETTERS[i]}. ' prefix"
        out.append(match.group(1).strip())
    return out, None


_SRT_TIME = re.compile(r"(\d+):(\d+):(\d+)[,.](\d+)\s*-->\s*(\d+):(\d+):(\d+)[,.](\d+)")


def read_srt(path: Path) -> list[list[Any]]:
    """Cues of an SRT file as ``[start_s, end_s, text]`` (markup like ``<font>`` removed).

    Args:
        path: The .srt file.

    Returns:
        Cues in file order; cue numbers and blank lines dropped, multi-line text joined.
    """
    cues: list[list[Any]] = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        match = _SRT_TIME.search(line)
        if match:
            h1, m1, s1, f1, h2, m2, s2, f2 = (int(x) for x in match.groups())
            start = h1 * 3600 + m1 * 60 + s1 + f1 / 1000
            cues.append([start, h2 * 3600 + m2 * 60 + s2 + f2 / 1000, ""])
        elif line and not line.isdigit() and cues:
            text = re.sub(r"<[^>]+>", "", line)
            cues[-1][2] = f"{cues[-1][2]} {text}".strip()
    return [c for c in cues if c[2]]


def adapt_videomme(rec: dict[str, Any], index: int, src: Source) -> dict[str, Any]:
    """Map one Video-MME record (see module docstring)."""
    errors: list[str | None] = []
    raw_options = as_list(rec.get("options"))
    if not raw_options:
        options, err = [], "record has no options list"
    else:
        options, err = _strip_prefixed(raw_options)
    errors.append(err)
    answer = str(rec.get("answer") or "").strip()
    if answer not in LETTERS[: len(options)] or not answer:
        errors.append(f"answer {answer!r} is not one of the offered letters")
    vid = rec.get("videoID") or rec.get("video_id")
    path, err = resolve_video(src.video_dir, vid, subdirs=("data", "videos", "video"))
    errors.append(err)
    extra: dict[str, Any] = {
        k: rec.get(k)
        for k in ("video_id", "videoID", "question_id", "domain", "sub_category", "url")
    }
    if src.subtitles:
        extra["subtitles"] = _videomme_subtitles(src, vid)
    return _row(
        src,
        f"videomme/{rec.get('question_id') or index}",
        video_path=path,
        question=str(rec.get("question") or ""),
        options=options,
        answer=answer or None,
        category=rec.get("task_type"),
        duration_bucket=rec.get("duration"),
        extra=extra,
        errors=errors,
    )


def _videomme_subtitles(src: Source, vid: Any) -> list[list[Any]] | None:
    """Subtitle cues of a video, or None (many Video-MME videos have no subtitles).

    Looks for ``subtitle/<videoID>.srt`` under the video folder, then next to the data file (the
    release unpacks ``data/``, ``subtitle/`` and ``videomme/`` side by side).
    """
    if not vid:
        return None
    data = Path(src.data).expanduser()
    roots = [r for r in (src.video_dir, data.parent, data.parent.parent) if r is not None]
    for root in roots:
        for sub in ("subtitle", "subtitles"):
            path = root / sub / f"{vid}.srt"
            if path.is_file():
                return read_srt(path)
    return None


# ---------------------------------------------------------------------------------------------
# LongVideoBench
# ---------------------------------------------------------------------------------------------


def _lvb_options(rec: dict[str, Any]) -> tuple[list[str], str | None]:
    if "candidates" in rec and rec["candidates"] is not None:
        opts = [str(c) for c in as_list(rec["candidates"]) or []]
        return opts, None if len(opts) >= 2 else "fewer than two candidates"
    raw = [rec.get(f"option{i}") for i in range(5)]
    present = [o is not None and str(o).strip() not in {"", "N/A"} for o in raw]
    count = sum(present)
    if present[:count] != [True] * count:  # an "N/A" before a real option
        return [str(o) for o in raw if o], "options have a gap ('N/A' before a real option)"
    if count < 2:
        return [str(o) for o in raw[:count]], "fewer than two options"
    return [str(o).strip() for o in raw[:count]], None


def adapt_longvideobench(rec: dict[str, Any], index: int, src: Source) -> dict[str, Any]:
    """Map one LongVideoBench record (see module docstring)."""
    errors: list[str | None] = []
    options, err = _lvb_options(rec)
    errors.append(err)
    choice = rec.get("correct_choice")
    answer = None
    if isinstance(choice, int) and not isinstance(choice, bool) and 0 <= choice < len(options):
        answer = LETTERS[choice]
    else:
        errors.append(f"correct_choice {choice!r} does not index one of {len(options)} options")
    path, err = resolve_video(src.video_dir, rec.get("video_path"), subdirs=("videos",))
    errors.append(err)
    group = rec.get("duration_group")
    bucket = _LVB_GROUPS.get(group, None if group is None else str(group))
    keys = ("id", "video_id", "topic_category", "level", "duration", "subtitle_path", "position")
    return _row(
        src,
        f"longvideobench/{rec.get('id') or index}",
        video_path=path,
        question=str(rec.get("question") or ""),
        options=options,
        answer=answer,
        category=rec.get("question_category"),
        duration_bucket=bucket,
        extra={k: rec.get(k) for k in keys if k in rec},
        errors=errors,
    )


# ---------------------------------------------------------------------------------------------
# MLVU dev
# ---------------------------------------------------------------------------------------------


def mlvu_task(file_stem: str, rec: dict[str, Any]) -> str:
    """Task name of an MLVU record: ``question_type``, else the file name without its number."""
    return str(rec.get("question_type") or re.sub(r"^\d+_", "", file_stem))


def adapt_mlvu(rec: dict[str, Any], index: int, src: Source) -> dict[str, Any]:
    """Map one MLVU dev multiple-choice record (see module docstring)."""
    stem = str(rec.get("__file__", ""))
    task = mlvu_task(stem, rec)
    errors: list[str | None] = []
    options = [str(c) for c in as_list(rec.get("candidates")) or []]
    if len(options) < 2:
        errors.append("fewer than two candidates")
    gold = rec.get("answer")
    hits = [i for i, c in enumerate(options) if c == gold]
    answer = LETTERS[hits[0]] if len(hits) == 1 else None
    if len(hits) != 1:
        errors.append(f"answer {str(gold)[:40]!r} matches {len(hits)} candidates (need exactly 1)")
    subdirs = (f"video/{stem}", stem, "video")
    path, err = resolve_video(src.video_dir, rec.get("video"), subdirs=subdirs)
    errors.append(err)
    duration = rec.get("duration")
    seconds = float(duration) if isinstance(duration, int | float) else None
    return _row(
        src,
        f"mlvu/{task}/{index}",
        video_path=path,
        question=str(rec.get("question") or ""),
        options=options,
        answer=answer,
        category=task,
        duration_bucket=duration_bucket_from_seconds(seconds),
        extra={"task_file": stem, "duration": duration, "answer_text": gold},
        errors=errors,
    )


def _mlvu_records(src: Source) -> list[dict[str, Any]]:
    """Read MLVU's per-task files, numbering records within each task; skip generation tasks."""
    path = Path(src.data).expanduser()
    if path.is_dir() and (path / "json").is_dir():
        path = path / "json"
    records = read_records(str(path), src.split)
    kept, skipped = [], {}
    for rec in records:
        stem = str(rec.get("__file__", ""))
        if any(stem.endswith(t) for t in MLVU_GENERATION_TASKS):
            skipped[stem] = skipped.get(stem, 0) + 1
            continue
        kept.append(rec)
    for stem, n in sorted(skipped.items()):
        src.notes.append(
            f"mlvu: {n} records of generation task {stem} not loaded (not multiple choice)"
        )
    return kept


# ---------------------------------------------------------------------------------------------
# Our own qa table
# ---------------------------------------------------------------------------------------------


def _qa_records(src: Source) -> list[dict[str, Any]]:
    """Rows of a ``qa`` table (filtered by split) or of a ``qa_raw`` table (all rows).

    ``qa_raw`` (``runs/<run>/qa/qa_raw``) is what ``lvr datagen filter`` rates: evaluating it
    with ``--passes K`` gives the pass rates its difficulty rule needs.
    """
    from lvr.artifacts import read_table, table_files, table_name_of

    try:
        files = table_files(src.data, "qa")
    except FileNotFoundError as exc:
        raise BenchmarkError(f"qa table not found: {exc}") from None
    name = (table_name_of(files[0]) if files else None) or "qa"
    if name not in {"qa", "qa_raw"}:
        raise BenchmarkError(f"{src.data} holds a '{name}' table; give a qa or qa_raw table")
    rows = read_table(src.data, name).to_pylist()
    split = src.split or "eval"
    if name == "qa_raw" or split == "all":
        return rows
    return [r for r in rows if r.get("split") == split]


def adapt_qa(rec: dict[str, Any], index: int, src: Source) -> dict[str, Any]:
    """Map one row of our ``qa`` table (its ``qa_id`` is kept, so pass rates join back)."""
    errors = [f"qa row has an error: {rec['error']}" if rec.get("error") else None]
    path = rec.get("video_path") or ""
    if src.video_dir is not None and path and not Path(path).is_absolute():
        path = str(src.video_dir / path)
    if not path or not Path(path).is_file():
        errors.append(f"video not found: {path or '(empty path)'}")
    fmt = rec.get("format") or ("mc" if rec.get("options") else "open")
    options = list(rec.get("options") or [])
    if fmt == "mc" and rec.get("answer") not in LETTERS[: len(options)]:
        errors.append(f"answer {rec.get('answer')!r} is not one of the offered letters")
    extra = {
        k: rec.get(k) for k in ("video_id", "generator", "prompt_version", "split", "duration_s")
    }
    return _row(
        src,
        str(rec["qa_id"]),
        video_path=path,
        question=rec.get("question") or "",
        options=options,
        answer=rec.get("answer"),
        format=fmt,
        category=rec.get("category"),
        duration_bucket=duration_bucket_from_seconds(rec.get("duration_s")),
        extra=extra,
        errors=errors,
    )


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------

Adapter = Callable[[dict[str, Any], int, Source], dict[str, Any]]
ADAPTERS: dict[str, Adapter] = {
    "qa": adapt_qa,
    "longvideo-reason": adapt_longvideo_reason,
    "videomme": adapt_videomme,
    "longvideobench": adapt_longvideobench,
    "mlvu": adapt_mlvu,
}
HEADLINE_GROUP = {"mlvu": "macro"}  # every other benchmark: question-weighted overall


def load_questions(src: Source, limit: int | None = None) -> pa.Table:
    """Load a benchmark into the ``questions`` table.

    Args:
        src: Benchmark name, data location, video folder, split, subtitles flag.
        limit: Keep only the first ``limit`` records (after loading; for smoke runs).

    Returns:
        A ``questions`` table, one row per record, malformed ones with an ``error``.

    Raises:
        BenchmarkError: Unknown benchmark or unreadable source.
    """
    if src.benchmark not in ADAPTERS:
        raise BenchmarkError(
            f"unknown benchmark {src.benchmark!r}; choose one of {', '.join(ADAPTERS)}"
        )
    if src.benchmark == "qa":
        records = _qa_records(src)
    elif src.benchmark == "mlvu":
        records = _mlvu_records(src)
    else:
        records = read_records(src.data, src.split)
    if limit is not None:
        records = records[:limit]
    rows = (
        _number_mlvu(records, src)
        if src.benchmark == "mlvu"
        else [ADAPTERS[src.benchmark](rec, i, src) for i, rec in enumerate(records)]
    )
    return rows_to_table(_unique_ids(rows), "questions")


def _number_mlvu(records: list[dict[str, Any]], src: Source) -> list[dict[str, Any]]:
    counters: dict[str, int] = {}
    rows = []
    for rec in records:
        task = mlvu_task(str(rec.get("__file__", "")), rec)
        k = counters.get(task, 0)
        counters[task] = k + 1
        rows.append(adapt_mlvu(rec, k, src))
    return rows


def _unique_ids(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep ids unique (a duplicated native id gets "#2", "#3" in file order)."""
    seen: dict[str, int] = {}
    for row in rows:
        n = seen.get(row["qa_id"], 0) + 1
        seen[row["qa_id"]] = n
        if n > 1:
            row["qa_id"] = f"{row['qa_id']}#{n}"
    return rows
