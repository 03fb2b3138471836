"""``lvr demo``: the whole chain on built-in synthetic data, on 2 CPU cores, in minutes.

What it runs (one run folder in the usual layout, ``runs/demo/``; rerunning resumes, ``--fresh``
starts over). Steps live in :mod:`lvr.demo.run`:

1. ``inputs``: renders the learning task's videos (red, green, blue and yellow shown in a random
   order) into ``inputs/sft``, ``inputs/rl`` and ``inputs/eval`` with their annotation sidecars.
   The annotator of the training videos was careless: in most videos that show yellow first it
   wrote green (``mislabel``); the rl and eval annotations are true.
2. ``datagen``: the datagen chain on those inputs: shot detection cuts each video at its color
   changes (``videos``, ``clips``), the clips are captioned from the annotations (``captions``), the
   template writer asks "Which color appears first?" with the options A red, B green, C blue,
   D yellow (``qa_raw``), and the filter keeps them with the split their folder names (``qa``).
3. ``eval base`` -> ``sft`` -> ``eval sft`` -> ``rl`` -> ``eval rl``: a tiny Qwen2.5-VL (random
   weights, built offline) is evaluated on the held-out split untrained, after CoT-SFT on the
   ``sft`` split (which learns the task, and the annotator's mistake; the vision tower stays
   frozen), and after GRPO with
   embedding reuse on the ``rl`` split (whose reward checks the true annotations), then
   ``lvr eval report`` writes the report. SFT and RL read the run's own ``qa`` table.
4. ``llm_qa`` (only with ``--llm``): SmolLM2-135M-Instruct (a real instruct LLM shipped on PyPI,
   loaded offline) writes questions for one video through the ``hf`` backend with JSON-schema
   constrained decoding, in a second run folder (``<run>-llm``). Off by default: it costs about
   45 s, and in the run measured its one question was rejected (the 135M model echoes the schema
   and repeats letters; the rejection is a ``qa_rejected`` row with the reason).

The numbers are float computations on a CPU: another machine, another thread count
(``--set threads=1``) or another seed (``--set seed=1``) gives other, close numbers; the README
quotes the range measured over four such runs. Steps whose rollouts all score the same do not
move the policy (lvr/train/rl/recipe.py), so RL cannot drift on float noise.

Deliberate simplifications: tiny models and 56x56 frames so that learning fits minutes of CPU;
the questions are written by the template writer from the annotations (no LLM), which is what
makes their answers checkable.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import typer

from lvr.cli_options import DemoSetOpt, ShowOpt
from lvr.config import from_dict, to_yaml
from lvr.errors import LvrError


@dataclass
class DemoConfig:
    """Sizes, seed and threads of the demo (``lvr demo --set rl_steps=8``)."""

    task_train: int = 320  # sft videos of the color task
    task_rl: int = 256  # rl videos (each RL step draws rl_prompts of them)
    task_eval: int = 64  # held-out videos
    mislabel: float = 0.6  # share of yellow-first sft videos annotated as green
    sft_steps: int = 300  # batches of 16: learns the task (and the annotator's mistake)
    rl_steps: int = 16
    rl_prompts: int = 8  # prompts per RL step (x 8 rollouts each)
    rl_lr: float = 1e-4
    eval_frames: int = 8
    seed: int = 0  # seed of SFT and RL (data order, rollout sampling)
    threads: int = 0  # torch CPU threads (0: torch's default)
    llm: bool = False  # also let SmolLM2 write questions (`lvr demo --llm`)
    llm_questions: int = 1  # SmolLM2 questions when llm is on


def demo(
    run: Path = typer.Option(Path("runs/demo"), "--run", "-r", help="Run folder of the demo."),
    fresh: bool = typer.Option(False, "--fresh", help="Delete the run folder and start over."),
    llm: bool = typer.Option(
        False, "--llm", help="Also let SmolLM2-135M (offline) write questions (+~45 s)."
    ),
    sets: list[str] | None = DemoSetOpt,
    show_config: bool = ShowOpt,
) -> None:
    """Run the whole chain on built-in synthetic data (datagen, filter, SFT, RL, eval, report).

    Takes a few minutes on 2 CPU cores; every artifact lands under --run. Rerunning resumes
    finished steps; --fresh starts over. Another seed or thread count: --set seed=1 --set threads=1.
    """
    cfg = from_dict(DemoConfig, {}, sets)
    cfg.llm = cfg.llm or llm
    if show_config:
        print(to_yaml(cfg), end="")
        return
    if run.exists() and not run.is_dir():
        raise LvrError(f"--run {run} is a file, not a run folder: give a folder")
    if fresh and run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
    from lvr.demo.run import print_summary, run_demo  # torch and the recipes load here

    print_summary(run_demo(cfg, run), run)
