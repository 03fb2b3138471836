"""`lvr eval run --backend vllm` against `--backend hf` (opt-in: `pytest -m vllm` inside the venv
made by scripts/vllm_env.sh, i.e. `make test-vllm`, or on a GPU machine with the `gpu` extra).

A tiny Qwen2.5-VL answers LongVideo-Reason-format questions on real encoded videos through both
backends; greedy answers must be the same text, question by question, and the vLLM run must have
gone through vLLM (its settings say so, the engine saw every answerable question)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm")

from typer.testing import CliRunner  # noqa: E402

from lvr.artifacts import read_table  # noqa: E402
from lvr.datagen.synthetic import VideoSpec, render_video  # noqa: E402
from lvr.eval.config import EvalConfig  # noqa: E402
from lvr.eval.runner import run_eval  # noqa: E402

FIX = Path(__file__).parent / "fixtures" / "eval"
SPEC = {"duration_s": 3.0, "fps": 8.0, "width": 96, "height": 64, "scene_len_s": (1.0, 2.0)}


def _talkative_tiny_vlm(folder: Path) -> Path:
    """The tiny VLM with its language model's weights shaken a little (seeded).

    Fresh random weights greedily emit one repeated newline whatever the video, which would make
    any two backends agree; shaken by 0.03 they emit text that depends on the frames. Shaken
    harder (0.1, or the vision tower too) a random model turns chaotic: the ~1e-3 float32
    differences between vLLM's and transformers' vision kernels (first-token log-probs of the
    unshaken model agree to 1e-3) flip greedy tokens after two or three steps.
    """
    import torch

    from lvr.models.loading import load_vlm
    from lvr.models.tiny import build_tiny_vlm

    build_tiny_vlm(folder)
    model, _ = load_vlm(folder, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.model.language_model.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.03)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine inside pytest's process
    root = tmp_path_factory.mktemp("vllm_eval")
    for seed, name in enumerate(["vid_a", "vid_b"]):
        path = root / "videos" / "longvila_videos" / f"{name}.mp4"
        render_video(path, VideoSpec(seed=seed, **SPEC))
    return _talkative_tiny_vlm(root / "tiny-vlm"), root / "videos"


def _responses(out_dir: Path) -> dict[str, dict]:
    return {r["qa_id"]: r for r in read_table(out_dir / "predictions", "predictions").to_pylist()}


def test_cli_vllm_backend_matches_hf(setup: tuple[Path, Path], tmp_path: Path) -> None:
    from lvr.cli import app

    model, videos = setup
    data = FIX / "longvideo_reason" / "eval.jsonl"
    hf = run_eval(
        EvalConfig(model=str(model), benchmark="longvideo-reason", data=str(data),
                   video_dir=str(videos), frames=[4], max_tokens=8, bootstrap=50),
        tmp_path / "hf", progress=False,
    )[0]  # fmt: skip
    args = ["eval", "run", "--model", str(model), "--benchmark", "longvideo-reason",
            "--data", str(data), "--video-dir", str(videos), "--run", str(tmp_path / "vllm"),
            "--frames", "4", "--backend", "vllm", "--set", "max_tokens=8", "--set", "bootstrap=50",
            "--set", "vllm.dtype=float32", "--set", "vllm.max_model_len=4096",
            "--set", "vllm.llm={kv_cache_memory_bytes: 268435456}"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    out = next((tmp_path / "vllm" / "eval").iterdir())
    got, want = _responses(out), _responses(hf.out_dir)
    answered = {k for k, r in want.items() if r["error"] is None}
    assert answered and {k for k, r in got.items() if r["error"] is None} == answered
    for qa_id in answered:
        assert json.loads(got[qa_id]["settings"])["backend"] == "vllm"
        assert got[qa_id]["frames"] == 4
        assert got[qa_id]["response"] == want[qa_id]["response"], qa_id
    texts = {got[qa_id]["response"] for qa_id in answered}
    assert all(t.strip() for t in texts) and len(texts) > 1, texts  # real, question-dependent text
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["requests"] == len(answered)
