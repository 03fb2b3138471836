"""Benchmark questions -> a ``qa`` table, so a benchmark's train split feeds ``lvr sft`` / ``lvr rl``.

Video-Holmes publishes a train split (1,551 questions with explanations) next to its test set;
``lvr eval questions --benchmark video-holmes --data train_Video-Holmes.json --video-dir V
--as-qa runs/R/qa`` writes its error-free questions in the ``qa`` contract that
``lvr.train.data.read_qa`` reads (``--set data.split=rl`` picks them). Numbered options are
re-labelled with letters there: training prompts always letter their options.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lvr.artifacts import rows_to_table, table_files
from lvr.errors import LvrError
from lvr.eval.options import LETTERS, NUMBERS

_GENERATOR_PREFIX = "benchmark:"  # the generator of every row --as-qa writes


def _video_id(extra: dict[str, Any], path: str) -> str:
    for key in ("video_id", "videoID", "key", "video"):
        if extra.get(key) not in (None, ""):
            return str(extra[key])
    return Path(path).stem


def question_to_qa(q: dict[str, Any], split: str) -> dict[str, Any]:
    """One error-free ``questions`` row as a ``qa`` row of ``split``.

    Args:
        q: A questions row without an error.
        split: The qa split to write (``rl``, ``sft``, ``eval``).

    Returns:
        A dict in the ``qa`` schema (reasoning from the benchmark's explanation, if any).
    """
    extra = json.loads(q["extra"] or "{}")
    answer = q["answer"]
    if q["format"] == "mc" and answer is not None and answer in NUMBERS:
        answer = LETTERS[NUMBERS.index(answer)]  # training prompts letter their options
    duration = extra.get("duration_s", extra.get("duration"))
    return {
        "qa_id": q["qa_id"],
        "video_id": _video_id(extra, q["video_path"]),
        "video_path": q["video_path"],
        "duration_s": float(duration) if isinstance(duration, int | float) else None,
        "category": q["category"],
        "format": q["format"],
        "question": q["question"],
        "options": list(q["options"] or []),
        "answer": answer,
        "reasoning": extra.get("explanation"),
        "evidence": None,
        "generator": f"{_GENERATOR_PREFIX}{q['benchmark']}",
        "prompt_version": None,
        "raw": None,
        "error": None,
        "split": split,
        "pass_rate": None,
    }


def questions_to_qa(questions: list[dict[str, Any]], split: str) -> tuple[pa.Table, int]:
    """Error-free questions as a ``qa`` table; returns ``(table, rows left out for errors)``."""
    good = [q for q in questions if q["error"] is None]
    return rows_to_table([question_to_qa(q, split) for q in good], "qa"), len(questions) - len(good)


def check_as_qa_folder(folder: Path) -> None:
    """Refuse a ``--as-qa`` folder that holds a table other than an earlier ``--as-qa`` output.

    ``--as-qa`` writes one shard, ``00000.parquet``. Into a folder the filter filled (shards
    ``00000``-``000NN``) it would replace shard 0 and leave the others: a table of two origins
    that every reader of the folder, ``lvr rl`` included, takes whole. A new or empty folder, or
    one holding only a previous ``--as-qa`` shard (every row's generator ``benchmark:...``), is
    fine; the new shard then replaces it.

    Raises:
        LvrError: The folder holds other Parquet files (one line: what, and what to do).
    """
    files = table_files(folder) if folder.is_dir() else []
    if not files:
        return
    ours = [f.name for f in files] == ["00000.parquet"] and _all_from_benchmarks(files[0])
    if not ours:
        raise LvrError(
            f"--as-qa {folder} already holds a table ({len(files)} Parquet file(s), e.g. "
            f"{files[0].name}) that --as-qa did not write; writing 00000.parquet there would mix "
            "the two: give a new folder (e.g. runs/<new>/qa) or remove that one first"
        )


def _all_from_benchmarks(path: Path) -> bool:
    """Whether every row of a Parquet file was written by ``--as-qa`` (unreadable: no)."""
    try:
        if "generator" not in pq.read_schema(path).names:
            return False
        generator = pq.read_table(path, columns=["generator"]).column("generator")
    except (OSError, pa.ArrowException):
        return False
    return bool(pc.all(pc.starts_with(pc.fill_null(generator, ""), _GENERATOR_PREFIX)).as_py())
