"""``lvr eval``: run a model on long-video QA benchmarks, score it honestly, and report.

Commands::

    lvr eval run --model <dir|hub id|openai:name> --benchmark <name> --data <path|dataset>
                 --video-dir D --run runs/R [--frames 8,16,32,64] [--passes K --temperature T]
    lvr eval questions --benchmark <name> --data <path> --video-dir D   # check a benchmark's rows
    lvr eval report runs/R                                             # report.md + report.html

Only light imports here (typer, dataclasses, lvr.config); the work happens in lvr.eval.runner.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from lvr.cli_options import ConfigOpt, EvalSetOpt, RunOpt, ShowOpt
from lvr.config import ConfigError, resolve_cli_config
from lvr.errors import LvrError
from lvr.eval.config import EvalConfig

app = typer.Typer(
    help="Evaluate VLMs on long-video QA benchmarks: strict and robust accuracy with CIs and floors.",
    no_args_is_help=True,
)


def _flag_overrides(**flags: object) -> list[str]:
    """``key=value`` overrides for the flags the user gave (values JSON-quoted: YAML reads them)."""
    out = []
    for key, value in flags.items():
        if value is None:
            continue
        if key == "frames":
            budgets = [part.strip() for part in str(value).split(",")]
            if not all(part.isdigit() for part in budgets):
                raise ConfigError(
                    f"--frames expects frame counts separated by commas (8 or 8,16,32), got {value!r}"
                )
            out.append(f"frames=[{','.join(budgets)}]")  # a YAML list
        else:
            out.append(f"{key}={json.dumps(value)}")
    return out


@app.command("run")
def run_cmd(
    model: str | None = typer.Option(
        None, "--model", "-m", help="Model folder, hub id, or openai:<served name>."
    ),
    benchmark: str | None = typer.Option(
        None,
        "--benchmark",
        "-b",
        help="qa | longvideo-reason | videomme | longvideobench | mlvu | videomme-v2 | lvbench "
        "| video-holmes | nextqa.",
    ),
    data: str | None = typer.Option(
        None, "--data", help="Benchmark file/folder or datasets name (org/name@split)."
    ),
    video_dir: str | None = typer.Option(
        None, "--video-dir", help="Folder holding the benchmark's videos."
    ),
    frames: str | None = typer.Option(
        None, "--frames", help="Frame budget(s); 8,16,32,64 runs a sweep."
    ),
    fps: float | None = typer.Option(
        None, "--fps", help="Sample F frames per second (capped by --frames)."
    ),
    passes: int | None = typer.Option(
        None, "--passes", help="Samples per question; K > 1 writes pass_rates."
    ),
    temperature: float | None = typer.Option(
        None, "--temperature", help="Sampling temperature (0 = greedy)."
    ),
    prompt: str | None = typer.Option(
        None, "--prompt", help="think (reasoning + answer) or direct."
    ),
    backend: str | None = typer.Option(None, "--backend", help="auto | hf | openai | vllm."),
    limit: int | None = typer.Option(
        None, "--limit", help="Only the first N questions (smoke runs)."
    ),
    run: Path = RunOpt,
    config: Path | None = ConfigOpt,
    sets: list[str] | None = EvalSetOpt,
    show: bool = ShowOpt,
) -> None:
    """Evaluate a model on a benchmark: predictions, scores (strict + robust, CIs, floor), manifest.

    Resumable: a rerun asks the model only for (question, pass, settings) rows that are missing
    or failed. The headline accuracy counts every question, errors as wrong.
    """
    overrides = _flag_overrides(
        model=model, benchmark=benchmark, data=data, video_dir=video_dir, frames=frames, fps=fps,
        passes=passes, temperature=temperature, prompt=prompt, backend=backend, limit=limit,
    )  # fmt: skip
    cfg = resolve_cli_config(EvalConfig, config, [*overrides, *(sets or [])], show)
    if cfg is None:
        return
    from lvr.eval.runner import describe, run_eval

    for line in describe(run_eval(cfg, run)):
        typer.echo(line)


@app.command("questions")
def questions_cmd(
    benchmark: str = typer.Option(..., "--benchmark", "-b", help="Benchmark adapter name."),
    data: str = typer.Option(..., "--data", help="Benchmark file/folder or datasets name."),
    video_dir: Path | None = typer.Option(None, "--video-dir", help="Folder holding the videos."),
    split: str | None = typer.Option(None, "--split", help="Dataset split (or qa split)."),
    out: Path | None = typer.Option(
        None, "--out", help="Write the questions table to this Parquet file."
    ),
    as_qa: Path | None = typer.Option(
        None,
        "--as-qa",
        help="Write the error-free questions as a qa table (e.g. runs/R/qa) for lvr sft/rl: a new "
        "or empty folder, or one holding only an earlier --as-qa output.",
    ),
    qa_split: str = typer.Option("rl", "--qa-split", help="Split of the rows written by --as-qa."),
) -> None:
    """Load a benchmark through its adapter and print counts and error reasons (no model)."""
    from lvr.artifacts import write_parquet
    from lvr.eval.benchmarks import Source, load_questions
    from lvr.reasons import group_errors

    if out is not None and out.is_dir():
        raise LvrError(
            f"--out {out} is a folder; give a Parquet file name (e.g. {out / 'questions.parquet'})"
        )
    if as_qa is not None and as_qa.suffix == ".parquet" and as_qa.is_dir():
        raise LvrError(f"--as-qa {as_qa} is a folder named like a file; give a qa table folder")
    if as_qa is not None and as_qa.suffix != ".parquet" and as_qa.is_file():
        raise LvrError(f"--as-qa {as_qa} is a file; give a qa table folder (e.g. runs/R/qa)")
    if as_qa is not None and as_qa.suffix != ".parquet":
        from lvr.eval.export import check_as_qa_folder

        check_as_qa_folder(as_qa)
    src = Source(benchmark, data, video_dir, split)
    table = load_questions(src)
    groups = group_errors(table.column("error").to_pylist())
    typer.echo(f"{table.num_rows} questions, {sum(n for _, n, _ in groups)} with errors")
    for reason, n, example in groups:
        typer.echo(f"  {n} x {reason}  (e.g. {example[:100]})")
    for note in src.notes:
        typer.echo(f"note: {note}")
    if out is not None:
        write_parquet(out, table, "questions")
        typer.echo(f"wrote {out}")
    if as_qa is not None:
        from lvr.eval.export import questions_to_qa

        rows, left_out = questions_to_qa(table.to_pylist(), qa_split)
        path = as_qa / "00000.parquet" if as_qa.suffix != ".parquet" else as_qa
        write_parquet(path, rows, "qa")
        typer.echo(f"wrote {path}: {rows.num_rows} qa rows (split {qa_split}), {left_out} left out")


@app.command("report")
def report_cmd(
    run: Path = typer.Argument(..., help="Run folder (runs/<name>) whose eval/ results to report."),
) -> None:
    """Write report.md and report.html (with PNG plots) for every evaluation of a run."""
    from lvr.eval.report import write_report

    if not run.exists() and (Path("runs") / run).exists():
        run = Path("runs") / run
    paths = write_report(run)
    for path in paths:
        typer.echo(f"wrote {path}")
