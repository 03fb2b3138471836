"""Generic model loaders used by every stage (datagen hf backend, SFT, RL, eval).

`load_vlm` and `load_llm` take a hub id ("Qwen/Qwen2.5-VL-7B-Instruct") or a local folder (a tiny model
from `lvr.models.tiny`, a converted SmolLM2, a training checkpoint) and return the model in eval mode on
the requested device with its processor or tokenizer. Nothing here knows about tiny models: tests load
them through exactly the path real users take. `HF_HUB_OFFLINE=1` is honoured by `from_pretrained`.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    PreTrainedModel,
)

from lvr.errors import LvrError


class ModelLoadError(LvrError, ValueError):
    """A model source that is not a model folder, or a hub id that cannot be fetched.

    A user mistake (a wrong `model.path`, no network): the CLI prints its message on one line.
    """


def default_dtype(device: str | torch.device) -> torch.dtype:
    """Return the default weight dtype for a device: fp32 on CPU, bf16 on CUDA.

    Args:
        device: Target device.

    Returns:
        `torch.bfloat16` on CUDA, else `torch.float32` (CPU bf16 matmuls are slow and inexact).
    """
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def default_attn_implementation(device: str | torch.device) -> str:
    """Return "flash_attention_2" on CUDA when flash-attn is installed, else "sdpa".

    Args:
        device: Target device.

    Returns:
        The attention implementation name for `from_pretrained`.
    """
    on_cuda = torch.device(device).type == "cuda"
    if on_cuda and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "org/name"; absolute, dotted-relative, home or deeper paths are local.
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def resolve_source(name_or_path: str | Path) -> str:
    """Validate a model source and return what `from_pretrained` should receive.

    Args:
        name_or_path: Hub id or local folder.

    Returns:
        An absolute folder path for local sources, the unchanged id for hub sources.

    Raises:
        ModelLoadError: A local path that does not exist, is not a folder, or lacks `config.json`.
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    if isinstance(name_or_path, Path) or path.exists() or _looks_like_path(text):
        if not path.is_dir():
            raise ModelLoadError(
                f"model folder not found: {path} (pass a model folder or a hub id)"
            )
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{path} is not a model folder (no config.json); point to the folder written by "
                "save_pretrained, e.g. one made by lvr.models.build_tiny_vlm"
            )
        return str(path.absolute())
    return text


def _check_attn(attn: str, device: torch.device) -> None:
    if attn == "flash_attention_2" and device.type != "cuda":
        raise ModelLoadError(
            "flash_attention_2 needs a CUDA device; use attn_implementation='sdpa'"
        )
    if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ModelLoadError("flash_attention_2 requested but flash-attn is not installed")


def _from_pretrained(fn: Any, source: str, **kwargs: Any) -> Any:
    """Call a `from_pretrained`, turning missing files / no network into one `ModelLoadError`."""
    try:
        return fn(source, **kwargs)
    except OSError as exc:  # missing files, no network, unknown hub id
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = " (HF_HUB_OFFLINE is set: only cached or local models load)" if offline else ""
        raise ModelLoadError(
            f"cannot load {source!r}: not a local folder, and as a hub id{hint}: {exc}"
        ) from exc


def _load(
    auto_cls: Any,
    source: str,
    device: str | torch.device,
    dtype: torch.dtype | None,
    attn_implementation: str | None,
) -> PreTrainedModel:
    """Load `source` with `auto_cls` onto `device` in eval mode."""
    dev = torch.device(device)
    attn = attn_implementation or default_attn_implementation(dev)
    _check_attn(attn, dev)
    model = _from_pretrained(
        auto_cls.from_pretrained,
        source,
        dtype=dtype or default_dtype(dev),
        attn_implementation=attn,
    )
    return model.to(dev).eval()


def load_vlm(
    name_or_path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
) -> tuple[PreTrainedModel, Any]:
    """Load a vision-language model and its processor.

    Args:
        name_or_path: Hub id or local folder (e.g. from `build_tiny_vlm`).
        device: "cpu", "cuda", "cuda:1", ...
        dtype: Weight dtype; default fp32 on CPU, bf16 on CUDA.
        attn_implementation: Default "sdpa", or "flash_attention_2" on CUDA when installed.

    Returns:
        (model in eval mode on `device`, processor from `AutoProcessor`).

    Raises:
        ModelLoadError: Not a model folder, or the model cannot be fetched.
    """
    source = resolve_source(name_or_path)
    model = _load(AutoModelForImageTextToText, source, device, dtype, attn_implementation)
    processor = _from_pretrained(AutoProcessor.from_pretrained, source)
    return model, processor


def load_llm(
    name_or_path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
) -> tuple[PreTrainedModel, Any]:
    """Load a text-only causal LM and its tokenizer.

    Args:
        name_or_path: Hub id or local folder (e.g. from `build_tiny_llm` or `smollm2_dir`).
        device: "cpu", "cuda", "cuda:1", ...
        dtype: Weight dtype; default fp32 on CPU, bf16 on CUDA.
        attn_implementation: Default "sdpa", or "flash_attention_2" on CUDA when installed.

    Returns:
        (model in eval mode on `device`, tokenizer from `AutoTokenizer`).

    Raises:
        ModelLoadError: Not a model folder, or the model cannot be fetched.
    """
    source = resolve_source(name_or_path)
    model = _load(AutoModelForCausalLM, source, device, dtype, attn_implementation)
    tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, source)
    return model, tokenizer
