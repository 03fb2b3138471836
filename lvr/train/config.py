"""The configs of `lvr sft` and `lvr rl`: one vocabulary, one meaning (see configs/*/*.yaml).

The sections both recipes have are defined once and mean the same in both: `model.*` (which
model, what trains, LoRA), `data.*` (questions, frames, sequence length), `optim.*` (AdamW and
the schedule) and the top-level run keys (`micro_batch`, `seed`, `precision`, `save_every`,
`keep_last`...). Each recipe adds only its own knobs: `SFTConfig` (epochs, grad_accum, DeepSpeed,
batching), `RLConfig` (rollout, algorithm, rewards, MR-SP). Kept free of torch, so the CLI parses
and prints configs fast. Defaults: SFT's are common practice, RL's are the paper's.

Every numeric knob is range-checked when the config is built (`__post_init__`), so a bad value
is a one-line `ConfigError` naming the key, the value and the allowed range before any model
loads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from lvr.config import ConfigError

# LoRA on every linear layer of the language model (attention and MLP).
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def _require(key: str, value: Any, ok: bool, allowed: str) -> None:
    """Raise the one-line `ConfigError` for `key` unless `ok`.

    >>> _require("epochs", -1, -1 >= 1, ">= 1")
    Traceback (most recent call last):
    ...
    lvr.config.ConfigError: config key 'epochs' must be >= 1; got -1
    """
    if not ok:
        raise ConfigError(f"config key '{key}' must be {allowed}; got {value!r}")


def _at_least(key: str, value: float, low: float) -> None:
    _require(key, value, value >= low, f">= {low}")


def _share(key: str, value: float) -> None:
    _require(key, value, 0.0 <= value <= 1.0, "in [0, 1]")


@dataclass
class ModelSection:
    """Which model, and what of it trains."""

    # "tiny" builds lvr's tiny Qwen2.5-VL in <run>/models/, "tiny:<family>" another family's
    # (tiny:qwen3_vl, tiny:qwen3_5, ...); "sft" = the latest checkpoint of <run>/sft/; else a hub
    # id or an HF folder (e.g. runs/exp1/sft/checkpoint-000500).
    path: str = "tiny"
    train_vision: bool = False  # the vision tower (ViT blocks); RL keeps it frozen
    train_projector: bool = True  # the vision-language merger; RL keeps it frozen
    lora: bool = False  # LoRA on the language model's linear layers (else full fine-tuning)
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    gradient_checkpointing: bool = False
    attn_implementation: str = "auto"  # auto | sdpa | flash_attention_2 | eager

    def __post_init__(self) -> None:
        _at_least("model.lora_r", self.lora_r, 1)
        _require("model.lora_alpha", self.lora_alpha, self.lora_alpha > 0, "> 0")
        ok = 0.0 <= self.lora_dropout < 1.0
        _require("model.lora_dropout", self.lora_dropout, ok, "in [0, 1)")


@dataclass
class DataSection:
    """The questions and how their videos become model inputs."""

    qa: str = ""  # qa table (file or folder); "" = the run's own qa table (<run>/qa)
    split: str = "sft"
    frames: int = 16  # uniform frames per video (with fps > 0: the maximum)
    fps: float = 0.0  # sample at this rate instead of a fixed count
    min_frames: int = 2  # fewest frames a too-long sample may be truncated to
    max_pixels: int = 0  # per-frame pixel cap applied when decoding (lvr.media); 0 = as decoded
    max_seq_len: int = 8192  # prompt + video + target tokens; longer samples use fewer frames
    mode: Literal["think", "direct"] = "think"

    def __post_init__(self) -> None:
        _at_least("data.frames", self.frames, 1)
        _require("data.fps", self.fps, self.fps >= 0, ">= 0 (0 = a fixed frame count)")
        _at_least("data.min_frames", self.min_frames, 1)
        _require("data.max_pixels", self.max_pixels, self.max_pixels >= 0, ">= 0 (0 = no cap)")
        _at_least("data.max_seq_len", self.max_seq_len, 1)


@dataclass
class OptimSection:
    """AdamW and the learning-rate schedule (per optimizer step)."""

    RENAMED: ClassVar[dict[str, str]] = {"warmup": "warmup_steps"}

    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0  # linear warm-up length; 0 = warmup_ratio of all steps
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0  # decay floor, as a share of lr
    grad_clip: float = 1.0  # 0 disables clipping

    def __post_init__(self) -> None:
        _require("optim.lr", self.lr, self.lr > 0, "> 0")
        _at_least("optim.weight_decay", self.weight_decay, 0)
        ok = len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas)
        _require("optim.betas", self.betas, ok, "two numbers in [0, 1)")
        _at_least("optim.warmup_steps", self.warmup_steps, 0)
        _share("optim.warmup_ratio", self.warmup_ratio)
        _share("optim.min_lr_ratio", self.min_lr_ratio)
        _require("optim.grad_clip", self.grad_clip, self.grad_clip >= 0, ">= 0 (0 = no clipping)")

    def warmup_for(self, total_steps: int) -> int:
        """Warm-up steps for a run of `total_steps` optimizer steps.

        >>> OptimSection(warmup_ratio=0.1).warmup_for(50), OptimSection(warmup_steps=3).warmup_for(50)
        (5, 3)
        """
        return self.warmup_steps or int(round(self.warmup_ratio * total_steps))


@dataclass
class RunSection:
    """Process, precision, checkpoints and logging: the top-level keys of both recipes."""

    RENAMED: ClassVar[dict[str, str]] = {"micro_batch_size": "micro_batch"}

    micro_batch: int = 1  # rows per forward pass (per rank)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    save_every: int = 0  # steps between checkpoints; 0 = only at the end
    keep_last: int = 2  # checkpoints kept (0 = all)
    progress: bool = True
    tensorboard: bool = False
    wandb_project: str = ""

    def __post_init__(self) -> None:
        _at_least("micro_batch", self.micro_batch, 1)
        _require("seed", self.seed, 0 <= self.seed < 2**32, "in [0, 2**32)")
        ok = _DEVICE.fullmatch(self.device) is not None
        _require("device", self.device, ok, "auto, cpu, cuda or cuda:<index>")
        _require("save_every", self.save_every, self.save_every >= 0, ">= 0 (0 = only at the end)")
        _require("keep_last", self.keep_last, self.keep_last >= 0, ">= 0 (0 = keep all)")


# ---------------------------------------------------------------------------------------------
# lvr sft
# ---------------------------------------------------------------------------------------------


@dataclass
class SFTDataSection(DataSection):
    """The shared data keys, plus how SFT batches and caches them."""

    group_by_length: bool = True
    num_workers: int = 0  # DataLoader workers decoding ahead of the GPU
    cache_samples: bool = False  # keep built samples in memory across epochs (small data only)

    def __post_init__(self) -> None:
        super().__post_init__()
        _at_least("data.num_workers", self.num_workers, 0)


@dataclass
class SFTOptimSection(OptimSection):
    """AdamW and the schedule, with SFT's defaults (a short warm-up, cosine decay)."""

    warmup_ratio: float = 0.03


@dataclass
class SFTConfig(RunSection):
    """Config of `lvr sft` (see configs/sft/*.yaml)."""

    model: ModelSection = field(default_factory=ModelSection)
    data: SFTDataSection = field(default_factory=SFTDataSection)
    optim: SFTOptimSection = field(default_factory=SFTOptimSection)
    grad_accum: int = 1  # micro-batches per optimizer step
    epochs: int = 1
    max_steps: int = 0  # > 0 overrides epochs
    deepspeed: str = ""  # ZeRO JSON (configs/deepspeed/zero2.json); "" = plain torch (DDP)

    def __post_init__(self) -> None:
        super().__post_init__()
        _at_least("grad_accum", self.grad_accum, 1)
        _at_least("epochs", self.epochs, 1)
        _require("max_steps", self.max_steps, self.max_steps >= 0, ">= 0 (0 = run epochs)")


# ---------------------------------------------------------------------------------------------
# lvr rl
# ---------------------------------------------------------------------------------------------


@dataclass
class RLDataSection(DataSection):
    """Questions and frames (the shared data keys, plus the embedding cache)."""

    split: str = "rl"
    frames: int = 64
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

    def __post_init__(self) -> None:
        ok = self.n >= 2
        _require("rollout.n", self.n, ok, ">= 2 (group-relative advantages need a group)")
        _require("rollout.temperature", self.temperature, self.temperature > 0, "> 0")
        _require("rollout.top_p", self.top_p, 0 < self.top_p <= 1, "in (0, 1]")
        _at_least("rollout.max_new_tokens", self.max_new_tokens, 1)


@dataclass
class AlgoSection:
    """Advantage estimator, loss and KL (DAPO = dapo + clip_high 0.28 + kl none + dynamic)."""

    REMOVED: ClassVar[dict[str, str]] = {
        "invert_advantage": "to train against a reward, negate the reward itself (a reward "
        "function by dotted path; benchmarks/rl_color_task.py does so for its negative control)"
    }

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

    def __post_init__(self) -> None:
        _require("algo.clip_low", self.clip_low, 0 <= self.clip_low < 1, "in [0, 1)")
        _at_least("algo.clip_high", self.clip_high, 0)
        ok = self.dual_clip == 0 or self.dual_clip > 1
        _require("algo.dual_clip", self.dual_clip, ok, "0 (off) or > 1")
        _at_least("algo.kl_coef", self.kl_coef, 0)
        _at_least("algo.update_epochs", self.update_epochs, 1)
        _at_least("algo.max_gen_batches", self.max_gen_batches, 1)


@dataclass
class RLModelSection(ModelSection):
    """Which model, with RL's defaults: the run's SFT checkpoint; the vision tower and projector
    stay frozen (the cached embeddings are only valid for frozen weights)."""

    path: str = "sft"
    train_projector: bool = False
    lora_r: int = 64
    lora_alpha: int = 128


@dataclass
class RLOptimSection(OptimSection):
    """AdamW and the schedule, with the paper's RL defaults (lr 1e-6, wd 0.01, constant)."""

    lr: float = 1e-6
    weight_decay: float = 0.01
    schedule: Literal["cosine", "linear", "constant"] = "constant"


@dataclass
class RLConfig(RunSection):
    """Config of `lvr rl` (see configs/rl/*.yaml). Defaults are the paper's."""

    model: RLModelSection = field(default_factory=RLModelSection)
    data: RLDataSection = field(default_factory=RLDataSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    algo: AlgoSection = field(default_factory=AlgoSection)
    optim: RLOptimSection = field(default_factory=RLOptimSection)
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
    reuse_embeddings: bool = True  # False re-encodes the video for every use (benchmark baseline)

    def __post_init__(self) -> None:
        super().__post_init__()
        _at_least("rollout_batch", self.rollout_batch, 1)
        _at_least("update_batch", self.update_batch, 1)
        _require("sp_size", self.sp_size, self.sp_size >= 0, ">= 0 (0 = one SP group of all ranks)")
        _at_least("steps", self.steps, 1)
