"""From a question row to a model request and back to scored prediction rows.

Prompts come from ``lvr.models.prompts`` (the same system prompt, think/direct instruction and
option lettering that SFT and RL train on, and no torch: an API evaluation runs on the core
install), so an evaluated checkpoint sees its training format. Frames come from
``lvr.media.sample_video`` (N uniform frames, or F per second capped at N, then downscaled to
``max_pixels``), the call SFT and RL use. A video that is missing or fails to decode makes error rows for
that question; nothing is substituted.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from lvr.backends import Request, make_backend
from lvr.errors import LvrError
from lvr.eval.extract import (
    PARSER_VERSION,
    extract_choice,
    extract_open,
    format_ok,
    open_match,
    strict_answer,
    strict_match,
)
from lvr.eval.options import option_labels
from lvr.media import FrameSpec, VideoDecodeError, sample_video
from lvr.models.prompts import PROMPT_VERSION, build_messages

JUDGE_ERROR_PREFIX = "judge"  # rows whose only problem was the judge keep their response on resume
SUBTITLE_HEADER = "This video's subtitles are listed below:"
# Eval-only instructions for numbered options (NExT-QA); lettered prompts come from lvr.models.
NUMBER_INSTRUCTIONS = {
    "think": "Think step by step inside <think></think>, "
    "then give the option number inside <answer></answer>.",
    "direct": "Answer with the option number only, inside <answer></answer>.",
}


def prompt_version() -> str:
    """Version of the shared prompt format (part of the settings hash)."""
    return PROMPT_VERSION


# ---------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------


def resolve_backend_name(cfg: Any) -> str:
    """``auto`` resolves to ``openai`` for ``openai:`` models, else ``hf``."""
    if cfg.backend != "auto":
        return cfg.backend
    return "openai" if cfg.model.startswith("openai:") else "hf"


def make_model_backend(cfg: Any) -> Any:
    """Build the backend that answers the questions (hf, openai, or the vLLM hook).

    Args:
        cfg: ``EvalConfig``.

    Returns:
        An ``lvr.backends`` backend.

    Raises:
        LvrError: vLLM asked for but not installed (or its engine missing), bad options.
    """
    name = resolve_backend_name(cfg)
    model = cfg.model.split(":", 1)[1] if cfg.model.startswith("openai:") else cfg.model
    if name == "vllm":
        return _vllm_backend(cfg, model)
    if name == "openai":
        return make_backend("openai", model, base_url=cfg.base_url, concurrency=cfg.concurrency)
    return make_backend("hf", model, device=cfg.device, batch_size=cfg.batch_size)


def _vllm_backend(cfg: Any, model: str) -> Any:
    """The offline vLLM backend (``lvr.eval.vllm_backend``): batched generation on raw frames."""
    if importlib.util.find_spec("vllm") is None:
        raise LvrError(
            "backend 'vllm' needs vLLM: install lvr[gpu] (pip install 'lvr[gpu]') on a GPU machine, "
            "or serve the model with `vllm serve` and pass --model openai:<served name>"
        )
    from lvr.eval.vllm_backend import VLLMBackend, VLLMOptions  # vLLM: the optional `gpu` extra

    names = [f.name for f in dataclasses.fields(VLLMOptions)]
    unknown = sorted(set(cfg.vllm) - set(names))
    if unknown:
        raise LvrError(
            f"unknown vllm options {unknown}; valid: {names} (other vllm.LLM arguments go under "
            "vllm.llm, e.g. --set vllm.llm.enforce_eager=true)"
        )
    return VLLMBackend(model, VLLMOptions(**dict(cfg.vllm)))


def make_judge_backend(cfg: Any, cache_path: Path) -> Any:
    """The open-ended judge backend (cached), or None when no judge model is configured."""
    if not cfg.judge.model:
        return None

    return make_backend(
        "openai", cfg.judge.model, cache_path=cache_path, base_url=cfg.judge.base_url
    )


# ---------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------


def subtitles_at(cues: Sequence[Sequence[Any]], timestamps: Sequence[float]) -> list[str]:
    """Texts of the subtitle cues on screen at any of the sampled frame times, in order, once each.

    >>> subtitles_at([[0.0, 1.0, "hi"], [1.0, 2.0, "yo"], [5.0, 6.0, "bye"]], [0.5, 0.7, 1.5])
    ['hi', 'yo']
    """
    return [str(text) for start, end, text in cues if any(start <= t < end for t in timestamps)]


def question_text(q: dict[str, Any], timestamps: Sequence[float] = ()) -> str:
    """Question text, after the subtitles the adapter kept (if any).

    Video-MME's protocol shows the cues on screen at the sampled frames; Video-MME-v2's official
    "concatenated" mode (``subtitles_mode`` = ``all``) shows every subtitle word.
    """
    extra = json.loads(q["extra"] or "{}")
    cues = extra.get("subtitles")
    if cues and extra.get("subtitles_mode") == "all":
        lines = [" ".join(str(c[2]) for c in cues if str(c[2]).strip())]
    else:
        lines = subtitles_at(cues, timestamps) if cues else []
    return "\n".join([SUBTITLE_HEADER, *lines, q["question"]]) if lines else q["question"]


def labels_of(q: dict[str, Any]) -> str:
    """Option labels of a question row: ``ABCD...``, or ``0123...`` for numbered options."""
    options = q.get("options") or []
    return option_labels(len(options), json.loads(q.get("extra") or "{}"))


def prompt_messages(q: dict[str, Any], text: str, mode: str) -> list[dict[str, Any]]:
    """Chat messages of a question: the shared training format, or numbered options.

    Lettered options use ``build_messages`` exactly as SFT/RL do. Numbered options (NExT-QA) are
    listed "0. ..." with an instruction asking for the option number; that prompt is eval-only
    (training data is always lettered).
    """
    options = list(q["options"] or [])
    labels = labels_of(q)
    if not options or not labels.isdigit():
        return build_messages(text, options or None, mode=mode, has_video=False)
    block = "\n".join(
        [text.strip(), *(f"{lab}. {opt}" for lab, opt in zip(labels, options, strict=True))]
    )
    return build_messages(
        block, None, mode=mode, has_video=False, instruction=NUMBER_INSTRUCTIONS[mode]
    )


def build_request(q: dict[str, Any], frames: Any, cfg: Any, missing: Sequence[int]) -> Any:
    """One request asking for ``len(missing)`` samples of one question.

    Args:
        q: Question row.
        frames: ``lvr.media.Frames`` of its video.
        cfg: ``EvalConfig``.
        missing: Pass indices still to answer (their count is ``n``; the first sets the seed).

    Returns:
        An ``lvr.backends.Request``.
    """
    # Text-only messages: each backend places the frames itself, before the text of the user turn
    # (the hf backend as one video at `fps`, the OpenAI-compatible one as images), which is where
    # `build_sample` puts the video in training.
    text = question_text(q, frames.timestamps_s.tolist())
    messages = prompt_messages(q, text, cfg.prompt)
    info = frames.info
    fps = len(frames.frames) / info.duration_s if info.duration_s > 0 else info.fps
    return Request(
        item_id=q["qa_id"],
        messages=messages,
        images=list(frames.frames),
        fps=float(fps),
        timestamps=[float(t) for t in frames.timestamps_s],  # the true times of these frames
        max_tokens=cfg.max_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        n=len(missing),
        seed=cfg.seed + min(missing),
        prompt_version=PROMPT_VERSION,
    )


def load_frames(path: str, frames: int, cfg: Any) -> Any:
    """Sample a question's frames (N uniform, or F per second capped at N), downscaled.

    Raises:
        VideoDecodeError, ValueError: The caller turns them into error rows.
    """
    spec = FrameSpec(frames, fps=cfg.fps or 0.0, max_pixels=cfg.max_pixels or 0)
    return sample_video(path, spec)


def ask(
    cfg: Any,
    backend: Any,
    chunk: Sequence[tuple[dict[str, Any], list[int]]],
    frames: int,
    settings: dict[str, Any],
    progress: bool,
) -> tuple[list[dict[str, Any]], int]:
    """Answer the missing passes of a chunk of questions.

    Args:
        cfg: ``EvalConfig``.
        backend: Model backend.
        chunk: ``(question row, missing pass indices)`` pairs.
        frames: Frame budget.
        settings: ``settings_for`` dict.
        progress: Show the backend's progress bar.

    Returns:
        ``(prediction rows, requests sent)``.
    """
    ready = [(q, m) for q, m in chunk if q["error"] is None]
    rows = [error_row(q, k, q["error"], settings) for q, m in chunk if q["error"] for k in m]

    def decode(item: tuple[dict[str, Any], list[int]]) -> Any:
        try:
            return load_frames(item[0]["video_path"], frames, cfg)
        except (VideoDecodeError, ValueError, OSError) as exc:
            return exc

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        decoded = list(pool.map(decode, ready))
    requests, metas = [], []
    for (q, missing), got in zip(ready, decoded, strict=True):
        if isinstance(got, Exception):
            rows += [error_row(q, k, f"video: {got}", settings) for k in missing]
        else:
            requests.append(build_request(q, got, cfg, missing))
            metas.append((q, missing, len(got.frames)))
    if requests:
        responses = backend.run(requests, progress=progress)
        for (q, missing, nframes), resp in zip(metas, responses, strict=True):
            rows += _response_rows(q, missing, nframes, resp, settings)
    return rows, len(requests)


def _response_rows(
    q: dict[str, Any], missing: list[int], nframes: int, resp: Any, settings: dict[str, Any]
) -> list[dict[str, Any]]:
    if resp.error is not None:
        return [error_row(q, k, f"model: {resp.error}", settings, nframes) for k in missing]
    if len(resp.texts) != len(missing):
        msg = f"model: backend returned {len(resp.texts)} outputs for n={len(missing)}"
        return [error_row(q, k, msg, settings, nframes) for k in missing]
    rows = []
    for k, text in zip(missing, resp.texts, strict=True):
        row = error_row(q, k, None, settings, nframes)
        row.update(response=text, latency_s=resp.latency_s)
        rows.append(score_row(row, q))
    return rows


# ---------------------------------------------------------------------------------------------
# Rows and scoring
# ---------------------------------------------------------------------------------------------


def error_row(
    q: dict[str, Any], pass_index: int, error: str | None, settings: dict[str, Any], frames: int = 0
) -> dict[str, Any]:
    """A prediction row without a response (also the base of answered rows)."""
    return {
        "qa_id": q["qa_id"],
        "benchmark": q["benchmark"],
        "model": settings["model"],
        "pass_index": pass_index,
        "category": q["category"],
        "duration_bucket": q["duration_bucket"],
        "format": q["format"],
        "options": q["options"],
        "answer": q["answer"],
        "response": None,
        "extracted": None,
        "correct": False,
        "strict_correct": False,
        "format_ok": False,
        "frames": frames,
        "latency_s": None,
        "settings": json.dumps(settings, sort_keys=True),
        "error": error,
    }


def score_row(row: dict[str, Any], q: dict[str, Any]) -> dict[str, Any]:
    """Fill extracted / correct / strict_correct / format_ok of a row that has a response."""
    text = row["response"]
    gold = q["answer"] or ""
    if q["format"] == "mc":
        options = list(q["options"] or [])
        letter, _rule = extract_choice(text, labels_of(q), options)
        row.update(extracted=letter, correct=letter is not None and letter == gold)
        row["strict_correct"] = strict_match(text, gold)
    else:
        row.update(extracted=extract_open(text), correct=open_match(text, gold))
        row["strict_correct"] = strict_answer(text) == gold
    row["format_ok"] = format_ok(text)
    return row


def rescore(row: dict[str, Any], q: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """Re-apply the current parser to a stored row (cheap; keeps scores and parser in sync).

    The gold answer and labels are taken from the current question row (a corrected benchmark
    file re-scores without re-asking); a row whose only error came from the judge is reset so
    that the judge runs again.
    """
    row = dict(row)
    row.update({k: q[k] for k in ("answer", "category", "duration_bucket", "format", "benchmark")})
    if row["error"] is not None and row["error"].startswith(JUDGE_ERROR_PREFIX):
        row["error"] = None
    stored = json.loads(row["settings"])
    if stored.get("parser") != PARSER_VERSION or stored.get("judge") != settings.get("judge"):
        row["settings"] = json.dumps(
            {**stored, "parser": PARSER_VERSION, "judge": settings.get("judge")}, sort_keys=True
        )
    return score_row(row, q) if row["error"] is None and row["response"] is not None else row
