"""Where benchmark rows and videos come from: local JSON/JSONL/Parquet/CSV files or `datasets` names.

Shared by every adapter in ``lvr.eval.benchmarks``: reading raw records as users download them,
finding a video on disk (never substituting another one), field look-ups under alternative names,
and the ``questions`` row every adapter returns.

Files are read by what they hold, not by their name: a Parquet file is known by its magic bytes,
JSON by its first character (one object per line is JSONL), so ``test.parquet`` that is really
JSON, or a ``.json`` holding JSONL, still reads (with a note). JSON that is not strict JSON as
published (trailing commas, as in Video-MME's official template) is read leniently with ``json5``,
also with a note. Each record carries ``__file__`` (file stem) and ``__source__`` (file name).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lvr.errors import LvrError
from lvr.eval.options import duplicate_texts, option_labels

VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".avi", ".mov")
DATA_EXTS = (".json", ".jsonl", ".parquet", ".csv")
NESTED_KEYS = ("questions", "qa")  # video -> questions layouts (Video-MME template, LVBench)


class BenchmarkError(LvrError):
    """A benchmark source that cannot be read at all (missing path, unknown format)."""


@dataclass
class Source:
    """Where a benchmark's rows and videos are, plus options that change the questions."""

    benchmark: str
    data: str
    video_dir: Path | None = None
    split: str | None = None
    subtitles: bool = False
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Reading raw records (local files or `datasets`)
# ---------------------------------------------------------------------------------------------


def read_records(
    data: str, split: str | None = None, notes: list[str] | None = None
) -> list[dict[str, Any]]:
    """Read raw records from a JSON/JSONL/Parquet/CSV file, a folder of them, or a dataset name.

    Args:
        data: Local path, or a hub dataset name (``org/name`` or ``org/name@split``).
        split: Dataset split for hub names (default: the ``@split`` suffix, else ``test``).
        notes: Where to append what the user should know (a lenient read, a misnamed file).

    Returns:
        Records in file order (files of a folder in name order).

    Raises:
        BenchmarkError: Unreadable file, empty folder, or a dataset that cannot be loaded.
    """
    notes = notes if notes is not None else []
    path = Path(data).expanduser()
    if path.is_file():
        return _read_file(path, notes)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in DATA_EXTS)
        if not files:
            raise BenchmarkError(f"{path} holds no {', '.join(DATA_EXTS)} files")
        return _read_folder(files, notes)
    if "/" in data and not data.startswith((".", "/", "~")):
        return _read_hub(data, split)
    raise BenchmarkError(f"benchmark data {data!r} is neither a file, a folder nor a dataset name")


def _read_folder(files: list[Path], notes: list[str]) -> list[dict[str, Any]]:
    """Records of every file, in name order.

    A file that does not parse stops the read: beside benchmark files it is most likely one of
    them, truncated or corrupted, and skipping it would score the benchmark without its
    questions. Files that parse but are another kind (a config, a results file) are left to the
    benchmark's field check, which skips them with a note.
    """
    records: list[dict[str, Any]] = []
    for f in files:
        try:
            records += _read_file(f, notes)
        except BenchmarkError as exc:
            raise BenchmarkError(
                f"{exc} (in the benchmark folder {f.parent}: re-download it or move it out)"
            ) from None
    return records


def sniff_format(path: Path) -> str:
    """``parquet``, ``json``, ``jsonl`` or ``csv``, from the file's first bytes (then its name).

    Args:
        path: A data file.

    Returns:
        The format its content has.
    """
    with path.open("rb") as fh:
        head = fh.read(65536)
    if head.startswith(b"PAR1"):
        return "parquet"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text.startswith(b"["):
        return "json"
    if text.startswith(b"{"):
        first, _, rest = text.partition(b"\n")
        try:
            json.loads(first)
        except ValueError:
            return "json"  # an object spanning lines
        return "jsonl" if rest.strip().startswith(b"{") or not rest.strip() else "json"
    return "csv" if path.suffix == ".csv" else path.suffix.lstrip(".") or "json"


def _read_file(path: Path, notes: list[str]) -> list[dict[str, Any]]:
    fmt = sniff_format(path)
    named = path.suffix.lstrip(".")
    rows: list[Any]
    if fmt != named and not (fmt == "jsonl" and named == "json" and _one_line(path)):
        notes.append(f"{path.name} holds {fmt}, not {named or 'a known format'}: read as {fmt}")
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            rows = pq.read_table(path).to_pylist()
        elif fmt == "csv":
            from pyarrow import csv

            rows = csv.read_csv(path).to_pylist()
        elif fmt == "jsonl":
            rows = _read_jsonl(path)
            if len(rows) == 1:  # one object on one line: a JSON document however laid out
                rows = _records_in(rows[0], path)
        else:
            rows = _records_in(_load_json(path, notes), path)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise BenchmarkError(f"cannot read {path}: {_first_line(exc)}") from None
    return [
        {**r, "__file__": path.stem, "__source__": path.name}
        if isinstance(r, dict)
        else {"__raw__": r, "__file__": path.stem, "__source__": path.name}
        for r in rows
    ]


def _one_line(path: Path) -> bool:
    """A file holding exactly one non-blank line (one compact JSON object is still plain JSON)."""
    return len([ln for ln in path.read_text(encoding="utf-8-sig").splitlines() if ln.strip()]) == 1


def _read_jsonl(path: Path) -> list[Any]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as exc:
                raise ValueError(f"line {n}: {exc}") from None
    return rows


def _load_json(path: Path, notes: list[str]) -> Any:
    """Strict JSON, else JSON5 (trailing commas, comments) with a note; strict error if neither."""
    text = path.read_text(encoding="utf-8-sig")
    try:
        return json.loads(text)
    except ValueError as strict:
        import json5

        try:
            obj = json5.loads(text)
        except ValueError:
            raise strict from None
        notes.append(f"{path.name} is not strict JSON ({_first_line(strict)}); read leniently")
        return obj


def _records_in(obj: Any, path: Path) -> list[Any]:
    """The records of a JSON document.

    A list is the records. An object is a wrapper when it holds exactly one list of objects
    (``{"version": 1, "data": [...]}``), a mapping when every value is an object (``{id:
    record}``; the key is kept as ``__key__``), and otherwise one record: its lists are its own
    fields (``options``), and so is a ``questions`` list of a video -> questions record.
    """
    if isinstance(obj, list):
        return obj
    if isinstance(obj, dict):
        lists = [
            k
            for k, v in obj.items()
            if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)
        ]
        if len(lists) == 1 and lists[0] not in NESTED_KEYS:
            return obj[lists[0]]
        if obj and all(isinstance(v, dict) for v in obj.values()):  # {id: record}
            return [{"__key__": k, **v} for k, v in obj.items()]
        return [obj]
    raise BenchmarkError(f"{path}: expected a JSON list of records, found a {type(obj).__name__}")


def _read_hub(name: str, split: str | None) -> list[dict[str, Any]]:
    repo, _, at_split = name.partition("@")
    split = split or at_split or "test"
    try:
        import datasets

        ds = datasets.load_dataset(repo, split=split)
    except Exception as exc:  # datasets raises many types (network, missing split, auth)
        raise BenchmarkError(
            f"cannot load dataset {repo!r} split {split!r}: {_first_line(exc)}"
        ) from None
    return [{**r, "__file__": repo, "__source__": repo} for r in ds]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def flatten_nested(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """Expand video -> questions records (Video-MME's template, LVBench) into one per question.

    A record holding a list of objects under ``questions`` or ``qa`` and no ``question`` of its own
    becomes one record per child: the parent's fields, then the child's (the child wins).

    Args:
        records: Raw records.

    Returns:
        ``(records, parents)``: flat records, and how many parents were expanded.
    """
    out: list[dict[str, Any]] = []
    parents = 0
    for rec in records:
        key = next(
            (
                k
                for k in NESTED_KEYS
                if isinstance(rec.get(k), list) and rec[k] and isinstance(rec[k][0], dict)
            ),
            None,
        )
        if key is None or "question" in rec:
            out.append(rec)
            continue
        parents += 1
        parent = {k: v for k, v in rec.items() if k != key}
        out.extend({**parent, **child} for child in rec[key] if isinstance(child, dict))
    return out, parents


# ---------------------------------------------------------------------------------------------
# Helpers shared by adapters
# ---------------------------------------------------------------------------------------------


def pick(rec: dict[str, Any], *names: str) -> Any:
    """The first present, non-None value among alternative field names (dots go into dicts).

    >>> pick({"solution": "B", "extra_info": {"problem_id": 7}}, "answer", "solution")
    'B'
    >>> pick({"extra_info": {"problem_id": 7}}, "problem_id", "extra_info.problem_id")
    7
    """
    for name in names:
        value: Any = rec
        for part in name.split("."):
            value = value.get(part) if isinstance(value, dict) else None
            if value is None:
                break
        if value is not None:
            return value
    return None


def record_fields(records: Iterable[dict[str, Any]], limit: int = 200) -> list[str]:
    """Field names seen in the first ``limit`` records (bookkeeping fields left out), sorted."""
    seen: set[str] = set()
    for i, rec in enumerate(records):
        if i >= limit:
            break
        seen.update(k for k in rec if not k.startswith("__"))
    return sorted(seen)


@dataclass(frozen=True)
class Spec:
    """The fields that tell one benchmark's records from another's.

    Attributes:
        fields: Required field groups; each group lists alternative names (any one will do).
        excludes: ``(field, benchmark)`` pairs: a record with that field belongs to the other
            benchmark (Video-MME-v2 records also carry every Video-MME field).
    """

    fields: tuple[tuple[str, ...], ...]
    excludes: tuple[tuple[str, str], ...] = ()

    def describe(self) -> str:
        """``question, options, answer, videoID|video_id``."""
        return ", ".join("|".join(group) for group in self.fields)

    def problem(self, records: list[dict[str, Any]]) -> str | None:
        """Why ``records`` (one file) are not this benchmark's, or None when they are.

        A field group counts as present when at least half of the records have one of its
        names (blank values count: a blank answer is a data defect, reported per row).
        """
        sample = records[:200]
        if not sample:
            return "no records"
        if all("__raw__" in r for r in sample):
            return "its records are not JSON objects"
        half = (len(sample) + 1) // 2
        missing = [
            "|".join(group)
            for group in self.fields
            if sum(any(pick(r, name) is not None for name in group) for r in sample) < half
        ]
        if missing:
            return f"missing {', '.join(missing)}"
        for name, other in self.excludes:
            if sum(name in r for r in sample) >= half:
                return f"has {name}, a {other} field"
        return None


Adapter = Callable[[dict[str, Any], int, Source], dict[str, Any]]


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: how its records are read, checked, mapped and headlined.

    Attributes:
        adapt: Record -> ``questions`` row.
        spec: Fields that identify its files (None: our own Parquet contract).
        read: Source -> raw records (default: ``read_records`` + nested layouts flattened).
        rows: Records -> rows, when ids depend on more than one record (MLVU task numbering).
        headline: ``group_by`` of the headline score (``overall``, MLVU ``macro``, ...).
    """

    adapt: Adapter
    spec: Spec | None = None
    read: Callable[[Source], list[dict[str, Any]]] | None = None
    rows: Callable[[list[dict[str, Any]], Source], list[dict[str, Any]]] | None = None
    headline: str = "overall"


def subtitle_candidates(src: Source, name: str) -> list[Path]:
    """Where a release keeps a subtitle file: ``subtitle(s)/<name>`` near the videos or the data."""
    data = Path(src.data).expanduser()
    roots = [r for r in (src.video_dir, data.parent, data.parent.parent) if r is not None]
    return [root / sub / name for root in roots for sub in ("subtitle", "subtitles")]


def question_row(
    source: Source,
    qa_id: str,
    *,
    errors: Iterable[str | None] = (),
    extra: dict[str, Any] | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """One row of the ``questions`` table (every adapter returns these).

    Args:
        source: The benchmark source (its name fills ``benchmark``).
        qa_id: Unique question id (``<benchmark>/<native id>``).
        errors: Problems found; the row's ``error`` joins the non-empty ones.
        extra: Benchmark-specific fields, stored as JSON.
        **fields: ``video_path``, ``question``, ``options``, ``answer``, ``format``, ``category``,
            ``duration_bucket``.

    Returns:
        A dict in the ``questions`` schema.
    """
    problems = [e for e in errors if e]
    extra = dict(extra or {})
    options = fields.get("options") or []
    same = duplicate_texts(options, option_labels(len(options), extra)) if options else None
    if same:  # kept as published (scored by label), but worth a note
        extra["warnings"] = [*extra.get("warnings", []), same]
    return {
        "qa_id": qa_id,
        "benchmark": source.benchmark,
        "video_path": fields.get("video_path") or "",
        "question": fields.get("question") or "",
        "options": fields.get("options") or [],
        "answer": fields.get("answer"),
        "format": fields.get("format") or "mc",
        "category": label_text(fields.get("category")),
        "duration_bucket": label_text(fields.get("duration_bucket")),
        "extra": json.dumps(extra, default=str, sort_keys=True),
        "error": "; ".join(problems) if problems else None,
    }


def label_text(value: Any) -> str | None:
    """A grouping label as text, whatever type the file gave (``["OCR", "Counting"]``, ``3``).

    >>> label_text(["OCR", "Counting"]), label_text(3), label_text(None)
    ('OCR, Counting', '3', None)
    """
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def resolve_video(
    video_dir: Path | None, name: str | None, subdirs: Iterable[str] = ()
) -> tuple[str, str | None]:
    """Find a benchmark video on disk.

    Tries ``name`` as given, then under ``video_dir`` and ``video_dir/<subdir>`` for each subdir,
    also with the usual extensions (either case) when ``name`` has none (Video-MME ids), and
    the same stem in another container when the named file is not there. The path returned is
    the file found, which the row then carries.

    Args:
        video_dir: Folder the benchmark's videos were extracted to.
        name: The record's video field (relative path, file name, or id).
        subdirs: Benchmark-specific subfolders to try.

    Returns:
        ``(path, error)``: the found path and None, or the first candidate and a reason.
    """
    if name is None or not str(name).strip():
        return "", "record has no video field"
    rel = Path(str(name).strip())
    # The named file first; then the same stem in the other containers and upper-case
    # extensions (a download tool's .mkv/.webm for a record's .mp4; a camera's .MP4).
    stem = rel.with_suffix("") if rel.suffix.lower() in VIDEO_EXTS else rel
    exts = [e for ext in VIDEO_EXTS for e in (ext, ext.upper())]
    names = [rel, *(Path(f"{stem}{ext}") for ext in exts if f"{stem}{ext}" != str(rel))]
    names = names if rel.suffix.lower() in VIDEO_EXTS else names[1:]
    bases = [Path()] if video_dir is None else [video_dir, *(video_dir / s for s in subdirs)]
    candidates = [n if n.is_absolute() else b / n for n in names for b in bases]
    if video_dir is not None:  # datasets sometimes keep a folder prefix the archive lacks
        candidates += [b / n.name for b in bases for n in names if n.name != str(n)]
    for cand in candidates:
        if cand.is_file():
            return str(cand), None
    where = str(video_dir) if video_dir else "the working directory (pass --video-dir)"
    return str(candidates[0]), f"video not found: {name} (looked under {where})"


def duration_bucket_from_seconds(seconds: float | None) -> str | None:
    """Generic duration buckets for sources that only give seconds.

    >>> duration_bucket_from_seconds(90.0), duration_bucket_from_seconds(3600.0)
    ('0-2min', '15min+')
    """
    if seconds is None or seconds != seconds:  # None or NaN
        return None
    if seconds < 120:
        return "0-2min"
    return "2-15min" if seconds < 900 else "15min+"


def as_list(value: Any) -> list[Any] | None:
    """A list from a list, an array, or a JSON-encoded list string; None otherwise."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except ValueError:
            return None
        return parsed if isinstance(parsed, list) else None
    if isinstance(value, dict):
        return None
    try:
        return list(value)
    except TypeError:
        return None
