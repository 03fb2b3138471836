"""Export the filtered ``qa`` table: LongVideo-Reason JSONL per split, or a Hugging Face dataset.

JSONL records have exactly the public LongVideo-Reason fields, in this order::

    {"problem_id": "<qa_id>", "problem": "<question>\\nA. ...\\nB. ...", "data_type": "video",
     "problem_type": "temporal", "reasoning": "...", "videos": "<path>", "answer": "<answer>B</answer>"}

``problem`` appends the options only for multiple choice; ``answer`` is ``<answer>X</answer>`` for
multiple choice and the gold text for open questions; ``videos`` is relative to ``video_root``
when one is given (a video outside it is an error, never an absolute path in disguise).

The Hugging Face export is a ``DatasetDict`` (splits sft / rl / eval, always all three, or only
the one ``--split`` names) saved with ``save_to_disk``; it holds the same fields plus ``format``
and ``options``. Video paths stay strings: nothing is decoded.

An export never replaces something that is not a previous export: the JSONL target must be new,
empty or a previous JSONL export (its first line a record with ``problem_id``); the HF target
folder must be new, empty or a previous HF export (it holds ``dataset_dict.json``). Anything else
is refused with one line.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lvr.artifacts import read_table
from lvr.errors import LvrError
from lvr.layout import RunLayout, check_layout

PUBLIC_FIELDS = (
    "problem_id",
    "problem",
    "data_type",
    "problem_type",
    "reasoning",
    "videos",
    "answer",
)
SPLITS = ("sft", "rl", "eval")


class ExportError(LvrError):
    """The qa table cannot be exported as asked (unfinished filter, unknown split, bad path)."""


def export_jsonl(
    run: str | Path | RunLayout,
    out_path: str | Path,
    split: str | None,
    video_root: str | Path | None = None,
) -> int:
    """Write one split (or every split with ``split=None``) as LongVideo-Reason JSONL.

    Args:
        run: The run folder (or its layout) whose ``qa`` table the filter wrote.
        out_path: JSONL file to write (atomically: temp file + rename).
        split: ``sft``, ``rl``, ``eval`` (or another split the policy made); None = all rows.
        video_root: Make ``videos`` relative to this folder.

    Returns:
        The number of records written.

    Raises:
        ExportError: Unfinished filter stage, unknown split, or a video outside ``video_root``.
        LayoutError: ``run`` was written by an older lvr (names the migration).
    """
    out_path = Path(out_path)
    check_jsonl_target(out_path)
    rows = _qa_rows(run, split)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as fh:
        for record in _records(rows, video_root):
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, out_path)
    return len(rows)


def check_jsonl_target(out_path: Path) -> None:
    """Refuse a JSONL target that is a folder, or a file that is not a previous JSONL export."""
    if out_path.is_dir():
        raise ExportError(
            f"--out {out_path} is a folder; --format jsonl writes one file "
            f"(e.g. --out {out_path / 'all.jsonl'})"
        )
    if out_path.exists() and not _is_jsonl_export(out_path):
        raise ExportError(
            f"--out {out_path} exists and is not a previous JSONL export; lvr does not overwrite "
            "it: give a new file name"
        )
    if out_path.parent.exists() and not out_path.parent.is_dir():
        raise ExportError(f"--out {out_path}: {out_path.parent} is a file, not a folder")


def _is_jsonl_export(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            first = fh.readline(1 << 20)
    except OSError:
        return False
    if not first.strip():
        return path.stat().st_size == 0
    try:
        record = json.loads(first)
    except ValueError:
        return False
    return isinstance(record, dict) and "problem_id" in record


def check_hf_target(out_dir: Path) -> None:
    """Refuse an HF target that is a file, or a folder that is neither empty nor an HF export."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(
            f"--out {out_dir} is a file; --format hf writes a folder: give a new folder name"
        )
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / HF_MARK).is_file():
        raise ExportError(
            f"--out {out_dir} holds files that are not a previous HF export (no {HF_MARK}); "
            "lvr replaces the --out folder as a whole: give a new or empty folder"
        )
    for parent in out_dir.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ExportError(f"--out {out_dir}: {parent} is a file, not a folder")
            break


HF_MARK = "dataset_dict.json"  # written by DatasetDict.save_to_disk


def _hf_split(datasets: Any, items: list[dict[str, Any]], features: Any) -> Any:
    """One split as a ``datasets.Dataset``; an empty split keeps the columns and their types.

    ``Dataset.from_list([], features=...)`` raises in datasets 5 ("Keys mismatch"), and a pilot
    run of a new domain easily leaves a split empty.
    """
    if not items:
        return datasets.Dataset.from_dict({name: [] for name in features}, features=features)
    return datasets.Dataset.from_list(items, features=features)


def export_hf(
    run: str | Path | RunLayout,
    out_dir: str | Path,
    video_root: str | Path | None = None,
    split: str | None = None,
) -> dict[str, int]:
    """Save a ``datasets.DatasetDict`` (sft / rl / eval, or only ``split``) with ``save_to_disk``.

    Args:
        run: The run folder (or its layout) whose ``qa`` table the filter wrote.
        out_dir: Target folder: new, empty or a previous HF export (it holds
            ``dataset_dict.json``), which is replaced as a whole (written next to it, then swapped
            in). Anything else is refused.
        video_root: Make ``videos`` relative to this folder.
        split: Only this split (one-split ``DatasetDict``); None = every split.

    Returns:
        Rows per split.

    Raises:
        ExportError: Unfinished filter stage, unknown split, a video outside ``video_root``, or
            an ``out_dir`` that is a file or holds files that are not an HF export.
        LayoutError: ``run`` was written by an older lvr (names the migration).
    """
    out_dir = Path(out_dir)
    check_hf_target(out_dir)
    rows = _qa_rows(run, split)
    import datasets

    features = datasets.Features(
        {
            **{name: datasets.Value("string") for name in PUBLIC_FIELDS},
            "format": datasets.Value("string"),
            "options": datasets.Sequence(datasets.Value("string")),  # List in datasets>=4
        }
    )
    names = (
        [split]
        if split is not None
        else [*SPLITS, *sorted({r["split"] for r in rows} - set(SPLITS))]
    )
    by_split: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for row, record in zip(rows, _records(rows, video_root), strict=True):
        by_split[row["split"]].append(
            {**record, "format": row["format"], "options": row["options"]}
        )
    dataset = datasets.DatasetDict(
        {name: _hf_split(datasets, items, features) for name, items in by_split.items()}
    )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    # An empty split gets one (empty) shard file: with none, load_from_disk fails on it.
    dataset.save_to_disk(str(tmp), num_shards={k: 1 for k, items in by_split.items() if not items})
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out_dir)
    return {name: len(items) for name, items in by_split.items()}


def public_record(row: dict[str, Any], video_root: str | Path | None = None) -> dict[str, Any]:
    """One ``qa`` row as a LongVideo-Reason record (exactly :data:`PUBLIC_FIELDS`).

    >>> r = public_record({"qa_id": "q1", "question": "Why?", "options": ["a", "b", "c", "d"],
    ...     "format": "mc", "answer": "B", "category": "goal", "reasoning": "r",
    ...     "video_path": "/v/x.mp4"}, "/v")
    >>> r["problem"], r["videos"], r["answer"]
    ('Why?\\nA. a\\nB. b\\nC. c\\nD. d', 'x.mp4', '<answer>B</answer>')
    """
    problem = row["question"]
    if row["format"] == "mc":
        letters = [chr(65 + i) for i in range(len(row["options"]))]
        problem += "".join(
            f"\n{letter}. {text}" for letter, text in zip(letters, row["options"], strict=True)
        )
        answer = f"<answer>{row['answer']}</answer>"
    else:
        answer = row["answer"]
    return {
        "problem_id": row["qa_id"],
        "problem": problem,
        "data_type": "video",
        "problem_type": row["category"],
        "reasoning": row["reasoning"],
        "videos": _video_path(row, video_root),
        "answer": answer,
    }


def _video_path(row: dict[str, Any], video_root: str | Path | None) -> str:
    path = row["video_path"]
    if video_root is None:
        return path
    root = Path(video_root).resolve()
    resolved = Path(path).resolve()
    if not resolved.is_relative_to(root):
        raise ExportError(f"qa {row['qa_id']}: video {path} is not under --video-root {video_root}")
    return resolved.relative_to(root).as_posix()


def _records(rows: list[dict[str, Any]], video_root: str | Path | None) -> Iterator[dict[str, Any]]:
    for row in rows:
        yield public_record(row, video_root)


def _qa_rows(run: str | Path | RunLayout, split: str | None) -> list[dict[str, Any]]:
    """Rows of the finished filter stage's ``qa`` table, optionally of one split."""
    layout = run if isinstance(run, RunLayout) else check_layout(run)
    manifest = layout.manifest("filter")
    if manifest.is_file():
        status = json.loads(manifest.read_text()).get("status")
        if status != "done":
            raise ExportError(
                f"filter stage of {layout.root} is not finished (status {status}); rerun it"
            )
    try:
        table = read_table(layout.qa, "qa")
    except FileNotFoundError as exc:
        raise ExportError(f"{exc} (run `lvr datagen filter` first)") from None
    columns = [
        "qa_id",
        "question",
        "options",
        "format",
        "answer",
        "category",
        "reasoning",
        "video_path",
        "split",
    ]
    rows = table.select(columns).to_pylist()
    if split is None:
        return rows
    present = {r["split"] for r in rows}
    if split not in present | set(SPLITS):
        raise ExportError(
            f"unknown split '{split}'; splits in {layout.qa}: {', '.join(sorted(present))}"
        )
    return [r for r in rows if r["split"] == split]
