"""Config of `lvr rl` (see configs/rl/*.yaml): one dataclass per section; defaults are the paper's.

Kept apart from the recipe (lvr/train/rl.py) so that the CLI can parse and print a config
without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from lvr.train import LORA_TARGETS


@dataclass
class ModelSection:
    """Which model, and what of it trains."""

    # "tiny" builds lvr's tiny Qwen2.5-VL in <run>/models/; "sft" = latest checkpoint of <run>/sft/;
    # else a hub id or an HF folder (e.g. runs/exp1/sft/checkpoint-000500).
    path: str = "sft"
    lora: bool = False
    lora_r: int = 64
    lora_alpha: int = 128
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    attn_implementation: str = "auto"  # auto | sdpa | eager (the SP prefill needs sdpa/eager)


@dataclass
class DataSection:
    """Questions and frames."""

    qa: str = ""  # qa table (file or folder); "" = <run>/filter/qa
    split: str = "rl"
    frames: int = 64  # uniform frames per video (with fps > 0: the maximum)
    fps: float = 0.0
    max_pixels: int = 0  # per-frame pixel cap at decode time (0 = as decoded)
    mode: Literal["think", "direct"] = "think"
    cache_dir: str = ""  # on-disk embedding cache shared across steps ("" = in memory, per step)


@dataclass
class RolloutSection:
    """Sampling of the G responses per prompt."""

    engine: Literal["hf", "vllm"] = "hf"
    n: int = 8  # G
    temperature: float = 1.0
    top_p: float = 0.99
    max_new_tokens: int = 512
    # engine=vllm only: extra `vllm.LLM` arguments (checked against vLLM's EngineArgs at start),
    # e.g. dtype (bfloat16 | float32), gpu_memory_utilization (the share of the GPU vLLM may take
    # next to training, e.g. 0.3), max_model_len, kv_cache_memory_bytes, tensor_parallel_size,
    # enforce_eager. In YAML a mapping; on the command line `--set rollout.vllm.dtype=bfloat16`.
    vllm: dict[str, Any] = field(default_factory=dict)


@dataclass
class AlgoSection:
    """Advantage estimator, loss and KL (DAPO = dapo + clip_high 0.28 + kl none + dynamic)."""

    advantage: Literal["grpo", "drgrpo", "dapo", "rloo"] = "grpo"
    clip_low: float = 0.2
    clip_high: float = 0.3
    dual_clip: float = 3.0  # 0 disables
    kl: Literal["k1", "k2", "k3", "low_var_kl", "none"] = "low_var_kl"
    kl_coef: float = 1e-2
    loss_agg: Literal["token-mean", "seq-mean"] = "token-mean"
    entropy_coef: float = 0.0
    update_epochs: int = 1
    dynamic_sampling: bool = False
    max_gen_batches: int = 3  # draws per step when refilling (dynamic sampling)
    invert_advantage: bool = False  # ONLY for the learning check's negative control


@dataclass
class OptimSection:
    """AdamW and the schedule (per optimizer step)."""

    lr: float = 1e-6
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    schedule: Literal["cosine", "linear", "constant"] = "constant"
    warmup_steps: int = 0
    grad_clip: float = 1.0


@dataclass
class RLConfig:
    """Config of `lvr rl` (see configs/rl/*.yaml). Defaults are the paper's."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    algo: AlgoSection = field(default_factory=AlgoSection)
    optim: OptimSection = field(default_factory=OptimSection)
    rewards: list[dict] = field(
        default_factory=lambda: [{"fn": "accuracy", "weight": 0.9}, {"fn": "format", "weight": 0.1}]
    )
    rollout_batch: int = 512  # prompts per RL step
    update_batch: int = 128  # prompts per optimizer step
    micro_batch: int = 8  # rows (prompt + response) per forward
    # Ranks per MR-SP group; world = dp x sp_size. 0 = every rank in ONE SP group (dp 1). With
    # dp > 1 each SP group (contiguous ranks) takes rollout_batch/dp prompts of every step, and the
    # update equals the single-group one on the same global batch (global loss normalisers,
    # gradients summed over the world). rollout_batch and update_batch must divide by dp.
    sp_size: int = 0
    steps: int = 100  # RL steps
    seed: int = 0
    device: str = "auto"
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    reuse_embeddings: bool = True  # False re-encodes the video for every use (benchmark baseline)
    save_every: int = 0  # RL steps between checkpoints; 0 = only at the end
    keep_last: int = 2
    progress: bool = True
    tensorboard: bool = False
    wandb_project: str = ""
