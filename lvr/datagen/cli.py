"""``lvr datagen``: segment -> caption -> qa -> filter -> export, each a resumable stage.

Every stage command takes ``--config/--set/--show-config/--run`` and ``--shard i --num-shards n``
(machine ``i`` of ``n`` runs shards ``k`` with ``k % n == i``; see docs/datagen.md for Slurm).
Heavy modules are imported inside the commands so that ``lvr --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from lvr.cli_options import ConfigOpt, RunOpt, SetOpt, ShowOpt

app = typer.Typer(
    help=(
        "Turn folders of long videos into a LongVideo-Reason-style reasoning QA dataset: "
        "segment -> caption -> qa -> filter -> export (all resumable, all Parquet under --run)."
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
PassRatesOpt = typer.Option(
    None,
    "--pass-rates",
    help="pass_rates table (file or folder) from `lvr eval --passes K`; enables the difficulty rule.",
)


def _config(config: Path | None, sets: list[str] | None, show: bool) -> Any:
    from lvr.config import resolve_cli_config
    from lvr.datagen.config import DatagenConfig

    return resolve_cli_config(DatagenConfig, config, sets, show)


def _check_shard(shard: int, num_shards: int) -> None:
    from lvr.errors import LvrError

    if num_shards < 1 or not 0 <= shard < num_shards:
        raise LvrError(
            f"--shard must be in [0, --num-shards); got --shard {shard} --num-shards {num_shards}"
        )


def _report(name: str, result: Any) -> None:
    """One summary line per stage: shards run/skipped, rows and error rows per table."""
    tables = ", ".join(
        f"{t} {n} rows ({result.errors.get(t, 0)} errors)" for t, n in result.rows.items()
    )
    skipped = getattr(result, "shards_skipped", 0)
    typer.echo(
        f"{name}: {result.shards_run} shards run, {skipped} skipped; {tables} -> {result.stage_dir}"
    )


def _segment(cfg: Any, run: Path, shard: int, num_shards: int, quiet: bool) -> None:
    from lvr.datagen.segment import run_segment

    _report("segment", run_segment(cfg, run, shard, num_shards, progress=not quiet))


def _caption(cfg: Any, run: Path, shard: int, num_shards: int, quiet: bool, retry: bool) -> None:
    from lvr.datagen.caption import run_caption

    _report(
        "caption", run_caption(cfg, run, shard, num_shards, progress=not quiet, retry_errors=retry)
    )


def _qa(cfg: Any, run: Path, shard: int, num_shards: int, quiet: bool, retry: bool) -> None:
    from lvr.datagen.qa import run_qa

    _report("qa", run_qa(cfg, run, shard, num_shards, progress=not quiet, retry_errors=retry))


def _filter(cfg: Any, run: Path, pass_rates: Path | None) -> None:
    from lvr.datagen.filter import run_filter

    result = run_filter(run / "qa" / "qa_raw", run / "filter", cfg.filter, pass_rates=pass_rates)
    kept, rejected = result.rows.get("qa", 0), result.rows.get("qa_rejected", 0)
    note = " (outputs were current)" if getattr(result, "skipped", False) else ""
    typer.echo(f"filter: {kept} kept, {rejected} rejected{note} -> {result.stage_dir}")
    if result.by_rule:
        typer.echo("  by rule: " + ", ".join(f"{k} {v}" for k, v in sorted(result.by_rule.items())))


@app.command("segment")
def segment(
    config: Path | None = ConfigOpt, sets: list[str] | None = SetOpt, show: bool = ShowOpt, run: Path = RunOpt,
    shard: int = ShardOpt, num_shards: int = NumShardsOpt, quiet: bool = QuietOpt,
) -> None:  # fmt: skip
    """Probe every input video into `videos` and cut it into `clips` (fixed stride or shots)."""
    cfg = _config(config, sets, show)
    if cfg is not None:
        _check_shard(shard, num_shards)
        _segment(cfg, run, shard, num_shards, quiet)


@app.command("caption")
def caption(
    config: Path | None = ConfigOpt, sets: list[str] | None = SetOpt, show: bool = ShowOpt, run: Path = RunOpt,
    shard: int = ShardOpt, num_shards: int = NumShardsOpt, quiet: bool = QuietOpt, retry: bool = RetryOpt,
) -> None:  # fmt: skip
    """Caption every clip with a VLM (openai / hf) or import annotations."""
    cfg = _config(config, sets, show)
    if cfg is not None:
        _check_shard(shard, num_shards)
        _caption(cfg, run, shard, num_shards, quiet, retry)


@app.command("qa")
def qa(
    config: Path | None = ConfigOpt, sets: list[str] | None = SetOpt, show: bool = ShowOpt, run: Path = RunOpt,
    shard: int = ShardOpt, num_shards: int = NumShardsOpt, quiet: bool = QuietOpt, retry: bool = RetryOpt,
) -> None:  # fmt: skip
    """Write reasoning questions per video from its timestamped captions (LLM or template)."""
    cfg = _config(config, sets, show)
    if cfg is not None:
        _check_shard(shard, num_shards)
        _qa(cfg, run, shard, num_shards, quiet, retry)


@app.command("filter")
def filter_cmd(
    config: Path | None = ConfigOpt, sets: list[str] | None = SetOpt, show: bool = ShowOpt, run: Path = RunOpt,
    pass_rates: Path | None = PassRatesOpt,
) -> None:  # fmt: skip
    """Filter qa_raw into `qa` (sft / rl / eval splits) and `qa_rejected` (one job over all shards)."""
    cfg = _config(config, sets, show)
    if cfg is not None:
        _filter(cfg, run, pass_rates)


@app.command("export")
def export(
    run: Path = RunOpt,
    fmt: str = typer.Option("jsonl", "--format", help="jsonl (LongVideo-Reason records) or hf (datasets save_to_disk)."),
    split: str | None = typer.Option(None, "--split", help="jsonl: sft, rl or eval (default: every row)."),
    out: Path | None = typer.Option(None, "--out", help="Output file (jsonl) or folder (hf); default under <run>/export."),
    video_root: Path | None = typer.Option(None, "--video-root", help="Write video paths relative to this folder."),
) -> None:  # fmt: skip
    """Export the filtered questions as LongVideo-Reason JSONL or a Hugging Face dataset."""
    from lvr.datagen.export import export_hf, export_jsonl
    from lvr.errors import LvrError

    if fmt == "jsonl":
        target = out or run / "export" / f"{split or 'all'}.jsonl"
        n = export_jsonl(run / "filter", target, split, video_root=video_root)
        typer.echo(f"export: {n} records -> {target}")
    elif fmt == "hf":
        target = out or run / "export" / "hf"
        counts = export_hf(run / "filter", target, video_root=video_root)
        typer.echo(f"export: {counts} -> {target}")
    else:
        raise LvrError(f"--format must be jsonl or hf, got {fmt!r}")


@app.command("run")
def run_all(
    config: Path | None = ConfigOpt, sets: list[str] | None = SetOpt, show: bool = ShowOpt, run: Path = RunOpt,
    shard: int = ShardOpt, num_shards: int = NumShardsOpt, quiet: bool = QuietOpt, retry: bool = RetryOpt,
    pass_rates: Path | None = PassRatesOpt,
) -> None:  # fmt: skip
    """Run segment, caption, qa and filter in order (filter only when this machine holds every shard)."""
    cfg = _config(config, sets, show)
    if cfg is None:
        return
    _check_shard(shard, num_shards)
    _segment(cfg, run, shard, num_shards, quiet)
    _caption(cfg, run, shard, num_shards, quiet, retry)
    _qa(cfg, run, shard, num_shards, quiet, retry)
    if num_shards == 1:
        _filter(cfg, run, pass_rates)
    else:
        typer.echo(
            f"filter: not run on a shard; once all {num_shards} machines are done: lvr datagen filter --run {run} ..."
        )
