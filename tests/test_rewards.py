"""Rewards (lvr.train.rewards): the paper's semantics, doctests, user rewards by dotted path."""

from __future__ import annotations

import doctest
import sys
import textwrap
from pathlib import Path

import pytest

import lvr.train.rewards as R


def test_doctests_pass() -> None:
    result = doctest.testmod(R)
    assert result.attempted >= 7
    assert result.failed == 0


def test_format_reward_whole_output() -> None:
    good = "<think>a\nb</think>  \n<answer>C</answer>"
    bad = [
        "<answer>C</answer>",
        "prefix <think>a</think><answer>C</answer>",
        "<think>a</think><answer>C</answer><answer>D</answer>x",
        "<think>a<answer>C</answer>",
        "",
    ]
    assert R.format_reward([good, *bad]) == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_mc_accuracy_uses_answer_span_only() -> None:
    outs = [
        "<think>B is wrong, A</think><answer>A</answer>",
        "<think>the answer is A</think><answer>B</answer>",
        "The answer is A",
        "<answer>a</answer>",
        "<answer> A </answer>",
        "<answer>AB</answer>",
    ]
    assert R.mc_accuracy_reward(outs, ["A"] * 6) == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def test_weighted_sum_default_and_components() -> None:
    specs = R.build_reward_specs(
        [{"fn": "accuracy", "weight": 0.9}, {"fn": "format", "weight": 0.1}]
    )
    total, parts = R.compute_rewards(
        specs,
        [
            "<think>x</think><answer>A</answer>",
            "<answer>A</answer>",
            "<think>x</think><answer>B</answer>",
        ],
        {"answer": ["A"] * 3, "options": [["r", "g"]] * 3},
    )
    assert total == pytest.approx([1.0, 0.9, 0.1])
    assert parts == {"accuracy": [1.0, 1.0, 0.0], "format": [1.0, 0.0, 1.0]}


def test_user_reward_by_dotted_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "myrewards.py").write_text(
        textwrap.dedent(
            """
            def short(completions, answer, **kwargs):
                return [1.0 if len(c) < 10 else 0.0 for c in completions]
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    specs = R.build_reward_specs([{"fn": "myrewards:short", "weight": 0.5}])
    assert specs[0].name == "short"
    total, _ = R.compute_rewards(specs, ["ok", "much too long text"], {"answer": ["A", "A"]})
    assert total == [0.5, 0.0]
    sys.modules.pop("myrewards", None)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"fn": "no_such_module_xyz:f"}, "cannot import module"),
        ({"fn": "lvr.train.rewards:nope"}, "has no function 'nope'"),
        ({"fn": "justaname"}, "neither a built-in"),
        ({"weight": 1.0}, "needs keys fn"),
        ({"fn": "format", "weight": "heavy"}, "must be a number"),
    ],
)
def test_bad_reward_entries_raise_clear_errors(entry: dict, message: str) -> None:
    with pytest.raises(R.RewardError, match=message):
        R.build_reward_specs([entry])


def test_reward_returning_wrong_length_is_an_error() -> None:
    spec = R.RewardSpec("bad", lambda completions, **kw: [1.0], 1.0)
    with pytest.raises(R.RewardError, match="returned 1 values for 2"):
        R.compute_rewards([spec], ["a", "b"], {})
