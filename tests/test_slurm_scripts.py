"""scripts/slurm/*.sbatch: they parse, their #SBATCH lines are read by Slurm, and they run here.

Slurm itself cannot run on this machine. The array script needs nothing of Slurm but its variables,
so it runs as two array tasks by hand. The multi-node scripts run on one "node" with stand-ins for
the two Slurm commands they call: `scontrol show hostnames` (prints this host) and `srun` (runs
its command once, as srun does for a one-node, one-task step); torchrun, lvr and the rendezvous
are the real ones.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lvr.artifacts import read_table
from lvr.demo.color_task import make_color_qa

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "scripts" / "slurm").glob("*.sbatch"))
BIN = Path(sys.executable).parent

SCONTROL = """#!/usr/bin/env bash
# stand-in for `scontrol show hostnames LIST`: one node, this machine
[ "$1 $2" = "show hostnames" ] || { echo "scontrol stand-in: unexpected $*" >&2; exit 1; }
echo 127.0.0.1
"""
SRUN = """#!/usr/bin/env bash
# stand-in for srun on a one-node allocation: drop srun's options, run the command once
while [ $# -gt 0 ]; do
  case "$1" in
    -w|--nodelist|-N|--nodes|-n|--ntasks) shift 2 ;;
    -*) shift ;;
    *) break ;;
  esac
done
exec "$@"
"""


def test_scripts_parse_and_slurm_reads_their_directives() -> None:
    assert {p.name for p in SCRIPTS} >= {"sft.sbatch", "rl.sbatch", "datagen_array.sbatch"}
    for script in SCRIPTS:
        check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert check.returncode == 0, (script.name, check.stderr)
        lines = script.read_text().splitlines()
        assert lines[0] == "#!/usr/bin/env bash"
        # sbatch stops reading #SBATCH lines at the first command
        first_command = next(i for i, x in enumerate(lines) if x.strip() and not x.startswith("#"))
        directives = [i for i, x in enumerate(lines) if x.startswith("#SBATCH")]
        assert directives and max(directives) < first_command, script.name


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """This venv's tools first on PATH (as a job's environment would have them)."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1", **extra}  # fmt: skip


def _stand_ins(tmp_path: Path) -> str:
    folder = tmp_path / "slurm_bin"
    folder.mkdir()
    for name, text in (("scontrol", SCONTROL), ("srun", SRUN)):
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    return str(folder)


def test_datagen_array_script_as_two_array_tasks(tmp_path: Path) -> None:
    run = tmp_path / "run"
    base = {"CONFIG": "configs/datagen/demo.yaml", "RUN": str(run), "SLURM_ARRAY_TASK_COUNT": "2"}
    for task in ("1", "0"):
        env = _env(tmp_path, **base, SLURM_ARRAY_TASK_ID=task)
        out = subprocess.run(["bash", "scripts/slurm/datagen_array.sbatch"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=600)  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        assert "filter: not run on a shard" in out.stdout
    manifests = sorted(p.name for p in (run / "_stages/qa").glob("manifest*.json"))
    assert manifests == ["manifest.0-of-2.json", "manifest.1-of-2.json"]
    filt = subprocess.run([str(BIN / "lvr"), "datagen", "filter", "--config", base["CONFIG"],
                           "--run", str(run)], cwd=REPO, env=_env(tmp_path), capture_output=True,
                          text=True)  # fmt: skip
    assert filt.returncode == 0, filt.stderr
    assert read_table(run / "qa_raw", "qa_raw").num_rows == 48  # the demo's one-machine count
    assert read_table(run / "qa", "qa").num_rows > 24


def _multinode_script(tmp_path: Path, script: str, config: str, *sets: str) -> Path:
    run = tmp_path / "run"
    env = _env(tmp_path, CONFIG=config, RUN=str(run), GPUS_PER_NODE="1", PORT="0",
               SLURM_JOB_NODELIST="node[1]", SLURM_NNODES="1", SLURM_JOB_ID="4242")  # fmt: skip
    env["PATH"] = f"{_stand_ins(tmp_path)}{os.pathsep}{env['PATH']}"
    args = [a for s in sets for a in ("--set", s)]
    out = subprocess.run(["bash", f"scripts/slurm/{script}", *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return run


def test_sft_script_runs_torchrun_with_a_c10d_rendezvous(tmp_path: Path) -> None:
    qa = make_color_qa(tmp_path / "data", 4, 0, seed=0, size=56)
    run = _multinode_script(tmp_path, "sft.sbatch", "configs/sft/tiny_cpu.yaml", f"data.qa={qa}",
                            "max_steps=2", "progress=false")  # fmt: skip
    manifest = json.loads((run / "sft/manifest.json").read_text())
    assert manifest["world_size"] == 1 and (run / "sft/checkpoint-000002").is_dir()


@pytest.mark.slow
def test_rl_script_runs_torchrun_with_a_c10d_rendezvous(tmp_path: Path) -> None:
    qa = make_color_qa(tmp_path / "data", 2, 0, seed=0, size=56)
    run = _multinode_script(tmp_path, "rl.sbatch", "configs/rl/tiny_cpu.yaml", f"data.qa={qa}",
                            "model.path=tiny", "data.split=sft", "steps=1", "rollout_batch=2",
                            "update_batch=2",
                            "progress=false")  # fmt: skip
    manifest = json.loads((run / "rl/manifest.json").read_text())
    assert manifest["steps"] == 1 and (run / "rl/checkpoint-000001").is_dir()
