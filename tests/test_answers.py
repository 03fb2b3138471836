"""One answer reading (lvr.answers) for the RL reward, the strict score and the robust extractor.

Each shape below was seen in real Qwen2.5-VL `<think>/<answer>` completions written by others,
where eval and the reward used to disagree; the three readers must now agree on every response
that holds a closed `<answer>` span.
"""

from __future__ import annotations

import doctest
import random

import pytest

from lvr import answers
from lvr.eval.extract import extract_choice, extract_open, strict_answer
from lvr.train.rewards import mc_accuracy_reward


def _readings(response: str) -> tuple[str | None, str | None, str | None]:
    """(reward's letter, strict answer, robust letter) of one response."""
    reward = next(
        (gold for gold in "ABCD" if mc_accuracy_reward([response], [gold]) == [1.0]), None
    )
    robust, _ = extract_choice(response, "ABCD")
    return reward, strict_answer(response), robust


SHAPES = [
    # A stray </think> after the answer must not turn the answer into reasoning (45 real cases).
    ("<think>red comes first</think>\n<answer>B</answer> </think>", "B"),
    ("<think>r</think><answer>B</answer></think>\n</think>", "B"),
    # An invented second turn: the first span is the model's answer.
    ("<think>r</think><answer>D</answer>\nuser\nAnd now?\nassistant\n<answer>C</answer>", "D"),
    # Tags are case-insensitive for the reward as for eval.
    ("<THINK>r</THINK><ANSWER>A</ANSWER>", "A"),
    ("<think>r</think><Answer>C</Answer>", "C"),
    # A draft inside the reasoning is not the answer.
    ("<think>first I thought <answer>A</answer> but no</think><answer>C</answer>", "C"),
    # An unclosed <think>: the answer ends the reasoning.
    ("<think>A? B? <answer>D</answer>", "D"),
    # The template opened <think> in the prompt.
    ("comparing A and B</think>\n<answer>B</answer>", "B"),
    # Whitespace and a bare letter.
    ("<think>r</think><answer>\n C \n</answer>", "C"),
]


@pytest.mark.parametrize(("response", "letter"), SHAPES)
def test_reward_strict_and_robust_read_the_same_span(response: str, letter: str) -> None:
    reward, strict, robust = _readings(response)
    assert (reward, strict, robust) == (letter, letter, letter)


def test_no_closed_span_outside_reasoning() -> None:
    assert answers.answer_span("<think>maybe <answer>A</answer> hmm</think> no idea") is None
    assert answers.answer_span("<answer>A") is None
    assert answers.answer_span("") is None
    assert strict_answer("<think>x</think>B") is None
    assert mc_accuracy_reward(["<think>x</think>B"], ["B"]) == [0.0]


@pytest.mark.parametrize(
    ("span", "letter"),
    [("B", "B"), ("b", "B"), ("(b)", "B"), ("B.", "B"), ("**B**", "B"), ("B. red", "B"),
     ("(B) red", "B"), ("B:", "B"), ("A video", None), ("AB", None), ("the answer is B", None),
     ("", None)],
)  # fmt: skip
def test_span_letter(span: str, letter: str | None) -> None:
    assert answers.span_letter(span) == letter


def test_reward_letter_implies_robust_letter_on_random_spans() -> None:
    """Whatever the decoration, a span the reward reads as X is read as X by eval too."""
    rng = random.Random(0)
    pieces = ["", " ", "\n", "(", ")", ".", "**", ":", " red", " the", "A", "B", "c", "answer"]
    for _ in range(3000):
        span = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 5)))
        think = rng.choice(["<think>A or B?</think>", "", "why</think>", "<think>C"])
        tail = rng.choice(["", " </think>", " <answer>D</answer>", "\nuser: ok"])
        response = f"{think}<answer>{span}</answer>{tail}"
        letter = answers.span_letter(answers.answer_span(response), "ABCD")
        if letter is not None:
            assert extract_choice(response, "ABCD")[0] == letter, response
            assert mc_accuracy_reward([response], [letter]) == [1.0], response


def test_open_answers_use_the_same_span() -> None:
    response = "<think>x</think><answer>The red car.</answer> </think>"
    assert extract_open(response) == "The red car."


def test_doctests() -> None:
    assert doctest.testmod(answers).failed == 0
