"""Is this file the benchmark's? One line when it is not, never thousands of error rows.

Each benchmark names the fields that identify its records (``Spec``). Before any row is built,
every file of a source is checked: a file that lacks the fields is skipped with a note when other
files are the benchmark's (MLVU's ``test_res_example.json`` results file beside its task files),
and stops the load with ONE line otherwise: which file, what is missing, the fields expected and
found, and which benchmark's fields it has instead ("it looks like videomme: pass --benchmark
videomme"). After the rows are built, a source whose every record failed to read (fields present,
content not: Video-R1's Video-MME problems carry no option lines) stops the same way.
"""

from __future__ import annotations

import json
import re
from typing import Any

from lvr.eval.sources import BenchmarkError, Source, Spec, record_fields
from lvr.reasons import error_reason, summarize_errors


def _by_file(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    files: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        files.setdefault(str(rec.get("__source__", "")), []).append(rec)
    return files


def looks_like(records: list[dict[str, Any]], specs: dict[str, Spec], besides: str) -> list[str]:
    """Benchmarks (other than ``besides``) whose fields these records have, most specific first."""
    fits = [
        (len(spec.fields), name)
        for name, spec in specs.items()
        if name != besides and spec.problem(records) is None
    ]
    return [name for _, name in sorted(fits, key=lambda t: -t[0])]


def not_this_benchmark(
    name: str, why: str, records: list[dict[str, Any]], specs: dict[str, Spec], src: Source
) -> str:
    """The one-line error: which file, why, the fields expected and found, what it looks like."""
    spec = specs.get(src.benchmark)
    found = record_fields(records)
    shown = ", ".join(found[:14]) + (f" (+{len(found) - 14} more)" if len(found) > 14 else "")
    line = (
        f"{name or src.data} is not a {src.benchmark} file ({why}): expected fields "
        f"{spec.describe() if spec else '?'}; found {shown or 'none'}"
    )
    others = looks_like(records, specs, src.benchmark)
    if others:
        line += f"; it looks like {others[0]}: pass --benchmark {others[0]}"
    return line


def benchmark_files(
    records: list[dict[str, Any]], specs: dict[str, Spec], src: Source
) -> list[dict[str, Any]]:
    """Keep the files whose records have the benchmark's fields; skip others with a note.

    Raises:
        BenchmarkError: No file is the benchmark's (the line of the first one).
    """
    spec = specs[src.benchmark]
    files = _by_file(records)
    kept: list[dict[str, Any]] = []
    rejected: list[str] = []
    for name, recs in files.items():
        why = spec.problem(recs)
        if why is None:
            kept.extend(recs)
        else:
            rejected.append(not_this_benchmark(name, why, recs, specs, src))
    if not kept:
        raise BenchmarkError(rejected[0] if rejected else f"{src.data} holds no records")
    for line in rejected:
        n_files = len(files) - len(rejected)
        src.notes.append(f"skipped (read {n_files} other file(s)): {line}")
    return kept


def _record_errors(error: str | None) -> list[str]:
    """The parts of a row's error that are about the record itself (not a missing video)."""
    parts = [] if not error else error.split("; ")
    return [p for p in parts if not p.startswith("video not found")]


def check_readable(
    records: list[dict[str, Any]], rows: list[dict[str, Any]], specs: dict[str, Spec], src: Source
) -> None:
    """Stop when not one record could be read: the file has the fields but not the content.

    Raises:
        BenchmarkError: Every row has a record error (missing videos do not count).
    """
    problems = [_record_errors(r["error"]) for r in rows]
    if any(not p for p in problems):
        return
    summary = summarize_errors(p[0] for p in problems)
    why = f"none of its {len(rows)} records could be read: {summary}"
    raise BenchmarkError(
        not_this_benchmark(str(records[0].get("__source__", "")), why, records, specs, src)
    )


def note_warnings(rows: list[dict[str, Any]], src: Source) -> None:
    """One note per kind of warning kept on rows (e.g. two options with the same text)."""
    found: dict[str, list[str]] = {}
    for row in rows:
        for warning in json.loads(row["extra"]).get("warnings", []):
            kind = re.sub(r"\b[A-J0-9]\b", "X", error_reason(warning))
            found.setdefault(kind, []).append(f"{row['qa_id']} ({warning})")
    for kind, hits in found.items():
        shown = ", ".join(hits[:3]) + (", ..." if len(hits) > 3 else "")
        src.notes.append(
            f"{src.benchmark}: {len(hits)} question(s) kept as published although {kind}; "
            f"scored by label: {shown}"
        )
