"""Rollout engines: sample G responses per prompt from cached video embeddings.

One interface (`RolloutEngine.generate`) and two engines:

- `HFRolloutEngine` (CPU and GPU, used by the tests): transformers `generate` with the KV cache. The
  cached embeddings (merged tokens and, for Qwen3-VL, DeepStack features) go in through
  `mm_encoder_outputs` (transformers' own pre-encoded path), so the vision tower does not run, and
  `generate` computes the 3-D positions with the same `get_rope_index` as `pack_batch`; generated
  tokens get `text position + rope_delta`, which equals what `get_rope_index` gives the full
  prompt+response sequence (tested). The prompt is prefilled once and its cache (KV, and the
  recurrent states of Qwen3.5's linear layers) copied to the n samples (prefix sharing). Prompts
  are generated one at a time (no padding), which keeps positions exact; batch prompts with a GPU
  engine for throughput. Vision placeholder tokens (image/video pads, vision start/end) are never
  sampled (`suppress_tokens`): one in a response would break `get_rope_index` and mean nothing.
- `VLLMRolloutEngine` (`lvr.mrsp.vllm_engine`, the `gpu` extra / the separate vLLM env).

Log-probs returned are the model's raw distribution (log_softmax of the logits, before temperature
and top-p), the convention of vLLM's default `raw_logprobs`; `sp_prefill_logprobs(temperature=1)`
recomputes exactly these.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from lvr.models import family
from lvr.mrsp.batch import PromptInput, check_prompt
from lvr.mrsp.comm import MrspError


@dataclass
class Rollouts:
    """Sampled responses, flattened prompt-major (prompt 0's n samples first).

    Attributes:
        prompt_index: Which prompt each response belongs to.
        response_ids: `[R_i]` token ids per response (ends with an eos id when finished).
        logprobs: `[R_i]` raw log-probs of those tokens.
        finished: Whether the response ended with an eos (else it hit max_new_tokens).
    """

    prompt_index: list[int] = field(default_factory=list)
    response_ids: list[torch.Tensor] = field(default_factory=list)
    logprobs: list[torch.Tensor] = field(default_factory=list)
    finished: list[bool] = field(default_factory=list)


class RolloutEngine(Protocol):
    """What the RL recipe needs from a rollout engine."""

    def generate(
        self,
        prompts: Sequence[PromptInput],
        n: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seed: int,
    ) -> Rollouts:
        """Sample `n` responses per prompt."""
        ...

    def update_weights(self, model: torch.nn.Module) -> None:
        """Make the engine sample from `model`'s current weights."""
        ...


def _trim(seq: torch.Tensor, eos_ids: set[int]) -> tuple[int, bool]:
    """Length up to and including the first eos, and whether one was found."""
    for i, tok in enumerate(seq.tolist()):
        if tok in eos_ids:
            return i + 1, True
    return seq.numel(), False


class HFRolloutEngine:
    """transformers `generate` from cached video embeddings (KV cache, exact 3-D positions)."""

    def __init__(
        self, model: torch.nn.Module, eos_token_ids: Sequence[int], pad_token_id: int
    ) -> None:
        """Wrap a VLM (shared with the policy: weight updates are seen at once).

        Args:
            model: A VLM `...ForConditionalGeneration` of a family lvr knows.
            eos_token_ids: Ids that end a response.
            pad_token_id: Padding id `generate` writes after an eos.
        """
        self.model = model
        self.eos_token_ids = list(eos_token_ids)
        self.pad_token_id = pad_token_id
        self.suppressed = family.placeholder_ids(model)  # vision placeholders: never sampled

    def update_weights(self, model: torch.nn.Module) -> None:
        """Copy `model`'s weights in (no-op when it is the engine's own model)."""
        if model is not self.model:
            self.model.load_state_dict(model.state_dict())

    def _prefix_cache(self, p: PromptInput, n: int) -> dict[str, Any]:
        """Prefill all prompt tokens but the last once, then copy the cache to n rows.

        Sharing the prompt's prefill across the n samples is what a prefix-caching engine does;
        `generate` alone would prefill the (long, video) prompt n times. A cache whose layers
        cannot be copied across the batch (transformers' linear-attention states, Qwen3.5) is
        built by prefilling the n rows instead. The forward also sets the model's `rope_deltas`,
        which `generate` uses for the positions of every later token.
        """
        ((name, cache),) = self._prefill_prefix(p, 1).items()
        if all(callable(getattr(layer, "batch_repeat_interleave", None)) for layer in cache.layers):
            cache.batch_repeat_interleave(n)
            return {name: cache}
        return self._prefill_prefix(p, n)

    def _prefill_prefix(self, p: PromptInput, rows: int) -> dict[str, Any]:
        """The cache of the prompt without its last token, for `rows` identical rows, under the
        name `generate` takes it by (`cache`; `past_key_values` before transformers 5.2x, which
        the vLLM CPU venv pins)."""
        dev = self.model.device
        ids = p.input_ids[None, :-1].expand(rows, -1).to(dev)  # [rows, P-1]
        secs = None if p.second_per_grid_ts is None else torch.tensor([p.second_per_grid_ts])
        video = family.video_kwargs(self.model, p.video_grid_thw.reshape(1, 3), secs)
        inputs = family.model_inputs(self.model, {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "mm_token_type_ids": p.mm_token_type_ids[None, :-1].expand(rows, -1).to(dev),
            **{k: v.repeat_interleave(rows, 0).to(dev) for k, v in video.items()},
        })  # fmt: skip
        embeds = family.encoder_outputs(self.model, [p.video_embeds] * rows, dev, self.model.dtype)
        out = self.model(**inputs, mm_encoder_outputs=embeds, use_cache=True, logits_to_keep=1)
        name = "cache" if "cache" in out else "past_key_values"
        return {name: out[name]}

    def _generate_one(
        self, p: PromptInput, n: int, temperature: float, top_p: float, max_new_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample n continuations. Returns (`[n, T]` new ids, `[n, T]` raw log-probs)."""
        dev = self.model.device
        if p.mm_token_type_ids[-1] != 0:
            raise MrspError(f"prompt {p.key!r} must end with a text token (the generation prompt)")
        ids = p.input_ids[None].expand(n, -1).to(dev)  # [n, P]
        cache = self._prefix_cache(p, n)  # {"cache": ...}
        sample = temperature > 0
        inputs = family.model_inputs(self.model, {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "mm_token_type_ids": p.mm_token_type_ids[None].expand(n, -1).to(dev),
        })  # fmt: skip
        out = self.model.generate(
            **inputs,
            **cache,
            do_sample=sample,
            temperature=temperature if sample else None,
            top_p=top_p if sample else None,
            top_k=None,
            max_new_tokens=max_new_tokens,
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
            suppress_tokens=self.suppressed,
            return_dict_in_generate=True,
            output_logits=True,
        )
        new = out.sequences[:, ids.shape[1] :]  # [n, T]
        logits = torch.stack(out.logits, dim=1).float()  # [n, T, V] raw (unprocessed)
        logp = torch.log_softmax(logits, -1).gather(-1, new[..., None]).squeeze(-1)
        return new.cpu(), logp.cpu()

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[PromptInput],
        n: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 256,
        seed: int = 0,
    ) -> Rollouts:
        """Sample `n` responses per prompt.

        Args:
            prompts: Prompts carrying their cached video embeddings.
            n: Samples per prompt (G).
            temperature: Sampling temperature (0 = greedy).
            top_p: Nucleus mass.
            max_new_tokens: Length cap.
            seed: Prompt i samples with seed + i (reproducible regardless of batch order).

        Returns:
            `Rollouts`, prompt-major.

        Raises:
            MrspError: On a prompt whose video tokens and embeddings disagree.
        """
        if n < 1 or max_new_tokens < 1:
            raise MrspError(f"need n >= 1 and max_new_tokens >= 1, got {n}, {max_new_tokens}")
        result = Rollouts()
        eos = set(self.eos_token_ids)
        for i, p in enumerate(prompts):
            check_prompt(p, family.video_token_id(self.model))
            torch.manual_seed(seed + i)
            new, logp = self._generate_one(p, n, temperature, top_p, max_new_tokens)
            for k in range(n):
                length, done = _trim(new[k], eos)
                result.prompt_index.append(i)
                result.response_ids.append(new[k, :length].clone())
                result.logprobs.append(logp[k, :length].clone())
                result.finished.append(done)
        return result
