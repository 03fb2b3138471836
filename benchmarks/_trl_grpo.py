"""TRL `GRPOTrainer` step time on the tiny Qwen2.5-VL, as a compute-equivalent video baseline.

A helper of `benchmarks/grpo_step.py` (which prints the verdict); `make bench` skips `_` files.

TRL 1.16's `GRPOTrainer` cannot feed a Qwen2.5-VL *video* (its prompt tokenization and its
log-prob forward carry image fields only: `pixel_values` / `image_grid_thw`, never
`pixel_values_videos` / `video_grid_thw`). It does train on multi-image prompts, so the video of
F frames that `lvr rl` sees is given to TRL as F/2 images: every other frame, at the same pixel
size. Qwen2.5-VL repeats each image to `temporal_patch_size` = 2 frames before patching, so the
F/2 images make exactly as many vision patches (F/2 x h x w) and as many LM visual tokens
(F/2 x h x w / merge^2) as the F-frame video (F/2 temporal groups of two frames): the vision
tower and the language model do the same work per forward as in `benchmarks/grpo_step.py`.
The prompt differs only by one `<|vision_start|>`/`<|vision_end|>` pair per image instead of one
per video, and the M-RoPE temporal index (per image instead of per frame pair).

Everything else matches `grpo_step.py`: the same tiny model folder, questions, system prompt and
instruction, frame sampler and pixel cap, G, prompts per optimizer step, response length,
temperature / top-p, clip range, KL coefficient (so TRL also runs the reference forward), frozen
vision tower, fp32 on CPU, learning rate 0.

    .venv/bin/python benchmarks/_trl_grpo.py
    .venv/bin/python benchmarks/_trl_grpo.py --frames 128 --steps 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lvr.demo.color_task import make_color_qa  # noqa: E402

MAX_PIXELS = 12544  # per-frame cap of grpo_step.py (data.max_pixels): 112 x 112


def _rl_defaults() -> tuple[Any, Any]:
    """Default algorithm and rollout sections of `lvr rl` (KL, clip range, top-p, ...)."""
    from lvr.train.config import AlgoSection, RolloutSection

    return AlgoSection(), RolloutSection()


def _is_visual(name: str) -> bool:
    # Same rule as lvr.train.policy.is_vision: the vision tower and projector stay frozen.
    return ".visual." in name or name.startswith("visual.")


def _build_rows(
    qa_dir: Path, frames: int, prompts: int, max_pixels: int, processor: Any, mode: str
) -> tuple[dict[str, list], int]:
    """Dataset columns (prompt, images, answer) and our visual tokens per prompt (first row).

    Frames come from our sampler exactly as `lvr rl` takes them (`num_frames`, pixel cap);
    TRL gets every other frame as an image.
    """
    from PIL import Image

    from lvr.media import sample_frames
    from lvr.models.inputs import build_messages, build_sample
    from lvr.train.data import read_qa

    rows = read_qa(qa_dir, "sft")[:prompts]
    cols: dict[str, list] = {"prompt": [], "images": [], "answer": []}
    ours_tokens = -1
    for row in rows:
        fr = sample_frames(row.video_path, num_frames=frames, max_pixels=max_pixels or None)
        if ours_tokens < 0:  # what our sample builder makes of the same frames
            ts = [float(t) for t in fr.timestamps_s]
            rate: dict[str, Any] = {"timestamps": ts} if len(ts) >= 2 else {"fps": 1.0}
            ours = build_sample(
                processor, row.question, row.options or None, frames=fr.frames, mode=mode, **rate
            )
            ours_tokens = int((ours["mm_token_type_ids"] == 2).sum())
        # String contents: TRL puts one image placeholder per image before the user text,
        # where our template puts the video.
        msgs = build_messages(row.question, row.options or None, mode=mode, has_video=False)
        cols["prompt"].append(msgs)
        cols["images"].append([Image.fromarray(f) for f in fr.frames[::2]])
        cols["answer"].append(row.answer.strip())
    return cols, ours_tokens


def _accuracy_reward(completions: list, answer: list[str], **_: Any) -> list[float]:
    """1.0 when `<answer>X</answer>` holds the gold letter (cheap; timing does not depend on it)."""
    out = []
    for comp, gold in zip(completions, answer, strict=True):
        text = comp[-1]["content"] if isinstance(comp, list) else str(comp)
        m = re.search(r"<answer>\s*(.*?)\s*</answer>", text, re.S)
        out.append(1.0 if m and m.group(1).strip().upper().startswith(gold.upper()) else 0.0)
    return out


class _Probe:
    """Forward pre-hooks that record what TRL feeds the model: visual tokens per row of every
    multimodal forward (from `image_grid_thw` and from the image placeholders in `input_ids`),
    and how many images the vision towers encode."""

    def __init__(self, image_token_id: int, merge: int) -> None:
        self.image_token_id, self.merge2 = image_token_id, merge * merge
        self.grid_tokens: set[int] = set()  # per row, from image_grid_thw
        self.placeholders: set[int] = set()  # per row, image pad tokens in input_ids
        self.images_encoded = 0
        self.handles: list[Any] = []

    def attach(self, model: Any) -> None:
        self.handles.append(model.register_forward_pre_hook(self._lm, with_kwargs=True))
        self.handles.append(
            model.model.visual.register_forward_pre_hook(self._vis, with_kwargs=True)
        )

    def _lm(self, _mod: Any, args: tuple, kwargs: dict) -> None:
        grid, ids = kwargs.get("image_grid_thw"), kwargs.get("input_ids")
        if grid is None or kwargs.get("pixel_values") is None or ids is None:
            return
        rows = ids.shape[0]
        self.grid_tokens.add(int(grid.prod(-1).sum()) // self.merge2 // rows)
        self.placeholders.update((ids == self.image_token_id).sum(1).tolist())

    def _vis(self, _mod: Any, args: tuple, kwargs: dict) -> None:
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        if grid is not None:
            self.images_encoded += int(grid.shape[0])

    def detach(self) -> None:
        for h in self.handles:
            h.remove()


def trl_step_seconds(
    model_dir: Path,
    qa_dir: Path,
    frames: int,
    g: int,
    prompts: int,
    new_tokens: int,
    steps: int = 3,
    *,
    work: Path,
    max_pixels: int = MAX_PIXELS,
    threads: int = 1,
    mode: str = "think",
) -> dict:
    """Median seconds per GRPOTrainer optimizer step (after 1 warm-up step), plus details.

    One optimizer step = `prompts` prompts x `g` completions: generation of all of them in one
    batch, the reference forward in chunks of `g` rows, then `prompts` accumulation micro-steps
    of `g` rows each (as `micro_batch=g` in grpo_step.py).

    Args:
        model_dir: The tiny Qwen2.5-VL folder (`lvr.models.tiny.build_tiny_vlm`, which
            `lvr rl` builds for `model.path=tiny` in `<run>/models/tiny-vlm`).
        qa_dir: The qa table (split "sft" as in grpo_step.py); its first `prompts` rows are used.
        frames: Frames per video (TRL gets frames/2 images).
        g: Completions per prompt (G).
        prompts: Prompts per optimizer step.
        new_tokens: Maximum completion length.
        steps: Timed steps (one more runs first as warm-up).
        work: Scratch folder (TRL output_dir).
        max_pixels: Per-frame pixel cap of the frame sampler.
        threads: torch CPU threads.
        mode: Prompt instruction ("think" as `lvr rl`'s default).

    Returns:
        step_s (median of on_step_begin..on_step_end), interval_s (median between consecutive
        step ends, so also the data loading), all step times, TRL's visual tokens per prompt
        (from image_grid_thw and from the image placeholders), ours for the same frames (video
        tokens of our `build_sample`), images encoded by the vision towers per step, and the
        mean completion length.
    """
    import torch
    from datasets import Dataset
    from transformers import (
        AutoProcessor,
        PrinterCallback,
        Qwen2_5_VLForConditionalGeneration,
        TrainerCallback,
    )
    from trl import GRPOConfig, GRPOTrainer

    if frames % 2:
        raise ValueError(f"frames must be even (pairs of frames = images), got {frames}")
    torch.set_num_threads(threads)
    algo, rollout = _rl_defaults()
    model_dir = Path(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="sdpa"
    )
    for name, p in model.named_parameters():
        p.requires_grad_(not _is_visual(name))
    cols, ours_tokens = _build_rows(Path(qa_dir), frames, prompts, max_pixels, processor, mode)
    dataset = Dataset.from_dict(cols)

    lengths: list[int] = []

    def reward(
        completions: list, answer: list[str], completion_ids: list, **kw: Any
    ) -> list[float]:
        lengths.extend(len(c) for c in completion_ids)
        return _accuracy_reward(completions, answer)

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.begin: list[float] = []
            self.end: list[float] = []

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.begin.append(time.perf_counter())

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.end.append(time.perf_counter())

    timer = Timer()
    use_kl = algo.kl != "none" and algo.kl_coef > 0
    args = GRPOConfig(
        output_dir=str(Path(work) / "trl"), use_cpu=True, bf16=False, fp16=False, seed=0,
        num_generations=g, per_device_train_batch_size=g, gradient_accumulation_steps=prompts,
        max_completion_length=new_tokens, temperature=rollout.temperature, top_p=rollout.top_p,
        learning_rate=0.0, weight_decay=0.01, max_grad_norm=1.0, lr_scheduler_type="constant",
        beta=algo.kl_coef if use_kl else 0.0, epsilon=algo.clip_low, epsilon_high=algo.clip_high,
        loss_type="dapo", scale_rewards="group", num_iterations=1, use_vllm=False,
        activation_checkpointing=False, disable_dropout=True, shuffle_dataset=False,
        max_steps=steps + 1, logging_strategy="no", save_strategy="no", report_to="none",
        disable_tqdm=True, dataloader_pin_memory=False, log_completions=False,
    )  # fmt: skip
    trainer = GRPOTrainer(
        model=model, reward_funcs=reward, args=args, train_dataset=dataset,
        processing_class=processor, callbacks=[timer],
    )  # fmt: skip
    trainer.remove_callback(PrinterCallback)  # no end-of-training metrics dump on stdout
    vis_cfg = model.config.vision_config
    probe = _Probe(model.config.image_token_id, vis_cfg.spatial_merge_size)
    for m in (trainer.model, trainer.ref_model):
        if m is not None:
            probe.attach(m)
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    probe.detach()

    step_s = [e - b for b, e in zip(timer.begin, timer.end, strict=True)]
    intervals = [b - a for a, b in zip(timer.end, timer.end[1:], strict=False)]
    timed = step_s[1:] or step_s
    return {
        "frames": frames,
        "images_per_prompt": frames // 2,
        "g": g,
        "prompts": prompts,
        "new_tokens": new_tokens,
        "step_s": round(statistics.median(timed), 3),
        "interval_s": round(statistics.median(intervals), 3) if intervals else None,
        "all_step_s": [round(s, 3) for s in step_s],
        "train_s": round(total, 3),
        "visual_tokens_trl": sorted(probe.grid_tokens),
        "visual_placeholders_trl": sorted(probe.placeholders),
        "visual_tokens_ours": ours_tokens,
        "images_encoded_per_step": probe.images_encoded / max(1, len(step_s)),
        "completion_len_mean": round(statistics.mean(lengths), 2) if lengths else None,
        "beta": args.beta,
        "reference_model": trainer.ref_model is not None,
        "activation_checkpointing": bool(args.activation_checkpointing),
        "threads": threads,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=64)
    ap.add_argument("--g", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    from lvr.models.tiny import build_tiny_vlm

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        f = args.frames
        dur = max(2.0, f / 16.0)
        qa = make_color_qa(
            work / "data", args.prompts, 0, seed=3, size=112, fps=16.0, duration_s=dur
        )
        model_dir = build_tiny_vlm(work / "models" / "tiny-vlm")  # as `lvr rl` model.path=tiny
        row = trl_step_seconds(
            model_dir, qa, f, args.g, args.prompts, args.new_tokens, args.steps,
            work=work, threads=args.threads,
        )  # fmt: skip
    print(json.dumps({"benchmark": "trl_grpo_step", **row}), flush=True)


if __name__ == "__main__":
    main()
