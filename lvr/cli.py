"""The ``lvr`` command line: a thin Typer app that parses, loads a config and calls one function.

Heavy imports (torch, transformers) happen inside the commands, so ``lvr --help`` stays fast.
User mistakes (:class:`lvr.errors.LvrError`) print one line and exit 2, never a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from lvr.errors import LvrError

app = typer.Typer(
    help=(
        "lvr: turn long videos into a reasoning dataset, train VLMs on it (CoT-SFT, then RL with "
        "MR-SP), and evaluate them on long-video benchmarks. Every stage reads and writes Parquet "
        "under a run folder (one folder per table, runs/<name>/<table>/) that `lvr inspect` summarizes."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
err = Console(stderr=True)


@app.command("inspect")
def inspect_cmd(
    path: Path = typer.Argument(..., help="A run, stage or table folder, or a Parquet file."),
    sql: str | None = typer.Option(
        None,
        "--sql",
        help="Run one read-only DuckDB query (SELECT/WITH/DESCRIBE/SUMMARIZE); each table is a "
        "view named after it (e.g. qa, clips), plus usage (model calls, maybe empty). A name in "
        "several folders (one eval/<name>/ per model: questions, predictions, scores) is the "
        "union of all with a column eval naming the folder; each folder's own view is "
        "<name>_<table> with '-' made '_' (e.g. qa_model_f4_predictions).",
    ),
    samples: int = typer.Option(
        3, "--samples", "-n", help="Sample rows to show per table (0 or more)."
    ),
) -> None:
    """Summarize Parquet artifacts: schema, row and error counts, distributions, sample rows."""
    from lvr.inspection import inspect_path

    inspect_path(path, sql=sql, samples=samples)


def _mount_subcommands() -> None:
    """Attach each area's commands; each module imports only light things at top level."""
    from lvr.datagen.cli import app as datagen_app
    from lvr.demo import demo
    from lvr.eval.cli import app as eval_app
    from lvr.train.cli import rl, sft

    app.add_typer(datagen_app, name="datagen")
    app.command("sft")(sft)
    app.command("rl")(rl)
    app.add_typer(eval_app, name="eval")
    app.command("demo")(demo)


_mount_subcommands()


def main() -> None:
    """Console-script entry point: run the app, turning user errors into one-line messages."""
    try:
        app()
    except LvrError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:  # raised before Typer runs a command (while importing)
        _interrupted()
    except SystemExit as exc:
        if exc.code == 130:  # Typer turns Ctrl-C inside a command into Exit(130), silently
            _interrupted()
        raise


def _interrupted() -> None:
    err.print("interrupted: finished shards are kept; rerun the same command to resume")
    sys.exit(130)


if __name__ == "__main__":
    main()
