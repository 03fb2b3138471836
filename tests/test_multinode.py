"""Training across nodes: two torchrun agents on this machine play two nodes (``--nnodes 2
--nproc-per-node 1 --rdzv-backend c10d``, rendezvous on loopback, gloo), and `lvr sft` / `lvr rl`
must equal one 2-process run on one node; an SP group that would span the nodes is refused."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lvr.config import load_config
from lvr.demo.color_task import make_color_qa
from lvr.errors import LvrError
from lvr.mrsp.topology import Node
from lvr.train.rl import RLConfig
from lvr.train.rl.recipe import check_config

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"
pytestmark = pytest.mark.skipif(
    shutil.which(str(TORCHRUN)) is None, reason="torchrun not installed"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(tmp_path)}  # fmt: skip


def two_nodes(args: list[str], env: dict[str, str]) -> list[subprocess.CompletedProcess[str]]:
    """``torchrun --nnodes 2 --nproc-per-node 1`` twice at once: two agents meet at a c10d
    rendezvous on loopback, as two machines meet at their head node's endpoint."""
    port = _free_port()
    launch = [str(TORCHRUN), "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
              "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"lvr-test-{port}"]  # fmt: skip
    agents = [
        subprocess.Popen(
            [*launch, *args],
            cwd=REPO,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        for _ in range(2)
    ]
    done = []
    for agent in agents:
        out, err = agent.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(agent.args, agent.returncode, out, err))
    return done


def one_node(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``torchrun --nproc_per_node 2``: the same 2 ranks on one node."""
    launch = [str(TORCHRUN), "--nproc_per_node", "2", "--master_port", str(_free_port())]
    return subprocess.run([*launch, *args], cwd=REPO, env=env, text=True, capture_output=True,
                          timeout=600)  # fmt: skip


def _ok(*procs: subprocess.CompletedProcess[str]) -> None:
    for proc in procs:
        assert proc.returncode == 0, proc.stderr[-3000:]


def _metrics(run: Path, stage: str) -> list[dict]:
    return [json.loads(x) for x in (run / stage / "metrics.jsonl").read_text().splitlines()]


def test_sft_on_two_nodes_equals_one_node(tmp_path: Path) -> None:
    qa = make_color_qa(tmp_path / "data", 8, 0, seed=0, size=56, bad_videos=1)
    sets = [f"data.qa={qa}", "progress=false", "micro_batch=1", "max_steps=3", "grad_accum=1",
            "deepspeed=configs/deepspeed/zero2.json"]  # fmt: skip
    args = ["-m", "lvr.cli", "sft", "--config", "configs/sft/tiny_cpu.yaml"]
    args += [a for s in sets for a in ("--set", s)]
    env = _env(tmp_path)
    _ok(*two_nodes([*args, "-r", str(tmp_path / "nodes")], env))
    _ok(one_node([*args, "-r", str(tmp_path / "node")], env))
    nodes, node = _metrics(tmp_path / "nodes", "sft"), _metrics(tmp_path / "node", "sft")
    assert [r["step"] for r in nodes] == [r["step"] for r in node] == [1, 2, 3]
    for a, b in zip(nodes, node, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6), (a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    manifest = json.loads((tmp_path / "nodes/sft/manifest.json").read_text())
    assert manifest["world_size"] == 2
    w1 = load_file(tmp_path / "nodes/sft/checkpoint-000003/model.safetensors")
    w2 = load_file(tmp_path / "node/sft/checkpoint-000003/model.safetensors")
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-6


def test_rl_on_two_nodes_equals_one_node(tmp_path: Path, varied_reward: str) -> None:
    """dp 2 x sp 1: one SP group per node, the data-parallel groups across the nodes."""
    qa = make_color_qa(tmp_path / "data", 4, 0, seed=0, size=56)
    sets = ["model.path=tiny", f"data.qa={qa}", "data.split=sft", "data.frames=4",
            "data.max_pixels=3136", "rollout.n=2", "rollout.max_new_tokens=6", "rollout_batch=4",
            "update_batch=2", "micro_batch=2", "steps=2", "optim.lr=0.01", "device=cpu",
            "precision=fp32", "progress=false", "keep_last=0", "save_every=1",
            f'rewards=[{{"fn": "{varied_reward}", "weight": 1.0}}, {{"fn": "format", "weight": 0.1}}]']  # fmt: skip
    args = ["-m", "lvr.cli", "rl", *[a for s in sets for a in ("--set", s)]]
    env = _env(tmp_path)  # the reward module lives in tmp_path
    # an SP group of both ranks would span the nodes: every rank refuses, in one line
    spanning = two_nodes([*args, "-r", str(tmp_path / "bad")], env)
    for agent in spanning:
        assert agent.returncode != 0
        assert "would span nodes (2 nodes, 1 ranks on this one)" in agent.stderr, agent.stderr[
            -2000:
        ]
        assert "--set sp_size=1" in agent.stderr
    _ok(*two_nodes([*args, "--set", "sp_size=1", "-r", str(tmp_path / "nodes")], env))
    _ok(one_node([*args, "--set", "sp_size=1", "-r", str(tmp_path / "node")], env))
    nodes, node = _metrics(tmp_path / "nodes", "rl"), _metrics(tmp_path / "node", "rl")
    assert len(nodes) == len(node) == 2 and nodes[0]["reward/std"] > 0
    for a, b in zip(nodes, node, strict=True):
        for key in ("groups", "encodes", "opt_steps", "reward/mean", "reward/std",
                    "response_len/mean", "identical_groups"):  # fmt: skip
            assert a[key] == b[key], key  # the same prompts and rollouts on both layouts
        for key in ("pg_loss", "kl", "entropy", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), key
    w1 = load_file(tmp_path / "nodes/rl/checkpoint-000002/model.safetensors")
    w2 = load_file(tmp_path / "node/rl/checkpoint-000002/model.safetensors")
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-6


@pytest.mark.parametrize(
    ("sp_size", "world", "node", "ok"),
    [
        (0, 4, Node(4, 0, 1), True),  # one node: any SP layout
        (2, 8, Node(4, 4, 2), True),  # groups {4,5}, {6,7} on node 1
        (4, 8, Node(4, 4, 2), True),
        (8, 8, Node(4, 0, 2), False),  # one group over both nodes
        (0, 8, Node(4, 0, 2), False),
        (3, 6, Node(2, 2, 3), False),  # group {3,4,5} would hold node 1's rank 3 and node 2's
    ],
)
def test_sp_groups_must_stay_inside_a_node(sp_size: int, world: int, node: Node, ok: bool) -> None:
    cfg = load_config(RLConfig, None, ["rollout_batch=8", "update_batch=8", f"sp_size={sp_size}"])
    if ok:
        check_config(cfg, world, node)
    else:
        with pytest.raises(LvrError, match="would span nodes"):
            check_config(cfg, world, node)


def test_node_from_torchrun_env() -> None:
    env = {"RANK": "5", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "GROUP_WORLD_SIZE": "2"}
    assert Node.from_env(env, 8) == Node(local_world=4, first_rank=4, nodes=2)
    assert Node.from_env({}, 2) == Node(local_world=2, first_rank=0, nodes=1)
