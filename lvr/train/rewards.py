"""RL rewards: plain functions `(completions: list[str], **dataset_columns) -> list[float]`.

Each reward receives the decoded completions of a step (one string per rollout) and, as keyword
lists aligned with them, the dataset columns of each rollout's question (`answer`, `options`,
`format`, `question`, `qa_id`, `video_path`). A reward takes the columns it needs and ignores the
rest through `**kwargs`, so user rewards plug in by dotted path:

    rewards:
      - {fn: accuracy, weight: 0.9}          # built-ins by name
      - {fn: format, weight: 0.1}
      - {fn: "mypkg.rewards:length_penalty", weight: 0.05}

The paper's reward (the default) is `0.9 * accuracy + 0.1 * format`:

- format: the WHOLE output matches `<think>.*?</think>\\s*<answer>.*?</answer>` (dot matches newline;
  surrounding whitespace allowed).
- accuracy, multiple choice: the letter of the model's answer span equals the gold letter. The
  span and its letter are read by `lvr.answers` exactly as `lvr eval` reads them (the first
  closed span outside reasoning; "B", "(b)", "B." and "B. red" count as "B"; anything else, or
  no span, is 0).
- accuracy, open-ended: normalized exact match of the answer span with the gold answer (case,
  articles, punctuation ignored; `lvr.answers.normalize_text`).
- judged_accuracy: like accuracy, but open-ended answers that do not match exactly are sent to an
  LLM judge on an OpenAI-compatible endpoint (the same Yes/No question as `lvr eval`'s judge).
  Settings go in the entry's `args`:

    rewards:
      - fn: judged_accuracy
        weight: 0.9
        args: {model: Qwen/Qwen2.5-7B-Instruct, base_url: "http://127.0.0.1:8000/v1"}

  A hosted judge takes its key from $LVR_API_KEY / $OPENAI_API_KEY, or `args.api_key` (redacted
  from the rl manifest, metrics and W&B config like every `api_key`).

  A reply that is not Yes/No scores 0 (never a guess in favour) and is counted in the
  `judge_malformed` log line; if every judge call of a step fails, the step stops with one line
  naming the endpoint (a dead judge must not silently turn accuracy into 0).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lvr import answers
from lvr.backends import Request, make_backend
from lvr.errors import LvrError

RewardFn = Callable[..., list[float]]
log = logging.getLogger(__name__)


class RewardError(LvrError):
    """A reward that cannot be loaded or returned something unusable."""


def _answer_span(text: str) -> str | None:
    span = answers.answer_span(text)
    return span.strip() if span is not None else None


def format_reward(completions: list[str], **kwargs: Any) -> list[float]:
    """1.0 when the whole completion is `<think>...</think> <answer>...</answer>`, else 0.0.

    Args:
        completions: Decoded responses (without the end-of-turn token).
        **kwargs: Dataset columns (unused).

    Returns:
        One reward per completion.

    >>> format_reward(["<think>red first</think>\\n<answer>A</answer>", "<answer>A</answer>",
    ...                "<think>x</think><answer>A</answer> trailing"])
    [1.0, 0.0, 0.0]
    """
    return [1.0 if answers.format_ok(c) else 0.0 for c in completions]


def mc_accuracy_reward(completions: list[str], answer: Sequence[str], **kwargs: Any) -> list[float]:
    """1.0 when the letter inside `<answer>` equals the gold letter.

    Args:
        completions: Decoded responses.
        answer: Gold letters, one per completion.
        **kwargs: Other dataset columns (unused).

    Returns:
        One reward per completion.

    >>> mc_accuracy_reward(["<think>t</think><answer>B</answer>", "<answer>(b)</answer>",
    ...                     "<answer>B. red</answer>", "B", "<answer>C</answer>"], ["B"] * 5)
    [1.0, 1.0, 1.0, 0.0, 0.0]
    """
    out = []
    for c, a in zip(completions, answer, strict=True):
        gold = str(a).strip().upper()
        offered = answers.ALL_NUMBERS if gold.isdigit() else answers.ALL_LETTERS
        out.append(1.0 if answers.span_letter(answers.answer_span(c), offered) == gold else 0.0)
    return out


def open_accuracy_reward(
    completions: list[str], answer: Sequence[str], **kwargs: Any
) -> list[float]:
    """1.0 when the `<answer>` span equals the gold answer after normalization.

    Args:
        completions: Decoded responses.
        answer: Gold answers.
        **kwargs: Other dataset columns (unused).

    Returns:
        One reward per completion.

    >>> open_accuracy_reward(["<answer>The red car.</answer>", "<answer>blue</answer>", "red car"],
    ...                      ["red car"] * 3)
    [1.0, 0.0, 0.0]
    """
    out = []
    for c, a in zip(completions, answer, strict=True):
        span = _answer_span(c)
        same = span is not None and answers.normalize_text(span) == answers.normalize_text(a)
        out.append(1.0 if same else 0.0)
    return out


def accuracy_reward(
    completions: list[str],
    answer: Sequence[str],
    options: Sequence[Sequence[str] | None] | None = None,
    **kwargs: Any,
) -> list[float]:
    """Multiple-choice accuracy for rows with options, open-ended accuracy for the others.

    Args:
        completions: Decoded responses.
        answer: Gold letters / answers.
        options: Each row's options (empty or None = open-ended).
        **kwargs: Other dataset columns (unused).

    Returns:
        One reward per completion.

    >>> accuracy_reward(["<answer>A</answer>", "<answer>Paris</answer>"], ["A", "paris"],
    ...                 options=[["x", "y"], []])
    [1.0, 1.0]
    """
    options = options if options is not None else [None] * len(completions)
    out = []
    for c, a, o in zip(completions, answer, options, strict=True):
        fn = mc_accuracy_reward if o else open_accuracy_reward
        out.append(fn([c], [a])[0])
    return out


@functools.cache
def _judge_backend(model: str, base_url: str, timeout_s: float, api_key: str | None) -> Any:
    return make_backend("openai", model, base_url=base_url, timeout_s=timeout_s, api_key=api_key)


def judged_accuracy_reward(
    completions: list[str],
    answer: Sequence[str],
    question: Sequence[str],
    options: Sequence[Sequence[str] | None] | None = None,
    *,
    model: str,
    base_url: str = "http://127.0.0.1:8000/v1",
    max_tokens: int = 8,
    timeout_s: float = 60.0,
    api_key: str | None = None,
    **kwargs: Any,
) -> list[float]:
    """`accuracy_reward`, with an LLM judge for open-ended answers that do not match exactly.

    Args:
        completions: Decoded responses.
        answer: Gold letters / answers.
        question: Question texts (shown to the judge).
        options: Each row's options (empty or None = open-ended).
        model: Judge model served at `base_url`.
        base_url: OpenAI-compatible endpoint root including /v1.
        max_tokens: Budget of each judge reply.
        timeout_s: Per-request timeout.
        api_key: Judge API key (default: the environment's, see `lvr.backends`).
        **kwargs: Other dataset columns (unused).

    Returns:
        One reward per completion.

    Raises:
        RewardError: Every judge request of the call failed (endpoint down or misconfigured).
    """
    out = accuracy_reward(completions, answer, options)
    options = options if options is not None else [None] * len(completions)
    todo = [
        (i, span)
        for i, (c, o) in enumerate(zip(completions, options, strict=True))
        if not o and out[i] == 0.0 and (span := _answer_span(c))
    ]
    if not todo:
        return out
    requests = [
        Request(
            item_id=f"judge-{i}",
            messages=answers.judge_messages(question[i], str(answer[i]), span),
            max_tokens=max_tokens,
            temperature=0.0,
            prompt_version=answers.JUDGE_PROMPT_VERSION,
        )
        for i, span in todo
    ]
    responses = _judge_backend(model, base_url, timeout_s, api_key).run(requests, progress=False)
    failed = malformed = 0
    for (i, _), resp in zip(todo, responses, strict=True):
        verdict = (
            None if resp.error else answers.parse_verdict(resp.texts[0] if resp.texts else None)
        )
        failed += resp.error is not None
        malformed += resp.error is None and verdict is None
        out[i] = 1.0 if verdict else 0.0
    if failed == len(todo):
        raise RewardError(
            f"judged_accuracy: all {failed} judge requests to {base_url} ({model}) failed, e.g. "
            f"{responses[0].error}; start the judge server or fix rewards[].args"
        )
    if failed or malformed:
        log.warning(
            "judged_accuracy: %d of %d judge requests failed, %d replies were not Yes/No (scored 0)",
            failed, len(todo), malformed,
        )  # fmt: skip
    return out


BUILTIN: dict[str, RewardFn] = {
    "format": format_reward,
    "accuracy": accuracy_reward,
    "mc_accuracy": mc_accuracy_reward,
    "open_accuracy": open_accuracy_reward,
    "judged_accuracy": judged_accuracy_reward,
}


@dataclass(frozen=True)
class RewardSpec:
    """One weighted reward component."""

    name: str
    fn: RewardFn
    weight: float


def load_reward_fn(path: str) -> RewardFn:
    """Resolve a built-in name ("accuracy") or a dotted path ("mypkg.mod:func" or "mypkg.mod.func").

    Raises:
        RewardError: The module or attribute does not exist, or is not callable.

    >>> load_reward_fn("format") is format_reward
    True
    """
    if path in BUILTIN:
        return BUILTIN[path]
    module, sep, attr = path.partition(":")
    if not sep:
        module, _, attr = path.rpartition(".")
    if not module or not attr:
        raise RewardError(
            f"reward {path!r} is neither a built-in ({', '.join(BUILTIN)}) nor 'package.module:function'"
        )
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise RewardError(f"reward {path!r}: cannot import module {module!r} ({exc})") from None
    fn = getattr(mod, attr, None)
    if not callable(fn):
        raise RewardError(f"reward {path!r}: module {module!r} has no function {attr!r}")
    return fn


def _check_args(where: str, fn: RewardFn, args: dict[str, Any]) -> None:
    """Unknown `args` and missing required keyword-only arguments fail before training starts.

    >>> _check_args("r", judged_accuracy_reward, {"modle": "x"})
    Traceback (most recent call last):
    lvr.train.rewards.RewardError: r: unknown args ['modle']; valid: ['model', 'base_url', 'max_tokens', 'timeout_s', 'api_key']
    """
    params = inspect.signature(fn).parameters.values()
    named = [p.name for p in params if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(args) - set(named))
    if unknown:
        raise RewardError(f"{where}: unknown args {unknown}; valid: {named}")
    missing = [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.default is p.empty]
    missing = [m for m in missing if m not in args]
    if missing:
        raise RewardError(f"{where}: needs args {missing} (e.g. args: {{{missing[0]}: ...}})")


def build_reward_specs(entries: Sequence[dict[str, Any]]) -> list[RewardSpec]:
    """Turn config entries `{fn: ..., weight: ..., name?: ..., args?: {...}}` into `RewardSpec`s.

    `args` bind the function's keyword-only parameters (those after `*`, e.g. a judge's model and
    endpoint); unknown or missing ones are errors here, before any model is loaded.

    Raises:
        RewardError: A missing `fn`, a non-numeric weight, unknown keys or duplicate names.
    """
    specs: list[RewardSpec] = []
    for i, e in enumerate(entries):
        unknown = set(e) - {"fn", "weight", "name", "args"}
        if "fn" not in e or unknown:
            raise RewardError(
                f"rewards[{i}] needs keys fn, weight (optional: name, args); got {sorted(e)}"
            )
        args = e.get("args") or {}
        if not isinstance(args, dict):
            raise RewardError(f"rewards[{i}].args must be a mapping, got {args!r}")
        try:
            weight = float(e.get("weight", 1.0))
        except (TypeError, ValueError):
            raise RewardError(
                f"rewards[{i}].weight must be a number, got {e['weight']!r}"
            ) from None
        name = str(e.get("name") or str(e["fn"]).replace(":", ".").rsplit(".", 1)[-1])
        if any(s.name == name for s in specs):
            raise RewardError(f"rewards[{i}]: duplicate reward name {name!r}; set `name`")
        fn = load_reward_fn(str(e["fn"]))
        _check_args(f"rewards[{i}] ({e['fn']})", fn, args)
        specs.append(RewardSpec(name, functools.partial(fn, **args) if args else fn, weight))
    if not specs:
        raise RewardError("at least one reward is needed")
    return specs


def compute_rewards(
    specs: Sequence[RewardSpec], completions: list[str], columns: dict[str, list[Any]]
) -> tuple[list[float], dict[str, list[float]]]:
    """Score completions with every component and their weighted sum.

    Args:
        specs: Reward components.
        completions: Decoded responses.
        columns: Dataset columns, each a list aligned with `completions`.

    Returns:
        (total per completion, {component name: its rewards}).

    Raises:
        RewardError: A component returned the wrong number of values or a non-finite one.

    >>> specs = build_reward_specs([{"fn": "accuracy", "weight": 0.9}, {"fn": "format", "weight": 0.1}])
    >>> total, parts = compute_rewards(specs, ["<think>r</think><answer>A</answer>"], {"answer": ["A"]})
    >>> round(total[0], 6), parts
    (1.0, {'accuracy': [1.0], 'format': [1.0]})
    """
    parts: dict[str, list[float]] = {}
    total = [0.0] * len(completions)
    for spec in specs:
        values = [float(v) for v in spec.fn(completions, **columns)]
        if len(values) != len(completions):
            raise RewardError(
                f"reward {spec.name!r} returned {len(values)} values for {len(completions)} completions"
            )
        if any(v != v or v in (float("inf"), float("-inf")) for v in values):
            raise RewardError(f"reward {spec.name!r} returned a non-finite value")
        parts[spec.name] = values
        total = [t + spec.weight * v for t, v in zip(total, values, strict=True)]
    return total, parts
