"""Training data over the `qa` table (shared by SFT and RL): rows, frames, samples, batches.

- `read_qa` reads any Parquet in the `qa` schema (e.g. `runs/<run>/qa`) and keeps one split.
- `load_sample` samples frames with `lvr.media.sample_video` and builds the model inputs with the
  shared `lvr.models.inputs.frames_sample` (chat template, video tokens and their true times,
  `mm_token_type_ids` for 3-D M-RoPE, labels on the assistant turn only): the one video -> sample
  path of SFT and RL. A sample longer than `max_seq_len` is rebuilt with fewer frames until it
  fits (never cut in the middle); a video that fails to decode is reported, never replaced.
- `plan_steps` fixes which rows form each optimizer step (seeded, optionally length-grouped) and
  `rank_micro_batches` gives each rank its share, so a 2-process run sees exactly the rows of a
  1-process run with the same global batch, and a resumed run continues with the same rows.
Batches are padded by the shared `lvr.models.batching.collate`.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lvr.artifacts import read_table
from lvr.errors import LvrError
from lvr.media import FrameSpec, VideoDecodeError, sample_video
from lvr.models.family import frames_per_unit
from lvr.models.inputs import format_target, frames_sample

__all__ = ["DataError", "FrameSpec", "LoadedSample", "QARow", "load_sample", "read_qa"]


class DataError(LvrError):
    """The training table is missing, empty or unusable."""


@dataclass(frozen=True)
class QARow:
    """One training question from the `qa` table."""

    qa_id: str
    video_path: str
    question: str
    options: list[str]
    answer: str
    reasoning: str | None
    format: str
    duration_s: float | None


@dataclass
class LoadedSample:
    """A built sample, or why there is none.

    Attributes:
        row: The source row.
        inputs: Tensors of `build_sample` (batch size 1), None when `error` is set.
        frames: Frames actually used (after truncation).
        truncated: True when fewer frames than requested were used to fit `max_seq_len`.
        error: Reason the sample was skipped (decode failure, too long with `min_frames`).
    """

    row: QARow
    inputs: dict[str, torch.Tensor] | None
    frames: int = 0
    truncated: bool = False
    error: str | None = None
    frame_indices: tuple[int, ...] = ()  # which frames of the video (an embedding cache key)
    frame_shape: tuple[int, int] = (0, 0)  # their decoded (height, width)

    @property
    def video_tokens(self) -> int:
        """Number of video placeholder tokens in `input_ids`."""
        if self.inputs is None or "mm_token_type_ids" not in self.inputs:
            return 0
        return int((self.inputs["mm_token_type_ids"] == 2).sum())


def read_qa(path: str | Path, split: str | None = "sft") -> list[QARow]:
    """Read the rows of one split from a `qa` table (file or folder), skipping error rows.

    Args:
        path: A Parquet file or table folder in the `qa` schema.
        split: Keep rows whose `split` equals this (None keeps all).

    Returns:
        Rows sorted by `qa_id` (a stable order, independent of file layout).

    Raises:
        DataError: The path holds no table, or no usable row of that split.
        SchemaError: A file does not match the `qa` schema.
    """
    if Path(path).suffix.lower() in (".jsonl", ".json"):
        # `lvr datagen export` writes these for other tools; they have lost the columns training
        # needs (options, format, split), and "not a readable Parquet file; remove or replace it"
        # would point the user at deleting their export.
        raise DataError(
            f"{path} is a JSONL export; lvr sft/rl read the qa table itself (Parquet): set "
            "data.qa to the run's qa folder (<run>/qa), or leave it empty to use --run's"
        )
    try:
        table = read_table(path, "qa")
    except FileNotFoundError as exc:
        raise DataError(f"no qa table at {path}: {exc} (run `lvr datagen filter` first)") from None
    rows = []
    for r in table.to_pylist():
        if r["error"] is not None or (split is not None and r["split"] != split):
            continue
        rows.append(
            QARow(
                qa_id=r["qa_id"],
                video_path=r["video_path"],
                question=r["question"],
                options=list(r["options"] or []),
                answer=r["answer"],
                reasoning=r["reasoning"],
                format=r["format"] or ("mc" if r["options"] else "open"),
                duration_s=r["duration_s"],
            )
        )
    if not rows:
        raise DataError(f"{path} holds no error-free rows with split={split!r}")
    return sorted(rows, key=lambda r: r.qa_id)


def target_text(row: QARow, mode: str) -> str:
    """The assistant target of a row (`<think>..</think><answer>X</answer>` in "think" mode)."""
    reasoning = (row.reasoning or "").strip() if mode == "think" else None
    return format_target(row.answer.strip(), reasoning)


def _fitting_frames(inputs: dict, frames: int, max_seq_len: int, temporal: int) -> int:
    """Largest frame count (multiple of the temporal patch) whose sample fits `max_seq_len`."""
    length = inputs["input_ids"].shape[1]
    video = int((inputs["mm_token_type_ids"] == 2).sum())
    per_group = video / max(1, -(-frames // temporal))  # tokens per temporal group of frames
    groups = int((max_seq_len - (length - video)) // per_group) if per_group else 0
    return groups * temporal


def load_sample(
    processor: Any,
    row: QARow,
    spec: FrameSpec,
    max_seq_len: int,
    mode: str = "think",
    target: bool = True,
) -> LoadedSample:
    """Decode frames and build one sample, truncating by frames when it is too long.

    The one video -> sample path of both recipes (RL builds prompts with `target=False`).

    Args:
        processor: The VLM processor.
        row: The question.
        spec: Frame sampling.
        max_seq_len: Longest allowed sequence (prompt + video tokens + target).
        mode: "think" (reasoning target) or "direct".
        target: Append the assistant target (SFT); False builds the prompt alone (RL).

    Returns:
        A `LoadedSample`; decode failures and samples that do not fit even with `min_frames` come
        back with `error` set (the caller counts and logs them), never with other frames.
    """
    temporal = frames_per_unit(processor)
    text = target_text(row, mode) if target else None
    want, truncated = spec, False
    for _ in range(4):  # the token count is linear in frames: one or two rebuilds suffice
        try:
            frames = sample_video(row.video_path, want)
        except (VideoDecodeError, OSError) as exc:
            return LoadedSample(row, None, error=f"decode: {type(exc).__name__}: {exc}")
        inputs = frames_sample(processor, row.question, row.options, frames, text, mode)  # type: ignore[arg-type]
        if inputs["input_ids"].shape[1] <= max_seq_len:
            return LoadedSample(
                row, inputs, frames=len(frames.frames), truncated=truncated,
                frame_indices=tuple(int(i) for i in frames.indices),
                frame_shape=(int(frames.frames.shape[1]), int(frames.frames.shape[2])),
            )  # fmt: skip
        n = len(frames.frames)
        fit = min(_fitting_frames(inputs, n, max_seq_len, temporal), n - 1)
        if fit < max(spec.min_frames, 1):
            break
        # fewer frames, evenly spread over the video
        want, truncated = dataclasses.replace(want, frames=fit, fps=0.0), True
    return LoadedSample(
        row,
        None,
        error=f"too long: does not fit max_seq_len={max_seq_len} with {want.frames} frames",
    )


# ---------------------------------------------------------------------------------------------
# Which rows each step trains on
# ---------------------------------------------------------------------------------------------


def text_lengths(processor: Any, rows: Sequence[QARow], mode: str) -> list[int]:
    """Token counts of question + options + target per row (the part that varies between rows).

    Under a fixed frame budget the video tokens are nearly constant, so this is what
    length-grouping needs, and it costs no video decoding.
    """
    tok = getattr(processor, "tokenizer", processor)
    texts = [r.question + " ".join(r.options) + target_text(r, mode) for r in rows]
    return [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]


def plan_steps(
    lengths: Sequence[int],
    global_batch: int,
    num_steps: int,
    seed: int,
    group_by_length: bool = True,
) -> list[list[int]]:
    """Row indices of every optimizer step: shuffled each epoch, incomplete last batch dropped.

    With `group_by_length`, each epoch's shuffled rows are cut into mega-batches of 50 global
    batches, sorted by length inside (longest first), cut into global batches whose order is then
    shuffled; a step's rows are themselves sorted by length so that micro-batches pad little.

    Args:
        lengths: Per-row length estimate.
        global_batch: Rows per optimizer step (micro batch x accumulation x ranks).
        num_steps: Steps to plan (epochs repeat as needed).
        seed: Seed of the order (epoch e uses seed + e).
        group_by_length: Group similar lengths.

    Returns:
        `num_steps` lists of `global_batch` row indices.

    Raises:
        DataError: Fewer rows than one global batch.

    >>> plan_steps([1, 2, 3, 4], global_batch=2, num_steps=3, seed=0)[2] != []
    True
    """
    n = len(lengths)
    if n < global_batch:
        raise DataError(f"{n} rows cannot fill one global batch of {global_batch}")
    steps: list[list[int]] = []
    epoch = 0
    while len(steps) < num_steps:
        rng = random.Random(seed + epoch)
        order = list(range(n))
        rng.shuffle(order)
        batches = [
            order[i : i + global_batch] for i in range(0, n - global_batch + 1, global_batch)
        ]
        if group_by_length:
            batches = _length_grouped(order, lengths, global_batch, rng)
        steps.extend(batches)
        epoch += 1
    return steps[:num_steps]


def _length_grouped(
    order: list[int], lengths: Sequence[int], global_batch: int, rng: random.Random
) -> list[list[int]]:
    mega = global_batch * 50
    batches: list[list[int]] = []
    usable = len(order) - len(order) % global_batch
    for i in range(0, usable, mega):
        chunk = sorted(order[i : min(i + mega, usable)], key=lambda j: -lengths[j])
        batches.extend(chunk[k : k + global_batch] for k in range(0, len(chunk), global_batch))
    rng.shuffle(batches)
    return [sorted(b, key=lambda j: -lengths[j]) for b in batches]


def rank_micro_batches(
    step_rows: Sequence[int], micro_batch: int, grad_accum: int, rank: int, world_size: int
) -> list[list[int]]:
    """This rank's micro-batches of one step: micro-batch m of rank r is chunk m * world + r.

    >>> rank_micro_batches([0, 1, 2, 3, 4, 5, 6, 7], 2, 2, rank=1, world_size=2)
    [[2, 3], [6, 7]]
    """
    chunks = [step_rows[i : i + micro_batch] for i in range(0, len(step_rows), micro_batch)]
    return [list(chunks[m * world_size + rank]) for m in range(grad_accum)]
