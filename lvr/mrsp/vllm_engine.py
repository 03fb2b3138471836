"""vLLM rollout engine (the `gpu` extra, or the separate CPU venv built by `scripts/vllm_env.sh`).

Same interface as `HFRolloutEngine`. Cached video embeddings go in as precomputed embeddings
(`enable_mm_embeds=True`, `multi_modal_data={"video": {"video_embeds", "video_grid_thw"}}`), so vLLM
never runs the vision tower; vLLM computes the M-RoPE positions from `video_grid_thw` itself (and
`second_per_grid_ts`). Our prompts arrive with the `<|video_pad|>` run already expanded; vLLM expands
the placeholder from the grid, so the run is collapsed back to one token before sending.
Log-probs are vLLM's default raw log-probs of the sampled tokens (`logprobs=0`). The vision
placeholder tokens are banned from sampling (`bad_words`: each is one token, so always banned),
as `HFRolloutEngine` suppresses them.

Weights are reloaded in place after each optimizer step with the workers' `reload_weights` through
`collective_rpc`: the tensors travel as one `torch.save` blob and a small function unpacks them in
each worker (functions are shipped pickled: `VLLM_ALLOW_INSECURE_SERIALIZATION=1`, set here when
unset). Tensors handed to `collective_rpc` directly only survive the in-process engine
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`): vLLM's msgpack RPC to an engine process turns a tensor nested
in a list into a plain list.

Written against the documented vLLM API (LLM, SamplingParams, collective_rpc); exercised only by the
opt-in `tests/test_mrsp_vllm.py` (`pytest -m vllm` in the vLLM venv), not by the default suite.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lvr.models import family
from lvr.mrsp.batch import VIDEO_TYPE, PromptInput, check_prompt
from lvr.mrsp.comm import MrspError
from lvr.mrsp.rollout import Rollouts

TIME_TEXT = re.compile(r"<(\d+\.\d) seconds>$")


def collapse_video_run(p: PromptInput) -> list[int]:
    """Prompt ids with the expanded `<|video_pad|>` run replaced by a single placeholder."""
    ids, types = p.input_ids.tolist(), p.mm_token_type_ids.tolist()
    out: list[int] = []
    for i, (tok, typ) in enumerate(zip(ids, types, strict=True)):
        if typ == VIDEO_TYPE and i > 0 and types[i - 1] == VIDEO_TYPE:
            continue
        out.append(tok)
    return out


def _runs(types: list[int]) -> list[tuple[int, int]]:
    """[start, end) of every run of video-typed positions."""
    starts = [i for i, t in enumerate(types) if t == VIDEO_TYPE and (i == 0 or types[i - 1] != t)]
    return [(s, next((j for j in range(s, len(types)) if types[j] != VIDEO_TYPE), len(types)))
            for s in starts]  # fmt: skip


def collapse_timed_video(p: PromptInput, tokenizer: Any) -> tuple[list[int], list[float]]:
    """A timestamp-text prompt (Qwen3-VL, Qwen3.5) as vLLM takes it with precomputed embeddings.

    Our prompt holds, per temporal patch, `<t seconds><|vision_start|><|video_pad|>*n
    <|vision_end|>`; vLLM rebuilds exactly that from ONE bare `<|video_pad|>` and the patch times
    (`timestamps`). The times are read back from the prompt's own text, and the token ids of each
    time text are checked, so the prompt vLLM rebuilds is ours token for token.

    Returns:
        (prompt ids with the video span collapsed to one `<|video_pad|>`, time of every patch).

    Raises:
        MrspError: A video span that is not the processor's timestamp layout.
    """
    ids, types = p.input_ids.tolist(), p.mm_token_type_ids.tolist()
    runs = _runs(types)
    times, begin = [], None
    for k, (start, _) in enumerate(runs):
        lo = runs[k - 1][1] + 1 if k else max(0, start - 1 - 16)  # after the previous vision_end
        text = tokenizer.decode(ids[lo : start - 1])
        found = TIME_TEXT.search(text)
        encoded = tokenizer.encode(found.group(0), add_special_tokens=False) if found else []
        if not found or ids[start - 1 - len(encoded) : start - 1] != encoded:
            raise MrspError(f"prompt {p.key!r}: no `<t seconds>` text before video patch {k}")
        times.append(float(found.group(1)))
        begin = start - 1 - len(encoded) if k == 0 else begin
    end = runs[-1][1] + 1  # past the last vision_end
    return ids[:begin] + [ids[runs[0][0]]] + ids[end:], times


class VLLMRolloutEngine:
    """Rollouts with vLLM from precomputed video embeddings."""

    def __init__(
        self,
        model_path: str | Path,
        video_token_id: int,
        stop_token_ids: Sequence[int] = (),
        **llm_kwargs: Any,
    ) -> None:
        """Start a vLLM engine (15-25 s; call from under `if __name__ == "__main__":`).

        Args:
            model_path: A saved Qwen2.5-VL folder (weights, config, tokenizer, processor).
            video_token_id: The `<|video_pad|>` id (to validate prompts).
            stop_token_ids: Extra ids that end a response (besides the model's eos), e.g. the
                end-of-turn ids `HFRolloutEngine` stops at, so both engines end responses alike.
            **llm_kwargs: Passed to `vllm.LLM` (dtype, gpu_memory_utilization, max_model_len...).

        Raises:
            MrspError: When vLLM is not installed in this environment, or the model's family is
                one vLLM cannot serve here (`Family.vllm_refusal`).
        """
        try:
            family.check_vllm_family(model_path)
        except family.FamilyError as exc:
            raise MrspError(f"rollout.engine=vllm: {exc}; use rollout.engine=hf") from None
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        try:
            from vllm import LLM
        except ImportError as exc:
            raise MrspError(
                "vLLM is not installed here: use the `gpu` extra, or build the CPU venv with "
                "scripts/vllm_env.sh"
            ) from exc
        kwargs = {"enable_mm_embeds": True, "limit_mm_per_prompt": {"video": 1, "image": 0}}
        kwargs.update(llm_kwargs)
        self.llm = LLM(model=str(model_path), **kwargs)
        self.video_token_id = video_token_id
        self.stop_token_ids = [int(i) for i in stop_token_ids]
        hf_config = self.llm.llm_engine.model_config.hf_config
        self.family = family.family_of(hf_config)
        tok = self.llm.get_tokenizer()  # vision placeholders: never sampled
        self.bad_words = [tok.convert_ids_to_tokens(i) for i in family.placeholder_ids(hf_config)]

    def _request(self, p: PromptInput) -> dict[str, Any]:
        check_prompt(p, self.video_token_id)
        # vLLM takes DeepStack features side by side with the tokens: [N, (1 + k) * D].
        video = {
            "video_embeds": p.video_embeds.detach().packed().cpu(),
            "video_grid_thw": p.video_grid_thw.reshape(1, 3).cpu(),
        }
        if p.second_per_grid_ts is not None:
            video["second_per_grid_ts"] = torch.tensor([float(p.second_per_grid_ts)])
        if self.family.frame_times == "timestamp_text":
            ids, times = collapse_timed_video(p, self.llm.get_tokenizer())
            video["timestamps"] = torch.tensor([times])  # [1 video, t patches]
        else:
            ids = collapse_video_run(p)
        return {"prompt_token_ids": ids, "multi_modal_data": {"video": video}}

    def generate(
        self,
        prompts: Sequence[PromptInput],
        n: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 256,
        seed: int = 0,
    ) -> Rollouts:
        """Sample `n` responses per prompt (prompt i uses seed + i). See `HFRolloutEngine.generate`."""
        from vllm import SamplingParams

        params = [
            SamplingParams(
                n=n,
                temperature=temperature,
                top_p=top_p,
                max_tokens=max_new_tokens,
                seed=seed + i,
                logprobs=0,
                stop_token_ids=self.stop_token_ids or None,
                bad_words=self.bad_words or None,
            )
            for i in range(len(prompts))
        ]
        outs = self.llm.generate([self._request(p) for p in prompts], params, use_tqdm=False)
        result = Rollouts()
        for i, out in enumerate(outs):
            for c in out.outputs:
                ids = list(c.token_ids)
                lps = [c.logprobs[k][tok].logprob for k, tok in enumerate(ids)]
                result.prompt_index.append(i)
                result.response_ids.append(torch.tensor(ids, dtype=torch.long))
                result.logprobs.append(torch.tensor(lps, dtype=torch.float32))
                result.finished.append(c.finish_reason == "stop")
        return result

    def update_weights(self, model: torch.nn.Module | Mapping[str, torch.Tensor]) -> None:
        """Load `model`'s current decoder weights into the running engine (no restart).

        `model` is the plain transformers model or its state dict with the same key names (e.g. a
        LoRA policy's merged weights: `lvr.train.checkpoint.merge_lora_state_dict`).

        The vision tower is skipped: the engine only ever receives precomputed embeddings, so its
        copy of the tower is never run. (A plain `model.load_weights` through `collective_rpc`
        fails on vLLM-CPU once weights were repacked: "Parameter has no attribute weight_loader";
        the worker's `reload_weights` handles that.)
        """
        state = model.state_dict() if isinstance(model, torch.nn.Module) else model
        # Cast to the engine's dtype before leaving the device: fp32 masters shipped to a bf16
        # engine would move twice the bytes for the same rounded values.
        dtype = getattr(getattr(self.llm.llm_engine, "model_config", None), "dtype", None)
        weights = [
            (k, v.detach().to(dtype if dtype and v.is_floating_point() else v.dtype).cpu())
            for k, v in state.items()
            if not family.is_vision_param(self.family, k)
        ]
        buf = io.BytesIO()
        torch.save(weights, buf)  # bytes cross vLLM's RPC intact (see the module docstring)
        self.llm.collective_rpc(_reload_weights, args=(buf.getvalue(),))
        # Cached KV blocks and the scheduler's record of encoder outputs predate the new weights
        # (the worker already dropped its encoder outputs: without this the next request with the
        # same video fails with "Encoder cache miss").
        self.llm.reset_prefix_cache()
        self.llm.reset_mm_cache()
        engine = self.llm.llm_engine
        if hasattr(engine, "reset_encoder_cache"):
            engine.reset_encoder_cache()


def _reload_weights(worker: Any, blob: bytes) -> None:
    """Runs in each vLLM worker: unpack `(name, tensor)` pairs and reload them in place with vLLM's
    own `reload_weights` (restores any repacked layouts, loads, re-processes)."""
    weights = torch.load(io.BytesIO(blob), weights_only=True)
    worker.reload_weights(weights_iterator=weights)
