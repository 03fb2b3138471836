"""Training: CoT-SFT (`sft.py`) and GRPO-family RL with MR-SP (the `rl/` package).

Shared parts, used by both recipes: `config.py` (one config vocabulary), `policy.py` (load,
freeze, LoRA, optimizer), `checkpoint.py` (save / resume / manifest), `data.py` (the qa table and
the video -> sample path), `common.py` (processes, schedule, metrics), `cli.py` (both commands).
The RL maths: `algos.py` (advantages, losses, KL) and `rewards.py`.
"""
