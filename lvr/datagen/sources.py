"""Where the videos come from: a folder, a glob, a list file, a Parquet column or a ``datasets`` column.

``resolve_inputs`` turns ``input.source`` into a sorted list of :class:`InputFile`. Files whose
extension is a video extension are probed later; other files found while walking a folder are
either ignored by name (``input.ignore_extensions``: sidecars, subtitles, annotation tables, counted
in the log line) or reported as error rows (``kind="other"``), never skipped silently. Paths named
explicitly (list file, Parquet, dataset) are all treated as videos: the user said they are.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from lvr.datagen.synthetic import make_videos
from lvr.errors import LvrError
from lvr.stages import progress_bar

VIDEO_EXTENSIONS = [
    ".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v", ".ts", ".mts", ".m2ts", ".flv", ".mpg",
    ".mpeg", ".wmv", ".3gp", ".ogv",
]  # fmt: skip
IGNORE_EXTENSIONS = [
    ".json", ".jsonl", ".csv", ".tsv", ".parquet", ".txt", ".md", ".srt", ".vtt", ".ass", ".nfo",
    ".yaml", ".yml",
]  # fmt: skip
_LIST_SUFFIXES = {".txt", ".lst", ".list", ".tsv"}


class InputError(LvrError):
    """``input.source`` does not exist, is empty, or cannot be read."""


@dataclass
class SyntheticInput:
    """Render synthetic videos as the input (demo and tests; section ``input.synthetic``).

    Attributes:
        videos: Number of videos to render (0 = off). They go to ``input.source`` (default
            ``<run>/inputs``) with their sidecars, and are reused when already there. lvr renders
            only into a folder it owns: a new or empty one, or one it rendered into before
            (marked by ``.lvr-synthetic``); a folder holding other files is refused.
        duration_s: Length of each video.
        width: Frame width.
        height: Frame height.
        fps: Frame rate.
        seed: Base seed (video ``i`` uses ``seed * 100003 + i``).
    """

    videos: int = 0
    duration_s: float = 20.0
    width: int = 160
    height: int = 120
    fps: float = 24.0
    seed: int = 0


@dataclass
class InputConfig:
    """Which videos to process (section ``input``).

    Attributes:
        source: A folder (walked recursively), a glob (``data/**/*.mp4``), a text file with one
            path per line (``#`` comments allowed), a ``.parquet`` file, or a folder written by
            ``datasets.Dataset.save_to_disk``.
        column: Column holding the video paths (Parquet / datasets sources).
        split: Split to read when a datasets folder holds a ``DatasetDict``.
        root: Base folder for relative paths in list/Parquet/datasets sources (default: the folder
            of the list or Parquet file; the current directory for datasets).
        extensions: File extensions that count as video when walking folders/globs (``mp4`` and
            ``.MP4`` both mean ``.mp4``).
        ignore_extensions: Extensions of companion files (sidecars, subtitles) that folder walks skip.
        synthetic: Render synthetic videos first (``input.synthetic.videos > 0``).
    """

    source: str = ""
    column: str = "path"
    split: str = "train"
    root: str = ""
    extensions: list[str] = field(default_factory=lambda: list(VIDEO_EXTENSIONS))
    ignore_extensions: list[str] = field(default_factory=lambda: list(IGNORE_EXTENSIONS))
    synthetic: SyntheticInput = field(default_factory=SyntheticInput)

    def __post_init__(self) -> None:
        # `[mp4, MOV]` means `.mp4` and `.mov`: kept as written, every video was an error row
        # "extension .mp4 is not in input.extensions".
        self.extensions = [_dotted(e) for e in self.extensions]
        self.ignore_extensions = [_dotted(e) for e in self.ignore_extensions]


def _dotted(ext: str) -> str:
    """An extension as the folder walk compares it: lower case with its leading dot.

    >>> _dotted("MP4"), _dotted(".mkv")
    ('.mp4', '.mkv')
    """
    return "." + ext.strip().lstrip(".").lower()


@dataclass(frozen=True)
class InputFile:
    """One input path and whether it is a video candidate (``video``) or a stray file (``other``)."""

    path: str
    kind: str  # video | other


@dataclass
class Resolved:
    """The resolved inputs and how many companion files a folder walk skipped."""

    files: list[InputFile]
    ignored: int = 0


def resolve_inputs(cfg: InputConfig) -> Resolved:
    """List the inputs named by ``cfg.source``.

    Args:
        cfg: The ``input`` section.

    Returns:
        Files sorted by path (duplicates removed), plus the count of ignored companion files.

    Raises:
        InputError: Missing/unreadable source, unknown column, or no file at all.
    """
    src = cfg.source.strip()
    if not src:
        raise InputError("input.source is empty; set it to a folder, glob, list file or .parquet")
    exts = {e.lower() for e in cfg.extensions}
    ignore = {e.lower() for e in cfg.ignore_extensions}
    if any(ch in src for ch in "*?[") and not Path(src).exists():
        res = _classify(sorted(glob.glob(src, recursive=True)), exts, ignore)
    else:
        path = Path(src)
        if not path.exists():
            raise InputError(f"input.source {src} does not exist")
        if path.is_dir() and _is_datasets_dir(path):
            res = Resolved(_explicit(_read_datasets(path, cfg), Path(cfg.root or ".")))
        elif path.is_dir():
            res = _classify(_walk(path), exts, ignore)
        elif path.suffix.lower() == ".parquet":
            res = Resolved(
                _explicit(_read_parquet(path, cfg.column), Path(cfg.root or path.parent))
            )
        elif path.suffix.lower() in exts:
            res = Resolved([InputFile(str(path), "video")])
        elif path.suffix.lower() in _LIST_SUFFIXES:
            res = Resolved(_explicit(_read_list(path), Path(cfg.root or path.parent)))
        else:
            raise InputError(
                f"input.source {src}: cannot tell how to read a '{path.suffix}' file; use a folder, "
                f"a glob, a .txt list, a .parquet file or a video ({', '.join(sorted(exts))})"
            )
    if not res.files:
        raise InputError(
            f"input.source {src} holds no files (ignored companion files: {res.ignored})"
        )
    return res


SYNTHETIC_MARK = ".lvr-synthetic"  # written into every folder synthetic videos are rendered into
_SYNTHETIC_NAME = re.compile(r"synth_s\d+_\d{4}\.(mp4|json)")


def render_synthetic(
    cfg: InputConfig, default_folder: Path, progress: bool = False, console: Any = None
) -> str:
    """Render ``cfg.synthetic.videos`` synthetic videos (cached) and return the folder holding them.

    They go to ``cfg.source`` when set, else to ``default_folder`` (the run's ``inputs/``). The
    folder must be one lvr owns (see :func:`claim_synthetic_folder`).

    Raises:
        InputError: The folder is a file, cannot be created, or holds files lvr did not render.
    """
    syn = cfg.synthetic
    folder = Path(cfg.source) if cfg.source else Path(default_folder)
    claim_synthetic_folder(folder)
    with progress_bar(progress, console) as bar:
        task = bar.add_task("render synthetic videos", total=syn.videos)
        # One encoder thread: x264 with 2 threads produced different bytes across runs under
        # load, and video ids are content hashes.
        make_videos(folder, syn.videos, seed=syn.seed, duration_s=syn.duration_s, width=syn.width,
                    height=syn.height, fps=syn.fps, encoder_threads=1,
                    on_video=lambda _: bar.advance(task))  # fmt: skip
    return str(folder)


def claim_synthetic_folder(folder: Path) -> None:
    """Make ``folder`` a synthetic-video folder lvr owns, or refuse it in one line.

    Owned: new (created here), empty, marked by :data:`SYNTHETIC_MARK`, or holding only files
    named like lvr's synthetic videos and sidecars (a folder of an lvr that wrote no mark).
    """
    hint = "set input.synthetic.videos=0 to use them, or point input.source at an empty folder"
    if folder.exists() and not folder.is_dir():
        raise InputError(
            f"input.source {folder} is a file; synthetic videos need a folder ({hint})"
        )
    if folder.is_dir() and not (folder / SYNTHETIC_MARK).is_file():
        foreign = [
            p.name
            for p in folder.iterdir()
            if not p.name.startswith(".") and not _SYNTHETIC_NAME.fullmatch(p.name)
        ]
        if foreign:
            raise InputError(
                f"input.source {folder} holds files lvr did not render (e.g. {sorted(foreign)[0]}): "
                f"{hint}"
            )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / SYNTHETIC_MARK).write_text(
            "lvr renders synthetic videos into this folder (input.synthetic); "
            "delete this file only together with the videos\n"
        )
    except OSError as exc:
        raise InputError(
            f"input.source {folder}: cannot create the synthetic video folder ({exc.strerror})"
        ) from None


def _walk(folder: Path) -> list[str]:
    """Every non-hidden file below ``folder`` (hidden names are temp files, .git and the like)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [os.path.join(dirpath, f) for f in filenames if not f.startswith(".")]
    return sorted(out)


def _classify(paths: list[str], exts: set[str], ignore: set[str]) -> Resolved:
    files, ignored = [], 0
    for p in paths:
        if os.path.isdir(p):
            continue
        suffix = Path(p).suffix.lower()
        if suffix in exts:
            files.append(InputFile(p, "video"))
        elif suffix in ignore:
            ignored += 1
        else:
            files.append(InputFile(p, "other"))
    return Resolved(files, ignored)


def _explicit(paths: list[str], root: Path) -> list[InputFile]:
    out = {}
    for p in paths:
        full = Path(p) if os.path.isabs(p) else root / p
        out[str(full)] = InputFile(str(full), "video")
    return [out[k] for k in sorted(out)]


def _read_list(path: Path) -> list[str]:
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read list file {path}: {exc}") from None
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def _column(values: list[object], column: str, where: str) -> list[str]:
    bad = [v for v in values if not isinstance(v, str) or not v.strip()]
    if bad:
        raise InputError(
            f"{where}: column '{column}' has {len(bad)} non-path values, e.g. {bad[0]!r}"
        )
    return [str(v).strip() for v in values]


def _read_parquet(path: Path, column: str) -> list[str]:
    try:
        schema = pq.read_schema(path)
    except OSError as exc:
        raise InputError(f"cannot read Parquet file {path}: {exc}") from None
    if column not in schema.names:
        raise InputError(f"{path} has no column '{column}' (input.column); columns: {schema.names}")
    values = pq.read_table(path, columns=[column]).column(column).to_pylist()
    return _column(values, column, str(path))


def _is_datasets_dir(path: Path) -> bool:
    return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()


def _read_datasets(path: Path, cfg: InputConfig) -> list[str]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if cfg.split not in ds:
            raise InputError(f"{path} has no split '{cfg.split}' (input.split); splits: {list(ds)}")
        ds = ds[cfg.split]
    if cfg.column not in ds.column_names:
        raise InputError(
            f"{path} has no column '{cfg.column}' (input.column); columns: {ds.column_names}"
        )
    return _column(list(ds[cfg.column]), cfg.column, str(path))
