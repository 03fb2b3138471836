"""``lvr sft``: a thin command; the recipe lives in lvr/train/sft.py (``lvr rl``: rl_cli.py).

Only light imports at module level (typer, lvr.config): torch and transformers load inside the
commands, so ``lvr --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import typer

from lvr.cli_options import ConfigOpt, RunOpt, SetOpt, ShowOpt


def sft(
    config: Path | None = ConfigOpt,
    sets: list[str] | None = SetOpt,
    show_config: bool = ShowOpt,
    run: Path = RunOpt,
    resume: bool = typer.Option(
        False, "--resume", help="Continue from the latest checkpoint in <run>/sft/ (exact resume)."
    ),
) -> None:
    """Chain-of-thought SFT of a VLM on the qa table's sft split (writes <run>/sft/).

    One process: `lvr sft -c configs/sft/tiny_cpu.yaml`. Several: `torchrun --nproc_per_node 8
    -m lvr.cli sft -c configs/sft/qwen25vl_8gpu.yaml` (DeepSpeed ZeRO when `deepspeed` is set).
    """
    from lvr.config import resolve_cli_config
    from lvr.train.sft import SFTConfig

    cfg = resolve_cli_config(SFTConfig, config, sets, show_config)
    if cfg is None:
        return
    from lvr.train.common import finish_distributed, init_distributed
    from lvr.train.sft import run_sft

    manifest = run_sft(cfg, run, resume=resume)
    info = init_distributed(cfg.device)
    if info.is_main:
        last = manifest.get("last_metrics", {})
        typer.echo(
            f"sft done: {manifest['steps']} steps, loss {last.get('loss', float('nan')):.4f}, "
            f"checkpoint {manifest['final_checkpoint']}"
        )
    # ZeRO-3 with several processes can abort in interpreter teardown: barrier, then os._exit(0).
    finish_distributed(info, hard_exit=True)
