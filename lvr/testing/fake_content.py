"""Plausible, deterministic answers for the loopback fake server (captions, QA objects, eval answers).

Answers are derived from the prompt text so that downstream stages see data they can validate:
caption requests get a caption JSON that echoes the clip's time range, QA requests get a schema-valid
question whose options, answer letter and evidence come from the timestamped caption lines of the
prompt ("From 20 to 30, <caption>"), and free-text multiple-choice prompts get
"<think>...</think><answer>X</answer>". Everything is a pure function of (prompt, schema, choice
index), so repeated requests get the same answer and cached reruns can be compared exactly.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

_SEGMENT = re.compile(
    r"(?:From|from)\s+(\d+(?:\.\d+)?)\s*s?\s+to\s+(\d+(?:\.\d+)?)\s*s?\s*[,:]\s*(.+)"
)
_OPTION = re.compile(r"^\s*\(?([A-J])[.)]\s+(.+)$", re.MULTILINE)
_SCHEMA_IN_TEXT = re.compile(r"JSON schema:\s*(\{.*\})\s*$", re.MULTILINE)
LETTERS = "ABCD"


def _digest(*parts: Any) -> int:
    blob = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(blob, digest_size=8).digest(), "big")


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split()).rstrip(".")
    return text if len(text) <= limit else text[: max(limit - 3, 0)].rstrip() + "..."


@dataclass
class PromptFacts:
    """What the fake model "understands" of a prompt."""

    text: str
    segments: list[tuple[float, float, str]] = field(default_factory=list)
    options: list[tuple[str, str]] = field(default_factory=list)
    category: str | None = None
    images: str = ""  # digest of the attached images ("" without images)

    @classmethod
    def of(cls, messages: list[dict[str, Any]]) -> PromptFacts:
        """Collect the text of all messages and parse segments, options, category and images."""
        chunks, urls = [], []
        for m in messages:
            content = m.get("content", "")
            if isinstance(content, list):
                parts = [p for p in content if isinstance(p, dict)]
                urls += [str((p.get("image_url") or {}).get("url", "")) for p in parts]
                content = "\n".join(p.get("text", "") for p in parts if p.get("text"))
            chunks.append(str(content))
        text = "\n".join(chunks)
        segs = [(float(a), float(b), c.strip()) for a, b, c in _SEGMENT.findall(text)]
        cat = re.search(r"categor(?:y|ies)\W+(\w+)", text, re.IGNORECASE)
        digest = f"{_digest(*urls):x}" if any(urls) else ""
        category = cat.group(1).lower() if cat else None
        return cls(text, segs, _OPTION.findall(text), category, digest)

    def seed(self, k: int) -> int:
        # Caption prompts are the same text for every clip: the frames make answers differ.
        return _digest(self.text, self.images, k)


_SUBJECTS = (
    "A man in a blue jacket",
    "A woman",
    "A child",
    "A brown dog",
    "A red car",
    "Two people",
)
_ACTIONS = (
    "walks toward the camera",
    "picks up a cup",
    "opens a door",
    "runs across a field",
    "sits at a table",
    "drives down a street",
)
_PLACES = ("in a kitchen", "in a park", "on a city street", "in an office", "near a river")


def caption_sentence(facts: PromptFacts, k: int) -> str:
    """A short, deterministic scene description (different frames give different captions)."""
    seed = facts.seed(k)
    who, what = _SUBJECTS[seed % len(_SUBJECTS)], _ACTIONS[(seed >> 8) % len(_ACTIONS)]
    where = _PLACES[(seed >> 16) % len(_PLACES)]
    return f"{who} {what} {where}, while the camera stays mostly still."


def schema_from_request(body: dict[str, Any]) -> dict[str, Any] | None:
    """Find the JSON schema a request asks for: response_format, else one quoted in the prompt."""
    fmt = body.get("response_format") or {}
    if fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema") or {}
        return spec.get("schema") or {}
    for m in body.get("messages", []):
        content = m.get("content")
        if isinstance(content, str):
            match = _SCHEMA_IN_TEXT.search(content)
            if match:
                try:
                    return json.loads(match.group(1))
                except json.JSONDecodeError:
                    return None
    return {} if fmt.get("type") == "json_object" else None


def _texts(facts: PromptFacts, k: int) -> dict[str, Any]:
    """Field texts of a QA-shaped answer built from the prompt's caption segments."""
    segs = facts.segments or [
        (0.0, 10.0, "a person walks into the room"),
        (10.0, 20.0, "the person picks up a red cup"),
    ]
    i = facts.seed(k) % max(len(segs) - 1, 1)
    first, second = segs[i], segs[min(i + 1, len(segs) - 1)]
    others = [s[2] for s in segs if s is not first and s is not second]
    right = _clip(second[2], 80)
    wrong = [_clip(o, 80) for o in others][:3]
    fillers = ["nothing changes in the scene", "the video ends abruptly", "the camera zooms out"]
    wrong += [f for f in fillers if f not in wrong][: 3 - len(wrong)]
    letter = LETTERS[facts.seed(k + 101) % 4]
    options = list(wrong)
    options.insert(LETTERS.index(letter), right)
    when = f"{first[0]:g} to {first[1]:g} s"
    caption = f"From {when}: {_clip(first[2], 200)}" if facts.segments else None
    return {
        "caption": caption or caption_sentence(facts, k),
        "question": f"After {_clip(first[2], 60)}, what happens next in the video?",
        "options": options,
        "answer": letter,
        "reasoning": (
            f"Checking the video, first {_clip(first[2], 60)}. Analyzing the following scene, "
            f"{right}. So the answer is {letter}."
        ),
        "evidence": [
            {"start_s": first[0], "end_s": first[1]},
            {"start_s": second[0], "end_s": second[1]},
        ],
        "category": facts.category or "temporal",
    }


def _string(schema: dict[str, Any], value: Any) -> str:
    if isinstance(value, dict) and {"start_s", "end_s"} <= set(value):
        value = f"{value['start_s']:g}-{value['end_s']:g} s"
    text = value if isinstance(value, str) else json.dumps(value) if value is not None else ""
    text = text or "n/a"
    if "maxLength" in schema:
        text = _clip(text, schema["maxLength"])
    return text.ljust(schema.get("minLength", 0), ".")


def synthesize(schema: dict[str, Any], hint: Any, facts: PromptFacts, key: str, k: int) -> Any:
    """Build a value valid against `schema`, preferring the hint derived from the prompt.

    Args:
        schema: Schema (subset of `lvr.backends.schema`).
        hint: A prompt-derived value for this position (may be None or of the wrong type).
        facts: Parsed prompt.
        key: Property name of this position (for enum choices).
        k: Choice index (n > 1 gives different samples).

    Returns:
        A JSON-compatible value.
    """
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        options = schema["enum"]
        return hint if hint in options else options[_digest(facts.text, key, k) % len(options)]
    typ = schema.get("type", "object")
    typ = next((t for t in typ if t != "null"), "null") if isinstance(typ, list) else typ
    if typ == "object":
        props = schema.get("properties", {})
        hints = hint if isinstance(hint, dict) else _texts(facts, k)
        return {p: synthesize(s, hints.get(p), facts, p, k) for p, s in props.items()}
    if typ == "array":
        items = hint if isinstance(hint, list) else [hint] * 2
        lo, hi = schema.get("minItems", 0), schema.get("maxItems", max(len(items), 1))
        items = (items + [items[-1] if items else None] * lo)[: max(lo, min(len(items), hi))]
        sub = schema.get("items", {})
        return [synthesize(sub, h, facts, key, k) for h in items]
    if typ == "string":
        return _string(schema, hint)
    if typ in ("number", "integer"):
        num = hint if isinstance(hint, (int, float)) and not isinstance(hint, bool) else 1
        num = min(max(num, schema.get("minimum", num)), schema.get("maximum", num))
        return int(num) if typ == "integer" else float(num)
    if typ == "boolean":
        return True
    return None


def answer_text(body: dict[str, Any], k: int) -> str:
    """The k-th output of a chat-completions request: JSON when a schema is asked, else text."""
    facts = PromptFacts.of(body.get("messages", []))
    judged = _JUDGE.search(facts.text)
    if judged:
        return judge_verdict(judged.group(1), judged.group(2))
    schema = schema_from_request(body)
    if schema is not None:
        return json.dumps(synthesize(schema, None, facts, "", k), ensure_ascii=False)
    if facts.options:
        letters = [letter for letter, _ in facts.options]
        pick = letters[facts.seed(k) % len(letters)]
        return (
            f"<think>Checking the video against each option, {pick} fits what is shown.</think>"
            f"<answer>{pick}</answer>"
        )
    # Free text: an echo of the prompt's last line (tests of other stages rely on this shape),
    # followed, when frames are attached, by a scene description that depends on the frames.
    last = facts.text.splitlines()[-1] if facts.text else "a scene"
    text = f"The video shows {_clip(last, 120)}"
    return f"{text}. {caption_sentence(facts, k)}" if facts.images else text


_JUDGE = re.compile(r"Reference answer: (.*)\nCandidate answer: (.*)\n")


def judge_verdict(reference: str, candidate: str) -> str:
    """A judge's reply: "Yes" when the candidate holds most of the reference's words, else "No".

    >>> judge_verdict("a red circle", "the crimson red circle"), judge_verdict("a red circle", "blue")
    ('Yes', 'No')
    """
    words = set(re.findall(r"\w+", reference.lower())) - {"a", "an", "the"}
    found = words & set(re.findall(r"\w+", candidate.lower()))
    return "Yes" if words and len(found) * 2 > len(words) else "No"


def broken_answer(body: dict[str, Any], k: int) -> str:
    """A JSON answer with its required fields removed (fault injection)."""
    good = json.loads(answer_text(body, k)) if schema_from_request(body) is not None else {}
    schema = schema_from_request(body) or {}
    for key in schema.get("required", list(good)[:1]):
        good.pop(key, None)
    return json.dumps(good)


# ---------------------------------------------------------------------------------------------
# Usage: token counts as an OpenAI-compatible server reports them
# ---------------------------------------------------------------------------------------------

# Byte-pair tokenizers split text into words with their leading space, runs of punctuation and runs
# of spaces, then split rare long words further: about 4 characters per token on English text.
_PIECE = re.compile(r"'(?:[sdmt]|ll|ve|re)| ?[^\W\d_]+| ?\d{1,3}| ?[^\s\w]+|\s+")
PER_MESSAGE_TOKENS = 4  # <|im_start|>role\n ... <|im_end|>\n
REPLY_PRIMING_TOKENS = 3  # <|im_start|>assistant\n
IMAGE_PATCH_PX = 28  # Qwen2-VL/2.5-VL: one token per 28x28 pixels after resizing to multiples of 28


def count_tokens(text: str) -> int:
    """Tokens of a text under a BPE-like split (a word of up to 8 letters is one token, longer
    words one per 5 letters), close to what cl100k or Qwen's tokenizer count on English text.

    >>> count_tokens("From 20 to 30, a person walks a dog.")
    11
    """
    return sum(1 if len(p) <= 9 else -(-len(p.strip()) // 5) for p in _PIECE.findall(text))


def image_tokens(url: str) -> int:
    """Tokens of one ``data:image/...;base64`` image: 28x28 patches of the frame, plus its start and
    end markers (0 for an image that does not decode: a real server would reject the request)."""
    import base64
    import io

    from PIL import Image

    try:
        raw = base64.b64decode(url.split(",", 1)[1])
        width, height = Image.open(io.BytesIO(raw)).size
    except (IndexError, ValueError, OSError):
        return 0
    cols = max(1, round(width / IMAGE_PATCH_PX))
    rows = max(1, round(height / IMAGE_PATCH_PX))
    return cols * rows + 2


def prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """Prompt tokens of chat messages: text, images, and the chat template's per-message tokens."""
    total = REPLY_PRIMING_TOKENS
    for m in messages:
        total += PER_MESSAGE_TOKENS + count_tokens(str(m.get("role", "")))
        content = m.get("content") or ""
        parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
        for p in parts:
            if not isinstance(p, dict):
                continue
            if p.get("type") == "image_url":
                total += image_tokens(str((p.get("image_url") or {}).get("url", "")))
            else:
                total += count_tokens(str(p.get("text", "")))
    return total


def usage_of(body: dict[str, Any], outputs: list[str]) -> dict[str, Any]:
    """The ``usage`` object of a chat completion, shaped like OpenAI's (vLLM sends the same keys).

    Completion tokens count every choice plus its end-of-turn token; the JSON schema of a
    ``response_format`` is not prompt text (servers enforce it by constrained decoding).
    """
    prompt = prompt_tokens(body.get("messages") or [])
    completion = sum(count_tokens(text) + 1 for text in outputs)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }
