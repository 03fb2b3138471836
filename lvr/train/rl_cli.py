"""``lvr rl``: the thin command over `lvr.train.rl.run_rl` (registered by lvr/cli.py).

Only light imports at module level (typer, lvr.cli_options): torch and transformers load inside the
command, so ``lvr --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import typer

from lvr.cli_options import ConfigOpt, RunOpt, SetOpt, ShowOpt


def rl(
    config: Path | None = ConfigOpt,
    sets: list[str] | None = SetOpt,
    show_config: bool = ShowOpt,
    run: Path = RunOpt,
    resume: bool = typer.Option(
        False, "--resume", help="Continue from the latest checkpoint in <run>/rl/ (exact resume)."
    ),
) -> None:
    """GRPO-family RL with MR-SP on the qa table's rl split (writes <run>/rl/).

    One process: `lvr rl -c configs/rl/tiny_cpu.yaml`. One SP group over 8 GPUs:
    `torchrun --nproc_per_node 8 -m lvr.cli rl -c configs/rl/qwen25vl_8gpu_long.yaml`.
    """
    from lvr.config import resolve_cli_config
    from lvr.train.rl_config import RLConfig

    cfg = resolve_cli_config(RLConfig, config, sets, show_config)
    if cfg is None:
        return
    from lvr.train.common import finish_distributed, init_distributed
    from lvr.train.rl import run_rl

    manifest = run_rl(cfg, run, resume=resume)
    info = init_distributed(cfg.device)
    if info.is_main:
        last = manifest.get("last_metrics", {})
        typer.echo(
            f"rl done: {manifest['steps']} steps ({manifest['optimizer_steps']} optimizer steps), "
            f"reward {last.get('reward/mean', float('nan')):.4f}, "
            f"checkpoint {manifest['final_checkpoint']}"
        )
    finish_distributed(info)
