"""Benchmark adapters: each published format -> rows of the ``questions`` table.

Every adapter reads the benchmark's own files as users download them (or the same rows through
``datasets.load_dataset(name)``) and maps one record to one question. A record that cannot be
used — a blank answer or option, a skipped option label, a video that is not on disk — becomes a
row with an ``error`` that names the reason; it is never skipped, never guessed, and never given
another video. Scores count those rows as wrong in the headline accuracy.

Before that, each file is checked to be the benchmark's at all (``Spec``): a file without the
benchmark's fields, or one whose every record fails to read, stops with ONE line naming the fields
expected and found and the benchmark the file looks like — never thousands of error rows and a 0%
score. In a folder, a file that is not the benchmark's (MLVU ships ``test_res_example.json``, a
results file) is skipped with a note, not read as questions.

Sources and the fields read (``tests/fixtures/eval/`` holds one small file per format):

- ``qa``: our own ``qa`` table (``runs/<run>/qa``), rows with ``split == eval`` by default
  (``--split all`` for every row), or a ``qa_raw`` table (all rows; what the filter rates).
- ``longvideo-reason``: LongVideo-Reason-eval JSON/JSONL rows ``problem_id``, ``problem`` (question
  with "\\nA. ...\\nB. ..." appended; options listed out of order are put back in label order),
  ``answer`` ("<answer>X</answer>"), ``problem_type`` (category), ``videos`` (path relative to the
  video folder, e.g. under ``longvila_videos/``). Re-formats are read too: ``solution`` for
  ``answer``, ``extra_info.problem_id``, an ``<image>`` placeholder in the problem (removed).
- ``videomme``: Video-MME rows ``videoID``, ``question_id``, ``duration`` (short|medium|long),
  ``domain``, ``sub_category``, ``task_type`` (category), ``question``, ``options`` ("A. ..."),
  ``answer``; also the official nested template (video -> ``questions``, not strict JSON). Videos
  ``<videoID>.mp4`` (``<video_id>.mp4`` for the template, which has no videoID), optional
  subtitles ``subtitle/<videoID>.srt`` (the prompt gets the cues shown at the sampled frames).
- ``longvideobench``: rows ``id``, ``question``, ``option0..option4`` ("N/A" when absent; the
  ``lvb_val.json`` form with a ``candidates`` list works too), ``correct_choice`` (int),
  ``duration_group``, ``question_category`` (category), ``video_path``.
- ``mlvu``: MLVU dev ``json/<k>_<task>.json`` files of ``{video, duration, question, candidates,
  answer (option text), question_type}``; videos under ``video/<k>_<task>/``. The official number
  is the mean of per-task accuracies (``group_by = macro``). The two generation tasks
  (``8_sub_scene``, ``9_summary``) are free-form captioning scored by GPT and are not loaded; the
  loader reports them in ``notes``.
- ``videomme-v2``, ``lvbench``, ``video-holmes``, ``nextqa``: see ``lvr.eval.recent_benchmarks``.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa

from lvr.artifacts import rows_to_table
from lvr.eval import filecheck, recent_benchmarks
from lvr.eval.options import (
    LETTERS,
    check_texts,
    clean_question,
    from_any,
    from_lines,
    from_prefixed,
    gold_label,
    lettered_question,
    question_error,
    split_label,
)
from lvr.eval.sources import (
    Adapter,
    Benchmark,
    BenchmarkError,
    Source,
    Spec,
    as_list,
    duration_bucket_from_seconds,
    flatten_nested,
    pick,
    question_row,
    read_records,
    resolve_video,
    subtitle_candidates,
)
from lvr.eval.subtitles import read_srt

__all__ = [
    "ADAPTERS",
    "BENCHMARKS",
    "BenchmarkError",
    "HEADLINE_GROUP",
    "Source",
    "load_questions",
    "read_records",
]

MLVU_GENERATION_TASKS = ("sub_scene", "summary")
_LVB_GROUPS = {15: "8-15s", 60: "15-60s", 600: "180-600s", 3600: "900-3600s"}
# Video-R1's `problem_type` is a format, not a category (its Video-MME file says "multiple choice").
_VIDEO_R1_TYPES = {"multiple choice", "numerical", "ocr", "free-form", "regression"}


def _blank(value: Any) -> bool:
    return value is None or not str(value).strip()


# ---------------------------------------------------------------------------------------------
# LongVideo-Reason-eval
# ---------------------------------------------------------------------------------------------


def split_problem(problem: str) -> tuple[str, list[str], str | None]:
    """Split a LongVideo-Reason ``problem`` into question and options.

    Options are the trailing labelled lines ("A. ...", in any order: they are put back in label
    order). Anything else after the first option line (reasoning that leaked into the options),
    a skipped or repeated label, or a blank option is malformed.

    Args:
        problem: The record's problem text.

    Returns:
        ``(question, options, error)``.

    >>> split_problem("Why?\\nA. x\\nB. y")
    ('Why?', ['x', 'y'], None)
    """
    question, options, err = from_lines(problem)
    if err and not options and err.startswith("no "):
        return question, options, f"problem has {err}"
    if err is None and not question:
        return question, options, "problem has no question text before the options"
    return question, options, err


def parse_tagged_answer(answer: Any, offered: str) -> tuple[str | None, str | None]:
    """Gold letter from ``"<answer>X</answer>"`` (or a bare letter); error when not offered."""
    return gold_label(answer, offered)


def adapt_longvideo_reason(rec: dict[str, Any], index: int, src: Source) -> dict[str, Any]:
    """Map one LongVideo-Reason-eval record (see module docstring)."""
    if "__raw__" in rec:
        return question_row(
            src, f"longvideo-reason/{index}", errors=["record is not a JSON object"]
        )
    native = pick(rec, "problem_id", "extra_info.problem_id", "id")
    problem = pick(rec, "problem")
    errors: list[str | None] = []
    if _blank(problem):
        question, options, err = "", [], "record has no problem text"
    else:
        question, options, err = split_problem(clean_question(problem))
        listed = pick(rec, "options")
        if not options and listed is not None:  # Video-R1 re-formats list them apart
            options, err = from_any(listed)
            err = err or question_error(question)
    errors.append(err)
    kind = pick(rec, "extra_info.answer_type", "answer_type")
    if kind is not None and "choice" not in str(kind).lower():
        errors.append(f"answer_type {kind!r} is not multiple choice (only those are evaluated)")
    letter, err = gold_label(pick(rec, "answer", "solution"), LETTERS[: len(options)])
    errors.append(err)
    video = pick(rec, "videos", "video", "path")
    video = video[0] if isinstance(video, list | tuple) and video else video
    path, err = resolve_video(src.video_dir, video, subdirs=("longvila_videos",))
    errors.append(err)
    category = pick(rec, "problem_type")
    if category is not None and str(category).lower() in _VIDEO_R1_TYPES:
        category = None
    keys = ("problem_id", "data_type", "videos", "data_source", "extra_info", "problem_type")
    return question_row(
        src,
        f"longvideo-reason/{index if native is None else native}",
        video_path=path,
        question=question,
        options=options,
        answer=letter,
        category=category,
        extra={k: rec.get(k) for k in keys if k in rec},
        errors=errors,
    )


# ---------------------------------------------------------------------------------------------
# Video-MME
# ---------------------------------------------------------------------------------------------


def adapt_videomme(rec: dict[str, Any], index: int, src: Source) -> dict[str, Any]:
    """Map one Video-MME record (see module docstring)."""
    question, options, answer, errors = lettered_question(
        pick(rec, "question"), pick(rec, "options"), pick(rec, "answer")
    )
    vid = pick(rec, "videoID", "video_id", "videoId")
    path, err = resolve_video(src.video_dir, vid, subdirs=("data", "videos", "video"))
    errors.append(err)
    extra: dict[str, Any] = {
        k: rec.get(k)
        for k in ("video_id", "videoID", "question_id", "domain", "sub_category", "url")
    }
    if src.subtitles:
        extra["subtitles"] = _videomme_subtitles(src, vid)
    duration = pick(rec, "duration")
    return question_row(
        src,
        f"videomme/{pick(rec, 'question_id', '__key__') or index}",
        video_path=path,
        question=question,
        options=options,
        answer=answer,
        category=pick(rec, "task_type", "original_question_type"),
        duration_bucket=str(duration) if isinstance(duration, str) else None,
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
    for path in subtitle_candidates(src, f"{vid}.srt"):
        if path.is_file():
            return read_srt(path)
    return None


# ---------------------------------------------------------------------------------------------
# LongVideoBench
# ---------------------------------------------------------------------------------------------


def _lvb_options(rec: dict[str, Any]) -> tuple[list[str], str, str | None]:
    """Option texts in label order, the label of each option as the record lists them (what
    ``correct_choice`` indexes), and the first defect.

    ``candidates`` padded to five with "N/A" lose the padding; candidates that carry their own
    labels ("B. green", in any order) are ordered by them, and keep them.
    """
    if rec.get("candidates") is not None:
        listed = [str(c).strip() for c in as_list(rec["candidates"]) or []]
        while listed and listed[-1] in ("", "N/A"):
            listed.pop()
        labels = [split_label(c)[0] for c in listed]
        if listed and all(labels):
            opts, err = from_prefixed(listed)
            return opts, "".join(label or "" for label in labels), err
        return listed, LETTERS[: len(listed)], check_texts(listed)
    raw = [rec.get(f"option{i}") for i in range(5)]
    present = [not _blank(o) and str(o).strip() != "N/A" for o in raw]
    count = sum(present)
    if present[:count] != [True] * count:  # an "N/A" or a blank before a real option
        return (
            [str(o) for o in raw if o],
            LETTERS[:count],
            "options have a gap ('N/A' or blank before a real option)",
        )
    opts = [str(o).strip() for o in raw[:count]]
    return opts, LETTERS[:count], check_texts(opts)


def _choice_index(choice: Any) -> int | None:
    if isinstance(choice, bool):
        return None
    if isinstance(choice, int):
        return choice
    if isinstance(choice, float) and choice.is_integer():  # pandas writes 2.0 beside nulls
        return int(choice)
    if isinstance(choice, str) and choice.strip().isdigit():
        return int(choice.strip())
    return None


def adapt_longvideobench(rec: dict[str, Any], index: int, src: Source) -> dict[str, Any]:
    """Map one LongVideoBench record (see module docstring)."""
    question = clean_question(pick(rec, "question"))
    options, listed, err = _lvb_options(rec)
    errors: list[str | None] = [question_error(question), err]
    choice = rec.get("correct_choice")
    pos = _choice_index(choice)
    answer = listed[pos] if pos is not None and 0 <= pos < len(listed) else None
    if answer is None:
        errors.append(f"correct_choice {choice!r} does not index one of {len(options)} options")
    path, err = resolve_video(
        src.video_dir, pick(rec, "video_path", "video_id"), subdirs=("videos",)
    )
    errors.append(err)
    group = rec.get("duration_group")
    bucket = _LVB_GROUPS.get(group) if isinstance(group, (int, float)) else None
    bucket = bucket or group  # a label the release did not use is kept as given (as text)
    keys = ("id", "video_id", "topic_category", "level", "duration", "subtitle_path", "position")
    return question_row(
        src,
        f"longvideobench/{rec.get('id') or rec.get('__key__') or index}",
        video_path=path,
        question=question,
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


def _mlvu_gold(options: list[str], gold: Any) -> tuple[str | None, str | None]:
    """The letter of the candidate whose text is the answer (exactly one must match)."""
    if _blank(gold):
        return None, "answer is blank"
    hits = [i for i, c in enumerate(options) if c == str(gold).strip()]
    if not hits:  # the same text up to case and spacing
        norm = " ".join(str(gold).lower().split())
        hits = [i for i, c in enumerate(options) if " ".join(c.lower().split()) == norm]
    if len(hits) != 1:
        return None, f"answer {str(gold)[:40]!r} matches {len(hits)} candidates (need exactly 1)"
    return LETTERS[hits[0]], None


def adapt_mlvu(rec: dict[str, Any], index: int, src: Source) -> dict[str, Any]:
    """Map one MLVU dev multiple-choice record (see module docstring)."""
    stem = str(rec.get("__file__", ""))
    task = mlvu_task(stem, rec)
    question = clean_question(pick(rec, "question"))
    options = [("" if c is None else str(c)).strip() for c in as_list(rec.get("candidates")) or []]
    errors: list[str | None] = [question_error(question), check_texts(options)]
    answer, err = _mlvu_gold(options, rec.get("answer"))
    errors.append(err)
    subdirs = (f"video/{stem}", stem, "video")
    path, err = resolve_video(src.video_dir, rec.get("video"), subdirs=subdirs)
    errors.append(err)
    duration = rec.get("duration")
    seconds = float(duration) if isinstance(duration, int | float) else None
    return question_row(
        src,
        f"mlvu/{task}/{index}",
        video_path=path,
        question=question,
        options=options,
        answer=answer,
        category=task,
        duration_bucket=duration_bucket_from_seconds(seconds),
        extra={"task_file": stem, "duration": duration, "answer_text": rec.get("answer")},
        errors=errors,
    )


def _mlvu_records(src: Source) -> list[dict[str, Any]]:
    """Read MLVU's per-task files; generation tasks are left out with a note."""
    path = Path(src.data).expanduser()
    if path.is_dir() and (path / "json").is_dir():
        path = path / "json"
    records = read_records(str(path), src.split, src.notes)
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


def _mlvu_rows(records: list[dict[str, Any]], src: Source) -> list[dict[str, Any]]:
    """Number records within each task (``mlvu/<task>/<k>``), in file order."""
    counters: dict[str, int] = {}
    rows = []
    for rec in records:
        task = mlvu_task(str(rec.get("__file__", "")), rec)
        k = counters.get(task, 0)
        counters[task] = k + 1
        rows.append(adapt_mlvu(rec, k, src))
    return rows


# ---------------------------------------------------------------------------------------------
# Our own qa table
# ---------------------------------------------------------------------------------------------


def _qa_records(src: Source) -> list[dict[str, Any]]:
    """Rows of a ``qa`` table (filtered by split) or of a ``qa_raw`` table (all rows).

    ``qa_raw`` (``runs/<run>/qa/qa_raw``) is what ``lvr datagen filter`` rates: evaluating it
    with ``--passes K`` gives the pass rates its difficulty rule needs.
    """
    from lvr.artifacts import SchemaError, read_table, table_files, table_name_of

    try:
        files = table_files(src.data, "qa")
        name = (table_name_of(files[0]) if files else None) or "qa"
    except FileNotFoundError as exc:
        raise BenchmarkError(f"qa table not found: {exc}") from None
    except (OSError, ValueError):  # pyarrow's "Parquet magic bytes not found" is a ValueError
        raise BenchmarkError(
            f"{src.data} is not a Parquet qa table (--benchmark qa reads runs/<run>/qa); "
            "for a benchmark's JSON file pass its --benchmark name"
        ) from None
    if name not in {"qa", "qa_raw"}:
        raise BenchmarkError(f"{src.data} holds a '{name}' table; give a qa or qa_raw table")
    try:
        rows = read_table(src.data, name).to_pylist()
    except SchemaError as exc:
        raise BenchmarkError(str(exc).splitlines()[0]) from None
    split = src.split or "eval"
    if name == "qa_raw" or split == "all":
        return rows
    chosen = [r for r in rows if r.get("split") == split]
    if rows and not chosen:
        counts = Counter(str(r.get("split")) for r in rows)
        have = ", ".join(f"{k} ({n} rows)" for k, n in sorted(counts.items()))
        raise BenchmarkError(
            f"the qa table at {src.data} has no rows with split {split!r}; "
            f"its splits: {have}; --split all takes every row"
        )
    return chosen


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
    return question_row(
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
# Registry and entry point
# ---------------------------------------------------------------------------------------------

BENCHMARKS: dict[str, Benchmark] = {
    "qa": Benchmark(adapt_qa, read=_qa_records),
    "longvideo-reason": Benchmark(
        adapt_longvideo_reason,
        # Video-R1's Video-MME file also has problem/solution/path (and options apart): it is
        # Video-MME's, with its categories and duration groups.
        Spec(
            (("problem",), ("answer", "solution"), ("videos", "video", "path")),
            excludes=(("videoID", "videomme"),),
        ),
    ),
    "videomme": Benchmark(
        adapt_videomme,
        Spec(
            (("question",), ("options",), ("answer",), ("videoID", "video_id", "videoId")),
            excludes=(("group_type", "videomme-v2"),),
        ),
    ),
    "longvideobench": Benchmark(
        adapt_longvideobench,
        Spec(
            (
                ("question",),
                ("candidates", "option0"),
                ("correct_choice",),
                ("video_path", "video_id"),
            )
        ),
    ),
    "mlvu": Benchmark(
        adapt_mlvu,
        Spec((("question",), ("candidates",), ("answer",), ("video",))),
        read=_mlvu_records,
        rows=_mlvu_rows,
        headline="macro",
    ),
    **recent_benchmarks.BENCHMARKS,
}
# Plain views kept for callers of the earlier API.
ADAPTERS: dict[str, Adapter] = {name: b.adapt for name, b in BENCHMARKS.items()}
HEADLINE_GROUP = {name: b.headline for name, b in BENCHMARKS.items() if b.headline != "overall"}


def load_questions(src: Source, limit: int | None = None) -> pa.Table:
    """Load a benchmark into the ``questions`` table.

    Args:
        src: Benchmark name, data location, video folder, split, subtitles flag (its ``notes``
            receive what the user should know: lenient reads, skipped files, left-out tasks).
        limit: Keep only the first ``limit`` questions (for smoke runs).

    Returns:
        A ``questions`` table, one row per question, malformed ones with an ``error``.

    Raises:
        BenchmarkError: Unknown benchmark, unreadable source, or a file that is not this
            benchmark's (one line: the fields expected and found, and what it looks like).
    """
    bench = BENCHMARKS.get(src.benchmark)
    if bench is None:
        raise BenchmarkError(
            f"unknown benchmark {src.benchmark!r}; choose one of {', '.join(BENCHMARKS)}"
        )
    records = bench.read(src) if bench.read else _plain_records(src)
    specs = {name: b.spec for name, b in BENCHMARKS.items() if b.spec is not None}
    if bench.spec is not None:
        records = filecheck.benchmark_files(records, specs, src)
    rows = bench.rows(records, src) if bench.rows else [
        bench.adapt(rec, i, src) for i, rec in enumerate(records)
    ]  # fmt: skip
    if bench.spec is not None and rows:
        filecheck.check_readable(records, rows, specs, src)
    rows = _unique_ids(rows, src)
    filecheck.note_warnings(rows, src)
    return rows_to_table(rows if limit is None else rows[:limit], "questions")


def _plain_records(src: Source) -> list[dict[str, Any]]:
    raw = read_records(src.data, src.split, src.notes)
    records, parents = flatten_nested(raw)
    if parents:
        children = len(records) - (len(raw) - parents)
        src.notes.append(
            f"{src.benchmark}: {parents} nested records expanded to {children} questions"
        )
    return records


def _unique_ids(rows: list[dict[str, Any]], src: Source) -> list[dict[str, Any]]:
    """Keep ids unique (a duplicated native id gets "#2", "#3" in file order), with a note."""
    seen: dict[str, int] = {}
    renamed = []
    for row in rows:
        n = seen.get(row["qa_id"], 0) + 1
        seen[row["qa_id"]] = n
        if n > 1:
            renamed.append(row["qa_id"])
            row["qa_id"] = f"{row['qa_id']}#{n}"
    if renamed:
        src.notes.append(
            f"{len(renamed)} question(s) repeat an earlier id and were renamed <id>#2, #3...: "
            f"{', '.join(sorted(set(renamed))[:3])}{' ...' if len(set(renamed)) > 3 else ''}"
        )
    return rows
