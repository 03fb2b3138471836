"""Adapters of the benchmarks a 2026 user expects beside the first four (see ``benchmarks``).

- ``videomme-v2``: Video-MME-v2 ``test.parquet`` rows ``video_id`` ("001"), ``question_id``
  ("001-1"), ``question``, ``options`` (one string "A. ...\\nB. ..." of up to 8 options A-H, or a
  list), ``answer``, ``group_type`` (``relevance`` = capability consistency, ``logic`` =
  reasoning coherence), ``group_structure`` ("[1, 2, 3, 4]", "[1, [2, 3], 4]" or
  "[[1, 2], 3, 4]"), ``level``, ``second_head``, ``third_head`` (often only on a group's last
  question). The 4 questions of a video form one group, ordered by the ``question_id`` suffix;
  the official score is grouped and non-linear (``lvr.eval.official``). Videos ``<video_id>.mp4``,
  optional word-level subtitles ``subtitle/<video_id>.jsonl`` (all words, the official
  "concatenated" mode).
- ``lvbench``: LVBench ``video_info.meta.jsonl``: one line per video ``{key, type, video_info:
  {duration_minutes, ...}, qa: [{uid, question ("...\\n(A) ...\\n(B) ..."), answer,
  question_type: [...], time_reference}]}``; the flat re-distribution (``question``, ``options``,
  ``answer``, ``video_path``) reads too. A question can have several types: it counts in each
  type's accuracy (the official ``compute_accuracy``). Videos ``<key>.mp4``.
- ``video-holmes``: ``test_Video-Holmes.json`` / ``train_Video-Holmes.json`` records ``video ID``,
  ``Question ID``, ``Question Type`` (SR, IMC, TCI, TA, MHR, PAR, CTI), ``Question``, ``Options``
  (a letter -> text dict, A-F), ``Answer``, ``Explanation`` (kept; ``lvr eval questions --as-qa``
  turns the train split into a ``qa`` table for ``lvr rl``). Score: overall and per type.
- ``nextqa``: NExT-QA multiple choice (``val.csv`` or the Parquet/JSON re-distributions):
  ``video``, ``qid``, ``type`` (CW, CH, TN, TC, TP, DL, DC, DO), ``question``, ``a0..a4``,
  ``answer`` (the NUMBER 0-4). Options keep their numbers: the prompt lists "0. ...", the model
  answers a number, and scoring compares numbers. Videos ``<video>.mp4`` (``NExTVideo/``), or
  through ``map_vid_vidorID.json`` when the release's folder layout is kept.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from lvr.eval.options import (
    LETTERS,
    NUMBERED,
    NUMBERS,
    check_texts,
    clean_question,
    from_lines,
    gold_label,
    lettered_question,
    order_labelled,
    question_error,
)
from lvr.eval.sources import (
    Benchmark,
    Source,
    Spec,
    as_list,
    duration_bucket_from_seconds,
    pick,
    question_row,
    resolve_video,
    subtitle_candidates,
)

# Video-MME-v2 logic-group structures: questions in brackets are parallel steps.
LOGIC_STRUCTURES = ([1, 2, 3, 4], [1, [2, 3], 4], [[1, 2], 3, 4])
GROUP_SIZE = 4


# ---------------------------------------------------------------------------------------------
# Video-MME-v2
# ---------------------------------------------------------------------------------------------


def parse_structure(value: Any) -> list[Any] | None:
    """``"[1, [2, 3], 4]"`` (or the list itself) -> the list; None when unreadable.

    >>> parse_structure("[[1, 2], 3, 4]")
    [[1, 2], 3, 4]
    """
    if isinstance(value, list):
        return value
    try:
        parsed = json.loads(str(value))
    except ValueError:
        return None
    return parsed if isinstance(parsed, list) else None


def _v2_video(src: Source, vid: Any) -> tuple[str, str | None]:
    path, err = resolve_video(src.video_dir, None if vid is None else str(vid), ("videos", "data"))
    if err and isinstance(vid, int):  # an integer id read from Parquet lost "001"'s zeros
        padded, perr = resolve_video(src.video_dir, f"{vid:03d}", ("videos", "data"))
        if perr is None:
            return padded, None
    return path, err


def adapt_videomme_v2(rec: dict[str, Any], index: int, src: Source) -> dict[str, Any]:
    """Map one Video-MME-v2 record (see module docstring)."""
    question, options, answer, errors = lettered_question(
        pick(rec, "question"), pick(rec, "options"), pick(rec, "answer")
    )
    vid = pick(rec, "video_id", "video")
    path, err = _v2_video(src, vid)
    errors.append(err)
    group_type = str(pick(rec, "group_type") or "").strip()
    structure = parse_structure(pick(rec, "group_structure"))
    if group_type not in {"relevance", "logic"}:
        errors.append(f"group_type {group_type!r} is not relevance or logic")
    elif group_type == "logic" and structure not in LOGIC_STRUCTURES:
        errors.append(
            f"group_structure {pick(rec, 'group_structure')!r} is not a known logic chain"
        )
    extra: dict[str, Any] = {
        "video_id": None if vid is None else str(vid),
        "question_id": pick(rec, "question_id"),
        "group_type": group_type,
        "group_structure": structure,
        **{k: rec.get(k) for k in ("level", "second_head", "third_head", "task_type")},
    }
    if src.subtitles:
        extra["subtitles"] = _v2_subtitles(src, vid)
        extra["subtitles_mode"] = "all"
    return question_row(
        src,
        f"videomme-v2/{pick(rec, 'question_id') or index}",
        video_path=path,
        question=question,
        options=options,
        answer=answer,
        category=pick(rec, "task_type", "third_head", "second_head"),
        duration_bucket=pick(rec, "duration"),
        extra=extra,
        errors=errors,
    )


def _v2_subtitles(src: Source, vid: Any) -> list[list[Any]] | None:
    """Word-level cues ``[start, end, word]`` of ``subtitle/<video_id>.jsonl``, or None."""
    if vid is None:
        return None
    for path in subtitle_candidates(src, f"{vid}.jsonl"):
        for cand in (path, path.parent / "subtitle" / path.name):
            if cand.is_file():
                words = [
                    json.loads(ln)
                    for ln in cand.read_text(encoding="utf-8").splitlines()
                    if ln.strip()
                ]
                return [
                    [w.get("start_time"), w.get("end_time"), str(w.get("text", ""))] for w in words
                ]
    return None


def _suffix(question_id: Any, fallback: int) -> int:
    """The position of a question in its group from ``"001-3"`` (else its file order)."""
    match = re.search(r"(\d+)\s*$", str(question_id or ""))
    return int(match.group(1)) if match else fallback


def videomme_v2_rows(records: list[dict[str, Any]], src: Source) -> list[dict[str, Any]]:
    """Map records, then check each video's group: 4 questions, one group type and structure.

    Each row's ``extra`` gets ``group`` (the video id) and ``group_index`` (0-3, by question id
    suffix); a group that breaks the grouped score's assumptions makes all its rows error rows.
    """
    rows = [adapt_videomme_v2(rec, i, src) for i, rec in enumerate(records)]
    groups: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for i, row in enumerate(rows):
        extra = json.loads(row["extra"])
        groups.setdefault(str(extra["video_id"]), []).append((i, extra))
    for vid, members in groups.items():
        ordered = sorted(members, key=lambda m: (_suffix(m[1]["question_id"], m[0]), m[0]))
        kinds = {(m[1]["group_type"], json.dumps(m[1]["group_structure"])) for m in members}
        problem = None
        if len(members) != GROUP_SIZE:
            problem = (
                f"group of video {vid} has {len(members)} questions (the grouped score needs 4)"
            )
        elif len(kinds) > 1:
            problem = f"questions of video {vid} disagree on group_type/group_structure"
        for pos, (i, extra) in enumerate(ordered):
            extra.update(group=vid, group_index=pos)
            rows[i]["extra"] = json.dumps(extra, default=str, sort_keys=True)
            if problem:
                rows[i]["error"] = "; ".join(e for e in (rows[i]["error"], problem) if e)
    return rows


# ---------------------------------------------------------------------------------------------
# LVBench
# ---------------------------------------------------------------------------------------------


def adapt_lvbench(rec: dict[str, Any], index: int, src: Source) -> dict[str, Any]:
    """Map one LVBench question (after its video's ``qa`` list was expanded)."""
    text = clean_question(pick(rec, "question"))
    listed = as_list(rec.get("options"))
    if listed:  # the flat re-distribution lists plain option texts
        question, options = text, [str(o).strip() for o in listed]
        err = check_texts(options)
    else:
        question, options, err = from_lines(text)
    errors: list[str | None] = [question_error(question), err]
    answer, err = gold_label(pick(rec, "answer"), LETTERS[: len(options)])
    errors.append(err)
    video = pick(rec, "key", "video_path", "video_id", "video")
    path, err = resolve_video(src.video_dir, video, subdirs=("videos", "all_videos", "video"))
    errors.append(err)
    raw_types = rec.get("question_type")
    types = [str(t) for t in (as_list(raw_types) or ([raw_types] if raw_types else []))]
    minutes = pick(rec, "video_info.duration_minutes")
    seconds = float(minutes) * 60 if isinstance(minutes, int | float) else pick(rec, "duration")
    extra = {
        "key": rec.get("key"),
        "uid": rec.get("uid"),
        "categories": types,
        "time_reference": rec.get("time_reference"),
        "video_type": rec.get("type"),
        "duration_s": seconds,
    }
    return question_row(
        src,
        f"lvbench/{pick(rec, 'uid') if pick(rec, 'uid') is not None else index}",
        video_path=path,
        question=question,
        options=options,
        answer=answer,
        category=", ".join(types) or None,
        duration_bucket=duration_bucket_from_seconds(
            float(seconds) if isinstance(seconds, int | float) else None
        ),
        extra=extra,
        errors=errors,
    )


# ---------------------------------------------------------------------------------------------
# Video-Holmes
# ---------------------------------------------------------------------------------------------


def adapt_video_holmes(rec: dict[str, Any], index: int, src: Source) -> dict[str, Any]:
    """Map one Video-Holmes record (options are a letter -> text dict)."""
    question, options, answer, errors = lettered_question(
        pick(rec, "Question", "question"),
        pick(rec, "Options", "options"),
        pick(rec, "Answer", "answer"),
    )
    video = pick(rec, "video ID", "video_id")
    path, err = resolve_video(src.video_dir, video, subdirs=("videos", "Benchmark/videos"))
    errors.append(err)
    qid = pick(rec, "Question ID", "question_id")
    return question_row(
        src,
        f"video-holmes/{video}-{qid if qid is not None else index}",
        video_path=path,
        question=question,
        options=options,
        answer=answer,
        category=pick(rec, "Question Type", "question_type"),
        extra={"video_id": video, "question_id": qid, "explanation": pick(rec, "Explanation")},
        errors=errors,
    )


# ---------------------------------------------------------------------------------------------
# NExT-QA (numbered options)
# ---------------------------------------------------------------------------------------------


def _nextqa_map(src: Source) -> dict[str, str]:
    """``map_vid_vidorID.json`` (video id -> "folder/vidor id") when the release ships it."""
    data = Path(src.data).expanduser()
    roots = [r for r in (src.video_dir, data if data.is_dir() else data.parent) if r is not None]
    for root in roots:
        path = root / "map_vid_vidorID.json"
        if path.is_file():
            return {str(k): str(v) for k, v in json.loads(path.read_text()).items()}
    return {}


def adapt_nextqa(
    rec: dict[str, Any], index: int, src: Source, video_map: dict[str, str] | None = None
) -> dict[str, Any]:
    """Map one NExT-QA multiple-choice record (options labelled 0-4)."""
    question = clean_question(pick(rec, "question"))
    pairs = [(NUMBERS[i], "" if rec.get(f"a{i}") is None else str(rec[f"a{i}"])) for i in range(5)]
    pairs = [p for p in pairs if f"a{p[0]}" in rec]
    options, err = order_labelled(pairs, NUMBERS)
    errors: list[str | None] = [question_error(question), err]
    gold = pick(rec, "answer")
    answer, err = gold_label(None if isinstance(gold, bool) else gold, NUMBERS[: len(options)])
    errors.append(err)
    video = pick(rec, "video", "video_id")
    name = (video_map or {}).get(str(video), None if video is None else str(video))
    path, err = resolve_video(src.video_dir, name, subdirs=("NExTVideo", "videos"))
    errors.append(err)
    qid = pick(rec, "qid")
    return question_row(
        src,
        f"nextqa/{video}-{qid if qid is not None else index}",
        video_path=path,
        question=question,
        options=options,
        answer=answer,
        category=pick(rec, "type"),
        extra={"option_labels": NUMBERED, "video": video, "qid": qid, "type": rec.get("type")},
        errors=errors,
    )


def nextqa_rows(records: list[dict[str, Any]], src: Source) -> list[dict[str, Any]]:
    """Map NExT-QA records with the release's video-id map read once."""
    video_map = _nextqa_map(src)
    return [adapt_nextqa(rec, i, src, video_map) for i, rec in enumerate(records)]


BENCHMARKS: dict[str, Benchmark] = {
    "videomme-v2": Benchmark(
        adapt_videomme_v2,
        Spec(
            (
                ("video_id",),
                ("question",),
                ("options",),
                ("answer",),
                ("group_type",),
                ("group_structure",),
            )
        ),  # fmt: skip
        rows=videomme_v2_rows,
        headline="nonlinear",
    ),
    "lvbench": Benchmark(
        adapt_lvbench,
        Spec((("key", "video_path"), ("question",), ("answer",), ("question_type", "uid"))),
    ),
    "video-holmes": Benchmark(
        adapt_video_holmes,
        Spec((("video ID",), ("Question",), ("Options",), ("Answer",))),
    ),
    "nextqa": Benchmark(
        adapt_nextqa,
        Spec((("video",), ("question",), ("a0",), ("a1",), ("answer",))),
        rows=nextqa_rows,
    ),
}
