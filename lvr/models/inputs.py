"""One way to turn (video frames, question, options, target) into model inputs: shared by SFT, RL, eval.

Every stage that feeds a model builds its samples here, so that training, rollout and evaluation see
the same prompt text, the same video tokens and the same 3-D M-RoPE positions.

Prompt format (version `PROMPT_VERSION`; it is part of cache keys elsewhere, bump it whenever any
constant or the layout below changes — `prompt_fingerprint()` and its test catch a forgotten bump):

    system: SYSTEM_PROMPT
    user:   <video> {question}\\nA. {option}\\nB. {option}...\\n{instruction}
    assistant (target): <think>{reasoning}</think><answer>{X}</answer>   (mode "think")
                        <answer>{X}</answer>                             (mode "direct")

The sequence a model trains on is exactly `prompt tokens + target tokens + end-of-turn token`, where the
prompt is the model's own chat template with the generation prompt and the end-of-turn token is read off
that template (`<|im_end|>` for ChatML). That is also exactly what rollout generates after the prompt,
so logprobs in RL are computed on the tokens that were sampled.

transformers 5.x computes Qwen2-VL / Qwen2.5-VL 3-D positions only when `mm_token_type_ids` (0 text,
1 image, 2 video) is passed; without it the positions silently become 1-D. Samples built here always
carry it, `collate` keeps it aligned with `input_ids`, and `rope_position_ids` returns the model's own
positions so that training and rollout can pass identical `position_ids`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from lvr.media.sample import Frames
from lvr.models.family import video_metadata
from lvr.models.prompts import (  # noqa: F401  (re-exported: the prompt is part of a sample)
    DIRECT_INSTRUCTION,
    DIRECT_INSTRUCTION_OPEN,
    OPTION_LETTERS,
    PROMPT_VERSION,
    SYSTEM_PROMPT,
    THINK_INSTRUCTION,
    THINK_INSTRUCTION_OPEN,
    Mode,
    build_messages,
    format_question,
    format_target,
    instruction_for,
    prompt_fingerprint,
)

IGNORE_INDEX = -100
BatchDict = dict[str, torch.Tensor]


def _tokenizer_of(proc_or_tok: Any) -> Any:
    return getattr(proc_or_tok, "tokenizer", proc_or_tok)


def _is_multimodal(proc_or_tok: Any) -> bool:
    return hasattr(proc_or_tok, "video_processor")


def control_tokens(proc_or_tok: Any) -> list[str]:
    """Return the tokenizer's special added tokens (ChatML markers, vision placeholders, ...).

    Args:
        proc_or_tok: Processor or tokenizer.

    Returns:
        Their strings; user-provided text must not contain any of them.
    """
    tok = _tokenizer_of(proc_or_tok)
    return [t.content for t in tok.added_tokens_decoder.values() if t.special]


def _check_text(proc_or_tok: Any, **texts: str | None) -> None:
    """Reject user text that would be tokenized as control tokens (a question smuggling in
    `<|im_end|>` or `<|video_pad|>` would corrupt turns or video token counts)."""
    specials = control_tokens(proc_or_tok)
    for name, text in texts.items():
        for special in specials:
            if text and special in text:
                raise ValueError(f"{name} contains the control token {special!r}; remove it")


def end_of_turn_ids(proc_or_tok: Any) -> list[int]:
    """Read the end-of-assistant-turn tokens off the model's chat template.

    Renders a conversation with a sentinel assistant reply and takes what the template writes after
    it, without trailing whitespace (`<|im_end|>` for ChatML).

    Args:
        proc_or_tok: Processor or tokenizer with a chat template.

    Returns:
        Token ids that close a target.

    Raises:
        ValueError: The template does not render the generation prompt as a prefix of the full
            conversation (then prompt + target would not equal the rendered conversation).
    """
    sentinel = "SENTINEL-7Q"
    msgs = [{"role": "user", "content": "hi"}]
    prompt = proc_or_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    full = proc_or_tok.apply_chat_template(
        [*msgs, {"role": "assistant", "content": sentinel}], tokenize=False
    )
    if not full.startswith(prompt + sentinel):
        raise ValueError("chat template does not render the prompt as a prefix of the full chat")
    suffix = full[len(prompt) + len(sentinel) :].rstrip()
    if not suffix:
        raise ValueError("chat template writes nothing after an assistant reply")
    return _tokenizer_of(proc_or_tok)(suffix, add_special_tokens=False)["input_ids"]


def video_fps(num_frames: int, fps: float | None, timestamps: Sequence[float] | None) -> float:
    """Return the sampling rate of a frame sequence from `fps` or from its timestamps.

    Args:
        num_frames: T.
        fps: Frames per second of the given (already sampled) frames.
        timestamps: Time in seconds of each frame; their mean spacing gives the rate. A frame
            may repeat with its time (`lvr.media` repeats frames of a video shorter than the
            frames asked for, so that a sample always has them all).

    Returns:
        Frames per second (> 0).

    Raises:
        ValueError: Neither or both given, wrong length, decreasing times, fewer than 2 frames or
            no time between the first and the last.
    """
    if (fps is None) == (timestamps is None):
        raise ValueError("give exactly one of fps or timestamps for the video frames")
    if fps is not None:
        if not fps > 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        return float(fps)
    ts = np.asarray(timestamps, dtype=np.float64)
    if ts.shape != (num_frames,):
        raise ValueError(f"{len(ts)} timestamps for {num_frames} frames")
    if num_frames < 2 or np.any(np.diff(ts) < 0) or not ts[-1] > ts[0]:
        raise ValueError(
            "timestamps must not decrease and must span > 0 s with >= 2 frames (else pass fps)"
        )
    return float((num_frames - 1) / (ts[-1] - ts[0]))


def frame_times(
    num_frames: int, fps: float | None, timestamps: Sequence[float] | None
) -> list[float]:
    """The time in seconds of each frame: the timestamps, or `i / fps` from a rate.

    Args:
        num_frames: T.
        fps: Frames per second of the given (already sampled) frames.
        timestamps: Time in seconds of each frame.

    Returns:
        T times (not decreasing: a repeated frame keeps its time; one frame, possibly repeated,
        may come with its one time).

    Raises:
        ValueError: As `video_fps`.
    """
    one_frame = timestamps is not None and len(set(timestamps)) == 1
    if fps is None and timestamps is not None and one_frame and len(timestamps) == num_frames:
        return [float(t) for t in timestamps]  # one frame, maybe repeated: its time, no rate
    rate = video_fps(num_frames, fps, timestamps)  # validates either form
    if timestamps is not None:
        return [float(t) for t in timestamps]
    return [i / rate for i in range(num_frames)]


def _check_frames(frames: Any) -> np.ndarray:
    if isinstance(frames, torch.Tensor):
        frames = frames.cpu().numpy()
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8:
        raise ValueError("frames must be a uint8 numpy array [T, H, W, 3]")
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"frames must have shape [T, H, W, 3] with T >= 1, got {frames.shape}")
    return frames


def _encode_prompt(
    proc_or_tok: Any,
    prompt: str,
    frames: np.ndarray | None,
    fps: float | None,
    timestamps: Sequence[float] | None,
) -> BatchDict:
    """Tokenize a rendered prompt, expanding the video placeholder with the processor."""
    if not _is_multimodal(proc_or_tok):
        enc = proc_or_tok([prompt], add_special_tokens=False, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    video: dict[str, Any] = {}
    if frames is not None:
        t, h, w, _ = frames.shape
        times = frame_times(t, fps, timestamps)
        # Our frames are already sampled: the processor must neither resample them nor guess
        # their times (it assumes 24 fps); the family decides how the times are given.
        video = {
            "videos": [frames],
            "video_metadata": [video_metadata(proc_or_tok, times, h, w)],
            "do_sample_frames": False,
        }
    enc = proc_or_tok(
        text=[prompt], add_special_tokens=False, return_tensors="pt",
        return_mm_token_type_ids=True, **video,
    )  # fmt: skip
    out = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
    if "mm_token_type_ids" not in out:
        raise ValueError(
            "processor returned no mm_token_type_ids: 3-D M-RoPE would silently be 1-D"
        )
    return out


def _append_target(proc_or_tok: Any, sample: BatchDict, target: str) -> BatchDict:
    """Append target + end-of-turn tokens; labels are -100 everywhere else."""
    tok = _tokenizer_of(proc_or_tok)
    ids = tok(target, add_special_tokens=False)["input_ids"] + end_of_turn_ids(proc_or_tok)
    new = torch.tensor([ids], dtype=sample["input_ids"].dtype)  # [1, N]
    prompt_len = sample["input_ids"].shape[1]
    out = dict(sample)
    out["input_ids"] = torch.cat([sample["input_ids"], new], dim=1)  # [1, P + N]
    out["attention_mask"] = torch.cat(
        [sample["attention_mask"], torch.ones_like(new, dtype=sample["attention_mask"].dtype)], 1
    )
    if "mm_token_type_ids" in sample:
        mm = sample["mm_token_type_ids"]
        out["mm_token_type_ids"] = torch.cat([mm, torch.zeros_like(new, dtype=mm.dtype)], 1)
    labels = torch.full_like(out["input_ids"], IGNORE_INDEX)
    labels[:, prompt_len:] = new
    out["labels"] = labels
    return out


def build_sample(
    processor: Any,
    question: str,
    options: Sequence[str] | None = None,
    frames: np.ndarray | torch.Tensor | None = None,
    fps: float | None = None,
    timestamps: Sequence[float] | None = None,
    target: str | None = None,
    mode: Mode = "think",
    system_prompt: str | None = SYSTEM_PROMPT,
    instruction: str | None = None,
) -> BatchDict:
    """Build the model inputs of one sample with the model's own chat template and processor.

    Args:
        processor: A VLM processor (`load_vlm`) or, for text-only samples, a tokenizer (`load_llm`).
        question: Question text.
        options: Option texts (lettered A, B, ... here), or None for open-ended.
        frames: uint8 [T, H, W, 3] already-sampled frames, or None for a text-only sample.
        fps: Sampling rate of `frames` (frames per second); exclusive with `timestamps`.
        timestamps: Time in seconds of each frame: what the model is told, as its family takes
            times (`lvr.models.family.video_metadata`).
        target: Assistant text (see `format_target`); when given, it is appended with the
            end-of-turn token and `labels` cover exactly those tokens.
        mode: "think" or "direct" instruction.
        system_prompt: System turn; None leaves the chat template's default.
        instruction: Override of the instruction line.

    Returns:
        Tensors with batch size 1, ready for `model(**sample)` / `collate`:
        input_ids [1, L], attention_mask [1, L], and with a VLM processor mm_token_type_ids [1, L]
        (0 text, 1 image, 2 video); with frames pixel_values_videos [N_patches, 3*2*p*p],
        video_grid_thw [1, 3] and, for Qwen2.5-VL, second_per_grid_ts [1] (Qwen3-VL / Qwen3.5:
        the frame times are `<t seconds>` text in input_ids); with a target labels [1, L].

    Raises:
        ValueError: Bad frames, fps/timestamps, options, mode, control tokens in the text, or
            frames given to a tokenizer.
    """
    if frames is None and (fps is not None or timestamps is not None):
        raise ValueError("fps/timestamps given without frames")
    if frames is not None and not _is_multimodal(processor):
        raise ValueError("frames need a multimodal processor (load_vlm), got a tokenizer")
    arr = _check_frames(frames) if frames is not None else None
    _check_text(
        processor, question=question, options="\n".join(map(str, options or [])), target=target
    )
    messages = build_messages(
        question,
        options,
        mode=mode,
        has_video=arr is not None,
        system_prompt=system_prompt,
        instruction=instruction,
    )
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    sample = _encode_prompt(processor, prompt, arr, fps, timestamps)
    return sample if target is None else _append_target(processor, sample, target)


def frames_sample(
    processor: Any,
    question: str,
    options: Sequence[str] | None,
    frames: Frames,
    target: str | None = None,
    mode: Mode = "think",
) -> BatchDict:
    """The sample of a question over decoded frames, timed by their true timestamps.

    The one video -> sample path of SFT, RL and evaluation with a local model: the frame times
    the model is told are those of the frames `lvr.media` actually decoded (with a frame cap,
    fps sampling, a clip window or a variable frame rate alike).
    """
    ts = [float(t) for t in frames.timestamps_s]
    return build_sample(
        processor, question, options or None, frames=frames.frames, target=target, mode=mode,
        timestamps=ts,
    )  # fmt: skip
