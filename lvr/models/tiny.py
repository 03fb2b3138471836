"""Tiny offline models of real architectures, for tests and the CPU demo.

`build_tiny_vlm` makes a Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`) and `build_tiny_llm` a Qwen2
causal LM, both from a config with seeded random weights, sharing the tokenizer of
`lvr.models.tokenizer`. Each is written with `save_pretrained` into one folder that the generic
loaders (`lvr.models.loading.load_vlm` / `load_llm`) read like any hub checkpoint, so tests exercise
the same code path as real models. Building takes about a second and is cached: a folder that holds
a matching completion marker is reused as is.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

from lvr.models import tokenizer as tk

# Bump when the recipe below changes: cached folders with another version are rebuilt.
TINY_BUILD_VERSION = "tiny-v1"
MARKER_FILE = ".lvr_build.json"

# Frames are resized to multiples of patch*merge = 28 px with a total between these bounds.
# The minimum is one merged patch so that small test frames (56x56, 112x112) keep their size
# (the library default of 128*28*28 would upscale 112x112 to 336x336); the maximum (224x224)
# caps a tiny-model frame pair at 64 visual tokens.
TINY_MIN_PIXELS = 28 * 28
TINY_MAX_PIXELS = 224 * 224

_TEXT_HIDDEN = 128


def _special_ids(tok: PreTrainedTokenizerFast) -> dict[str, int]:
    """Return the token ids the configs must agree on."""
    ids = {t: tok.convert_tokens_to_ids(t) for t in tk.SPECIAL_TOKENS}
    return {
        "bos": ids[tk.ENDOFTEXT],
        "eos": ids[tk.IM_END],
        "pad": ids[tk.ENDOFTEXT],
        "endoftext": ids[tk.ENDOFTEXT],
        "image": ids[tk.IMAGE_PAD],
        "video": ids[tk.VIDEO_PAD],
        "vision_start": ids[tk.VISION_START],
        "vision_end": ids[tk.VISION_END],
    }


def _text_config_kwargs(
    vocab_size: int, ids: dict[str, int], hidden: int = _TEXT_HIDDEN, layers: int = 2
) -> dict:
    """Text-decoder shape: heads of head_dim 64, half as many KV heads (default 128 / 2 layers)."""
    if hidden % 64:
        raise ValueError(f"hidden must be a multiple of the head size 64, got {hidden}")
    heads = hidden // 64
    return {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 2),
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
        "pad_token_id": ids["pad"],
    }


def _generation_config(ids: dict[str, int]) -> GenerationConfig:
    # Like Qwen: a turn ends at <|im_end|>; <|endoftext|> also stops a (pretraining-style) run.
    return GenerationConfig(
        bos_token_id=ids["bos"],
        eos_token_id=[ids["eos"], ids["endoftext"]],
        pad_token_id=ids["pad"],
        do_sample=False,
    )


def tiny_vlm_config(
    tok: PreTrainedTokenizerFast, hidden: int = _TEXT_HIDDEN, layers: int = 2
) -> Qwen2_5_VLConfig:
    """Build the tiny Qwen2.5-VL config for a tokenizer.

    Args:
        tok: The tiny tokenizer (its special-token ids go into the config).
        hidden: Text hidden size (a multiple of the head size 64).
        layers: Text decoder layers.

    Returns:
        A `Qwen2_5_VLConfig`: text hidden 128, 2 layers, 2x64 heads, 1 KV head, M-RoPE sections
        [8, 12, 12] (sum = head_dim/2 = 32); vision depth 2, hidden 64, patch 14, merge 2,
        temporal patch 2, 2 tokens per second as in the released Qwen2.5-VL.
    """
    ids = _special_ids(tok)
    text = _text_config_kwargs(len(tok), ids, hidden, layers)
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 1_000_000.0,
        "mrope_section": [8, 12, 12],
    }
    vision = {
        "depth": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_heads": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "tokens_per_second": 2,
        "window_size": 112,
        "fullatt_block_indexes": [1],
        "out_hidden_size": hidden,
    }
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["image"],
        video_token_id=ids["video"],
        vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"],
        tie_word_embeddings=True,
    )


def tiny_processor(tok: PreTrainedTokenizerFast) -> Qwen2_5_VLProcessor:
    """Build the Qwen2.5-VL processor (official image + video processors) around the tokenizer.

    Args:
        tok: The tiny tokenizer.

    Returns:
        A `Qwen2_5_VLProcessor` whose processors keep small frames at their size
        (`TINY_MIN_PIXELS`..`TINY_MAX_PIXELS`) and apply the reference per-frame pixel cap.
    """
    image_proc = Qwen2VLImageProcessor(min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS)
    video_proc = Qwen2VLVideoProcessor(
        min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS, cap_pixels_per_frame=True
    )
    return Qwen2_5_VLProcessor(
        image_processor=image_proc,
        tokenizer=tok,
        video_processor=video_proc,
        chat_template=tk.CHAT_TEMPLATE,
    )


def _save_vlm(tmp: Path, seed: int, hidden: int, layers: int) -> None:
    tok = tk.train_tokenizer()
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(tiny_vlm_config(tok, hidden, layers)).eval()
    model.generation_config = _generation_config(_special_ids(tok))
    model.save_pretrained(tmp)
    tiny_processor(tok).save_pretrained(tmp)


def _save_llm(tmp: Path, seed: int) -> None:
    tok = tk.train_tokenizer()
    ids = _special_ids(tok)
    config = Qwen2Config(
        **_text_config_kwargs(len(tok), ids),
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    model.generation_config = _generation_config(ids)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)


def _marker(kind: str, seed: int) -> dict:
    return {"kind": kind, "version": TINY_BUILD_VERSION, "seed": seed}


def is_complete(folder: Path, expected: dict) -> bool:
    """Tell whether `folder` holds a finished build with exactly the `expected` marker content.

    Args:
        folder: A model folder.
        expected: The marker dict the build would write.

    Returns:
        True if the marker file exists and matches and config.json is there.
    """
    marker = Path(folder) / MARKER_FILE
    if not marker.is_file() or not (Path(folder) / "config.json").is_file():
        return False
    try:
        return json.loads(marker.read_text()) == expected
    except (OSError, json.JSONDecodeError):
        return False


def cached_build(out_dir: Path, marker: dict, save: Callable[[Path], None]) -> Path:
    """Run `save(tmp)` into a temporary sibling folder and rename it to `out_dir`, unless cached.

    Atomic and safe under concurrent builders: the folder appears complete or not at all; a racing
    builder that loses the rename discards its copy. A folder built by an older recipe (our marker
    with other content) is replaced; a foreign non-empty folder is never touched.

    Args:
        out_dir: Final model folder.
        marker: Marker content identifying the recipe; written last.
        save: Writes all model files into the folder it is given.

    Returns:
        `out_dir` as an absolute path.

    Raises:
        FileExistsError: `out_dir` exists, is not empty and was not built by lvr.
    """
    out_dir = Path(out_dir).absolute()
    if is_complete(out_dir, marker):
        return out_dir
    ours = (out_dir / MARKER_FILE).is_file()
    if out_dir.exists() and any(out_dir.iterdir()) and not ours:
        raise FileExistsError(
            f"{out_dir} exists and was not built by lvr; delete it or pick another folder"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the final folder should be readable like any other
    try:
        save(tmp)
        (tmp / MARKER_FILE).write_text(json.dumps(marker))
        if out_dir.exists():  # stale build of ours, or an empty folder: move it out of the way
            trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, trash / "old")
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, out_dir)
    except OSError:
        if not is_complete(out_dir, marker):  # not a lost race: a real failure
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def build_tiny_vlm(
    out_dir: str | Path, seed: int = 0, hidden: int = _TEXT_HIDDEN, layers: int = 2
) -> Path:
    """Build (or reuse) the tiny Qwen2.5-VL with its processor and tokenizer in `out_dir`.

    Args:
        out_dir: Folder to write; reused when it already holds this build.
        seed: Seed of the random weights (the tokenizer is deterministic).
        hidden: Text hidden size; the learning checks use 256 (4 heads, 2 KV heads), which
            learns the color-order lookup within minutes where 128 is slow to.
        layers: Text decoder layers (learning checks: 4).

    Returns:
        The absolute folder path, loadable with `load_vlm`.
    """
    marker = _marker("vlm", seed)
    if (hidden, layers) != (_TEXT_HIDDEN, 2):  # default builds keep their marker (no rebuild)
        marker |= {"hidden": hidden, "layers": layers}
    return cached_build(Path(out_dir), marker, lambda tmp: _save_vlm(tmp, seed, hidden, layers))


def build_tiny_llm(out_dir: str | Path, seed: int = 0) -> Path:
    """Build (or reuse) a tiny Qwen2 causal LM with the same tokenizer in `out_dir`.

    Args:
        out_dir: Folder to write; reused when it already holds this build.
        seed: Seed of the random weights.

    Returns:
        The absolute folder path, loadable with `load_llm`.
    """
    return cached_build(Path(out_dir), _marker("llm", seed), lambda tmp: _save_llm(tmp, seed))
