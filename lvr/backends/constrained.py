"""JSON-schema constrained decoding for transformers `generate`: a LogitsProcessor over `JsonGrammar`.

At every step and for every row, the processor keeps the grammar state of the text generated so far
and lets through only tokens whose text continues a schema-valid document that can still be finished
within the remaining token budget (`JsonGrammar.min_rest`, counting one character per token, which
byte-level vocabularies always offer). To stay fast it first tries the `top_k` best-scored tokens in
order (so greedy decoding picks the best valid token exactly); only when none fits does it scan the
vocabulary, restricted to tokens whose first character the grammar accepts, and it caches those scans
per state. Once the document is complete only end-of-sequence tokens are allowed. Even a model with
random weights therefore emits valid JSON.

Deliberate simplification: with sampling, when some top-k tokens are valid the choice is among those
(a top-k truncation of the constrained distribution), not the full valid set.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from lvr.backends.json_grammar import JsonGrammar, State

_SCAN_CACHE_SIZE = 4096


class TokenTable:
    """The text of every token id, and ids grouped by first character.

    Special tokens and tokens that do not decode to whole characters alone (pieces of a multi-byte
    UTF-8 character) get None: they are never allowed inside JSON.

    Args:
        tokenizer: A transformers tokenizer.
    """

    def __init__(self, tokenizer: Any):
        size = len(tokenizer)
        special = set(tokenizer.all_special_ids) | {
            i for i, t in tokenizer.added_tokens_decoder.items() if t.special
        }
        texts = tokenizer.batch_decode(
            [[i] for i in range(size)], clean_up_tokenization_spaces=False
        )
        pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
        self.texts: list[str | None] = []
        for i, (text, piece) in enumerate(zip(texts, pieces, strict=True)):
            if piece and piece.startswith("\u2581") and not text.startswith(" "):
                text = " " + text  # SentencePiece: decoding a lone token drops its leading space
            ok = text and i not in special and "\ufffd" not in text
            self.texts.append(text if ok else None)
        self.by_first: dict[str, list[int]] = {}
        for i, text in enumerate(self.texts):
            if text:
                self.by_first.setdefault(text[0], []).append(i)


class JsonLogitsProcessor:
    """Mask logits so that every row's output is JSON valid against one schema.

    Args:
        grammar: The compiled schema.
        table: Token texts of the tokenizer.
        eos_ids: Token ids that end generation.
        prompt_len: Length of the (left-padded) prompt; later positions are generated tokens.
        max_new_tokens: Token budget per row.
        top_k: Candidates tried before a vocabulary scan.
    """

    def __init__(
        self,
        grammar: JsonGrammar,
        table: TokenTable,
        eos_ids: Sequence[int],
        prompt_len: int,
        max_new_tokens: int,
        top_k: int = 32,
    ):
        self.grammar, self.table = grammar, table
        self.eos_ids = sorted(set(eos_ids))
        self.prompt_len, self.max_new_tokens, self.top_k = prompt_len, max_new_tokens, top_k
        self.states: list[State | None] = []  # None = row ended (EOS emitted)
        self.scans = 0  # vocabulary scans done (for tests and profiling)
        self._scan_cache: OrderedDict[tuple[State, bool], list[int]] = OrderedDict()

    def _fits(self, state: State | None, remaining: int) -> bool:
        return state is not None and self.grammar.min_rest(state) <= remaining

    def _ok(self, state: State, token: int, remaining: int) -> bool:
        text = self.table.texts[token]
        return text is not None and self._fits(self.grammar.feed(state, text), remaining)

    def _scan(self, state: State, remaining: int, budget: bool) -> list[int]:
        """All valid tokens (first-character index first), cached per state when the budget
        cannot bind (far from the end every valid token also fits)."""
        key = (state, budget)
        cacheable = self.grammar.min_rest(state) + 64 < remaining or not budget
        if cacheable and key in self._scan_cache:
            self._scan_cache.move_to_end(key)
            return self._scan_cache[key]
        self.scans += 1
        limit = remaining if budget else 1 << 30
        allowed = []
        for ch, ids in self.table.by_first.items():
            if self.grammar.advance(state, ch) is None:
                continue
            allowed.extend(i for i in ids if self._ok(state, i, limit))
        if cacheable:
            self._scan_cache[key] = allowed
            if len(self._scan_cache) > _SCAN_CACHE_SIZE:
                self._scan_cache.popitem(last=False)
        return allowed

    def allowed(self, state: State, scores: torch.Tensor, step: int) -> list[int]:
        """Token ids allowed after `state` at generation step `step` (0-based).

        Args:
            state: Grammar state of the row.
            scores: [V] scores of the row (for the top-k fast path).
            step: Tokens generated so far.

        Returns:
            Allowed ids (never empty: EOS when nothing else is possible).
        """
        remaining = self.max_new_tokens - step - 1  # characters left after this token
        if not state:  # document complete
            return self.eos_ids
        done = self.grammar.is_complete(state)  # e.g. a top-level number may stop here
        k = min(self.top_k, scores.shape[-1])
        top = torch.topk(scores, k).indices.tolist()
        valid = [t for t in top if t < len(self.table.texts) and self._ok(state, t, remaining)]
        if not valid:
            valid = self._scan(state, remaining, budget=True)
        if not valid:  # budget too small for a 1-char-per-token completion: best effort
            valid = self._scan(state, remaining, budget=False)
        return valid + self.eos_ids if done or not valid else valid

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """Advance each row's state with its last token and mask `scores` [B, V] in place."""
        rows, length = input_ids.shape  # [B, T]
        step = length - self.prompt_len
        if not self.states:
            self.states = [self.grammar.initial() for _ in range(rows)]
        mask = torch.full_like(scores, float("-inf"))  # [B, V]
        for r in range(rows):
            if step > 0 and self.states[r] is not None:
                last = int(input_ids[r, -1])
                if last in self.eos_ids:
                    self.states[r] = None
                else:
                    self.states[r] = self.grammar.feed(self.states[r], self.table.texts[last] or "")
            state = self.states[r]
            ids = self.eos_ids if state is None else self.allowed(state, scores[r], step)
            mask[r, ids] = 0.0
        return scores + mask
