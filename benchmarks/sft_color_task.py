"""The SFT learning check: "which color appears first?" on synthetic color-order videos.

Makes a `qa` table (sft + eval splits, gold letters balanced over A-D) with
`lvr.demo.color_task.make_color_qa`, trains a small tiny VLM with `lvr sft` (settings in
configs/sft/color_order.yaml) and measures held-out accuracy with greedy generation and the letter
inside `<answer>X</answer>`. Chance is 25%.

The default variant ("fixed") shows red, green, blue and yellow in a random order and always
offers them as A-D: the question and options are the same text for every video, so only the
frames can lift accuracy above chance. `--options shuffled` runs the harder variant (4 of 6
colors, options shuffled), where the model must also find the option that names the color.

    .venv/bin/python benchmarks/sft_color_task.py                      # train + evaluate, last line JSON
    .venv/bin/python benchmarks/sft_color_task.py --options shuffled epochs=60
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]

from lvr.demo.color_task import make_color_qa  # noqa: E402


def build_color_vlm(out_dir: Path, hidden: int = 256, layers: int = 4, seed: int = 0) -> Path:
    """A slightly larger tiny Qwen2.5-VL for the learning check (same tokenizer and processor).

    The default tiny model (hidden 128, 2 layers) learns the format but is slow to tie the video
    to the answer; hidden 256 / 4 layers / 4 heads costs about 1.5x per step (the LM head
    dominates) and learns the task well within the budget.

    Args:
        out_dir: Folder to write (reused when it already holds this build).
        hidden: Text hidden size (head_dim stays 64).
        layers: Text decoder layers.
        seed: Weight seed.

    Returns:
        The model folder, loadable with `lvr.models.load_vlm`.
    """
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from lvr.models import tiny
    from lvr.models import tokenizer as tk

    def save(tmp: Path) -> None:
        tok = tk.train_tokenizer()
        cfg = tiny.tiny_vlm_config(tok)
        text = cfg.text_config
        text.hidden_size, text.num_hidden_layers = hidden, layers
        text.num_attention_heads, text.num_key_value_heads = hidden // 64, 2
        text.intermediate_size = 2 * hidden
        text.layer_types = ["full_attention"] * layers
        cfg.vision_config.out_hidden_size = hidden
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
        model.generation_config = tiny._generation_config(tiny._special_ids(tok))
        model.save_pretrained(tmp)
        tiny.tiny_processor(tok).save_pretrained(tmp)

    marker = {"kind": "color-vlm", "hidden": hidden, "layers": layers, "seed": seed, "v": 1}
    return tiny.cached_build(Path(out_dir), marker, save)


def extract_letter(text: str) -> str | None:
    """The letter inside the last `<answer>X</answer>` (None if absent).

    >>> extract_letter("<think>red</think><answer>C</answer>")
    'C'
    """
    found = re.findall(r"<answer>\s*([A-D])\s*</answer>", text)
    return found[-1] if found else None


def evaluate(
    model_dir: Path, qa_dir: Path, frames: int, max_pixels: int = 0, samples: int = 0, seed: int = 0
) -> dict[str, float]:
    """Score every "eval" row by the letter inside `<answer>` (unparsable answers are wrong).

    Greedy decoding by default; with `samples` > 0, that many responses per question at
    temperature 1 (no top-k/top-p: the distribution RL samples from) and the accuracy is their
    mean — the held-out counterpart of RL's mean accuracy reward, with `samples` x less variance
    than one greedy answer per question.

    Returns:
        {"accuracy", "n" (questions), "parsed" (answers with a letter)}.
    """
    import torch

    from lvr.media import FrameSpec, sample_video
    from lvr.models.batching import collate
    from lvr.models.inputs import frames_sample
    from lvr.models.loading import load_vlm
    from lvr.train import data

    model, processor = load_vlm(model_dir)
    rows = data.read_qa(qa_dir, "eval")
    tok = processor.tokenizer
    sampling = {"do_sample": False}
    if samples:
        sampling = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                    "num_return_sequences": samples}  # fmt: skip
    torch.manual_seed(seed)
    correct = parsed = total = 0
    for row in rows:
        decoded = sample_video(row.video_path, FrameSpec(frames, max_pixels=max_pixels))
        sample = frames_sample(processor, row.question, row.options, decoded)
        batch = collate([sample], tok.pad_token_id, padding_side="left")
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=32, **sampling)
        for seq in out:
            letter = extract_letter(
                tok.decode(seq[batch["input_ids"].shape[1] :], skip_special_tokens=True)
            )
            parsed += letter is not None
            correct += letter == row.answer
            total += 1
    return {"accuracy": correct / total, "n": len(rows), "parsed": parsed}


def learning_check(
    work: Path,
    config: Path | None = None,
    sets: list[str] | None = None,
    threads: int = 1,
    options: str = "fixed",
) -> dict:
    """Make data, train with `configs/sft/color_order.yaml`, evaluate on held-out videos.

    Args:
        work: Scratch folder (videos, qa table, run folder).
        config: SFT config (default configs/sft/color_order.yaml).
        sets: `key=value` overrides.
        threads: torch CPU threads; 1 is fastest on the shared 2-core machine (2 threads thrash
            when other processes compete for the cores).
        options: Task variant of `make_color_qa` ("fixed" or "shuffled").

    Returns:
        The benchmark JSON dict (accuracy as "ours", chance 0.25 as "baseline").
    """
    import torch

    from lvr.config import load_config
    from lvr.train.sft import SFTConfig, run_sft

    torch.set_num_threads(threads)

    cfg = load_config(SFTConfig, config or REPO / "configs/sft/color_order.yaml", sets)
    n_train, n_eval = 400, 60
    t0 = time.time()
    qa = make_color_qa(work / "data", n_train, n_eval, seed=1, size=56, options=options)
    cfg.data.qa = str(qa)
    if cfg.model.path.startswith("color-vlm"):  # "color-vlm" or "color-vlm-<hidden>-<layers>"
        dims = [int(x) for x in cfg.model.path.split("-")[2:]] or [256, 4]
        cfg.model.path = str(build_color_vlm(work / "models" / cfg.model.path, *dims))
    t_data = time.time() - t0
    manifest = run_sft(cfg, work / "run")
    t_train = time.time() - t0 - t_data
    final = Path(manifest["final_checkpoint"])
    after = evaluate(final, qa, cfg.data.frames, cfg.data.max_pixels)
    return {
        "benchmark": "sft_color_order",
        "metric": "held-out accuracy (greedy, <answer> letter)",
        "ours": after["accuracy"],
        "baseline": 0.25,
        "ratio": after["accuracy"] / 0.25,
        "target": 0.8,
        "met": after["accuracy"] >= 0.8,
        "n_eval": after["n"],
        "parsed": after["parsed"],
        "train_s": round(t_train, 1),
        "data_s": round(t_data, 1),
        "final_loss": manifest["last_metrics"].get("loss"),
        "options": options,
    }


if __name__ == "__main__":
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--options", choices=["fixed", "shuffled"], default="fixed")
    parser.add_argument("sets", nargs="*", help="key=value overrides of the SFT config")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(learning_check(Path(tmp), sets=args.sets, options=args.options)))
