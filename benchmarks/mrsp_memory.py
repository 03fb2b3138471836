"""MR-SP stage 2 benchmark: peak memory per rank of the policy prefill, SP=1 vs SP=2 (gloo, CPU).

Workload: one sequence of L tokens (8K..64K: a video block + prompt text + a 64-token response) through
the tiny Qwen2.5-VL decoder (hidden 128, 2 layers, 2 heads / 1 KV head), forward AND backward of a
log-prob loss — the policy prefill, whose saved activations are what runs out of memory. The video
embeddings are given (stage 1 is another benchmark).

Measurement: every (SP, L) runs in fresh processes (one per rank). Each rank resets its kernel
high-water mark (`/proc/self/clear_refs` <- 5), runs the prefill, and reports VmHWM - VmRSS(before):
the peak resident memory the prefill added. glibc is told to serve every block >= 64 KB with mmap
(`MALLOC_MMAP_THRESHOLD_`), so freed tensors leave RSS at once and the peak follows live tensor bytes
(Python's tracemalloc does not see torch's allocations; the CPU has no allocator counters like
`torch.cuda.max_memory_allocated`).

    .venv/bin/python benchmarks/mrsp_memory.py                    # 8K..64K: ~10-20 min on 2 cores
    .venv/bin/python benchmarks/mrsp_memory.py --tokens 8192,16384
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lvr.mrsp.batch import PromptInput, pack_batch
from lvr.mrsp.prefill import sp_prefill_logprobs
from lvr.mrsp.synthetic import PAD, random_response, synthetic_prompt, tiny_model

TARGET = 0.6  # SP=2 peak <= 0.6 x SP=1 at the longest length
BUDGET_MB = 400.0  # a fixed per-rank budget: which lengths fit it at SP=1 and at SP=2
RESPONSE = 64
TOKENS_PER_TEMPORAL_PATCH = 16  # 112x112 frames: 8x8 patches merged 2x2


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _batch(model: torch.nn.Module, tokens: int):
    t = max(1, (tokens - RESPONSE - 14) // TOKENS_PER_TEMPORAL_PATCH)
    grid = torch.tensor([t, 8, 8])
    ids, types = synthetic_prompt(grid)
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(
        t * TOKENS_PER_TEMPORAL_PATCH, model.config.text_config.hidden_size, generator=g
    )
    p = PromptInput(ids, types, grid, 1.0, emb)
    return pack_batch(model, [p], [random_response(RESPONSE)], PAD)


def _prefill_step(model: torch.nn.Module, batch, group) -> None:
    out = sp_prefill_logprobs(model, batch, group)
    (-(out.logprobs * out.mask).sum() / out.mask.sum()).backward()
    model.zero_grad(set_to_none=True)


def _rank(rank: int, sp: int, tokens: int, init: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    group = None
    if sp > 1:
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=sp)
        group = dist.group.WORLD
    model = tiny_model(seed=0)
    _prefill_step(model, _batch(model, 512), group)  # warm-up: kernels, allocator pools
    batch = _batch(model, tokens)
    if group is not None:
        dist.barrier()
    before = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to current RSS
    t0 = time.perf_counter()
    _prefill_step(model, batch, group)
    peak = _status_kb("VmHWM") - before
    res = {"rank": rank, "peak_mb": peak / 1024, "seconds": time.perf_counter() - t0}
    res["tokens"] = int(batch.input_ids.shape[1])
    Path(out_dir, f"{rank}.json").write_text(json.dumps(res))
    if group is not None:
        dist.destroy_process_group()


def run_one(sp: int, tokens: int) -> dict[str, float]:
    """Fresh processes for one (SP, L); returns the largest per-rank peak."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
        code = (
            "import sys; from benchmarks_mrsp_memory import worker_main; "
            "worker_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])"
        )
        env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
        cmd = [sys.executable, "-c", code.replace("benchmarks_mrsp_memory", Path(__file__).stem)]
        subprocess.run([*cmd, str(sp), str(tokens), tmp], check=True, env=env)
        ranks = [json.loads(Path(tmp, f"{r}.json").read_text()) for r in range(sp)]
    worst = max(ranks, key=lambda r: r["peak_mb"])
    return {
        "sp": sp,
        "tokens": worst["tokens"],
        "peak_mb_per_rank": round(worst["peak_mb"], 1),
        "seconds": round(max(r["seconds"] for r in ranks), 2),
    }


def worker_main(sp: int, tokens: int, out_dir: str) -> None:
    """Entry of the fresh process: start `sp` rank processes and wait."""
    init = os.path.join(out_dir, "init")
    mp.spawn(_rank, args=(sp, tokens, init, out_dir), nprocs=sp, join=True)


def main() -> None:
    """Measure every (SP, L) and print one JSON line each, then the summary line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="8192,16384,32768,65536")
    args = ap.parse_args()
    lengths = [int(t) for t in args.tokens.split(",")]
    rows = []
    for n in lengths:
        for sp in (1, 2):
            rows.append(run_one(sp, n))
            print(json.dumps(rows[-1]), flush=True)
    peak = {
        (r["sp"], n): r["peak_mb_per_rank"]
        for r, n in zip(rows, [n for n in lengths for _ in (1, 2)], strict=True)
    }
    longest = max(lengths)
    one, two = peak[(1, longest)], peak[(2, longest)]
    fits = {sp: max([n for n in lengths if peak[(sp, n)] <= BUDGET_MB], default=0) for sp in (1, 2)}
    print(
        json.dumps(
            {
                "benchmark": "mrsp_memory",
                "metric": f"peak_prefill_mb_per_rank_at_{longest}_tokens_sp2_over_sp1",
                "ours": two,
                "baseline": one,
                "ratio": round(two / one, 3),
                "target": TARGET,
                "met": two <= TARGET * one,
                "budget_mb": BUDGET_MB,
                "longest_fitting_tokens": {"sp1": fits[1], "sp2": fits[2]},  # of those measured
            }
        )
    )


if __name__ == "__main__":
    main()
