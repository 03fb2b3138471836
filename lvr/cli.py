"""The ``lvr`` command line: a thin Typer app that parses, loads a config and calls one function.

Heavy imports (torch, transformers) happen inside the commands, so ``lvr --help`` stays fast.
User mistakes (:class:`lvr.errors.LvrError`) print one line and exit 2, never a traceback.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType

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
    global _terminated
    _terminated = False
    previous = signal.signal(signal.SIGTERM, _sigterm_handler(os.getpid()))
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
    finally:
        signal.signal(signal.SIGTERM, previous)  # main() called in-process (tests) leaves no trace


_terminated = False  # set when SIGTERM, not Ctrl-C, stopped the command


def _sigterm_handler(main_pid: int) -> Callable[[int, FrameType | None], None]:
    """SIGTERM (Slurm preemption, `kill`, a container stop) stops a command as Ctrl-C does.

    Python's default dies on the spot: stage manifests kept saying "running", a half-started
    evaluation folder stayed, and nothing said how to resume. As a KeyboardInterrupt, the same
    clean-up and message as Ctrl-C run. Forked children that inherit the handler (a process
    pool's) die as before; the parent does the reporting.
    """

    def handler(signum: int, frame: FrameType | None) -> None:
        global _terminated
        if os.getpid() == main_pid:
            _terminated = True
            # A second SIGTERM kills at once, as before: a clean-up that hangs, or a library
            # callback that swallows the KeyboardInterrupt, never makes lvr unkillable.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            # DataLoader workers die of a SIGTERM sent to the whole job (Slurm) and torch's
            # SIGCHLD handler would then raise "worker killed" amid the clean-up: not news now.
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)  # a child (pool worker) dies as before
        os.kill(os.getpid(), signum)

    return handler


# What an interrupted command keeps and how to continue it, by command (default: datagen).
_RESUME_HINTS = {
    "sft": "finished checkpoints are kept; rerun with --resume to continue from the latest one",
    "rl": "finished checkpoints are kept; rerun with --resume to continue from the latest one",
    "eval": "answers written so far are kept; rerun the same command to ask only for the rest",
    "demo": "finished steps are kept; rerun `lvr demo` without --fresh to resume",
}


def _interrupted() -> None:
    """Say what an interrupted command kept and how to go on; exit 130 (Ctrl-C) or 143 (SIGTERM)."""
    command = next((a for a in sys.argv[1:] if not a.startswith("-")), "")
    hint = _RESUME_HINTS.get(command, "finished shards are kept; rerun the same command to resume")
    err.print(f"interrupted: {hint}", soft_wrap=True)
    sys.exit(128 + signal.SIGTERM if _terminated else 130)


if __name__ == "__main__":
    main()
