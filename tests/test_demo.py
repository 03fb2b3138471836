"""`lvr demo` end to end at toy sizes: every step runs, the summary prints, a rerun resumes."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from lvr.artifacts import read_table
from lvr.layout import RunLayout

REPO = Path(__file__).resolve().parents[1]
TOY = ["task_train=12", "task_rl=4", "task_eval=4", "sft_steps=2", "rl_steps=1", "rl_prompts=2"]


def _demo(run: Path) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, "-m", "lvr.cli", "demo", "--run", str(run)]
    for item in TOY:
        args += ["--set", item]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run(args, capture_output=True, text=True, env=env)


def test_demo_runs_every_step_then_resumes(tmp_path: Path) -> None:
    run = tmp_path / "demo"
    first = _demo(run)
    assert first.returncode == 0, first.stderr[-3000:]
    for step in ("inputs", "datagen", "eval base", "sft", "eval sft", "rl", "eval rl", "report"):
        assert f"│ {step}" in first.stdout
    assert "held-out accuracy (chance 25%): untrained" in first.stdout
    layout = RunLayout(run)
    assert layout.report.is_file()
    assert json.loads((layout.sft / "manifest.json").read_text())["status"] == "done"
    # SFT, RL and eval read the table the datagen chain wrote: its splits come from the folders
    splits = read_table(layout.qa, "qa").column("split").to_pylist()
    assert sorted(set(splits)) == ["eval", "rl", "sft"] and splits.count("sft") == 12

    kept = [layout.rl / "manifest.json", layout.clips / "00000.parquet"]
    stamps = [p.stat().st_mtime_ns for p in kept]
    again = _demo(run)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [p.stat().st_mtime_ns for p in kept] == stamps, "finished work must be reused"


def test_demo_show_config_and_bad_key() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "lvr.cli", "demo", "--show-config"], capture_output=True, text=True
    )
    assert "task_train: 320" in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "lvr.cli", "demo", "--set", "task_trian=3"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "did you mean 'task_train'" in bad.stderr


def test_demo_datagen_config_is_the_preset_file() -> None:
    """configs/datagen/color_task.yaml documents exactly what `lvr demo` runs."""
    from lvr.config import load_config, to_dict
    from lvr.datagen.config import DatagenConfig
    from lvr.demo.run import datagen_config

    preset = load_config(DatagenConfig, REPO / "configs/datagen/color_task.yaml")
    assert to_dict(datagen_config(RunLayout(Path("runs/demo")))) == to_dict(preset)


def test_color_inputs_annotations_and_questions(tmp_path: Path) -> None:
    """The careless annotator only touches yellow-first training videos; the template writer's
    question follows the annotation (what SFT imitates), with fixed options."""
    import random

    from lvr.datagen import template_qa
    from lvr.datagen.synthetic import read_sidecar
    from lvr.demo.color_task import FIXED_OPTIONS, render_color_inputs, split_folders

    render_color_inputs(tmp_path, {"sft": 8, "rl": 4, "eval": 4}, mislabel=1.0)
    render_color_inputs(tmp_path, {"sft": 8, "rl": 4, "eval": 4}, mislabel=1.0)  # idempotent
    for split, folder in split_folders(tmp_path).items():
        for video in sorted(folder.glob("*.mp4")):
            side = read_sidecar(video)
            truth = side["spec"]["colors"][0]
            said = side["facts"]["color_order"][0]
            careless = split == "sft" and truth == "yellow"
            assert said == ("green" if careless else truth), (split, video.name)
            q = template_qa.generate(template_qa.facts_from_sidecar(side), "temporal", "mc",
                                     random.Random(0), set(), ["first_color"], FIXED_OPTIONS)  # fmt: skip
            assert q.question == "Which color appears first?" and q.options == FIXED_OPTIONS
            assert q.answer == "ABCD"[FIXED_OPTIONS.index(said)]
            assert q.reasoning.startswith(f"The first color is {said} ({q.answer})")


def test_color_inputs_resume_after_a_full_disk_cut_a_sidecar_rewrite(tmp_path: Path) -> None:
    """The careless annotation rewrites finished sidecars; a full disk cut that rewrite and the
    cut sidecar (next to its finished video) made every later run fail reading it. The kernel's
    file-size limit plays the full disk: it lets the write through up to the limit, no further."""
    from lvr.datagen.synthetic import read_sidecar
    from lvr.demo.color_task import render_color_inputs, split_folders

    render_color_inputs(
        tmp_path, {"sft": 4}
    )  # video 3 shows yellow first: its sidecar is rewritten
    script = textwrap.dedent("""
        import resource, signal, sys
        from lvr.demo.color_task import render_color_inputs
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the limit as an error, not a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (256, 256))
        try:
            render_color_inputs(sys.argv[1], {"sft": 4}, mislabel=1.0)
        except OSError as exc:
            print(exc.errno)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, text=True,
                         capture_output=True, check=True)  # fmt: skip
    assert out.stdout.strip() == str(errno.EFBIG), out.stdout + out.stderr
    render_color_inputs(tmp_path, {"sft": 4}, mislabel=1.0)  # the rerun, space freed
    folder = split_folders(tmp_path)["sft"]
    said = [read_sidecar(v)["facts"]["color_order"][0] for v in sorted(folder.glob("*.mp4"))]
    assert said == ["red", "green", "blue", "green"]  # the yellow-first video: annotated green
    assert not [p.name for p in folder.iterdir() if ".tmp" in p.name]
