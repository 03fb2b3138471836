"""``lvr demo``: the whole chain on built-in synthetic data, on 2 CPU cores, in minutes.

What it runs (everything lands in ``runs/demo/``; rerunning resumes, ``--fresh`` starts over):

1. ``datagen``: renders 6 synthetic multi-scene videos (with ground-truth sidecars), cuts them at
   the detected shots, captions the clips from the sidecar annotations, writes checkable questions
   with the template backend, and filters them into video-disjoint sft/rl/eval splits.
2. ``llm_qa`` (only with ``--llm``): SmolLM2-135M-Instruct (a real instruct LLM shipped on PyPI,
   loaded offline) writes questions for one of those videos through the ``hf`` backend with
   JSON-schema constrained decoding, and the same filter validates them. Off by default: it costs
   about a minute and a half of the demo's budget for one question of a 135M model.
3. ``task``: the learning task: short color-order videos whose question ("Which color appears
   first?") depends on what is shown, as a ``qa`` table with sft/rl/eval splits. Its SFT
   demonstrations carry a writer's systematic mistake (``mislabel``: most yellow-first videos are
   labelled green), as LLM-written data does; the RL reward checks against the renderer's truth.
4. ``eval base`` -> ``sft`` -> ``eval sft`` -> ``rl`` -> ``eval rl``: a tiny Qwen2.5-VL (random
   weights, built offline) is evaluated untrained, after CoT-SFT (which learns the task and the
   mistake), and after GRPO with embedding reuse (which unlearns the mistake from the reward), on
   the held-out split; then ``lvr eval report`` writes the report.

The numbers are float computations on a CPU: another machine, another thread count
(``--set threads=1``) or another seed (``--set seed=1``) gives other, close numbers (the README
quotes the range measured over four such runs). Steps whose rollouts all score the same do not
move the policy (see lvr/train/rl.py), so RL cannot drift on float noise.

Deliberate simplifications: tiny models and 56x56 frames so that learning fits minutes of CPU;
the learning task's table is written directly (its ground truth is the renderer's), while the
datagen steps show the pipeline on richer videos.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer

from lvr.cli_options import SetOpt, ShowOpt


@dataclass
class DemoConfig:
    """Sizes, seed and threads of the demo (``lvr demo --set rl_steps=8``)."""

    task_train: int = 320  # sft rows of the color task
    task_rl: int = 256  # rl rows (each RL step draws rl_prompts of them)
    task_eval: int = 64  # held-out rows
    mislabel: float = 0.6  # share of yellow-first sft demonstrations that say green
    sft_steps: int = 300  # batches of 16: learns the task (and the writer's mistake)
    rl_steps: int = 16
    rl_prompts: int = 8  # prompts per RL step (x 8 rollouts each)
    rl_lr: float = 1e-4
    eval_frames: int = 8
    seed: int = 0  # seed of SFT and RL (data order, rollout sampling)
    threads: int = 0  # torch CPU threads (0: torch's default)
    llm: bool = False  # also let SmolLM2 write questions (`lvr demo --llm`)
    llm_questions: int = 1  # SmolLM2 questions when llm is on


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


def demo(
    run: Path = typer.Option(Path("runs/demo"), "--run", "-r", help="Run folder of the demo."),
    fresh: bool = typer.Option(False, "--fresh", help="Delete the run folder and start over."),
    llm: bool = typer.Option(
        False, "--llm", help="Also let SmolLM2-135M (offline) write questions (+~1.5 min)."
    ),
    sets: list[str] | None = SetOpt,
    show_config: bool = ShowOpt,
) -> None:
    """Run the whole chain on built-in synthetic data (datagen, filter, SFT, RL, eval, report).

    Takes a few minutes on 2 CPU cores; every artifact lands under --run. Rerunning resumes
    finished steps; --fresh starts over. Another seed or thread count: --set seed=1 --set threads=1.
    """
    from lvr.config import from_dict, to_yaml

    cfg = from_dict(DemoConfig, {}, sets)
    cfg.llm = cfg.llm or llm
    if show_config:
        print(to_yaml(cfg), end="")
        return
    if fresh and run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
    results = run_demo(cfg, run)
    print_summary(results, run)


def run_demo(cfg: DemoConfig, run: Path) -> list[StepResult]:
    """All steps in order; each is resumable on its own."""
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    results = [_timed("datagen", lambda: step_datagen(run))]
    if cfg.llm and cfg.llm_questions:
        results.append(_timed("llm_qa", lambda: step_llm_qa(run, cfg)))
    results.append(_timed("task", lambda: step_task(run, cfg)))
    base_model = _color_model(run)
    results.append(_timed("eval base", lambda: step_eval(run, cfg, str(base_model), "base")))
    results.append(_timed("sft", lambda: step_sft(run, cfg, base_model)))
    results.append(_timed("eval sft", lambda: step_eval(run, cfg, _latest(run / "sft"), "sft")))
    results.append(_timed("rl", lambda: step_rl(run, cfg)))
    results.append(_timed("eval rl", lambda: step_eval(run, cfg, _latest(run / "rl"), "rl")))
    results.append(_timed("report", lambda: step_report(run)))
    return results


def _timed(name: str, fn: Callable[[], StepResult]) -> StepResult:
    from rich.console import Console

    Console().rule(f"[bold]demo: {name}")
    start = time.time()
    result = fn()
    result.name, result.seconds = name, time.time() - start
    return result


# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------

# The synthetic datagen domain (same settings as configs/datagen/demo.yaml, kept here so that an
# installed `lvr demo` needs no repository files).
DATAGEN: dict[str, Any] = {
    "input": {
        "synthetic": {
            "videos": 6,
            "duration_s": 20.0,
            "width": 160,
            "height": 120,
            "fps": 24.0,
            "seed": 0,
        }
    },
    "shards": {"videos_per_shard": 2},
    "segment": {"method": "shots", "min_clip_s": 1.0, "max_clip_s": 6.0},
    "caption": {"backend": "annotations", "annotations": "sidecar"},
    "qa": {
        "backend": "template",
        "template_source": "sidecar",
        "questions_per_video": 8,
        "categories": [
            {"name": "temporal", "share": 0.4, "instruction": "order of first appearances"},
            {"name": "counting", "share": 0.2, "instruction": "how many shapes of a kind"},
            {"name": "spatial", "share": 0.2, "instruction": "direction of motion"},
            {"name": "plot", "share": 0.2, "instruction": "scenes and backgrounds"},
        ],
        "format_shares": {"mc": 0.5, "open": 0.5},
    },
    "filter": {
        "category_shares": {"temporal": 0.4, "counting": 0.2, "spatial": 0.2, "plot": 0.2},
        "category_share_tolerance": 0.5,
        "split_sft": 0.34,
        "split_rl": 0.5,
        "split_eval": 0.16,
    },
}


def _run_datagen(cfg: Any, out: Path) -> tuple[Any, Any]:
    from lvr.datagen.caption import run_caption
    from lvr.datagen.filter import run_filter
    from lvr.datagen.qa import run_qa
    from lvr.datagen.segment import run_segment

    run_segment(cfg, out)
    run_caption(cfg, out)
    qa = run_qa(cfg, out)
    return qa, run_filter(out / "qa" / "qa_raw", out / "filter", cfg.filter)


def step_datagen(run: Path) -> StepResult:
    """Synthetic videos -> videos, clips, captions, qa_raw, qa, qa_rejected."""
    from lvr.config import from_dict
    from lvr.datagen.config import DatagenConfig

    out = run / "datagen"
    cfg = from_dict(DatagenConfig, DATAGEN)
    qa, filtered = _run_datagen(cfg, out)
    kept = sum(v["rows"] for v in filtered.splits.values())
    return StepResult(
        "datagen",
        0.0,
        rows=f"{qa.rows['qa_raw']} questions -> {kept} kept",
        where=str(out),
        note=_rejections(filtered.by_rule),
    )


def _rejections(by_rule: dict[str, int]) -> str:
    rejected = {rule: n for rule, n in by_rule.items() if rule != "kept"}
    return f"rejected: {rejected}" if rejected else "rejected: none"


def step_llm_qa(run: Path, cfg: DemoConfig) -> StepResult:
    """SmolLM2 writes questions for one video via the hf backend (constrained JSON)."""
    from lvr.config import from_dict
    from lvr.datagen.config import DatagenConfig
    from lvr.models import smollm2_dir

    model = smollm2_dir(run.parent / ".models")
    first_video = sorted((run / "datagen" / "synthetic_videos").glob("*.mp4"))[0]
    out = run / "datagen_llm"
    settings = {
        **DATAGEN,
        "input": {"source": str(first_video)},
        "qa": {
            "backend": "hf",
            "model": str(model),
            "questions_per_video": cfg.llm_questions,
            "max_tokens": 256,
            "temperature": 0.0,
            "format_shares": {"mc": 1.0, "open": 0.0},
        },
        "filter": {"min_reasoning_chars": 1, "split_sft": 1.0, "split_rl": 0.0, "split_eval": 0.0},
    }
    qa, filtered = _run_datagen(from_dict(DatagenConfig, settings), out)
    errors = qa.errors.get("qa_raw", 0)
    return StepResult(
        "llm_qa",
        0.0,
        rows=f"{qa.rows['qa_raw']} questions ({errors} errors)",
        where=str(out),
        note=f"SmolLM2-135M-Instruct; {_rejections(filtered.by_rule)}",
    )


def step_task(run: Path, cfg: DemoConfig) -> StepResult:
    """The color-order learning task as a qa table (sft / rl / eval splits)."""
    from lvr.demo.color_task import make_color_qa

    # "fixed" options (A red, B green, C blue, D yellow for every video): only the frames tell
    # the answer, and the small model learns it within the demo's few minutes.
    table = make_color_qa(
        run / "task",
        n_train=cfg.task_train,
        n_rl=cfg.task_rl,
        n_eval=cfg.task_eval,
        seed=0,
        options="fixed",
        mislabel=cfg.mislabel,
    )
    total = cfg.task_train + cfg.task_rl + cfg.task_eval
    note = (
        f"{cfg.mislabel:.0%} of yellow-first sft demonstrations say green" if cfg.mislabel else ""
    )
    return StepResult("task", 0.0, rows=f"{total} questions", where=str(table), note=note)


def _color_model(run: Path) -> Path:
    from lvr.models import build_tiny_vlm

    return build_tiny_vlm(run / "models" / "tiny-vlm", seed=0, hidden=256, layers=4)


def step_eval(run: Path, cfg: DemoConfig, model: str, tag: str) -> StepResult:
    """Held-out accuracy of one model on the task's eval split."""
    from lvr.config import from_dict
    from lvr.eval.config import EvalConfig
    from lvr.eval.runner import run_eval

    ecfg = from_dict(
        EvalConfig,
        {
            "model": model,
            "benchmark": "qa",
            "data": str(run / "task" / "qa"),
            "split": "eval",
            "frames": [cfg.eval_frames],
            "max_pixels": 56 * 56,
            "max_tokens": 48,
            "batch_size": 16,
            "bootstrap": 200,
        },
    )
    (result,) = run_eval(ecfg, run)
    return StepResult(
        f"eval {tag}",
        0.0,
        rows=f"{result.questions} questions",
        where=str(result.out_dir),
        accuracy=result.headline,
    )


def step_sft(run: Path, cfg: DemoConfig, base_model: Path) -> StepResult:
    """CoT-SFT of the tiny VLM on the task's sft split."""
    from lvr.config import from_dict
    from lvr.train.sft import SFTConfig, run_sft

    scfg = from_dict(
        SFTConfig,
        {
            "model": {"path": str(base_model), "train_vision": True, "train_projector": True},
            "data": {
                "qa": str(run / "task" / "qa"),
                "split": "sft",
                "frames": 8,
                "max_pixels": 56 * 56,
                "max_seq_len": 512,
                "cache_samples": True,
            },
            # The best learning-check settings found (configs/sft/color_order.yaml).
            "optim": {"lr": 1e-3, "schedule": "cosine", "warmup_ratio": 0.02, "min_lr_ratio": 0.2},
            "micro_batch_size": min(16, cfg.task_train),
            "max_steps": cfg.sft_steps,
            "seed": cfg.seed,
            "device": "cpu",
            "precision": "fp32",
            "keep_last": 1,
            "progress": True,
            "save_every": 200,  # an interrupted demo resumes SFT from here
        },
    )
    manifest = _resumable(run / "sft", lambda resume: run_sft(scfg, run, resume=resume))
    loss = manifest.get("last_metrics", {}).get("loss")
    return StepResult(
        "sft",
        0.0,
        rows=f"{manifest.get('steps')} steps",
        where=str(manifest.get("final_checkpoint")),
        note=f"final loss {loss:.3f}" if loss is not None else "",
    )


def step_rl(run: Path, cfg: DemoConfig) -> StepResult:
    """GRPO from the SFT checkpoint on the task's rl split (embedding reuse on).

    A small lr for a converged model (3e-4 made this model worse; configs/rl/color_order.yaml
    uses it from a half-trained one); a short warm-up tames Adam's first steps.
    """
    from lvr.config import from_dict
    from lvr.train.rl import RLConfig, run_rl

    rcfg = from_dict(
        RLConfig,
        {
            "model": {"path": _latest(run / "sft")},
            "data": {
                "qa": str(run / "task" / "qa"),
                "split": "rl",
                "frames": 8,
                "max_pixels": 56 * 56,
            },
            "rollout": {"n": 8, "temperature": 1.0, "top_p": 0.99, "max_new_tokens": 32},
            "optim": {"lr": cfg.rl_lr, "warmup_steps": 3, "weight_decay": 0.01, "grad_clip": 1.0},
            "rollout_batch": cfg.rl_prompts,
            "update_batch": cfg.rl_prompts,
            "micro_batch": 16,
            "steps": cfg.rl_steps,
            "seed": cfg.seed,
            "device": "cpu",
            "precision": "fp32",
            "keep_last": 1,
        },
    )
    manifest = _resumable(run / "rl", lambda resume: run_rl(rcfg, run, resume=resume))
    rewards = _metric_series(run / "rl" / "metrics.jsonl", "reward/mean")
    note = f"reward/mean by step: {' '.join(f'{r:.2f}' for r in rewards)}" if rewards else ""
    flat = int(manifest.get("counts", {}).get("no_signal_steps", 0))
    if flat:
        note += f"; {flat} step(s) without signal left the policy untouched"
    return StepResult(
        "rl",
        0.0,
        rows=f"{manifest.get('steps')} steps",
        where=str(manifest.get("final_checkpoint")),
        note=note,
    )


def step_report(run: Path) -> StepResult:
    from lvr.eval.report import write_report

    files = write_report(run)
    return StepResult("report", 0.0, rows=f"{len(files)} files", where=str(files[0]))


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _resumable(out_dir: Path, train: Callable[[bool], dict[str, Any]]) -> dict[str, Any]:
    """A finished training step is reused; an interrupted one resumes from its checkpoint."""
    import json

    manifest = out_dir / "manifest.json"
    if manifest.is_file():
        info = json.loads(manifest.read_text())
        if info.get("status") == "done" and info.get("final_checkpoint"):
            return info
    return train(out_dir.exists())


def _metric_series(path: Path, key: str) -> list[float]:
    """One metric over the steps of a metrics.jsonl log (empty when absent)."""
    import json

    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [float(r[key]) for r in rows if key in r]


def _latest(out_dir: Path) -> str:
    from lvr.train.common import latest_checkpoint

    ckpt = latest_checkpoint(out_dir)
    if ckpt is None:
        from lvr.errors import LvrError

        raise LvrError(f"no checkpoint in {out_dir}; run the previous demo step first")
    return str(ckpt)


def print_summary(results: list[StepResult], run: Path) -> None:
    """The Rich table that closes the demo: rows, time and files of each step, accuracy moves."""
    from rich.console import Console
    from rich.table import Table

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
