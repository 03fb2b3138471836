"""The `hf` backend: local transformers models (text LLMs and VLMs) on CPU or GPU.

Requests are grouped by everything `generate` must share (sampling parameters, schema, media kind),
batched with left padding, and decoded with the model's own chat template and processor. Images are
passed as images, or as one video when the request gives `fps`: the processor gets the frames' true
times as metadata and does not resample (`lvr.models.family.video_metadata`: Qwen3-VL writes each
temporal patch's time into the prompt, Qwen2.5-VL scales positions by the mean rate). A VLM never
generates its vision placeholder tokens (`suppress_tokens`). With a `json_schema`, decoding is constrained by
`JsonLogitsProcessor`, so even a tiny or random model returns schema-valid JSON; the schema is also
stated in the system prompt so that real models know what the fields mean.

`temperature == 0` is greedy (n identical outputs are produced once and repeated); otherwise
`num_return_sequences = n`. transformers samples a whole batch from one torch generator, so per-row
seeds cannot be honoured inside a batch; rather than give up batching (the QA stage sends a distinct
seed per question), requests are batched regardless of seed and the batch is seeded from all its
seeds: outputs are reproducible for the same batch composition. A batch that raises is retried row by row, so one bad
row gets an error and the others still get outputs.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lvr.backends.base import (
    BackendError,
    OnResponse,
    Request,
    Response,
    check_request,
    message_text,
    one_line,
    with_system_line,
)
from lvr.backends.json_grammar import JsonGrammar
from lvr.backends.progress import progress_bar
from lvr.backends.schema import parse_and_validate, schema_instruction


@dataclass
class HFOptions:
    """Options of the `hf` backend (settable through `make_backend("hf", model, ...)`).

    Attributes:
        device: "cpu", "cuda", "cuda:1", ...
        dtype: "float32", "bfloat16" or "float16"; default fp32 on CPU, bf16 on CUDA.
        batch_size: Requests per `generate` call.
        model_type: "llm", "vlm", or "auto" (a config with `vision_config` is a VLM).
        constrain_json: Constrain decoding to the request's json_schema.
        constrain_top_k: Candidates tried per step before a vocabulary scan.
        max_string_chars: Length cap of schema strings without maxLength.
        max_array_items: Item cap of schema arrays without maxItems.
        schema_in_prompt: Also state the schema in the system prompt.
        attn_implementation: Passed to the loader (default sdpa, flash-attn on CUDA if present).
        torch_threads: When set, `torch.set_num_threads` at load (CPU machines shared with other
            work run far faster with fewer threads than cores: OpenMP threads spin on contention).
    """

    device: str = "cpu"
    dtype: str | None = None
    batch_size: int = 8
    model_type: Literal["auto", "llm", "vlm"] = "auto"
    constrain_json: bool = True
    constrain_top_k: int = 32
    max_string_chars: int = 2000
    max_array_items: int = 16
    schema_in_prompt: bool = True
    attn_implementation: str | None = None
    torch_threads: int | None = None


def _combine(seeds: list[int]) -> int:
    """One 63-bit seed from several (stable across runs, unlike hash())."""
    digest = hashlib.blake2b(json.dumps(seeds).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def times_of(req: Request) -> list[float]:
    """Seconds of each frame of a video request: its timestamps, else `i / fps`."""
    if req.timestamps is not None:
        return [float(t) for t in req.timestamps]
    return [i / float(req.fps or 1.0) for i in range(len(req.images))]


def _group_key(req: Request) -> str:
    media = "none" if not req.images else "video" if req.fps else "image"
    sampling = [req.max_tokens, req.temperature, req.top_p, req.n]  # not the seed: see module doc
    return json.dumps([media, sampling, req.json_schema], sort_keys=True)


class HFBackend:
    """Local transformers backend.

    Args:
        model: Hub id or local model folder (`lvr.models.build_tiny_llm`, `smollm2_dir`, ...).
        options: `HFOptions`.
    """

    name = "hf"

    def __init__(self, model: str | Path, options: HFOptions | None = None):
        self.model = str(model)
        self.opts = options or HFOptions()
        if self.opts.batch_size < 1:
            raise BackendError(f"batch_size must be >= 1, got {self.opts.batch_size}")
        self._model: Any = None
        self._proc: Any = None  # processor (VLM) or tokenizer (LLM)
        self._table: Any = None
        self.is_vlm = False

    # -- loading ---------------------------------------------------------------------------------

    def load(self) -> None:
        """Load model and processor once (called by the first `run`).

        Raises:
            BackendError: The model cannot be loaded or has no chat template.
        """
        if self._model is not None:
            return
        import torch  # torch, transformers and lvr.models load only when a local model does
        from transformers import AutoConfig

        from lvr.models import ModelLoadError, load_llm, load_vlm
        from lvr.models.loading import resolve_source

        if self.opts.torch_threads:
            torch.set_num_threads(self.opts.torch_threads)
        dtype = getattr(torch, self.opts.dtype) if self.opts.dtype else None
        try:
            kind = self.opts.model_type
            if kind == "auto":  # a missing folder is named as such, not as a bad hub id
                cfg = AutoConfig.from_pretrained(resolve_source(self.model))
                kind = "vlm" if hasattr(cfg, "vision_config") else "llm"
            loader = load_vlm if kind == "vlm" else load_llm
            self._model, self._proc = loader(
                self.model, self.opts.device, dtype, self.opts.attn_implementation
            )
        except (ModelLoadError, OSError, ValueError) as exc:
            raise BackendError(
                f"hf backend cannot load {self.model!r}: {one_line(str(exc))}"
            ) from exc
        self.is_vlm = kind == "vlm"
        tok = self.tokenizer
        tok.padding_side = "left"  # generation appends on the right: prompts must end aligned
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        if not getattr(self._proc, "chat_template", None) and not tok.chat_template:
            raise BackendError(f"model {self.model!r} has no chat template; use an instruct model")

    @property
    def tokenizer(self) -> Any:
        """The tokenizer (inside the processor for VLMs)."""
        return getattr(self._proc, "tokenizer", self._proc)

    def eos_ids(self) -> list[int]:
        """End-of-sequence ids: the generation config's plus the tokenizer's."""
        eos = self._model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return sorted(ids)

    def placeholder_ids(self) -> list[int]:
        """The VLM's vision placeholder tokens (never generated); [] for a family lvr does not know
        (such a model still captions; nothing is suppressed for it)."""
        from lvr.models.family import FamilyError, placeholder_ids

        try:
            return placeholder_ids(self._model)
        except FamilyError:
            return []

    def model_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The processor's outputs as the model's `generate` takes them (`mm_token_type_ids` only
        for M-RoPE families); unchanged for a family lvr does not know."""
        from lvr.models.family import FamilyError, model_inputs

        try:
            return model_inputs(self._model, inputs)
        except FamilyError:
            return inputs

    # -- running ---------------------------------------------------------------------------------

    def run(
        self,
        requests: Sequence[Request],
        progress: bool = True,
        on_response: OnResponse | None = None,
    ) -> list[Response]:
        """Generate for every request; see `Backend.run`.

        Raises:
            BackendError: The model cannot be loaded.
        """
        requests = list(requests)
        if requests:
            self.load()  # a model that cannot load fails every row alike: one error, raised here
        results: list[Response | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            bad = check_request(req)
            if bad is None and req.images and not self.is_vlm:
                bad = "bad request: images given to a text-only model"
            if bad is not None:
                results[i] = Response(req.item_id, [], bad, 0, 0.0)
            else:
                groups.setdefault(_group_key(req), []).append(i)
        with progress_bar(f"{self.name}:{Path(self.model).name}", len(requests), progress) as adv:
            for i, resp in enumerate(results):
                if resp is not None:
                    self._emit(i, resp, on_response, adv)
            for idxs in groups.values():
                for start in range(0, len(idxs), self.opts.batch_size):
                    chunk = idxs[start : start + self.opts.batch_size]
                    batch = self._run_batch([requests[i] for i in chunk])
                    for i, resp in zip(chunk, batch, strict=True):
                        results[i] = resp
                        self._emit(i, resp, on_response, adv)
        return [r for r in results if r is not None]

    @staticmethod
    def _emit(i: int, resp: Response, on_response: OnResponse | None, advance: Any) -> None:
        if on_response is not None:
            on_response(i, resp)
        advance(resp)

    def _run_batch(self, reqs: list[Request]) -> list[Response]:
        """Generate one homogeneous batch; on an exception retry row by row."""
        start = time.monotonic()
        try:
            outs = self.generate(reqs)
        except Exception as exc:  # one bad row must not fail the others
            if len(reqs) > 1:
                return [r for req in reqs for r in self._run_batch([req])]
            err = f"generate failed: {type(exc).__name__}: {one_line(str(exc))}"
            return [Response(reqs[0].item_id, [], err, 1, time.monotonic() - start)]
        latency = time.monotonic() - start
        responses = []
        for req, texts in zip(reqs, outs, strict=True):
            error = None
            if req.json_schema is not None:
                checked = [parse_and_validate(t, req.json_schema) for t in texts]
                texts = [c for c, _ in checked]
                error = next((p for _, p in checked if p), None)
            responses.append(Response(req.item_id, [] if error else texts, error, 1, latency))
        return responses

    # -- generation ------------------------------------------------------------------------------

    def render(self, req: Request) -> str:
        """The prompt text of a request (chat template with the generation prompt)."""
        messages = req.messages
        if req.json_schema is not None and self.opts.schema_in_prompt:
            messages = with_system_line(messages, schema_instruction(req.json_schema))
        if not self.is_vlm:  # text-only templates want string content
            flat = [{"role": role, "content": text} for role, text in message_text(messages)]
            return self._proc.apply_chat_template(flat, tokenize=False, add_generation_prompt=True)
        media: list[dict[str, Any]] = []
        if req.images:
            media = [{"type": "video"}] if req.fps else [{"type": "image"}] * len(req.images)
        users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
        last_user = users[-1] if users else -1
        chat = []
        for i, (role, text) in enumerate(message_text(messages)):
            parts = (media if i == last_user else []) + [{"type": "text", "text": text}]
            chat.append({"role": role, "content": parts})
        return self._proc.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)

    def encode(self, reqs: list[Request]) -> dict[str, Any]:
        """Tokenize a homogeneous batch (left padding) with its images or videos."""
        prompts = [self.render(r) for r in reqs]
        if not self.is_vlm:
            return dict(
                self._proc(prompts, padding=True, add_special_tokens=False, return_tensors="pt")
            )
        kwargs: dict[str, Any] = {}
        if reqs[0].images and reqs[0].fps:
            from lvr.models.family import video_metadata

            videos = [np.stack(r.images) for r in reqs]  # each [T, H, W, 3]
            # Our frames are already sampled: the processor must not resample them, and the model
            # is told their true times (timestamp text, second_per_grid_ts) as its family does.
            meta = [
                video_metadata(self._proc, times_of(r), v.shape[1], v.shape[2])
                for v, r in zip(videos, reqs, strict=True)
            ]
            kwargs = {"videos": videos, "video_metadata": meta, "do_sample_frames": False}
        elif reqs[0].images:
            kwargs = {"images": [list(r.images) for r in reqs]}
        enc = self._proc(
            text=prompts, padding=True, add_special_tokens=False, return_tensors="pt", **kwargs
        )
        return dict(enc)

    def generate(self, reqs: list[Request]) -> list[list[str]]:
        """Run `generate` for a homogeneous batch.

        Args:
            reqs: Requests sharing sampling parameters, schema and media kind.

        Returns:
            n texts per request.
        """
        import torch
        from transformers import LogitsProcessorList

        self.load()
        first = reqs[0]
        inputs = {
            k: v.to(self._model.device) if hasattr(v, "to") else v
            for k, v in self.encode(reqs).items()
        }
        prompt_len = inputs["input_ids"].shape[1]  # [B, P]
        sampling = first.temperature > 0
        reps = first.n if sampling else 1
        gen: dict[str, Any] = {
            "max_new_tokens": first.max_tokens,
            "do_sample": sampling,
            "pad_token_id": self.tokenizer.pad_token_id,
            "eos_token_id": self.eos_ids(),
        }
        if self.is_vlm:  # a sampled vision placeholder means nothing (and breaks M-RoPE)
            gen["suppress_tokens"] = self.placeholder_ids()
        if sampling:
            gen.update(temperature=first.temperature, top_p=first.top_p, num_return_sequences=reps)
        else:
            gen.update(temperature=None, top_p=None, top_k=None)
        if first.json_schema is not None and self.opts.constrain_json:
            gen["logits_processor"] = LogitsProcessorList([self._constraint(first, prompt_len)])
        seeds = [r.seed for r in reqs if r.seed is not None]
        if seeds:
            torch.manual_seed(seeds[0] if len(seeds) == 1 else _combine(seeds))
        if self.is_vlm:
            inputs = self.model_inputs(inputs)
        with torch.inference_mode():
            out = self._model.generate(**inputs, **gen)  # [B * reps, P + L]
        texts = self.tokenizer.batch_decode(out[:, prompt_len:], skip_special_tokens=True)
        per = [texts[i * reps : (i + 1) * reps] for i in range(len(reqs))]
        return [group * first.n if reps == 1 else group for group in per]

    def _constraint(self, req: Request, prompt_len: int) -> Any:
        from lvr.backends.constrained import JsonLogitsProcessor, TokenTable  # imports torch

        if self._table is None:
            self._table = TokenTable(self.tokenizer)
        grammar = JsonGrammar(
            req.json_schema or {}, self.opts.max_string_chars, self.opts.max_array_items
        )
        return JsonLogitsProcessor(
            grammar,
            self._table,
            self.eos_ids(),
            prompt_len,
            req.max_tokens,
            self.opts.constrain_top_k,
        )
