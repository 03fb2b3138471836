"""The policy both recipes train: where it comes from, what of it trains, and its optimizer.

- `resolve_model_path`: `model.path` -> a folder or hub id ("tiny" builds lvr's tiny Qwen2.5-VL in
  the run, "tiny:<family>" the tiny model of another family, e.g. "tiny:qwen3_vl"; "sft" is the
  run's latest SFT checkpoint).
- `load_policy`: the VLM and its processor in the recipe's master dtype.
- `set_trainable`: freeze or train the vision tower and projector, LoRA or full language model.
- `make_optimizer`: AdamW over the trainable parameters and the warm-up + decay schedule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lvr.layout import RunLayout
from lvr.models import family
from lvr.models.checkpointing import set_activation_checkpointing
from lvr.models.family import QWEN2_5_VL, Family
from lvr.models.loading import load_vlm
from lvr.models.tiny import DEFAULT_FAMILY, TINY_FAMILIES, build_tiny_vlm
from lvr.train.checkpoint import latest_checkpoint
from lvr.train.common import DistInfo, TrainError, barrier, build_scheduler
from lvr.train.config import ModelSection, OptimSection


def is_vision(name: str, fam: Family = QWEN2_5_VL) -> bool:
    """A parameter of the vision tower or projector (where the model's family keeps them)."""
    return family.is_vision_param(fam, name)


def is_projector(name: str, fam: Family = QWEN2_5_VL) -> bool:
    """A parameter of the vision-to-language projectors (Qwen3-VL: also the DeepStack mergers)."""
    return family.is_projector_param(fam, name)


def resolve_model_path(path: str, layout: RunLayout, info: DistInfo) -> str | Path:
    """The folder or hub id `model.path` names; "tiny[:family]" is built once, on rank 0.

    Raises:
        TrainError: `model.path=sft` but the run has no finished SFT checkpoint.
    """
    if path == "tiny" or path.startswith("tiny:"):
        name = path.partition(":")[2] or DEFAULT_FAMILY
        if name not in TINY_FAMILIES:
            raise TrainError(
                f"model.path={path}: no tiny model of {name!r}; use tiny:<family> with one of "
                f"{', '.join(TINY_FAMILIES)}"
            )
        folder = layout.tiny_model(name)
        if info.is_main:
            build_tiny_vlm(folder, family=name)
        barrier(info)
        return folder
    if path == "sft":
        ckpt = latest_checkpoint(layout.sft)
        if ckpt is None:
            raise TrainError(f"model.path=sft but {layout.sft} has no finished checkpoint")
        return ckpt
    return path


def load_policy(
    section: ModelSection, layout: RunLayout, info: DistInfo, dtype: torch.dtype
) -> tuple[torch.nn.Module, Any, str | Path]:
    """Load the VLM named by `section.path`.

    Returns:
        The model (on `info.device`, in `dtype`), its processor, and where it came from (a vLLM
        rollout engine loads the same folder).
    """
    source = resolve_model_path(section.path, layout, info)
    attn = None if section.attn_implementation == "auto" else section.attn_implementation
    if attn is None and info.device.type == "cuda":
        attn = "sdpa"  # the MR-SP prefill runs the decoder layers itself (sdpa/eager, Ulysses)
    model, processor = load_vlm(source, device=info.device, dtype=dtype, attn_implementation=attn)
    return model, processor, source


def set_trainable(model: torch.nn.Module, section: ModelSection) -> torch.nn.Module:
    """Freeze or train the vision tower and projector; wrap the language model with LoRA.

    With LoRA the base language model is frozen and only the adapters train (PEFT); the vision
    choices are applied again after wrapping, because PEFT freezes everything else. Which
    parameters are vision, projector and decoder is the model family's answer.
    """
    fam = family.family_of(model)
    for name, p in model.named_parameters():
        if family.is_unused_param(fam, name):
            p.requires_grad_(False)  # never reached: DDP would wait for its gradient forever
        elif is_projector(name, fam):
            p.requires_grad_(section.train_projector)
        elif is_vision(name, fam):
            p.requires_grad_(section.train_vision)
        else:
            p.requires_grad_(not section.lora)
    if section.lora:
        from peft import LoraConfig, get_peft_model

        # Only the language model's linear layers: the regex keeps LoRA out of the ViT.
        lora = LoraConfig(
            r=section.lora_r, lora_alpha=section.lora_alpha, lora_dropout=section.lora_dropout,
            target_modules=family.lora_target_regex(fam, section.lora_targets),
        )  # fmt: skip
        model = get_peft_model(model, lora)
        for name, p in model.named_parameters():
            if family.is_unused_param(fam, name):
                continue
            if is_projector(name, fam):
                p.requires_grad_(section.train_projector)
            elif is_vision(name, fam) and "lora_" not in name:
                p.requires_grad_(section.train_vision)
    if section.gradient_checkpointing:
        set_activation_checkpointing(model, True)
    if not any(p.requires_grad for p in model.parameters()):
        raise TrainError("nothing to train: enable lora, the language model, vision or projector")
    return model


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain transformers model under a PEFT wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def lora_scaling(section: ModelSection) -> float | None:
    """LoRA's alpha / r (the factor a merged export folds in), or None without LoRA."""
    return section.lora_alpha / section.lora_r if section.lora else None


def make_optimizer(
    model: torch.nn.Module, optim: OptimSection, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable parameters and its schedule (stepped once per optimizer step)."""
    params = [p for p in model.parameters() if p.requires_grad]
    betas = (optim.betas[0], optim.betas[1])
    optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=betas, weight_decay=optim.weight_decay)
    scheduler = build_scheduler(
        optimizer, optim.schedule, optim.warmup_for(total_steps), total_steps, optim.min_lr_ratio
    )
    return optimizer, scheduler
