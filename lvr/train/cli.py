"""``lvr sft`` and ``lvr rl``: the thin commands over the two recipes (registered by lvr/cli.py).

Both take the same options (--config, --set, --show-config, --run, --resume) and print one
summary line; only light imports at module level (typer, the torch-free configs), so
``lvr --help`` stays fast and torch loads when a recipe runs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from lvr.cli_options import ConfigOpt, RunOpt, SetOpt, ShowOpt
from lvr.config import resolve_cli_config
from lvr.train.config import RLConfig, SFTConfig

ResumeOpt = typer.Option(
    False, "--resume", help="Continue from the latest checkpoint of this recipe in the run folder."
)


def _run_recipe(
    stage: str,
    config_cls: type,
    config: Path | None,
    sets: list[str] | None,
    show_config: bool,
    run: Path,
    resume: bool,
    summary: Callable[[dict[str, Any]], str],
) -> None:
    """Resolve the config, run the recipe, print its summary on the main rank, leave cleanly."""
    cfg = resolve_cli_config(config_cls, config, sets, show_config)
    if cfg is None:
        return
    from lvr.train.common import finish_distributed, init_distributed  # torch loads here

    if stage == "sft":
        from lvr.train.sft import run_sft as recipe
    else:
        from lvr.train.rl.recipe import run_rl as recipe
    manifest = recipe(cfg, run, resume=resume)
    info = init_distributed(cfg.device)
    if info.is_main:
        typer.echo(summary(manifest))
    # ZeRO-3 with several processes can abort in interpreter teardown: barrier, then os._exit(0).
    finish_distributed(info, hard_exit=stage == "sft")


def _last(manifest: dict[str, Any], key: str) -> float:
    return float(manifest.get("last_metrics", {}).get(key, float("nan")))


def _skipped(m: dict[str, Any]) -> str:
    """The tail of a summary line for a run that skipped some samples ("" when none)."""
    skipped = m.get("skipped") or {}
    if not skipped.get("samples"):
        return ""
    where = Path(m["final_checkpoint"]).parent / "skipped.jsonl"
    return f"; {skipped['samples']} samples skipped ({skipped['reasons']}; see {where})"


def _resumed(m: dict[str, Any]) -> str:
    """Where a resumed run took over ("" for a run from the start): its steps before that were
    done by an earlier, interrupted invocation, and this line says so."""
    if not m.get("resumed_from"):
        return ""
    return f", resumed from {Path(m['resumed_from']).name} at step {m['start_step']}"


def _sft_summary(m: dict[str, Any]) -> str:
    return (
        f"sft done: {m['steps']} steps{_resumed(m)}, loss {_last(m, 'loss'):.4f}, "
        f"checkpoint {m['final_checkpoint']}{_skipped(m)}"
    )


def _rl_summary(m: dict[str, Any]) -> str:
    return (
        f"rl done: {m['steps']} steps ({m['optimizer_steps']} optimizer steps){_resumed(m)}, "
        f"reward {_last(m, 'reward/mean'):.4f}, checkpoint {m['final_checkpoint']}{_skipped(m)}"
    )


def _command(
    stage: str, config_cls: type, summary: Callable[[dict[str, Any]], str], doc: str
) -> Callable[..., None]:
    """A Typer command over one recipe: both take exactly the same options."""

    def command(
        config: Path | None = ConfigOpt,
        sets: list[str] | None = SetOpt,
        show_config: bool = ShowOpt,
        run: Path = RunOpt,
        resume: bool = ResumeOpt,
    ) -> None:
        _run_recipe(stage, config_cls, config, sets, show_config, run, resume, summary)

    command.__name__ = command.__qualname__ = stage
    command.__doc__ = doc
    return command


sft = _command("sft", SFTConfig, _sft_summary, """Chain-of-thought SFT of a VLM on the qa table's sft split (writes <run>/sft/).

    One process: `lvr sft -c configs/sft/tiny_cpu.yaml`. Several: `torchrun --nproc_per_node 8
    -m lvr.cli sft -c configs/sft/qwen25vl_8gpu.yaml` (DeepSpeed ZeRO when `deepspeed` is set).
    """)  # fmt: skip
rl = _command("rl", RLConfig, _rl_summary, """GRPO-family RL with MR-SP on the qa table's rl split (writes <run>/rl/).

    One process: `lvr rl -c configs/rl/tiny_cpu.yaml`. One SP group over 8 GPUs:
    `torchrun --nproc_per_node 8 -m lvr.cli rl -c configs/rl/qwen25vl_8gpu_long.yaml`.
    """)  # fmt: skip
