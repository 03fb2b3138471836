"""Typer options shared by every command that takes a config (one definition, reused)."""

from __future__ import annotations

from pathlib import Path

import typer

ConfigOpt = typer.Option(
    None, "--config", "-c", help="YAML config file (keys mirror --show-config).", exists=False
)


def set_option(example: str) -> typer.models.OptionInfo:
    """The repeatable ``--set`` option, its help naming a key that is valid for the command."""
    return typer.Option(
        None,
        "--set",
        "-s",
        help=f"Override one key, e.g. --set {example} (repeatable; dotted keys for sections; "
        "--show-config lists them).",
    )


SetOpt = set_option("data.frames=32")  # sft and rl (both have data.frames)
DatagenSetOpt = set_option("caption.backend=openai")
EvalSetOpt = set_option("frames=[8,16]")
DemoSetOpt = set_option("sft_steps=100")
ShowOpt = typer.Option(False, "--show-config", help="Print the effective config as YAML and exit.")
RunOpt = typer.Option(
    Path("runs/default"), "--run", "-r", help="Run folder that holds every stage's outputs."
)
