"""Every model family lvr knows, on its tiny model: the family description, MR-SP numerics from
cached embeddings (the model's own forward is the reference), rollouts, the embedding cache, the
placeholder ban, and the tiny-model builder. SP=2 numerics per family: tests/test_mrsp_sp.py;
frame times: tests/test_frame_times.py; the CLI chain per family: tests/test_families_chain.py."""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import re
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lvr.models import family
from lvr.models.inputs import build_sample
from lvr.models.loading import load_vlm
from lvr.models.tiny import TINY_FAMILIES, build_tiny_vlm, tiny_vlm
from lvr.mrsp.batch import pack_batch, prompt_from_sample
from lvr.mrsp.comm import MrspError
from lvr.mrsp.encode import EmbeddingCache, VideoKey, encode_video
from lvr.mrsp.prefill import sp_prefill_logprobs
from lvr.mrsp.rollout import HFRolloutEngine
from lvr.train.config import ModelSection
from lvr.train.policy import base_model, set_trainable

TOL = 1e-5
DEEPSTACK = [f for f in TINY_FAMILIES if family.get_family(f).deepstack]


@cache
def _tiny(name: str) -> tuple[torch.nn.Module, Any]:
    return tiny_vlm(name, seed=0)


def _frames(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 112, 112, 3), dtype=np.uint8)


def _prompt(name: str, frames: int = 6, seed: int = 0) -> tuple[Any, dict]:
    model, proc = _tiny(name)
    times = [0.25 + 0.5 * i for i in range(frames)]
    sample = build_sample(proc, "What color is the ball?", ["red", "blue"], _frames(frames, seed),
                          timestamps=times)  # fmt: skip
    with torch.no_grad():
        emb = encode_video(model, sample["pixel_values_videos"], family.video_grid(sample))
    return prompt_from_sample(sample, emb, key=f"{name}-{seed}"), sample


def _eos(name: str) -> list[int]:
    return [_tiny(name)[1].tokenizer.convert_tokens_to_ids("<|im_end|>")]


def _pad(name: str) -> int:
    return int(_tiny(name)[1].tokenizer.pad_token_id)


@pytest.mark.parametrize("name", TINY_FAMILIES)
def test_family_description_finds_the_parts(name: str) -> None:
    model, _ = _tiny(name)
    fam = family.family_of(model)
    assert fam.name == model.config.model_type == name
    assert family.vision_tower(model) is getattr(model.model, fam.vision_module)
    assert family.language_model(model) is model.model.language_model
    cfg = model.config
    wanted = {cfg.image_token_id, cfg.video_token_id}
    if fam.positions == "mrope":  # Qwen also bans its vision start/end markers
        wanted |= {cfg.vision_start_token_id, cfg.vision_end_token_id}
    assert family.placeholder_ids(model) == sorted(wanted)
    names = [n for n, _ in model.named_parameters()]
    vision = {n for n in names if family.is_vision_param(fam, n)}
    projector = {n for n in names if family.is_projector_param(fam, n)}
    tower = {n for n in names if n.startswith(f"model.{fam.vision_module}.")}
    assert projector and projector < vision and vision == tower | projector
    assert all(n.startswith("model.") and ".language_model." not in n for n in vision)
    assert any("deepstack_merger_list" in n for n in projector) == fam.deepstack
    # What a cached embedding depends on: every vision and projector parameter, once.
    assert len(family.vision_parameters(model)) == len(vision)
    regex = re.compile(family.lora_target_regex(fam, ["q_proj", "down_proj"]))
    matched = [n for n, _ in model.named_modules() if regex.fullmatch(n)]
    assert matched and all(".language_model." in n for n in matched)


def test_unknown_family_is_one_line() -> None:
    with pytest.raises(family.FamilyError, match="unknown model family 'llama'.*qwen3_vl"):
        family.get_family("llama")


@pytest.mark.parametrize("name", TINY_FAMILIES)
def test_encoding_units_separately_is_exact(name: str) -> None:
    # The premise of MR-SP's paralleled encoding (units: Qwen's temporal patches, LLaVA's
    # frames), DeepStack features included; the once-per-video trailer comes from the last run.
    model, _ = _tiny(name)
    p, sample = _prompt(name, frames=6)
    grid, pixels = family.video_grid(sample), sample["pixel_values_videos"]
    trailer = family.family_of(model).video_trailer
    with torch.no_grad():
        parts = [encode_video(model, *family.video_units(model, pixels, grid, i, 1))
                 for i in range(int(grid[0]))]  # fmt: skip
    keep = [x.tokens[: x.rows - trailer] for x in parts[:-1]] + [parts[-1].tokens]
    assert torch.allclose(torch.cat(keep), p.video_embeds.tokens, atol=TOL)
    for k, whole in enumerate(p.video_embeds.deepstack):
        assert torch.allclose(torch.cat([x.deepstack[k] for x in parts]), whole, atol=TOL)
    assert len(p.video_embeds.deepstack) == (2 if name in DEEPSTACK else 0)
    if trailer:  # the guard: every run really carries the trailer
        assert sum(x.rows for x in parts) == p.video_embeds.rows + trailer * (len(parts) - 1)


@pytest.mark.parametrize("name", TINY_FAMILIES)
def test_logprobs_from_cached_embeddings_equal_the_models_own_forward(name: str) -> None:
    model, _ = _tiny(name)
    prompts, samples = zip(*[_prompt(name, 6, 0), _prompt(name, 2, 1)], strict=True)
    resps = [
        torch.randint(10, 2000, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 9)
    ]
    with torch.no_grad():
        out = sp_prefill_logprobs(model, pack_batch(model, list(prompts), resps, _pad(name)))
    for i, (p, s, r) in enumerate(zip(prompts, samples, resps, strict=True)):
        ids = torch.cat([p.input_ids, r])[None]
        types = torch.cat([p.mm_token_type_ids, torch.zeros_like(r)])[None]
        video = {k: s[k] for k in ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
                 if k in s}  # fmt: skip
        inputs = family.model_inputs(model, {"input_ids": ids, "mm_token_type_ids": types, **video})
        with torch.no_grad():  # the model encodes the pixels itself and computes its positions
            logits = model(**inputs).logits[0, :-1]
        logp = torch.log_softmax(logits, -1)
        ref = logp.gather(-1, ids[0, 1:, None])[-r.numel() :, 0]
        ref_ent = -(logp.exp() * logp).sum(-1)[-r.numel() :]
        assert torch.allclose(out.logprobs[i, : r.numel()], ref, atol=TOL)
        assert torch.allclose(out.entropy[i, : r.numel()], ref_ent, atol=TOL)


@pytest.mark.parametrize("name", DEEPSTACK)
def test_deepstack_features_matter(name: str) -> None:
    # Guards the test above: dropping the DeepStack features changes the log-probs.
    model, _ = _tiny(name)
    p, _ = _prompt(name)
    resp = [torch.arange(10, 16)]
    with torch.no_grad():
        good = sp_prefill_logprobs(model, pack_batch(model, [p], resp, _pad(name))).logprobs
        bare = family.VideoEmbeds(p.video_embeds.tokens, tuple(
            torch.zeros_like(d) for d in p.video_embeds.deepstack))  # fmt: skip
        p.video_embeds, keep = bare, p.video_embeds
        bad = sp_prefill_logprobs(model, pack_batch(model, [p], resp, _pad(name))).logprobs
        p.video_embeds = keep
    assert (good - bad).abs().max() > 1e-4


@pytest.mark.parametrize("name", TINY_FAMILIES)
def test_rollout_positions_and_logprobs_equal_the_prefill(name: str) -> None:
    model, _ = _tiny(name)
    p, _ = _prompt(name, frames=4, seed=2)
    seen: list[torch.Tensor] = []
    rotary = family.language_model(model).rotary_emb
    hook = rotary.register_forward_hook(lambda mod, args, out: seen.append(args[1].clone()))
    try:
        ro = HFRolloutEngine(model, _eos(name), _pad(name)).generate([p], n=3, max_new_tokens=6)
    finally:
        hook.remove()
    batch = pack_batch(model, [p] * 3, ro.response_ids, _pad(name))
    # Positions generate used: the (last) prompt prefill, then one column per decode step
    # ([3, rows, cols] for M-RoPE, [rows, cols] for 1-D positions).
    start = max(i for i, s in enumerate(seen) if s.shape[-1] > 1)
    mrope = family.family_of(model).positions == "mrope"
    shape = (3, 3, -1) if mrope else (3, -1)
    used = torch.cat([(s[-3:] if mrope else s).expand(*shape) for s in seen[start:]], -1)
    assert used.shape[-1] == p.input_ids.numel() + 5
    assert torch.equal(used, batch.position_ids[..., : used.shape[-1]])
    video = p.mm_token_type_ids == 2
    if mrope:
        assert not torch.equal(batch.position_ids[1, 0, : video.numel()][video],
                               batch.position_ids[2, 0, : video.numel()][video])  # 3-D  # fmt: skip
    with torch.no_grad():
        out = sp_prefill_logprobs(model, batch)
    for k, lp in enumerate(ro.logprobs):
        assert torch.allclose(out.logprobs[k, : lp.numel()], lp, atol=TOL)


@pytest.mark.parametrize("name", TINY_FAMILIES)
def test_placeholders_are_never_sampled(name: str) -> None:
    # A policy that wants nothing but vision placeholders: the engine must never emit one.
    model, _ = _tiny(name)
    banned = family.placeholder_ids(model)
    p, _ = _prompt(name, frames=2, seed=3)

    def force(module: Any, args: Any, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.clone()
        logits[..., banned] += 1e4
        return logits

    hook = model.lm_head.register_forward_hook(force)
    try:
        ro = HFRolloutEngine(model, _eos(name), _pad(name)).generate([p], n=4, max_new_tokens=5)
        with torch.no_grad():  # the guard: without the ban, placeholders come out
            free = model.generate(input_ids=torch.tensor([[10, 11, 12]]), max_new_tokens=3,
                                  do_sample=False)  # fmt: skip
    finally:
        hook.remove()
    sampled = torch.cat(ro.response_ids)
    assert sampled.numel() >= 4 and not torch.isin(sampled, torch.tensor(banned)).any()
    assert torch.isin(free[0, 3:], torch.tensor(banned)).all()


@pytest.mark.parametrize("name", TINY_FAMILIES)
def test_cache_encodes_once_and_disk_entries_carry_deepstack(name: str, tmp_path: Path) -> None:
    model, _ = _tiny(name)
    p, s = _prompt(name, frames=4, seed=4)
    key = VideoKey(p.key, (0, 1, 2, 3), (112, 112))
    cache = EmbeddingCache(model, cache_dir=tmp_path)
    grid = family.video_grid(s)
    first = cache.get(key, s["pixel_values_videos"], grid)
    for _ in range(6):  # G rollouts + old/ref/policy prefills
        assert cache.get(key, s["pixel_values_videos"], grid) is first
    again = EmbeddingCache(model, cache_dir=tmp_path).get(key, s["pixel_values_videos"], grid)
    assert cache.encodes == 1 and torch.equal(again.packed(), first.packed())
    assert len(again.deepstack) == len(first.deepstack)
    other, _ = tiny_vlm(name, seed=1)  # another tower never reads this model's entries
    fresh = EmbeddingCache(other, cache_dir=tmp_path)
    fresh.get(key, s["pixel_values_videos"], grid)
    assert fresh.disk_hits == 0 and fresh.encodes == 1


def test_video_with_the_wrong_deepstack_is_refused() -> None:
    model, _ = _tiny("qwen3_vl")
    p, _ = _prompt("qwen3_vl")
    p.video_embeds = family.VideoEmbeds(p.video_embeds.tokens, (p.video_embeds.deepstack[0][:-1],))
    with pytest.raises(MrspError, match="embedding rows"):
        pack_batch(model, [p], [torch.arange(10, 14)], _pad("qwen3_vl"))


@pytest.mark.parametrize("name", ["qwen3_vl", "qwen3_5", "llava_onevision"])
def test_lora_and_freezing_follow_the_family(name: str) -> None:
    model, _ = tiny_vlm(name, seed=0)
    fam = family.family_of(model)
    section = ModelSection(lora=True, train_projector=True, train_vision=False)
    wrapped = set_trainable(model, section)
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert any("lora_" in n and ".language_model." in n for n in trainable)
    projector = [n for n in trainable if "lora_" not in n]
    assert projector and all(family.is_projector_param(fam, n) for n in projector)
    tower = [n for n, _ in wrapped.named_parameters()
             if family.is_vision_param(fam, n) and not family.is_projector_param(fam, n)]  # fmt: skip
    assert tower and not set(tower) & set(trainable)
    assert any((".merger." if fam.name != "llava_onevision" else ".image_newline") in n
               for n in projector)  # fmt: skip


def test_tiny_cli_writes_a_family_and_refuses_an_unknown_one(tmp_path: Path) -> None:
    out = tmp_path / "tiny-q35"
    done = subprocess.run(
        [sys.executable, "-m", "lvr.models.tiny", "--family", "qwen3_5", "--out", str(out)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    model, proc = load_vlm(out)
    assert model.config.model_type == "qwen3_5" and type(proc).__name__ == "Qwen3VLProcessor"
    assert build_tiny_vlm(out, family="qwen3_5") == out.absolute()  # cached: reused as is
    bad = subprocess.run(
        [sys.executable, "-m", "lvr.models.tiny", "--family", "llama", "--out", str(tmp_path / "x")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert bad.returncode == 2 and "invalid choice: 'llama'" in bad.stderr


@pytest.mark.parametrize("name", [f for f in TINY_FAMILIES if family.get_family(f).vllm_refusal])
def test_vllm_is_refused_in_one_line(name: str, tmp_path: Path) -> None:
    from lvr.mrsp.vllm_engine import VLLMRolloutEngine

    folder = build_tiny_vlm(tmp_path / name, family=name)
    with pytest.raises(MrspError) as err:
        VLLMRolloutEngine(folder, video_token_id=0)
    text = str(err.value)
    assert "\n" not in text and text.startswith("rollout.engine=vllm: vLLM is refused for")
    assert text.endswith("use rollout.engine=hf")


@pytest.mark.parametrize("name", TINY_FAMILIES)
def test_hf_backend_answers_video_requests(name: str, tmp_path: Path) -> None:
    # The captioner / eval path: frames as one video with their times, placeholders suppressed.
    from lvr.backends import Request
    from lvr.backends.hf import HFBackend

    backend = HFBackend(build_tiny_vlm(tmp_path / name, family=name))
    frames = list(_frames(4, seed=7))
    reqs = [Request(f"c{i}", [{"role": "user", "content": "Describe the clip."}], images=frames,
                    fps=2.0, timestamps=[10.0, 10.5, 11.0, 11.5], max_tokens=6,
                    temperature=t, n=2) for i, t in enumerate((0.0, 1.0))]  # fmt: skip
    got = backend.run(reqs, progress=False)
    assert [r.error for r in got] == [None, None] and all(len(r.texts) == 2 for r in got)
    assert backend.placeholder_ids() == family.placeholder_ids(backend._model)


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[1].glob("configs/*/qwen3vl_*.yaml")))
def test_qwen3vl_configs_load_and_open_with_their_command(path: Path) -> None:
    from lvr.config import load_config
    from lvr.train.rl import RLConfig
    from lvr.train.sft import SFTConfig

    kind = path.parent.name
    cfg = load_config(SFTConfig if kind == "sft" else RLConfig, path, [])
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and f" {kind} --config configs/{kind}/{path.name} " in first
    assert cfg.model.lora or cfg.deepspeed  # 1 GPU: LoRA; 8 GPUs: ZeRO-3 or LoRA


def test_activation_checkpointing_without_deprecation_and_same_gradients() -> None:
    """`gradient_checkpointing: true` turns checkpointing on through the name transformers keeps
    (the old one warned at every run), and LoRA's gradients through it equal those without."""
    ids = torch.arange(3, 19).unsqueeze(0)  # [1, 16] text tokens
    grads = []
    for on in (False, True):
        model, _ = tiny_vlm("qwen2_5_vl", seed=0)
        section = ModelSection(lora=True, lora_dropout=0.0, gradient_checkpointing=on)
        with warnings.catch_warnings():
            # (peft's own `is_gradient_checkpointing` call warns too: not ours to fix)
            warnings.filterwarnings("error", ".*gradient_checkpointing_enable", FutureWarning)
            wrapped = set_trainable(model, section)
        base = base_model(wrapped)
        new = hasattr(type(base), "is_activation_checkpointing")  # the older name warns
        assert (base.is_activation_checkpointing if new else base.is_gradient_checkpointing) is on
        wrapped.train()
        wrapped(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in wrapped.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)
