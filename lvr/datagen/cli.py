"""``lvr datagen``: segment -> caption -> qa -> filter -> export, each a resumable stage.

Every stage command takes ``--config/--set/--show-config/--run`` and ``--shard i --num-shards n``
(machine ``i`` of ``n`` runs shards ``k`` with ``k % n == i``; see docs/datagen.md for Slurm), or
``--executor ray`` (every shard of the job pulled from one queue by Ray workers, ``--address`` for
a running cluster). A run folder of an older lvr is refused with the one line naming
``lvr datagen migrate``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer

from lvr.artifacts import read_table
from lvr.cli_options import ConfigOpt, DatagenSetOpt, RunOpt, ShowOpt
from lvr.config import resolve_cli_config
from lvr.datagen import caption, qa, segment
from lvr.datagen.config import DatagenConfig
from lvr.datagen.export import export_hf, export_jsonl
from lvr.datagen.filter import check_filter, run_filter
from lvr.datagen.migrate import migrate_run
from lvr.datagen.ray_executor import RayExecutor
from lvr.datagen.runner import DatagenStage, Executor, check_stages, run_datagen_stage
from lvr.errors import LvrError
from lvr.layout import RunLayout, check_layout
from lvr.reasons import summarize_errors
from lvr.stages import StageResult

app = typer.Typer(
    help=(
        "Turn folders of long videos into a LongVideo-Reason-style reasoning QA dataset: "
        "segment -> caption -> qa -> filter -> export (all resumable, one Parquet folder per "
        "table under --run). A new video domain is a YAML config (clip lengths, caption prompt, "
        "question categories, model endpoints): copy configs/datagen/sports.yaml, see "
        "docs/datagen.md 'Adding a domain'; `lvr datagen run --config F --show-config` prints "
        "every key, and `run` checks prompts and model settings before any work."
    ),
    no_args_is_help=True,
)

ShardOpt = typer.Option(0, "--shard", help="This machine's shard index i (0-based).")
NumShardsOpt = typer.Option(1, "--num-shards", help="Number of machines n sharing the work.")
RetryOpt = typer.Option(
    True,
    "--retry-errors/--no-retry-errors",
    help="Redo finished shards that hold error rows (cached rows are free).",
)
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bars.")
ExecutorOpt = typer.Option(
    "local",
    "--executor",
    help="local: this machine's shards, here. ray: every shard of the job, pulled from one queue "
    "by Ray workers (one request budget for all; needs the `ray` extra).",
)
AddressOpt = typer.Option(
    None,
    "--address",
    help="--executor ray: a running Ray cluster (default: a local Ray for this run).",
)
WorkersOpt = typer.Option(
    0, "--workers", help="--executor ray: shard workers at once (default: the cluster's CPUs)."
)
PassRatesOpt = typer.Option(
    None,
    "--pass-rates",
    help="pass_rates table (file or folder) from `lvr eval --passes K`; enables the difficulty rule.",
)


def _config(config: Path | None, sets: list[str] | None, show: bool) -> DatagenConfig | None:
    return resolve_cli_config(DatagenConfig, config, sets, show)


def _check_shard(shard: int, num_shards: int) -> None:
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise LvrError(
            f"--shard must be in [0, --num-shards); got --shard {shard} --num-shards {num_shards}"
        )


@contextmanager
def _executor(
    kind: str, address: str | None, workers: int, shard: int, num_shards: int
) -> Iterator[Executor | None]:
    """The executor of ``--executor`` for the commands it wraps (a local Ray stops after them)."""
    _check_shard(shard, num_shards)
    if kind == "local":
        if address or workers:
            raise LvrError("--address and --workers go with --executor ray")
        yield None
        return
    if kind != "ray":
        raise LvrError(f"--executor must be local or ray, got {kind!r}")
    if num_shards != 1:
        raise LvrError("--executor ray runs every shard of the job from one queue: drop "
                       "--shard/--num-shards (they are for machines that cannot talk to each other)")  # fmt: skip
    with RayExecutor(address=address, workers=workers) as ray_executor:
        yield ray_executor


def _run(
    stage: DatagenStage[Any], cfg: DatagenConfig, layout: RunLayout, shard: int, num_shards: int,
    quiet: bool, retry: bool = True, executor: Executor | None = None,
) -> None:  # fmt: skip
    """Run one sharded stage and print its summary: shards run/skipped, rows and error rows."""
    result = run_datagen_stage(stage, cfg, layout, shard, num_shards, not quiet, retry, executor)
    tables = ", ".join(
        f"{t} {n} rows ({result.errors.get(t, 0)} errors)" for t, n in result.rows.items()
    )
    typer.echo(
        f"{stage.name}: {result.shards_run} shards run, {result.shards_skipped} skipped; {tables} "
        f"in {layout.root}"
    )
    _check_usable(stage, layout, result)


class NothingUsableError(LvrError):
    """A stage ran but every row it wrote is an error row: the next stage would have nothing."""


def _check_usable(stage: DatagenStage[Any], layout: RunLayout, result: StageResult) -> None:
    """Stop (non-zero exit) when a stage that had work wrote no row without an error.

    Partial failures stay error rows (rerun retries them); a stage whose every row failed stops
    the chain with the commonest reasons, so a dead endpoint or a wrong input list is never a
    successful run with an empty dataset.
    """
    out = stage.tables[-1]
    if result.shards_total == 0 or result.rows.get(out, 0) > result.errors.get(out, 0):
        return
    messages: list[str | None] = []
    for table in stage.tables:
        try:
            messages += read_table(layout.table(table), table).column("error").to_pylist()
        except (FileNotFoundError, LvrError, KeyError):
            continue
    why = summarize_errors(messages) if any(messages) else "no rows at all"
    raise NothingUsableError(
        f"{stage.name}: no usable {out} row ({result.rows.get(out, 0)} rows, all errors): {why}; "
        f"fix the cause and rerun (error rows are retried), or `lvr inspect {layout.root}`"
    )


def _stage_command(
    stages: Sequence[DatagenStage[Any]], config: Path | None, sets: list[str] | None, show: bool,
    run: Path, shard: int, num_shards: int, quiet: bool, retry: bool, executor: str,
    address: str | None, workers: int, check_after: Callable[[DatagenConfig], None] | None = None,
) -> tuple[DatagenConfig, RunLayout] | None:  # fmt: skip
    """Run ``stages`` in order on one executor; None when only the config was shown.

    ``check_after`` checks the settings of what runs after ``stages`` (``run``: the filter).
    """
    cfg = _config(config, sets, show)
    if cfg is None:
        return None
    layout = check_layout(run)
    check_stages(stages, cfg)  # a bad qa setting stops `run` now, not after segment and caption
    if check_after is not None:
        check_after(cfg)
    with _executor(executor, address, workers, shard, num_shards) as ex:
        for stage in stages:
            _run(stage, cfg, layout, shard, num_shards, quiet, retry, ex)
    return cfg, layout


def _filter(cfg: DatagenConfig, layout: RunLayout, pass_rates: Path | None) -> None:
    result = run_filter(layout, cfg.filter, pass_rates=pass_rates)
    kept, rejected = result.rows.get("qa", 0), result.rows.get("qa_rejected", 0)
    note = " (outputs were current)" if result.skipped else ""
    typer.echo(f"filter: {kept} kept, {rejected} rejected{note} -> {layout.qa}")
    by_rule = ", ".join(f"{k} {v}" for k, v in sorted(result.by_rule.items()))
    if result.by_rule:
        typer.echo("  by rule: " + by_rule)
    if kept == 0:
        raise NothingUsableError(
            f"filter: 0 questions kept of {kept + rejected} ({by_rule or 'no qa_raw rows'}); "
            f"loosen the filter.* rule that rejects them or check qa_raw with `lvr inspect {layout.root}`"
        )


@app.command("segment")
def segment_cmd(
    config: Path | None = ConfigOpt, sets: list[str] | None = DatagenSetOpt, show: bool = ShowOpt, run: Path = RunOpt,
    shard: int = ShardOpt, num_shards: int = NumShardsOpt, quiet: bool = QuietOpt,
    executor: str = ExecutorOpt, address: str | None = AddressOpt, workers: int = WorkersOpt,
) -> None:  # fmt: skip
    """Probe every input video into `videos` and cut it into `clips` (fixed stride or shots)."""
    _stage_command([segment.STAGE], config, sets, show, run, shard, num_shards, quiet, True,
                   executor, address, workers)  # fmt: skip


@app.command("caption")
def caption_cmd(
    config: Path | None = ConfigOpt, sets: list[str] | None = DatagenSetOpt, show: bool = ShowOpt, run: Path = RunOpt,
    shard: int = ShardOpt, num_shards: int = NumShardsOpt, quiet: bool = QuietOpt, retry: bool = RetryOpt,
    executor: str = ExecutorOpt, address: str | None = AddressOpt, workers: int = WorkersOpt,
) -> None:  # fmt: skip
    """Caption every clip with a VLM (openai / hf) or import annotations."""
    _stage_command([caption.STAGE], config, sets, show, run, shard, num_shards, quiet, retry,
                   executor, address, workers)  # fmt: skip


@app.command("qa")
def qa_cmd(
    config: Path | None = ConfigOpt, sets: list[str] | None = DatagenSetOpt, show: bool = ShowOpt, run: Path = RunOpt,
    shard: int = ShardOpt, num_shards: int = NumShardsOpt, quiet: bool = QuietOpt, retry: bool = RetryOpt,
    executor: str = ExecutorOpt, address: str | None = AddressOpt, workers: int = WorkersOpt,
) -> None:  # fmt: skip
    """Write reasoning questions per video from its timestamped captions (LLM or template)."""
    _stage_command([qa.STAGE], config, sets, show, run, shard, num_shards, quiet, retry,
                   executor, address, workers)  # fmt: skip


@app.command("filter")
def filter_cmd(
    config: Path | None = ConfigOpt, sets: list[str] | None = DatagenSetOpt, show: bool = ShowOpt, run: Path = RunOpt,
    pass_rates: Path | None = PassRatesOpt,
) -> None:  # fmt: skip
    """Filter qa_raw into `qa` (sft / rl / eval splits) and `qa_rejected` (one job over all shards)."""
    cfg = _config(config, sets, show)
    if cfg is not None:
        _filter(cfg, check_layout(run), pass_rates)


@app.command("export")
def export(
    run: Path = RunOpt,
    fmt: str = typer.Option("jsonl", "--format", help="jsonl (LongVideo-Reason records) or hf (datasets save_to_disk)."),
    split: str | None = typer.Option(None, "--split", help="sft, rl or eval (default: every row; hf: every split)."),
    out: Path | None = typer.Option(
        None, "--out",
        help="Output file (jsonl) or folder (hf); default under <run>/export. Only a previous export "
        "of the same format is replaced (hf: a folder holding dataset_dict.json, replaced as a "
        "whole; jsonl: a file of records); a new or empty target is fine, anything else is refused.",
    ),
    video_root: Path | None = typer.Option(None, "--video-root", help="Write video paths relative to this folder."),
) -> None:  # fmt: skip
    """Export the filtered questions as LongVideo-Reason JSONL or a Hugging Face dataset."""
    layout = check_layout(run)
    if fmt == "jsonl":
        target = out or layout.export / f"{split or 'all'}.jsonl"
        n = export_jsonl(layout, target, split, video_root=video_root)
        typer.echo(f"export: {n} records -> {target}")
    elif fmt == "hf":
        target = out or layout.export / "hf"
        counts = export_hf(layout, target, video_root=video_root, split=split)
        typer.echo(f"export: {counts} -> {target}")
    else:
        raise LvrError(f"--format must be jsonl or hf, got {fmt!r}")


@app.command("run")
def run_all(
    config: Path | None = ConfigOpt, sets: list[str] | None = DatagenSetOpt, show: bool = ShowOpt, run: Path = RunOpt,
    shard: int = ShardOpt, num_shards: int = NumShardsOpt, quiet: bool = QuietOpt, retry: bool = RetryOpt,
    pass_rates: Path | None = PassRatesOpt, executor: str = ExecutorOpt,
    address: str | None = AddressOpt, workers: int = WorkersOpt,
) -> None:  # fmt: skip
    """Run segment, caption, qa and filter in order (filter only when this machine holds every shard)."""

    def filter_check(cfg: DatagenConfig) -> None:
        if num_shards == 1:  # the filter runs at the end of this command
            check_filter(cfg.filter, pass_rates)

    done = _stage_command([segment.STAGE, caption.STAGE, qa.STAGE], config, sets, show, run,
                          shard, num_shards, quiet, retry, executor, address, workers,
                          filter_check)  # fmt: skip
    if done is None:
        return
    cfg, layout = done
    if num_shards == 1:
        _filter(cfg, layout, pass_rates)
    else:
        typer.echo(
            f"filter: not run on a shard; once all {num_shards} machines are done: lvr datagen filter --run {run} ..."
        )


@app.command("migrate")
def migrate_cmd(run: Path = RunOpt) -> None:
    """Move a run folder written by an older lvr into the current layout (rows stay as they are)."""
    lines = migrate_run(run)
    for line in lines:
        typer.echo(line)
    typer.echo(
        f"migrate: {len(lines)} changes; {run} is in the current layout"
        if lines
        else f"migrate: nothing to do; {run} is in the current layout"
    )
