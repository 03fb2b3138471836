"""Typer options shared by every command that takes a config (one definition, reused)."""

from __future__ import annotations

from pathlib import Path

import typer

ConfigOpt = typer.Option(
    None, "--config", "-c", help="YAML config file (keys mirror --show-config).", exists=False
)
SetOpt = typer.Option(
    None,
    "--set",
    "-s",
    help="Override one key, e.g. --set caption.backend=openai (repeatable; dotted keys for sections).",
)
ShowOpt = typer.Option(False, "--show-config", help="Print the effective config as YAML and exit.")
RunOpt = typer.Option(
    Path("runs/default"), "--run", "-r", help="Run folder that holds every stage's outputs."
)
