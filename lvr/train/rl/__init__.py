"""`lvr rl`: GRPO-family RL with MR-SP, as a package one can read in order.

- the config, `RLConfig`, is in lvr/train/config.py (with the sections SFT shares)
- `recipe.py`  `run_rl`: setup, the loop, checkpoints, manifest (start here)
- `step.py`    `rl_step`: ONE step top to bottom (decode -> encode -> rollout -> reward ->
               advantage -> old/ref prefill -> update); change the advantage estimator in
               lvr/train/algos.py and its use here
- `state.py`   what a run holds between steps, and its exact checkpoint/resume

Importing this package stays light (no torch): `run_rl` loads the recipe when called.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lvr.train.config import RLConfig

__all__ = ["RLConfig", "run_rl"]


def run_rl(cfg: RLConfig, run_dir: Path, resume: bool = False) -> dict[str, Any]:
    """Train with RL and write `<run>/rl/` (see `lvr.train.rl.recipe.run_rl`)."""
    from lvr.train.rl.recipe import run_rl as run  # torch loads here, not at CLI start

    return run(cfg, run_dir, resume)
