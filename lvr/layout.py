"""The run folder: ONE object owns every path of a run; nothing else joins stage or table names.

A run folder holds one folder per table, named after the table (what ``lvr inspect --sql`` calls
it), the bookkeeping of the sharded stages, and the training, evaluation and cache folders::

    runs/<run>/
      videos/ clips/            segment: one row per input video / per clip   (00000.parquet ...)
      captions/                 caption: one row per clip
      qa_raw/                   qa: every generated question, failures as error rows
      qa/ qa_rejected/          filter: the kept questions with their split / the rejected, why
      pass_rates/               eval --passes K: per-question pass rates (filter input)
      _stages/<stage>/          _done/<shard>.json completion markers, manifest*.json
      inputs/                   rendered synthetic input videos (``input.synthetic``)
      clip_files/               clip files (``segment.write_clips``, see ``lvr.datagen.clip_files``)
      cache/                    model-call caches (requests*.sqlite, judge), embedding caches
      models/                   models built for the run (the tiny offline VLMs)
      sft/ rl/                  checkpoint-NNNNNN/, metrics.jsonl/.parquet, manifest.json
      eval/<name>/              questions/ predictions/ scores/ manifest.json, report.md
      export/                   JSONL / HF dataset exports

Runs written before this layout (stage folders ``segment/``, ``caption/``, ``qa/qa_raw``,
``filter/qa``) are recognised: `check_layout` names the one command that moves them
(``lvr datagen migrate --run R``), and `migrate` does the moves (the command also gives old
``captions`` shards the columns they gained and rewrites old empty shards without their empty row
group: ``lvr.datagen.migrate``). Files that the tables
name by path (``synthetic_videos/``, ``segment/clip_files/``) stay where they are:
`RunLayout.inputs` and `RunLayout.clip_files` resolve to them in such a run, so its rows stay
valid and nothing reruns.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from lvr.errors import LvrError

# The table each sharded datagen stage writes, in pipeline order.
STAGE_TABLES: dict[str, tuple[str, ...]] = {
    "segment": ("videos", "clips"),
    "caption": ("captions",),
    "qa": ("qa_raw",),
    "filter": ("qa", "qa_rejected"),
}


def shard_name(index: int) -> str:
    """The file stem of shard ``index`` (``00003``): sorted names are shard order."""
    return f"{index:05d}"


class LayoutError(LvrError):
    """A run folder that lvr cannot read as it is (an older layout, a wrong path)."""


@dataclass(frozen=True)
class EvalRunLayout:
    """One evaluation (``eval/<benchmark>-<model>-f<frames>/``): its tables and manifest."""

    root: Path

    @property
    def questions(self) -> Path:
        return self.root / "questions"

    @property
    def predictions(self) -> Path:
        return self.root / "predictions"

    @property
    def scores(self) -> Path:
        return self.root / "scores"

    @property
    def pass_rates(self) -> Path:
        return self.root / "pass_rates"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"


@dataclass(frozen=True)
class RunLayout:
    """Every path of one run folder (``RunLayout(run).qa``, ``.stage("segment")``, ``.rl``...)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # Tables -----------------------------------------------------------------------------------

    def table(self, name: str) -> Path:
        """The folder of table ``name`` (sharded Parquet files ``00000.parquet``...)."""
        return self.root / name

    def shard_file(self, table: str, index: int) -> Path:
        """Shard ``index`` of a table: ``<table>/00003.parquet``."""
        return self.table(table) / f"{shard_name(index)}.parquet"

    @property
    def videos(self) -> Path:
        return self.table("videos")

    @property
    def clips(self) -> Path:
        return self.table("clips")

    @property
    def captions(self) -> Path:
        return self.table("captions")

    @property
    def qa_raw(self) -> Path:
        return self.table("qa_raw")

    @property
    def qa(self) -> Path:
        return self.table("qa")

    @property
    def qa_rejected(self) -> Path:
        return self.table("qa_rejected")

    @property
    def pass_rates(self) -> Path:
        return self.table("pass_rates")

    # Stage bookkeeping ------------------------------------------------------------------------

    def stage(self, name: str) -> Path:
        """Markers (``_done/``) and manifests of a sharded stage."""
        return self.root / "_stages" / name

    def done(self, stage: str) -> Path:
        """Completion markers of a stage: ``_done/<shard>.json``, one per finished shard."""
        return self.stage(stage) / "_done"

    def manifest(self, stage: str, name: str = "manifest.json") -> Path:
        """A manifest of a stage (``manifest.<i>-of-<n>.json`` for machine i of n)."""
        return self.stage(stage) / name

    def stage_manifests(self) -> list[Path]:
        """Every manifest present under ``_stages/``, the datagen stages first in pipeline order."""
        folder = self.root / "_stages"
        names = [d.name for d in folder.iterdir() if d.is_dir()] if folder.is_dir() else []
        order = [s for s in STAGE_TABLES if s in names] + sorted(set(names) - set(STAGE_TABLES))
        return [m for name in order for m in sorted(self.stage(name).glob("manifest*.json"))]

    # Inputs, caches, models -------------------------------------------------------------------

    @property
    def inputs(self) -> Path:
        """Rendered synthetic videos (``synthetic_videos/`` in a run migrated from before)."""
        return self._kept_legacy(self.root / "inputs", self.root / "synthetic_videos")

    @property
    def clip_files(self) -> Path:
        """Clip files of ``segment.write_clips`` (``segment/clip_files/`` in a migrated run)."""
        return self._kept_legacy(self.root / "clip_files", self.root / "segment" / "clip_files")

    @staticmethod
    def _kept_legacy(current: Path, legacy: Path) -> Path:
        """``legacy`` while only it exists: its files are named by the rows of a migrated run."""
        return legacy if legacy.is_dir() and not current.exists() else current

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    def request_cache(self, shard: int = 0, num_shards: int = 1, worker: str = "") -> Path:
        """The model-call cache of this machine (SQLite: one writer per file).

        The names are those of runs written before `RunLayout`, so their cached calls stay hits;
        lookups also read the other ``requests*.sqlite`` files of the folder, so a rerun with
        another number of shards reuses every answer (`lvr.backends.cache`). A worker of a
        distributed executor names its own file (``worker="ray3"``: ``requests-ray3.sqlite``).
        """
        if worker:
            return self.cache / f"requests-{worker}.sqlite"
        suffix = "" if num_shards == 1 else f"-{shard}of{num_shards}"
        return self.cache / f"requests{suffix}.sqlite"

    @property
    def judge_cache(self) -> Path:
        return self.cache / "judge.sqlite"

    @property
    def models(self) -> Path:
        return self.root / "models"

    def tiny_model(self, family: str = "qwen2_5_vl") -> Path:
        """Where a run builds its tiny offline VLM (`model.path=tiny[:family]`)."""
        return self.models / ("tiny-vlm" if family == "qwen2_5_vl" else f"tiny-{family}")

    # Training, evaluation, export -------------------------------------------------------------

    @property
    def sft(self) -> Path:
        return self.root / "sft"

    @property
    def rl(self) -> Path:
        return self.root / "rl"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    def eval_run(self, name: str) -> EvalRunLayout:
        return EvalRunLayout(self.eval / name)

    @property
    def report(self) -> Path:
        return self.eval / "report.md"

    @property
    def export(self) -> Path:
        return self.root / "export"


# ---------------------------------------------------------------------------------------------
# Runs written before this layout
# ---------------------------------------------------------------------------------------------

# (old path, new path) relative to the run, in an order where no move lands on a folder that a
# later move still has to read (the old stage folder qa/ is emptied before the table qa arrives).
_MOVES: tuple[tuple[str, str], ...] = (
    ("segment/videos", "videos"),
    ("segment/clips", "clips"),
    ("segment/_done", "_stages/segment/_done"),
    ("caption/captions", "captions"),
    ("caption/_done", "_stages/caption/_done"),
    ("qa/qa_raw", "qa_raw"),
    ("qa/_done", "_stages/qa/_done"),
    ("filter/qa_rejected", "qa_rejected"),
    ("filter/_done", "_stages/filter/_done"),
)
_OLD_STAGES = ("segment", "caption", "qa", "filter")


def old_layout_paths(root: Path) -> list[Path]:
    """Folders of the layout before `RunLayout` that still exist under ``root``."""
    marks = ["segment/clips", "caption/captions", "qa/qa_raw", "filter/qa"]
    return [root / m for m in marks if (root / m).is_dir()]


def check_layout(root: str | Path) -> RunLayout:
    """The layout of ``root``; a run in the older layout is a one-line error naming the migration.

    Raises:
        LayoutError: ``root`` is a file, or holds stage folders of the layout before `RunLayout`.
    """
    layout = RunLayout(Path(root))
    # The run or the nearest existing folder above it (a stage creates the rest) must be a folder.
    existing = next((p for p in (layout.root, *layout.root.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise LayoutError(
            f"--run {layout.root}: {existing} is a file, not a run folder: pass a folder, e.g. "
            "runs/<name>"
        )
    old = old_layout_paths(layout.root)
    if old:
        raise LayoutError(
            f"{layout.root} was written by an older lvr (stage folders such as {old[0]}); move it "
            f"to the current layout with `lvr datagen migrate --run {layout.root}`"
        )
    return layout


def migrate(root: str | Path) -> list[tuple[Path, Path]]:
    """Move a run of the older layout into the current one; returns the moves made.

    Tables, markers and manifests keep their contents (the Parquet files do not change), so
    finished shards stay finished and every stage resumes.

    Raises:
        LayoutError: A destination already exists (the run is partly migrated by hand).
    """
    layout = RunLayout(Path(root))
    moves: list[tuple[Path, Path]] = []
    for old, new in _MOVES:
        src, dst = layout.root / old, layout.root / new
        if not src.exists():
            continue
        if dst.exists():
            raise LayoutError(f"cannot move {src} to {dst}: it already exists; move it by hand")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(src), str(dst))
        moves.append((src, dst))
    for stage in _OLD_STAGES:  # manifests, then the emptied stage folders
        folder = layout.root / stage
        for manifest in sorted(folder.glob("manifest*.json")) if folder.is_dir() else []:
            dst = layout.stage(stage) / manifest.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(manifest), str(dst))
            moves.append((manifest, dst))
    for stage in ("segment", "caption", "qa"):
        folder = layout.root / stage
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    old_qa = layout.root / "filter" / "qa"  # the table qa: its folder name is free only now
    if old_qa.is_dir():
        if layout.qa.exists():
            raise LayoutError(f"cannot move {old_qa} to {layout.qa}: it already exists")
        shutil.move(str(old_qa), str(layout.qa))
        moves.append((old_qa, layout.qa))
    filter_dir = layout.root / "filter"
    if filter_dir.is_dir() and not any(filter_dir.iterdir()):
        filter_dir.rmdir()
    return moves
