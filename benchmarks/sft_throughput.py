"""Training tokens/s of `lvr sft` vs TRL's `SFTTrainer`: same tiny VLM, same samples, same batch.

Both train the tiny Qwen2.5-VL (fp32, CPU) on the same color-order videos, micro-batch 4, AdamW,
constant lr. TRL gets the samples already built by our shared `build_sample` (its own data
preparation does not take video paths), collated by the shared `collate`; it keeps its default
loss and metrics. Timing covers each optimizer step's compute (forward, backward, optimizer) and
excludes data loading on both sides: our `step_s` metric, and TRL's on_step_begin -> on_step_end
(the batch is fetched before on_step_begin). Runs alternate (ours, TRL, ours, TRL, ...) and the
median step time is used, which keeps the comparison fair on a busy machine.

    .venv/bin/python benchmarks/sft_throughput.py [--steps 24] [--repeats 2]

Last line: one JSON object (ours/baseline = tokens per second).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lvr.demo.color_task import make_color_qa  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MICRO_BATCH = 4
FRAMES = 8
MAX_PIXELS = 112 * 112


def run_ours(qa: Path, run: Path, steps: int) -> tuple[float, float]:
    """Train with `run_sft`; return (median step seconds, mean tokens per step), warm-up excluded."""
    from lvr.config import load_config
    from lvr.train.sft import SFTConfig, run_sft

    sets = [
        f"data.qa={qa}", f"max_steps={steps}", f"micro_batch={MICRO_BATCH}",
        f"data.frames={FRAMES}", f"data.max_pixels={MAX_PIXELS}", "optim.schedule=constant",
        "optim.warmup_ratio=0", "optim.lr=0.0001", "progress=false", "save_every=0",
        "data.group_by_length=false",
    ]  # fmt: skip
    cfg = load_config(SFTConfig, REPO / "configs/sft/tiny_cpu.yaml", sets)
    run_sft(cfg, run)
    rows = [json.loads(x) for x in (run / "sft/metrics.jsonl").read_text().splitlines()][2:]
    times = [r["step_s"] for r in rows]
    tokens = [r["tokens_per_s"] * r["step_s"] for r in rows]
    return statistics.median(times), sum(tokens) / len(tokens)


def _samples(qa: Path, processor) -> list[dict]:
    from lvr.train import data

    spec = data.FrameSpec(frames=FRAMES, max_pixels=MAX_PIXELS)
    return [data.load_sample(processor, r, spec, 1024).inputs for r in data.read_qa(qa, "sft")]


def run_trl(qa: Path, model_dir: Path, out: Path, steps: int) -> tuple[float, float]:
    """Train with TRL's SFTTrainer on the same samples; return (median step s, mean tokens/step)."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig as TRLConfig
    from trl import SFTTrainer

    from lvr.models.batching import collate
    from lvr.models.loading import load_vlm

    model, processor = load_vlm(model_dir)
    samples = _samples(qa, processor)
    seq = ("input_ids", "attention_mask", "mm_token_type_ids", "labels")
    dataset = Dataset.from_list(
        [{k: (v[0] if k in seq else v).numpy() for k, v in s.items()} for s in samples]
    ).with_format("torch")
    pad = processor.tokenizer.pad_token_id
    tokens: list[int] = []

    def collator(items: list[dict]) -> dict:
        per = [{k: (v[None] if v.ndim == 1 and k in ("input_ids", "attention_mask",
                "mm_token_type_ids", "labels") else v) for k, v in it.items()} for it in items]  # fmt: skip
        batch = collate(per, pad, padding_side="right")
        tokens.append(int(batch["attention_mask"].sum()))
        return batch

    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001, ANN003
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001, ANN003
            times.append(time.perf_counter() - self.t)

    args = TRLConfig(
        output_dir=str(out), per_device_train_batch_size=MICRO_BATCH, max_steps=steps,
        learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, logging_steps=10**6,
        save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
        remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True},
        bf16=False, fp16=False, max_grad_norm=1.0, disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=dataset, data_collator=collator,
        processing_class=processor, callbacks=[Timer()],
    )  # fmt: skip
    torch.manual_seed(0)
    trainer.train()
    return statistics.median(times[2:]), sum(tokens[2:]) / len(tokens[2:])


def main() -> None:
    """Alternate ours / TRL runs and print the comparison (last line JSON)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    from lvr.models.tiny import build_tiny_vlm

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        qa = make_color_qa(work / "data", 32, 0, seed=5, size=112)
        model_dir = build_tiny_vlm(work / "run0/models/tiny-vlm")
        ours, base = [], []
        for k in range(args.repeats):
            run = work / f"run{k}"
            if k:
                build_tiny_vlm(run / "models/tiny-vlm")
            t, n = run_ours(qa, run, args.steps)
            ours.append(n / t)
            t, n = run_trl(qa, model_dir, work / f"trl{k}", args.steps)
            base.append(n / t)
            print(f"repeat {k}: ours {ours[-1]:.0f} tok/s, TRL SFTTrainer {base[-1]:.0f} tok/s")
    o, b = statistics.median(ours), statistics.median(base)
    print(json.dumps({
        "benchmark": "sft_throughput", "metric": "training tokens/s (tiny Qwen2.5-VL, CPU fp32)",
        "ours": round(o, 1), "baseline": round(b, 1), "ratio": round(o / b, 3), "target": 1.0,
        "met": o / b >= 1.0, "baseline_name": f"trl.SFTTrainer {_version('trl')}",
        "micro_batch": MICRO_BATCH, "frames": FRAMES, "steps": args.steps,
    }))  # fmt: skip


def _version(pkg: str) -> str:
    from importlib import metadata

    return metadata.version(pkg)


if __name__ == "__main__":
    main()
