"""First GPU figures (issue 17): lvr at real model sizes on one GPU, written to one JSON file.

Builds Qwen2.5-VL-7B / -3B and Qwen3-VL-8B from their published configs with random weights (no
download), bf16, SDPA attention, and measures:

- vision-tower encode seconds and visual tokens at 64 / 256 / 1,024 frames of 448x448;
- one RL step (7B, LoRA) at 256 frames, G = 8, 64 new tokens: encode / rollout / old+ref
  prefill / update seconds with embedding reuse on and off (`lvr.mrsp`, one GPU);
- SFT step tokens/s and MFU at 64 / 256 frames: 7B LoRA and 3B full fine-tuning;
- peak memory vs frames and the most frames that fit the memory cap (80 GiB: an H100) for an SFT
  step and for the RL policy prefill, by bisection with out-of-memory errors caught;
- the capacity model of docs/performance.md, predicted against those measured peaks;
- bf16 vs fp32 log-probs of the MR-SP prefill on the tiny model (numerics).

Each measurement runs in its own try: the JSON says what failed and why, and what was skipped
because the time budget ran low. The JSON is rewritten after every measurement, so a run killed
at its limit still leaves what it measured.

    bash scripts/gpu_check.sh                                    # device machine: $OUT/gpu_check.json
    python scripts/gpu_check.py --out runs/gpu_check.json        # any CUDA machine (PYTHONPATH=.)
    python scripts/gpu_check.py --cpu-dry-run --out /tmp/dry.json   # tiny sizes on CPU (tested)
    python scripts/gpu_check.py --device cpu --only layer_bytes --out /tmp/lb.json  # real widths

Imports only torch, transformers, peft and lvr.mrsp (what the GPU machine has; no lvr.train).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import os
import platform
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import gpu_check_measure as gmeasure
import gpu_check_steps as gs
import torch

from lvr.mrsp import PromptInput, pack_batch, sp_prefill_logprobs
from lvr.mrsp.synthetic import PAD, model_prompt, random_response, tiny_model

GIB = gs.GIB
# Dense bf16 tensor-core peaks from NVIDIA's datasheets (TFLOP/s, without sparsity).
DATASHEET_BF16_TFLOPS = [("H200", 989.4), ("H100 PCIe", 756.0), ("H100 NVL", 835.0),
                         ("H100", 989.4), ("A100", 312.0)]  # fmt: skip
# Rough seconds each measurement needs on an H100, for the budget guard (skip when less is left).
NEED_S = {"env": 0, "matmul_peak": 5, "numerics": 5, "recipe_devices": 2, "encode_7b": 40,
          "rl_step_7b": 110, "sft_lora_7b": 45, "max_frames_rl_7b": 30, "max_frames_sft_7b": 60,
          "sft_full_3b": 50, "qwen3_vl_8b": 50, "layer_bytes": 10}  # fmt: skip


class Runner:
    """Runs measurements fail-soft under a time budget and keeps the JSON report up to date."""

    def __init__(
        self,
        out: Path,
        budget_s: float,
        report: dict[str, Any],
        summary: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        self.out, self.budget_s, self.report, self.summary = out, budget_s, report, summary
        self.t0 = time.time()
        report["results"] = {}

    def left(self) -> float:
        """Seconds of budget left."""
        return self.budget_s - (time.time() - self.t0)

    def run(self, name: str, fn: Callable[[], dict[str, Any]], need_s: float = 0.0) -> Any:
        """Run `fn`; record ok / failed (with the error) / skipped (budget) and its seconds."""
        entry: dict[str, Any] = {}
        if self.left() < need_s:
            entry = {"status": "skipped",
                     "reason": f"budget: {self.left():.0f} s left < {need_s:.0f} s needed"}  # fmt: skip
        else:
            t0 = time.time()
            try:
                entry = {"status": "ok", "data": fn()}
            except Exception as exc:  # noqa: BLE001 - fail soft: the JSON carries the reason
                tb = traceback.format_exception(exc)
                entry = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"[:500],
                         "traceback": "".join(tb)[-3000:]}  # fmt: skip
            entry["seconds"] = round(time.time() - t0, 2)
        self.report["results"][name] = entry
        gs.reset_peak(torch.device(self.report["env"].get("device", "cpu")))
        self.write()
        brief = entry.get("reason") or entry.get("error") or ""
        print(f"[gpu_check] {name}: {entry['status']} {entry.get('seconds', '')} {brief}"[:300],
              flush=True)  # fmt: skip
        return entry.get("data")

    def write(self) -> None:
        """Atomically rewrite the JSON file."""
        self.report["elapsed_s"] = round(time.time() - self.t0, 2)
        if self.summary is not None:  # kept current: a run killed at its limit still has one
            self.report["summary"] = self.summary(self.report)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.report, indent=1, default=str))
        os.replace(tmp, self.out)


# ---------------------------------------------------------------------------------------------
# Environment, matmul ceiling, numerics
# ---------------------------------------------------------------------------------------------


def environment(device: torch.device, cap_gib: float) -> dict[str, Any]:
    """Versions, the device and the memory cap applied to the allocator."""
    import peft
    import transformers

    env: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "peft": peft.__version__,
        "cuda": torch.version.cuda, "device": str(device), "host": platform.node(),
    }  # fmt: skip
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        total = props.total_memory / GIB
        env.update({"gpu": props.name, "sm_count": props.multi_processor_count,
                    "capability": f"{props.major}.{props.minor}", "total_gib": round(total, 2)})  # fmt: skip
        fraction = min(1.0, cap_gib / total)
        torch.cuda.set_per_process_memory_fraction(fraction, device)
        env["memory_cap_gib"] = round(min(cap_gib, total), 2)
        env["datasheet_bf16_tflops"] = next(
            (v for k, v in DATASHEET_BF16_TFLOPS if k in props.name), None
        )
    return env


def matmul_peak(device: torch.device, dry: bool) -> dict[str, Any]:
    """The matrix-product ceiling as measured here (bf16 on CUDA, fp32 on CPU), median of 10."""
    n = 512 if dry else 8192
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)  # random, never zeros
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        t: dict[str, float] = {}
        with gs.phase(t, "s", device):
            a @ b
        times.append(t["s"])
    times.sort()
    return {"n": n, "dtype": str(dtype), "median_s": times[5],
            "tflops": round(2 * n**3 / times[5] / 1e12, 1)}  # fmt: skip


def numerics(device: torch.device) -> dict[str, Any]:
    """bf16 vs fp32 response log-probs of the MR-SP prefill on the tiny model (8 frames, 4 rows).

    fp32 is the reference (TF32 off); compared: the recipes' bf16 autocast over fp32 weights, and
    bf16 weights (the LoRA base), as max / mean |delta log p| over response tokens.
    """
    torch.backends.cuda.matmul.allow_tf32 = False
    model = tiny_model(seed=0)
    cpu_prompt = model_prompt(model, frames=8, size=112, seed=1)  # encodes on the CPU
    model.to(device)
    prompt = dataclasses.replace(cpu_prompt, video_embeds=cpu_prompt.video_embeds.to(device))
    rows = [random_response(32, seed=i) for i in range(4)]

    def logprobs(m: torch.nn.Module, p: PromptInput, autocast: bool) -> torch.Tensor:
        batch = gs._to_device(pack_batch(m, [p] * len(rows), rows, PAD), device)
        ctx = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else nullcontext()
        with torch.no_grad(), ctx:
            out = sp_prefill_logprobs(m, batch)
        return out.logprobs[out.mask.bool()].double()

    ref = logprobs(model, prompt, False)
    cast = copy.deepcopy(model).to(torch.bfloat16)
    p16 = PromptInput(prompt.input_ids, prompt.mm_token_type_ids, prompt.video_grid_thw, 1.0,
                      prompt.video_embeds.to(torch.bfloat16))  # fmt: skip
    out = {"tokens": int(ref.numel()), "mean_abs_logp_fp32": float(ref.abs().mean())}
    for name, got in (("autocast_bf16", logprobs(model, prompt, True)),
                      ("bf16_weights", logprobs(cast, p16, False))):  # fmt: skip
        delta = (got - ref).abs()
        out[name] = {"max_abs": float(delta.max()), "mean_abs": float(delta.mean()),
                     "finite": bool(torch.isfinite(got).all())}  # fmt: skip
    return out


def recipe_devices(device: torch.device) -> dict[str, Any]:
    """Does the vision tower accept `lvr rl`'s call: CUDA pixels with the processor's CPU grid?

    lvr/train/rl.py `_encode` passes `video_grid_thw` as the processor returns it (CPU); in
    transformers 5.25 the tower multiplies CPU position ids by its rotary frequencies on the
    pixels' device, which fails off the CPU (seen with meta tensors on a CPU machine). The check
    encodes on the tiny model both ways and records what happened (an answer, not a failure).
    """
    from lvr.mrsp import EmbeddingCache, VideoKey
    from lvr.mrsp.synthetic import synthetic_video

    model = tiny_model(seed=0).to(device)
    v = synthetic_video(8, size=112, seed=2)
    pixels = v.pixel_values_videos.to(device)
    out: dict[str, Any] = {}
    for name, grid in (("grid_on_cpu", v.grid_thw), ("grid_on_device", v.grid_thw.to(device))):
        try:
            EmbeddingCache(model).get(VideoKey(v.video_id, (0,), (112, 112)), pixels, grid)
            out[name] = "ok"
        except RuntimeError as exc:
            out[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return out


# ---------------------------------------------------------------------------------------------
# Summary and entry point
# ---------------------------------------------------------------------------------------------


def _data(report: dict[str, Any], name: str) -> dict[str, Any]:
    entry = report["results"].get(name) or {}
    return entry.get("data") or {} if entry.get("status") == "ok" else {}


def _sft_rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    keys = ("frames", "tokens", "step_s", "tokens_per_s", "mfu_datasheet", "mfu_measured_matmul",
            "peak_gib", "predicted_peak_gib")  # fmt: skip
    return [{k: r.get(k) for k in keys} for r in data.get("rows", [])]


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """The headline figures (reuse speed-up, max frames per GPU, MFU) and every status."""
    s: dict[str, Any] = {"status": {n: e["status"] for n, e in report["results"].items()}}
    rl = _data(report, "rl_step_7b")
    if rl and "reuse_on" in rl:
        phases = ("encode_s", "rollout_s", "prefill_s", "update_s", "step_s", "encodes", "peak_gib")
        s["rl_step_7b"] = {
            "frames": rl["frames"], "size": rl["size"], "speedup_reuse": rl["speedup_reuse"],
            "gradient_checkpointing": rl["gradient_checkpointing"],
            **{k: {p: rl[k][p] for p in phases} for k in ("reuse_on", "reuse_off", "reuse_on_again")},
        }  # fmt: skip
    for name in ("sft_lora_7b", "sft_full_3b"):
        if _data(report, name):
            s[name] = _sft_rows(_data(report, name))
    q3 = _data(report, "qwen3_vl_8b")
    if q3:
        s["qwen3_vl_8b_sft_lora"] = _sft_rows(q3["sft_lora"])
        s["qwen3_vl_8b_encode"] = [
            {k: r[k] for k in ("frames", "visual_tokens", "seconds")} for r in q3["encode"]["rows"]
        ]
    enc = _data(report, "encode_7b")
    if enc:
        s["encode_7b"] = [{k: r[k] for k in ("frames", "visual_tokens", "seconds", "peak_gib")}
                          for r in enc["rows"]]  # fmt: skip
    for name in ("max_frames_sft_7b", "max_frames_rl_7b"):
        d = _data(report, name)
        if d:
            s[name] = {k: d.get(k) for k in ("size", "cap_gib", "max_fit_frames", "min_oom_frames",
                                             "capacity_model_max_frames", "stopped_by")}  # fmt: skip
    if _data(report, "recipe_devices"):
        s["recipe_devices"] = _data(report, "recipe_devices")
    num = _data(report, "numerics")
    if num:
        s["numerics_max_abs_dlogp"] = {
            k: num[k]["max_abs"] for k in ("autocast_bf16", "bf16_weights")
        }
    return s


STEPS = ("env", "matmul_peak", "numerics", "recipe_devices", "encode_7b", "rl_step_7b", "sft_lora_7b",
         "max_frames_rl_7b", "max_frames_sft_7b", "sft_full_3b", "qwen3_vl_8b", "layer_bytes")  # fmt: skip


def run_all(args: argparse.Namespace, runner: Runner, device: torch.device) -> None:
    """Run the selected measurements in priority order (headline figures first)."""
    dry = args.cpu_dry_run
    plan = gmeasure.Plan.dry() if dry else gmeasure.Plan()
    runner.report["plan"] = dataclasses.asdict(plan)
    models = gmeasure.Models(plan, device, dry)
    report = runner.report
    selected = [n for n in STEPS if (not args.only or n in args.only) and n not in args.skip]

    def peak() -> float | None:
        return _data(report, "matmul_peak").get("tflops")

    def search_s(want: float, name: str) -> float:
        later = sum(NEED_S[n] for n in selected[selected.index(name) + 1 :])
        return max(0.0, min(want, runner.left() - later))

    env = report["env"]
    cap = env.get("memory_cap_gib")
    work: dict[str, Callable[[], dict[str, Any]]] = {
        "env": lambda: env,
        "matmul_peak": lambda: matmul_peak(device, dry),
        "numerics": lambda: numerics(device),
        "recipe_devices": lambda: recipe_devices(device),
        "encode_7b": lambda: gmeasure.encode(models, plan, plan.big),
        "rl_step_7b": lambda: gmeasure.rl_step(models, plan),
        "sft_lora_7b": lambda: gmeasure.sft(models, plan, plan.big, False, plan.sft_frames, env, peak()),
        "max_frames_sft_7b": lambda: gmeasure.max_frames_sft(
            models, plan, cap, _data(report, "sft_lora_7b"), search_s(plan.sft_search_s, "max_frames_sft_7b")),
        "max_frames_rl_7b": lambda: gmeasure.max_frames_rl(
            models, plan, cap, search_s(plan.rl_search_s, "max_frames_rl_7b")),
        "sft_full_3b": lambda: gmeasure.sft(models, plan, plan.full, True, plan.sft_frames, env, peak()),
        "qwen3_vl_8b": lambda: gmeasure.qwen3(models, plan, env, peak()),
        "layer_bytes": lambda: gmeasure.layer_bytes(device, plan, dry),
    }  # fmt: skip
    for name in selected:
        if name in ("sft_full_3b", "layer_bytes"):
            models.free()  # the 7B is done with: make room
        runner.run(name, work[name], 0.0 if dry else NEED_S[name])
    models.free()
    report["model_build_s"] = models.builds


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command line (module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--out", type=Path, default=Path(os.environ.get("OUT", "runs")) / "gpu_check.json"
    )
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny sizes on the CPU (the test)")
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu")
    ap.add_argument(
        "--budget-s", type=float, default=400.0, help="no measurement starts after (seconds)"
    )
    ap.add_argument("--memory-cap-gib", type=float, default=80.0,
                    help="allocator cap (an 80 GB H100 also on a bigger GPU)")  # fmt: skip
    ap.add_argument("--only", type=lambda s: s.split(","), default=[], help=f"subset of {STEPS}")
    ap.add_argument("--skip", type=lambda s: s.split(","), default=[], help="measurements to skip")
    args = ap.parse_args(argv)
    unknown = [n for n in args.only + args.skip if n not in STEPS]
    if unknown:
        ap.error(f"unknown measurement(s) {unknown}; choose from {', '.join(STEPS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the check and write the JSON; exit 0 when the report was written (failures inside)."""
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' renames: log noise
    device = torch.device("cpu" if args.cpu_dry_run else args.device)
    if args.cpu_dry_run:
        torch.set_num_threads(1)  # tiny ops: on a shared CPU, thread hand-offs cost 10x the work
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; use --cpu-dry-run (tiny sizes) or --device cpu",
              file=sys.stderr)  # fmt: skip
        return 2
    report: dict[str, Any] = {
        "schema": 1, "issue": 17, "mode": "cpu-dry-run" if args.cpu_dry_run else device.type,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv), "env": {"device": str(device)},
    }  # fmt: skip
    runner = Runner(args.out, 1e9 if args.cpu_dry_run else args.budget_s, report, summarize)
    try:
        report["env"] = environment(device, args.memory_cap_gib)
    except Exception as exc:  # noqa: BLE001 - the JSON still gets written
        report["env"]["error"] = f"{type(exc).__name__}: {exc}"
    run_all(args, runner, device)
    runner.write()
    print(json.dumps(report["summary"], indent=1, default=str))
    print(f"gpu_check: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
