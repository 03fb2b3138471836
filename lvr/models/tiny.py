"""Tiny offline models of real architectures, for tests and the CPU demo.

`build_tiny_vlm` makes a VLM of any family lvr knows (`lvr.models.family`: Qwen2-VL, Qwen2.5-VL
by default, Qwen3-VL, Qwen3-VL-MoE, Qwen3.5, LLaVA-OneVision) and `build_tiny_llm` a Qwen2 causal LM, from
configs with seeded random weights, sharing the tokenizer of `lvr.models.tokenizer` and the
family's official processor classes. Each is written with `save_pretrained` into one folder that
the generic loaders (`lvr.models.loading.load_vlm` / `load_llm`) read like any hub checkpoint, so
tests exercise the same code path as real models. Building takes about a second and is cached: a
folder that holds a matching completion marker is reused as is.

    python -m lvr.models.tiny --family qwen3_vl --out /tmp/tiny-qwen3-vl
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForImageTextToText,
    GenerationConfig,
    LlavaOnevisionConfig,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2VLConfig,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
    Qwen3_5Config,
    Qwen3VLConfig,
    Qwen3VLMoeConfig,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from lvr.models import tokenizer as tk
from lvr.models.family import FAMILIES, get_family

# Bump when the recipe below changes: cached folders with another version are rebuilt.
TINY_BUILD_VERSION = "tiny-v1"
MARKER_FILE = ".lvr_build.json"
DEFAULT_FAMILY = "qwen2_5_vl"

# Frames are resized to multiples of patch*merge = 28 px with a total between these bounds.
# The minimum is one merged patch so that small test frames (56x56, 112x112) keep their size
# (the library default of 128*28*28 would upscale 112x112 to 336x336); the maximum (224x224)
# caps a tiny-model frame pair at 64 visual tokens.
TINY_MIN_PIXELS = 28 * 28
TINY_MAX_PIXELS = 224 * 224
# Qwen3-VL / Qwen3.5 (patch 16): multiples of 32 px, from one merged patch up to 256x256 a frame
# (64 tokens), whatever the frame count (the per-frame cap of the reference implementation).
TINY3_MIN_PIXELS = 32 * 32
TINY3_FRAME_TOKENS = 64
TINY3_MAX_FRAMES = 4096
# LLaVA-OneVision: every frame resized to 112x112, SigLIP patch 14 (8x8 patches), pooled 2x2 to
# 16 tokens a frame (the released model: 384 px, 729 patches, 196 tokens a frame).
TINY_OV_SIZE = 112
TINY_OV_PATCH = 14

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


def _mrope(theta: float, sections: list[int], interleaved: bool = False, **extra: Any) -> dict:
    rope = {"rope_type": "default", "rope_theta": theta, "mrope_section": sections, **extra}
    return rope | ({"mrope_interleaved": True} if interleaved else {})


def _vision_ids(ids: dict[str, int]) -> dict[str, Any]:
    return {
        "image_token_id": ids["image"],
        "video_token_id": ids["video"],
        "vision_start_token_id": ids["vision_start"],
        "vision_end_token_id": ids["vision_end"],
        "tie_word_embeddings": True,
    }


def _qwen3_vision(hidden: int, deepstack: bool) -> dict[str, Any]:
    """Qwen3-VL / Qwen3.5 tower: patch 16, a learned 8x8 position grid (interpolated per frame)."""
    vision = {
        "depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2,
        "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
        "out_hidden_size": hidden, "num_position_embeddings": 64,
    }  # fmt: skip
    return vision | ({"deepstack_visual_indexes": [0, 1]} if deepstack else {})


def _qwen2_5_vl(text: dict, ids: dict[str, int], hidden: int) -> PretrainedConfig:
    """M-RoPE sections [8, 12, 12] (sum = head_dim/2); vision depth 2, hidden 64, patch 14, merge
    2, temporal patch 2, windowed attention, 2 tokens per second as in the released model."""
    vision = {
        "depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2,
        "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
        "tokens_per_second": 2, "window_size": 112, "fullatt_block_indexes": [1],
        "out_hidden_size": hidden,
    }  # fmt: skip
    text["rope_parameters"] = _mrope(1_000_000.0, [8, 12, 12])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **_vision_ids(ids))


def _qwen2_vl(text: dict, ids: dict[str, int], hidden: int) -> PretrainedConfig:
    """Qwen2-VL: the same M-RoPE, a plain (unwindowed) ViT of width 64, patch 14."""
    vision = {
        "depth": 2, "embed_dim": 64, "hidden_size": hidden, "num_heads": 2, "mlp_ratio": 2,
        "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
    }  # fmt: skip
    text["rope_parameters"] = _mrope(1_000_000.0, [8, 12, 12])
    return Qwen2VLConfig(text_config=text, vision_config=vision, **_vision_ids(ids))


def _qwen3_vl(text: dict, ids: dict[str, int], hidden: int) -> PretrainedConfig:
    """Qwen3-VL: interleaved M-RoPE [12, 10, 10], DeepStack from both vision blocks."""
    text |= {"head_dim": 64, "rope_parameters": _mrope(5_000_000.0, [12, 10, 10], True)}
    return Qwen3VLConfig(
        text_config=text, vision_config=_qwen3_vision(hidden, True), **_vision_ids(ids)
    )


def _qwen3_vl_moe(text: dict, ids: dict[str, int], hidden: int) -> PretrainedConfig:
    """Qwen3-VL-MoE: as Qwen3-VL, every decoder MLP a 4-expert top-2 mixture."""
    text |= {
        "head_dim": 64, "rope_parameters": _mrope(5_000_000.0, [12, 10, 10], True),
        "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": hidden // 2,
        "decoder_sparse_step": 1,
        "norm_topk_prob": True,  # what transformers does; vLLM reads the flag from the config
    }  # fmt: skip
    return Qwen3VLMoeConfig(
        text_config=text, vision_config=_qwen3_vision(hidden, True), **_vision_ids(ids)
    )


def _qwen3_5(text: dict, ids: dict[str, int], hidden: int) -> PretrainedConfig:
    """Qwen3.5: gated delta-net layers then a gated full-attention layer (the 3:1 pattern cut to
    the layer count), half the head dims rotary, interleaved M-RoPE [6, 5, 5]."""
    layers = text["num_hidden_layers"]
    kinds = ["full_attention" if (i + 1) % 4 == 0 or i == layers - 1 else "linear_attention"
             for i in range(layers)]  # fmt: skip
    heads = text["num_attention_heads"]
    text |= {
        "head_dim": 64, "layer_types": kinds, "linear_num_key_heads": heads,
        "linear_num_value_heads": 2 * heads, "linear_key_head_dim": 32,
        "linear_value_head_dim": 32, "linear_conv_kernel_dim": 4,
        "rope_parameters": _mrope(10_000_000.0, [6, 5, 5], True, partial_rotary_factor=0.5),
    }  # fmt: skip
    return Qwen3_5Config(
        text_config=text, vision_config=_qwen3_vision(hidden, False), **_vision_ids(ids)
    )


def _llava_onevision(text: dict, ids: dict[str, int], hidden: int) -> PretrainedConfig:
    """LLaVA-OneVision: a Qwen2 decoder (1-D RoPE), a 2-layer SigLIP tower of width 64 on whole
    112 px frames, its last layer projected by the 2-layer MLP, a learned newline per video."""
    text |= {"model_type": "qwen2", "rope_parameters": {"rope_type": "default",
                                                        "rope_theta": 1_000_000.0}}  # fmt: skip
    vision = {
        "model_type": "siglip_vision_model", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 2, "patch_size": TINY_OV_PATCH,
        "image_size": TINY_OV_SIZE, "vision_use_head": False,
    }  # fmt: skip
    return LlavaOnevisionConfig(
        text_config=text, vision_config=vision, image_token_index=ids["image"],
        video_token_index=ids["video"], vision_feature_select_strategy="full",
        vision_feature_layer=-1, image_grid_pinpoints=[[TINY_OV_SIZE, TINY_OV_SIZE]],
        tie_word_embeddings=True,
    )  # fmt: skip


def _llava_onevision_processor(tok: PreTrainedTokenizerFast) -> LlavaOnevisionProcessor:
    """LLaVA-OneVision's processor around the tiny tokenizer: its `<|video_pad|>` and
    `<|image_pad|>` are the placeholders (the released model names them `<video>`/`<image>`)."""
    size = {"height": TINY_OV_SIZE, "width": TINY_OV_SIZE}
    return LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(
            size=size, image_grid_pinpoints=[[TINY_OV_SIZE, TINY_OV_SIZE]]
        ),
        tokenizer=tok, video_processor=LlavaOnevisionVideoProcessor(size=size),
        num_image_tokens=(TINY_OV_SIZE // TINY_OV_PATCH) ** 2,
        vision_feature_select_strategy="full", chat_template=tk.CHAT_TEMPLATE,
        image_token=tk.IMAGE_PAD, video_token=tk.VIDEO_PAD,
    )  # fmt: skip


_CONFIGS: dict[str, Callable[[dict, dict[str, int], int], PretrainedConfig]] = {
    "qwen2_vl": _qwen2_vl,
    "qwen2_5_vl": _qwen2_5_vl,
    "qwen3_vl": _qwen3_vl,
    "qwen3_vl_moe": _qwen3_vl_moe,
    "qwen3_5": _qwen3_5,
    "llava_onevision": _llava_onevision,
}
TINY_FAMILIES = tuple(_CONFIGS)


def tiny_vlm_config(
    tok: PreTrainedTokenizerFast,
    hidden: int = _TEXT_HIDDEN,
    layers: int = 2,
    family: str = DEFAULT_FAMILY,
) -> PretrainedConfig:
    """Build the tiny config of a family for a tokenizer.

    Args:
        tok: The tiny tokenizer (its special-token ids go into the config).
        hidden: Text hidden size (a multiple of the head size 64).
        layers: Text decoder layers.
        family: A `model_type` of `TINY_FAMILIES`.

    Returns:
        The config: text hidden 128, 2 layers, 2x64 heads, 1 KV head by default; a 2-block
        vision tower of width 64 (see each family's builder for the rest).

    Raises:
        FamilyError: A family without a tiny recipe.
    """
    if family not in _CONFIGS:
        get_family(family)  # an unknown name: the family error lists the known ones
        raise ValueError(f"no tiny recipe for {family}; tiny families: {', '.join(_CONFIGS)}")
    ids = _special_ids(tok)
    return _CONFIGS[family](_text_config_kwargs(len(tok), ids, hidden, layers), ids, hidden)


def tiny_processor(tok: PreTrainedTokenizerFast, family: str = DEFAULT_FAMILY) -> Any:
    """Build the family's processor (official image + video processors) around the tokenizer.

    Args:
        tok: The tiny tokenizer.
        family: A `model_type` of `TINY_FAMILIES`.

    Returns:
        Qwen2-VL / Qwen2.5-VL: processors that keep small frames at their size
        (`TINY_MIN_PIXELS`..`TINY_MAX_PIXELS`) and apply the reference per-frame pixel cap.
        Qwen3-VL / Qwen3.5: the `Qwen3VLProcessor` (patch 16, timestamps in the text), at most
        `TINY3_FRAME_TOKENS` merged tokens a frame. LLaVA-OneVision: frames resized to
        `TINY_OV_SIZE` px.
    """
    processor_class = get_family(family).processor_class
    if processor_class == "LlavaOnevisionProcessor":
        return _llava_onevision_processor(tok)
    if processor_class == "Qwen3VLProcessor":
        per_frame = TINY3_FRAME_TOKENS * 32 * 32
        image_proc = Qwen2VLImageProcessor(
            patch_size=16, size={"shortest_edge": TINY3_MIN_PIXELS, "longest_edge": per_frame}
        )
        video_proc = Qwen3VLVideoProcessor(
            size={"shortest_edge": TINY3_MIN_PIXELS, "longest_edge": per_frame * TINY3_MAX_FRAMES},
            cap_pixels_per_frame=True, max_video_tokens=TINY3_FRAME_TOKENS,
        )  # fmt: skip
        return Qwen3VLProcessor(
            image_processor=image_proc, tokenizer=tok, video_processor=video_proc,
            chat_template=tk.CHAT_TEMPLATE,
        )  # fmt: skip
    image_proc = Qwen2VLImageProcessor(min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS)
    video_proc = Qwen2VLVideoProcessor(
        min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS, cap_pixels_per_frame=True
    )
    cls = Qwen2VLProcessor if processor_class == "Qwen2VLProcessor" else Qwen2_5_VLProcessor
    return cls(
        image_processor=image_proc,
        tokenizer=tok,
        video_processor=video_proc,
        chat_template=tk.CHAT_TEMPLATE,
    )


def tiny_vlm(
    family: str = DEFAULT_FAMILY, seed: int = 0, hidden: int = _TEXT_HIDDEN, layers: int = 2
) -> tuple[torch.nn.Module, Any]:
    """The tiny VLM of a family and its processor, in memory (what `build_tiny_vlm` saves).

    Args:
        family: A `model_type` of `TINY_FAMILIES`.
        seed: Seed of the random weights.
        hidden: Text hidden size.
        layers: Text decoder layers.

    Returns:
        (model in eval mode, fp32 on CPU with sdpa attention, processor).
    """
    tok = tk.train_tokenizer()
    torch.manual_seed(seed)
    config = tiny_vlm_config(tok, hidden, layers, family)
    model = AutoModelForImageTextToText.from_config(config, attn_implementation="sdpa").eval()
    model.generation_config = _generation_config(_special_ids(tok))
    return model, tiny_processor(tok, family)


def _save_vlm(tmp: Path, seed: int, hidden: int, layers: int, family: str) -> None:
    model, processor = tiny_vlm(family, seed, hidden, layers)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)


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
    out_dir: str | Path,
    seed: int = 0,
    hidden: int = _TEXT_HIDDEN,
    layers: int = 2,
    family: str = DEFAULT_FAMILY,
) -> Path:
    """Build (or reuse) a tiny VLM of a family with its processor and tokenizer in `out_dir`.

    Args:
        out_dir: Folder to write; reused when it already holds this build.
        seed: Seed of the random weights (the tokenizer is deterministic).
        hidden: Text hidden size; the learning checks use 256 (4 heads, 2 KV heads), which
            learns the color-order lookup within minutes where 128 is slow to.
        layers: Text decoder layers (learning checks: 4).
        family: A `model_type` of `TINY_FAMILIES` (default Qwen2.5-VL).

    Returns:
        The absolute folder path, loadable with `load_vlm`.
    """
    tiny_vlm_config(tk.train_tokenizer(), hidden, layers, family)  # bad arguments fail first
    marker = _marker("vlm", seed)
    if (hidden, layers) != (_TEXT_HIDDEN, 2):  # default builds keep their marker (no rebuild)
        marker |= {"hidden": hidden, "layers": layers}
    if family != DEFAULT_FAMILY:
        marker |= {"family": family}
    save = lambda tmp: _save_vlm(tmp, seed, hidden, layers, family)  # noqa: E731
    return cached_build(Path(out_dir), marker, save)


def build_tiny_llm(out_dir: str | Path, seed: int = 0) -> Path:
    """Build (or reuse) a tiny Qwen2 causal LM with the same tokenizer in `out_dir`.

    Args:
        out_dir: Folder to write; reused when it already holds this build.
        seed: Seed of the random weights.

    Returns:
        The absolute folder path, loadable with `load_llm`.
    """
    return cached_build(Path(out_dir), _marker("llm", seed), lambda tmp: _save_llm(tmp, seed))


def main(argv: list[str] | None = None) -> None:
    """`python -m lvr.models.tiny --family F --out DIR`: write a tiny model of a family."""
    parser = argparse.ArgumentParser(prog="python -m lvr.models.tiny", description=main.__doc__)
    parser.add_argument("--family", default=DEFAULT_FAMILY, choices=TINY_FAMILIES)
    parser.add_argument("--out", required=True, help="folder to write (reused when built)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden", type=int, default=_TEXT_HIDDEN)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args(argv)
    try:
        folder = build_tiny_vlm(args.out, args.seed, args.hidden, args.layers, args.family)
    except (ValueError, FileExistsError) as exc:
        parser.exit(2, f"error: {exc}\n")
    print(f"{FAMILIES[args.family].label} tiny model: {folder}")


if __name__ == "__main__":
    main()
