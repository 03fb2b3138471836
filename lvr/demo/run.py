"""The steps of ``lvr demo`` (see lvr/demo/__init__.py), each resumable, all in one run layout."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from lvr.config import from_dict
from lvr.datagen.caption import run_caption
from lvr.datagen.config import DatagenConfig
from lvr.datagen.filter import run_filter
from lvr.datagen.qa import run_qa
from lvr.datagen.segment import run_segment
from lvr.demo import DemoConfig
from lvr.demo.color_task import FIXED_OPTIONS, render_color_inputs, split_folders
from lvr.errors import LvrError
from lvr.eval.config import EvalConfig
from lvr.eval.report import write_report
from lvr.eval.runner import run_eval
from lvr.layout import RunLayout
from lvr.models import build_tiny_vlm, smollm2_dir
from lvr.train.checkpoint import latest_checkpoint
from lvr.train.common import read_jsonl
from lvr.train.config import RLConfig, SFTConfig
from lvr.train.rl import run_rl
from lvr.train.sft import run_sft

FRAMES, MAX_PIXELS = 8, 56 * 56  # 4 temporal groups of 2 frames; 4 video tokens per frame pair


@dataclass
class StepResult:
    """One line of the final summary."""

    name: str
    seconds: float
    rows: str
    where: str
    note: str = ""
    accuracy: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def run_demo(cfg: DemoConfig, run: Path) -> list[StepResult]:
    """All steps in order; each is resumable on its own."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    layout = RunLayout(run)
    results = [
        _timed("inputs", lambda: step_inputs(layout, cfg)),
        _timed("datagen", lambda: step_datagen(layout)),
    ]
    base_model = build_tiny_vlm(layout.tiny_model(), seed=0, hidden=256, layers=4)
    results.append(_timed("eval base", lambda: step_eval(layout, cfg, base_model, "base")))
    results.append(_timed("sft", lambda: step_sft(layout, cfg, base_model)))
    results.append(_timed("eval sft", lambda: step_eval(layout, cfg, _latest(layout.sft), "sft")))
    results.append(_timed("rl", lambda: step_rl(layout, cfg)))
    results.append(_timed("eval rl", lambda: step_eval(layout, cfg, _latest(layout.rl), "rl")))
    results.append(_timed("report", lambda: step_report(layout)))
    if cfg.llm and cfg.llm_questions:
        results.append(_timed("llm_qa", lambda: step_llm_qa(layout, cfg)))
    return results


def _timed(name: str, fn: Callable[[], StepResult]) -> StepResult:
    Console().rule(f"[bold]demo: {name}")
    start = time.time()
    result = fn()
    result.name, result.seconds = name, time.time() - start
    return result


# ---------------------------------------------------------------------------------------------
# Data: the task's videos, then the datagen chain over them
# ---------------------------------------------------------------------------------------------


def step_inputs(layout: RunLayout, cfg: DemoConfig) -> StepResult:
    """The task's videos in split folders, with their (partly careless) annotations."""
    counts = {"sft": cfg.task_train, "rl": cfg.task_rl, "eval": cfg.task_eval}
    render_color_inputs(layout.inputs, counts, seed=0, size=56, mislabel=cfg.mislabel)
    note = (
        f"{cfg.mislabel:.0%} of yellow-first sft videos annotated as green" if cfg.mislabel else ""
    )
    total = sum(counts.values())
    return StepResult("inputs", 0.0, rows=f"{total} videos", where=str(layout.inputs), note=note)


def datagen_config(layout: RunLayout) -> DatagenConfig:
    """The datagen chain of the demo (kept here, so that an installed `lvr demo` needs no repo
    files; configs/datagen/color_task.yaml is the same as a file)."""
    settings = {
        "input": {"source": str(layout.inputs)},
        "shards": {"videos_per_shard": 160},
        # The color changes are hard cuts: one clip per color window.
        "segment": {"method": "shots", "min_clip_s": 0.25, "max_clip_s": 2.0},
        "caption": {"backend": "annotations", "annotations": "sidecar"},
        "qa": {
            "backend": "template",
            "template_source": "sidecar",
            "template_kinds": ["first_color"],
            "template_palette": list(FIXED_OPTIONS),
            "questions_per_video": 1,
            "categories": [{"name": "temporal", "share": 1.0, "instruction": "the first color"}],
            "format_shares": {"mc": 1.0},
        },
        "filter": {"split_by": "folder", "category_shares": {}, "max_per_video": 1},
    }
    return from_dict(DatagenConfig, settings)


def step_datagen(layout: RunLayout) -> StepResult:
    """videos -> clips -> captions -> qa_raw -> qa (split by folder), resumable."""
    cfg = datagen_config(layout)
    run_segment(cfg, layout.root, progress=True)
    run_caption(cfg, layout.root, progress=True)
    qa = run_qa(cfg, layout.root, progress=True)
    filtered = run_filter(layout.root, cfg.filter)
    kept = sum(v["rows"] for v in filtered.splits.values())
    splits = ", ".join(f"{k} {v['rows']}" for k, v in sorted(filtered.splits.items()))
    return StepResult(
        "datagen", 0.0, rows=f"{qa.rows['qa_raw']} questions -> {kept} kept ({splits})",
        where=str(layout.qa), note=_rejections(filtered.by_rule),
    )  # fmt: skip


def _rejections(by_rule: dict[str, int]) -> str:
    rejected = {rule: n for rule, n in by_rule.items() if rule != "kept"}
    return f"rejected: {rejected}" if rejected else "rejected: none"


# ---------------------------------------------------------------------------------------------
# Evaluation and training, on the run's own qa table
# ---------------------------------------------------------------------------------------------


def step_eval(layout: RunLayout, cfg: DemoConfig, model: str | Path, tag: str) -> StepResult:
    """Held-out (greedy) accuracy of one model on the qa table's eval split."""
    ecfg = from_dict(EvalConfig, {
        "model": str(model), "benchmark": "qa", "data": str(layout.qa), "split": "eval",
        "frames": [cfg.eval_frames], "max_pixels": MAX_PIXELS, "max_tokens": 48,
        "batch_size": 16, "bootstrap": 200,
    })  # fmt: skip
    (result,) = run_eval(ecfg, layout.root)
    return StepResult(f"eval {tag}", 0.0, rows=f"{result.questions} questions",
                      where=str(result.out_dir), accuracy=result.headline)  # fmt: skip


def step_sft(layout: RunLayout, cfg: DemoConfig, base_model: Path) -> StepResult:
    """CoT-SFT of the tiny VLM on the qa table's sft split.

    The vision tower stays frozen (as in most Qwen-VL fine-tuning): trained on the careless
    annotations it merged yellow and green into one feature, which RL (vision frozen) could not
    split again: SFT 75% -> RL 75% (seed 0); frozen, SFT 85.9-87.5% -> RL 98.4-100% (README).
    """
    scfg = from_dict(SFTConfig, {
        "model": {"path": str(base_model), "train_vision": False, "train_projector": True},
        "data": {"split": "sft", "frames": FRAMES, "max_pixels": MAX_PIXELS, "max_seq_len": 512,
                 "cache_samples": True},
        # The best learning-check settings found (configs/sft/color_order.yaml).
        "optim": {"lr": 1e-3, "schedule": "cosine", "warmup_ratio": 0.02, "min_lr_ratio": 0.2},
        "micro_batch": min(16, cfg.task_train), "max_steps": cfg.sft_steps, "seed": cfg.seed,
        "device": "cpu", "precision": "fp32", "keep_last": 1, "progress": True,
        "save_every": 100,  # an interrupted demo resumes SFT from here
    })  # fmt: skip
    manifest = _resumable(layout.sft, lambda resume: run_sft(scfg, layout.root, resume=resume))
    loss = manifest.get("last_metrics", {}).get("loss")
    return StepResult("sft", 0.0, rows=f"{manifest.get('steps')} steps",
                      where=str(manifest.get("final_checkpoint")),
                      note=f"final loss {loss:.3f}" if loss is not None else "")  # fmt: skip


def step_rl(layout: RunLayout, cfg: DemoConfig) -> StepResult:
    """GRPO from the SFT checkpoint on the qa table's rl split (embedding reuse on).

    A small lr for a converged model (3e-4 made this model worse; configs/rl/color_order.yaml
    uses it from a half-trained one); a short warm-up tames Adam's first steps.
    """
    rcfg = from_dict(RLConfig, {
        "model": {"path": "sft"},
        "data": {"split": "rl", "frames": FRAMES, "max_pixels": MAX_PIXELS, "max_seq_len": 512},
        "rollout": {"n": 8, "temperature": 1.0, "top_p": 0.99, "max_new_tokens": 32},
        "optim": {"lr": cfg.rl_lr, "warmup_steps": 3, "weight_decay": 0.01, "grad_clip": 1.0},
        "rollout_batch": cfg.rl_prompts, "update_batch": cfg.rl_prompts, "micro_batch": 16,
        "steps": cfg.rl_steps, "seed": cfg.seed, "device": "cpu", "precision": "fp32",
        "keep_last": 1, "progress": True,
    })  # fmt: skip
    manifest = _resumable(layout.rl, lambda resume: run_rl(rcfg, layout.root, resume=resume))
    rewards = _metric_series(layout.rl / "metrics.jsonl", "reward/mean")
    note = f"reward/mean by step: {' '.join(f'{r:.2f}' for r in rewards)}" if rewards else ""
    flat = int(manifest.get("counts", {}).get("no_signal_steps", 0))
    if flat:
        note += f"; {flat} step(s) without signal left the policy untouched"
    return StepResult("rl", 0.0, rows=f"{manifest.get('steps')} steps",
                      where=str(manifest.get("final_checkpoint")), note=note)  # fmt: skip


def step_report(layout: RunLayout) -> StepResult:
    files = write_report(layout.root)
    return StepResult("report", 0.0, rows=f"{len(files)} files", where=str(files[0]))


# ---------------------------------------------------------------------------------------------
# Optional: a real (small) LLM writes questions (`lvr demo --llm`)
# ---------------------------------------------------------------------------------------------


def step_llm_qa(layout: RunLayout, cfg: DemoConfig) -> StepResult:
    """SmolLM2 writes questions for one input video via the hf backend (constrained JSON), in a
    run folder of its own (`<run>-llm`): its questions are a showcase, not training data."""
    model = smollm2_dir(layout.root.parent / ".models")
    video = sorted(split_folders(layout.inputs)["eval"].glob("*.mp4"))[0]
    llm = RunLayout(Path(f"{layout.root}-llm"))
    settings = {
        "input": {"source": str(video)},
        "segment": {"method": "shots", "min_clip_s": 0.25, "max_clip_s": 2.0},
        "caption": {"backend": "annotations", "annotations": "sidecar"},
        "qa": {"backend": "hf", "model": str(model), "questions_per_video": cfg.llm_questions,
               "max_tokens": 256, "temperature": 0.0, "format_shares": {"mc": 1.0, "open": 0.0}},
        "filter": {"split_sft": 1.0, "split_rl": 0.0, "split_eval": 0.0},
    }  # fmt: skip
    dcfg = from_dict(DatagenConfig, settings)
    run_segment(dcfg, llm.root)
    run_caption(dcfg, llm.root)
    qa = run_qa(dcfg, llm.root)
    filtered = run_filter(llm.root, dcfg.filter)
    errors = qa.errors.get("qa_raw", 0)
    return StepResult("llm_qa", 0.0, rows=f"{qa.rows['qa_raw']} questions ({errors} errors)",
                      where=str(llm.root),
                      note=f"SmolLM2-135M-Instruct; {_rejections(filtered.by_rule)}")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _resumable(out_dir: Path, train: Callable[[bool], dict[str, Any]]) -> dict[str, Any]:
    """A finished training step is reused; an interrupted one resumes from its checkpoint."""
    manifest = out_dir / "manifest.json"
    if manifest.is_file():
        info = json.loads(manifest.read_text())
        if info.get("status") == "done" and info.get("final_checkpoint"):
            return info
    return train(latest_checkpoint(out_dir) is not None)


def _metric_series(path: Path, key: str) -> list[float]:
    """One metric over the steps of a metrics.jsonl log (empty when absent)."""
    if not path.is_file():
        return []
    rows = read_jsonl(path)  # a line cut short by a kill or a full disk is left out
    return [float(r[key]) for r in rows if key in r]


def _latest(out_dir: Path) -> str:
    ckpt = latest_checkpoint(out_dir)
    if ckpt is None:
        raise LvrError(f"no checkpoint in {out_dir}; run the previous demo step first")
    return str(ckpt)


def print_summary(results: list[StepResult], run: Path) -> None:
    """The Rich table that closes the demo: rows, time and files of each step, accuracy moves."""
    table = Table(title=f"lvr demo - {run}", title_justify="left")
    for col in ("step", "rows", "seconds", "accuracy", "where", "note"):
        table.add_column(col, overflow="fold")
    for r in results:
        acc = f"{100 * r.accuracy:.1f}%" if r.accuracy is not None else ""
        table.add_row(r.name, r.rows, f"{r.seconds:.0f}", acc, r.where, r.note)
    console = Console()
    console.print(table)
    accs = {r.name: r.accuracy for r in results if r.accuracy is not None}
    if {"eval base", "eval sft", "eval rl"} <= set(accs):
        console.print(
            "held-out accuracy (chance 25%): "
            f"untrained {100 * accs['eval base']:.1f}% -> SFT {100 * accs['eval sft']:.1f}% "
            f"-> RL {100 * accs['eval rl']:.1f}%"
        )
    console.print(f"total {sum(r.seconds for r in results):.0f} s; inspect: lvr inspect {run}")
    if not any(r.name == "llm_qa" for r in results):
        console.print(
            "lvr demo --llm also lets SmolLM2-135M-Instruct (offline) write a question "
            "(+~45 s; README: what it wrote when measured)"
        )
