"""Model loading, prompt format and sample building shared by every stage; tiny offline models.

Public API (import from `lvr.models`):

- Loading: `load_vlm`, `load_llm`, `ModelLoadError`, `default_dtype`, `default_attn_implementation`.
- Offline models: `build_tiny_vlm` (any family: `family="qwen3_vl"`), `build_tiny_llm`,
  `smollm2_dir`, `MissingPackageError`.
- Model families (`lvr.models.family`): what each architecture needs (vision tower, placeholders,
  positions, frame times, DeepStack), consulted by every stage.
- Prompt format (`PROMPT_VERSION` goes into cache keys): `SYSTEM_PROMPT`, `THINK_INSTRUCTION`,
  `THINK_INSTRUCTION_OPEN`, `DIRECT_INSTRUCTION`, `DIRECT_INSTRUCTION_OPEN`, `format_question`,
  `format_target`, `build_messages`, `instruction_for`.
- Samples and batches: `build_sample`, `collate`, `append_tokens`, `response_mask`, `rope_index`,
  `rope_position_ids`, `end_of_turn_ids`, `IGNORE_INDEX`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lvr.models.batching import (
        append_tokens,
        collate,
        find_rope_owner,
        response_mask,
        rope_index,
        rope_position_ids,
    )
    from lvr.models.inputs import (
        DIRECT_INSTRUCTION,
        DIRECT_INSTRUCTION_OPEN,
        IGNORE_INDEX,
        OPTION_LETTERS,
        PROMPT_VERSION,
        SYSTEM_PROMPT,
        THINK_INSTRUCTION,
        THINK_INSTRUCTION_OPEN,
        build_messages,
        build_sample,
        end_of_turn_ids,
        format_question,
        format_target,
        instruction_for,
        prompt_fingerprint,
        video_fps,
    )
    from lvr.models.loading import (
        ModelLoadError,
        default_attn_implementation,
        default_dtype,
        load_llm,
        load_vlm,
    )
    from lvr.models.smollm2 import MissingPackageError, smollm2_dir, smollm2_gguf_path
    from lvr.models.tiny import build_tiny_llm, build_tiny_vlm

# Lazy exports (PEP 562): `from lvr.models.inputs import ...` or the prompt constants do not
# pull in transformers; the first access to a loader or builder does.
_EXPORTS: dict[str, str] = {
    "append_tokens": "lvr.models.batching",
    "response_mask": "lvr.models.batching",
    "DIRECT_INSTRUCTION": "lvr.models.prompts",
    "DIRECT_INSTRUCTION_OPEN": "lvr.models.prompts",
    "IGNORE_INDEX": "lvr.models.inputs",
    "MissingPackageError": "lvr.models.smollm2",
    "ModelLoadError": "lvr.models.loading",
    "OPTION_LETTERS": "lvr.models.prompts",
    "PROMPT_VERSION": "lvr.models.prompts",
    "SYSTEM_PROMPT": "lvr.models.prompts",
    "THINK_INSTRUCTION": "lvr.models.prompts",
    "THINK_INSTRUCTION_OPEN": "lvr.models.prompts",
    "build_messages": "lvr.models.prompts",
    "build_sample": "lvr.models.inputs",
    "build_tiny_llm": "lvr.models.tiny",
    "build_tiny_vlm": "lvr.models.tiny",
    "collate": "lvr.models.batching",
    "default_attn_implementation": "lvr.models.loading",
    "default_dtype": "lvr.models.loading",
    "end_of_turn_ids": "lvr.models.inputs",
    "find_rope_owner": "lvr.models.batching",
    "format_question": "lvr.models.prompts",
    "format_target": "lvr.models.prompts",
    "instruction_for": "lvr.models.prompts",
    "load_llm": "lvr.models.loading",
    "load_vlm": "lvr.models.loading",
    "prompt_fingerprint": "lvr.models.prompts",
    "rope_index": "lvr.models.batching",
    "rope_position_ids": "lvr.models.batching",
    "smollm2_dir": "lvr.models.smollm2",
    "smollm2_gguf_path": "lvr.models.smollm2",
    "video_fps": "lvr.models.inputs",
}
__all__ = [
    "append_tokens",
    "response_mask",
    "DIRECT_INSTRUCTION",
    "DIRECT_INSTRUCTION_OPEN",
    "IGNORE_INDEX",
    "MissingPackageError",
    "ModelLoadError",
    "OPTION_LETTERS",
    "PROMPT_VERSION",
    "SYSTEM_PROMPT",
    "THINK_INSTRUCTION",
    "THINK_INSTRUCTION_OPEN",
    "build_messages",
    "build_sample",
    "build_tiny_llm",
    "build_tiny_vlm",
    "collate",
    "default_attn_implementation",
    "default_dtype",
    "end_of_turn_ids",
    "find_rope_owner",
    "format_question",
    "format_target",
    "instruction_for",
    "load_llm",
    "load_vlm",
    "prompt_fingerprint",
    "rope_index",
    "rope_position_ids",
    "smollm2_dir",
    "smollm2_gguf_path",
    "video_fps",
]


def __getattr__(name: str) -> Any:
    """Import the module that defines `name` on first access."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
