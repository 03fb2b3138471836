"""Rewards (lvr.train.rewards): the paper's semantics, doctests, user rewards by dotted path."""

from __future__ import annotations

import doctest
import sys
import textwrap
from pathlib import Path

import pytest

from lvr.errors import LvrError
from lvr.train import rewards


def test_doctests_pass() -> None:
    result = doctest.testmod(rewards)
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
    assert rewards.format_reward([good, *bad]) == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_mc_accuracy_uses_answer_span_only() -> None:
    outs = [
        "<think>B is wrong, A</think><answer>A</answer>",
        "<think>the answer is A</think><answer>B</answer>",
        "The answer is A",
        "<answer>a</answer>",  # a lone lower-case letter: eval's `alone` rule reads it too
        "<answer> A </answer>",
        "<answer>AB</answer>",
        "<answer>A video</answer>",  # a letter followed by a word is prose, not a choice
        "<answer>A, B, C, D</answer>",  # listing every letter must not pay
        "<answer>A or B</answer>",
    ]
    want = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert rewards.mc_accuracy_reward(outs, ["A"] * len(outs)) == want


def test_weighted_sum_default_and_components() -> None:
    specs = rewards.build_reward_specs(
        [{"fn": "accuracy", "weight": 0.9}, {"fn": "format", "weight": 0.1}]
    )
    total, parts = rewards.compute_rewards(
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
    specs = rewards.build_reward_specs([{"fn": "myrewards:short", "weight": 0.5}])
    assert specs[0].name == "short"
    total, _ = rewards.compute_rewards(specs, ["ok", "much too long text"], {"answer": ["A", "A"]})
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
    with pytest.raises(rewards.RewardError, match=message):
        rewards.build_reward_specs([entry])


def test_reward_returning_wrong_length_is_an_error() -> None:
    spec = rewards.RewardSpec("bad", lambda completions, **kw: [1.0], 1.0)
    with pytest.raises(rewards.RewardError, match="returned 1 values for 2"):
        rewards.compute_rewards([spec], ["a", "b"], {})


def test_judged_accuracy_over_loopback_judge() -> None:
    from lvr.testing.fake_server import FakeOpenAIServer

    completions = [
        "<think>t</think><answer>A red circle.</answer>",  # exact after normalization: no call
        "<think>t</think><answer>the red circle moving left</answer>",  # judge says Yes
        "<think>t</think><answer>a blue square</answer>",  # judge says No
        "no answer span",  # nothing to judge
        "<think>t</think><answer>B</answer>",  # multiple choice: never judged
    ]
    columns = {
        "answer": ["a red circle"] * 4 + ["B"],
        "question": ["What moves?"] * 5,
        "options": [[], [], [], [], ["x", "y"]],
    }
    with FakeOpenAIServer() as server:
        entry = {
            "fn": "judged_accuracy",
            "weight": 1.0,
            "args": {"model": "fake-model", "base_url": server.url},
        }
        specs = rewards.build_reward_specs([entry])
        total, _ = rewards.compute_rewards(specs, completions, columns)
        sent = [a.user_text for a in server.log]
    assert total == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert len(sent) == 2 and all("Reference answer: a red circle" in t for t in sent)


def test_judged_accuracy_errors_are_one_line() -> None:
    with pytest.raises(rewards.RewardError, match=r"needs args \['model'\]"):
        rewards.build_reward_specs([{"fn": "judged_accuracy", "weight": 1.0}])
    with pytest.raises(rewards.RewardError, match="unknown args"):
        rewards.build_reward_specs([{"fn": "judged_accuracy", "weight": 1, "args": {"modle": "m"}}])
    dead = {"model": "m", "base_url": "http://127.0.0.1:9/v1", "timeout_s": 1.0}
    specs = rewards.build_reward_specs([{"fn": "judged_accuracy", "weight": 1.0, "args": dead}])
    with pytest.raises(LvrError, match="cannot reach .* http://127.0.0.1:9/v1") as err:
        rewards.compute_rewards(
            specs, ["<answer>blue</answer>"], {"answer": ["red"], "question": ["Q"]}
        )
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kind", ["missing_fields", "500"])
def test_judged_accuracy_dead_judge_stops_the_step(kind: str) -> None:
    """A judge that never gives a usable reply (empty content, HTTP 500 after retries) stops RL
    with one line naming the endpoint, instead of silently scoring every open answer 0."""
    from lvr.testing.fake_server import FakeOpenAIServer, FaultConfig

    columns = {"answer": ["a red circle"], "question": ["What moves?"]}
    completion = ["<answer>the red circle moving left</answer>"]  # the judge would say Yes
    with FakeOpenAIServer(faults=FaultConfig(rate=1.0, kinds=(kind,))) as server:
        args = {"model": "fake-model", "base_url": server.url, "timeout_s": 5.0}
        specs = rewards.build_reward_specs([{"fn": "judged_accuracy", "weight": 1.0, "args": args}])
        with pytest.raises(rewards.RewardError, match="all 1 judge requests .* failed") as err:
            rewards.compute_rewards(specs, completion, columns)
    assert "\n" not in str(err.value)
