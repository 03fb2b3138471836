"""QA stage: template questions checked against sidecar facts, the validator/repairer on adversarial
outputs, allocation of categories and formats, and the LLM path through the loopback server."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from backend_server import fake_server

from lvr.artifacts import qa_id, read_table
from lvr.config import load_config
from lvr.datagen.caption import run_caption
from lvr.datagen.config import DatagenConfig
from lvr.datagen.qa import allocate, render_captions, run_qa, slots
from lvr.datagen.qa_parse import LETTERS, QAParseError, cot_problem, parse_qa, parse_rewrite
from lvr.datagen.segment import run_segment
from lvr.datagen.synthetic import VideoSpec, read_sidecar, render_video

TEMPLATE_SETS = [
    "caption.backend=annotations", "caption.annotations=sidecar", "qa.backend=template",
    "qa.questions_per_video=10", "filter.category_shares={}",
    "qa.categories=[{name: temporal, share: 0.4}, {name: counting, share: 0.2}, "
    "{name: spatial, share: 0.2}, {name: plot, share: 0.2}]",
]  # fmt: skip


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("qa_videos")
    for i in range(4):
        spec = VideoSpec(duration_s=12.0, fps=12.0, width=96, height=64, scene_len_s=(2.0, 4.0),
                         objects_per_scene=(1, 3), seed=60 + i, encoder_threads=1)  # fmt: skip
        render_video(d / f"v{i}.mp4", spec)
    return d


def pipeline(videos: Path, run: Path, *sets: str) -> list[dict[str, Any]]:
    cfg = load_config(
        DatagenConfig, None, [f"input.source={videos}", "shards.videos_per_shard=2", *sets]
    )
    run_segment(cfg, run, progress=False)
    run_caption(cfg, run, progress=False)
    run_qa(cfg, run, progress=False)
    return read_table(run / "qa_raw", "qa_raw").to_pylist()


def expected_answer(q: str, side: dict[str, Any]) -> Any:
    """The correct answer of a template question, recomputed from the sidecar (not from `raw`)."""
    f, objs = side["facts"], side["objects"]
    named = {f"{o['color']} {o['shape']}": o for o in objs}
    target = re.search(r"the (\w+ \w+) (?:shows up|appears|move)", q)
    if "order" in q:
        words = ("zero", "one", "two", "three", "four", "five")
        m = re.search(r"first (\w+) colors", q)
        n = words.index(m.group(1)) if m else len(f["color_order"])
        return ", ".join(f["color_order"][:n])
    if q.startswith("Which shape is the first"):
        return f"{f['first_object']['color']} {f['first_object']['shape']}"
    if "final new shape" in q:
        return f"{f['last_object']['color']} {f['last_object']['shape']}"
    if "right after" in q:
        order = [objs[i] for i in f["object_order"]]
        i = next(k for k, o in enumerate(order) if f"{o['color']} {o['shape']}" == target.group(1))
        return f"{order[i + 1]['color']} {order[i + 1]['shape']}"
    if q.startswith("How many shapes appear"):
        return str(f["num_objects"])
    if q.startswith("How many") and "background" not in q:
        word = q.split()[2]
        if word in f["count_by_color"]:
            return str(f["count_by_color"][word])
        return str(next(v for k, v in f["count_by_shape"].items() if word.startswith(k)))
    if "direction" in q:
        return named[target.group(1)]["motion"]
    if "travels from" in q:
        motion = re.search(r"travels from (.+) across", q).group(1)
        (o,) = [o for o in objs if o["motion"] == motion]
        return f"{o['color']} {o['shape']}"
    if "background when" in q:
        return side["scenes"][named[target.group(1)]["scene"]]["background"]
    if "background of the video change" in q:
        return str(f["num_scenes"] - 1)
    raise AssertionError(f"unknown template question {q!r}")


def test_template_questions_are_valid_and_correct(videos: Path, tmp_path: Path) -> None:
    rows = pipeline(videos, tmp_path, *TEMPLATE_SETS, "segment.stride_s=4")
    assert len(rows) == 40
    ok = [r for r in rows if r["error"] is None]
    assert len(ok) >= 36, [r["error"] for r in rows if r["error"]]
    letters = Counter()
    for r in ok:
        side = read_sidecar(r["video_path"])
        want = expected_answer(r["question"], side)
        assert r["qa_id"] in {qa_id(r["video_id"], "template", "template-v1", k) for k in range(10)}
        if r["format"] == "mc":
            assert len(r["options"]) == 4 and len(set(r["options"])) == 4
            assert r["answer"] in LETTERS[:4]
            assert r["options"][LETTERS.index(r["answer"])] == want, r
            assert sum(o == want for o in r["options"]) == 1
            letters[r["answer"]] += 1
        else:
            assert r["options"] == [] and r["answer"] == want, r
        assert cot_problem(r["reasoning"]) is None, r["reasoning"]
        assert r["evidence"] and all(
            0 <= e["start_s"] < e["end_s"] <= r["duration_s"] + 1e-6 for e in r["evidence"]
        )
        assert r["video_path"] and r["duration_s"] == pytest.approx(side["duration_s"], abs=0.1)
        assert json.loads(r["raw"])["kind"]
    assert len(letters) >= 3  # the answer letter is not a constant
    kinds = Counter(json.loads(r["raw"])["kind"] for r in ok)
    assert len(kinds) >= 8, kinds
    cats = Counter(r["category"] for r in rows)
    assert (
        cats["temporal"] == 16 and cats["counting"] == cats["spatial"] == cats["plot"] == 8
    )  # 10 per video
    assert len({(r["video_id"], r["question"]) for r in ok}) == len(
        ok
    )  # no repeated question per video


def _cfg() -> DatagenConfig:
    return load_config(DatagenConfig, None, TEMPLATE_SETS)


def test_template_from_captions(videos: Path, tmp_path: Path) -> None:
    rows = pipeline(
        videos, tmp_path, *TEMPLATE_SETS, "qa.template_source=captions", "segment.stride_s=4"
    )
    ok = [r for r in rows if r["error"] is None]
    assert len(ok) >= 30
    for r in ok:
        if "order do the colors" in r["question"] and r["format"] == "open":
            # caption mentions follow appearance order, so the parsed order is the true order
            assert r["answer"] == ", ".join(read_sidecar(r["video_path"])["facts"]["color_order"])


def test_template_rejects_unknown_category(videos: Path, tmp_path: Path) -> None:
    from lvr.datagen.qa import QAConfigError

    with pytest.raises(QAConfigError, match="goal"):
        pipeline(videos, tmp_path, *TEMPLATE_SETS[:3], "filter.category_shares={}")


def test_allocation_hits_shares_and_is_deterministic() -> None:
    cfg = _cfg().qa
    counts: Counter = Counter()
    fmts: Counter = Counter()
    for v in range(500):
        s = slots(f"video{v}", cfg)
        assert s == slots(f"video{v}", cfg)
        counts.update(c for _, c, _ in s)
        fmts.update(f for _, _, f in s)
    total = sum(counts.values())
    for name, share in {"temporal": 0.4, "counting": 0.2, "spatial": 0.2, "plot": 0.2}.items():
        assert counts[name] / total == pytest.approx(share, abs=0.02)
    assert fmts["mc"] / total == pytest.approx(0.5, abs=0.02)
    assert allocate("v", 3, {"a": 1.0, "b": 0.0}, "s") == ["a", "a", "a"]


def test_render_captions_timestamps() -> None:
    text = render_captions(
        [[10.0, 20.0, "b  happens"], [0.0, 10.0, "a happens"], [20.0, 22.5, "c"]]
    )
    assert text == "From 0 to 10, a happens\nFrom 10 to 20, b happens\nFrom 20 to 22.5, c"


GOOD = {
    "question": "What does the man do after he opens the fridge?",
    "options": ["He pours milk", "He leaves", "He sits down", "He calls a friend"],
    "reasoning": "He opens the fridge first, then takes the milk and pours it into a cup.",
    "answer": "A",
    "evidence": [{"start_s": 10, "end_s": 20}, {"start_s": 20, "end_s": 30}],
}


def raw(**changes: Any) -> str:
    obj = {**GOOD, **changes}
    return json.dumps({k: v for k, v in obj.items() if v is not ...})


@pytest.mark.parametrize(
    ("text", "why"),
    [
        (
            raw(
                options=[
                    "He pours milk",
                    "He leaves",
                    "He sits down",
                    "He calls a friend\nREASONS: he pours milk because",
                ]
            ),
            "leaked",
        ),
        (
            raw(
                options=[
                    "He pours milk",
                    "He leaves",
                    "He sits down",
                    "Answer: A, since he pours the milk",
                ]
            ),
            "leaked reasoning",
        ),
        (raw(options=["He pours milk", "He leaves", "He sits down"]), "expected 4 options, got 3"),
        (raw(options=...), "missing field 'options'"),
        (
            raw(options=["He pours milk", "he pours milk.", "He sits down", "He calls a friend"]),
            "duplicates option A",
        ),
        (raw(answer="E"), "not one of the options"),
        (raw(answer="He dances"), "not one of the options"),
        (raw(answer=1), "must be a string letter, got int"),
        (raw(question=["What?"]), "field 'question' must be a string, got list"),
        (raw(options="He pours milk or he leaves"), "must be a list of strings, got a string"),
        (
            raw(options=["He pours milk", 2, "He sits down", "He calls a friend"]),
            "every option must be a string, got int",
        ),
        (raw(reasoning=...), "missing field 'reasoning'"),
        (raw(evidence=[{"start_s": 30, "end_s": 10}]), "0 <= start < end"),
        (raw(evidence=[{"start_s": 10, "end_s": 500}]), "after the video"),
        (raw(evidence="10-20"), "non-empty list"),
        (
            raw(
                options=[
                    "B. He pours milk",
                    "A. He leaves",
                    "C. He sits down",
                    "D. He calls a friend",
                ]
            ),
            "do not match",
        ),
        (raw(answer="B. He pours milk"), "names option B but not with its text"),
        ('{"question": "What does the man do', "not valid JSON"),
        ("I cannot answer that.", "no JSON object"),
        ("[1, 2]", "expected an object"),
        ("", "empty output"),
    ],
)
def test_validator_rejects_malformed_mc(text: str, why: str) -> None:
    with pytest.raises(QAParseError, match=re.escape(why)):
        parse_qa(text, "mc", duration_s=60.0)


def test_validator_repairs_what_is_safe() -> None:
    text = "<think>Let me think about the fridge.</think>\nSure! Here it is:\n```json\n" + raw(
        question="  What does the man do after he\nopens the fridge?\nA. He pours milk\nB. He leaves",
        options=["A. He pours milk", "B) He leaves", "(C) He sits down", "D: He calls a friend"],
        answer="he leaves", evidence=[[10, "20"]],
    ) + "\n```"  # fmt: skip
    qa = parse_qa(text, "mc", duration_s=60.0)
    assert qa.question == "What does the man do after he opens the fridge?"
    assert qa.options == ["He pours milk", "He leaves", "He sits down", "He calls a friend"]
    assert qa.answer == "B"
    assert qa.evidence == [{"start_s": 10.0, "end_s": 20.0}]
    assert {
        "removed think block",
        "stripped option letter prefixes",
        "answer given as option text -> letter",
    } <= set(qa.repairs)
    for form in ("B", "B.", "(B)", "b", "Option B", "<answer>B</answer>", "B. He leaves"):
        assert parse_qa(raw(answer=form), "mc").answer == "B", form
    mapping = parse_qa(raw(options=dict(zip("ABCD", GOOD["options"], strict=True))), "mc")
    assert mapping.options == GOOD["options"]
    lettered = parse_qa(
        raw(options="A. He pours milk\nB. He leaves\nC. He sits down\nD. He calls a friend"), "mc"
    )
    assert lettered.options == GOOD["options"]
    assert (
        parse_qa(json.dumps([json.loads(raw())]), "mc").answer == "A"
    )  # one-element list unwrapped


def test_validator_open_format() -> None:
    qa = parse_qa(raw(options=..., answer="He pours milk into a cup"), "open")
    assert qa.options == [] and qa.answer == "He pours milk into a cup"
    with pytest.raises(QAParseError, match="must not have options"):
        parse_qa(raw(answer="He pours milk"), "open")
    with pytest.raises(QAParseError, match="bare option letter"):
        parse_qa(raw(options=..., answer="B"), "open")


def test_cot_post_check() -> None:
    assert (
        cot_problem("Checking the video, the man opens the fridge and later pours the milk.")
        is None
    )
    assert cot_problem("Step 1: he opens the fridge.") == "uses the word 'step'"
    assert "clock" in cot_problem("At (0:00:20-0:00:30) he pours milk.")
    assert "time range" in cot_problem("From 20 to 30, he pours milk.")
    assert "time range" in cot_problem("He pours milk (20-30).")
    assert parse_rewrite(
        '{"reasoning": "Analyzing the scene, he pours milk after opening the fridge."}'
    )
    with pytest.raises(QAParseError, match="step"):
        parse_rewrite('{"reasoning": "First step: he opens the fridge, then pours milk."}')


def test_llm_path_through_openai_server(videos: Path, tmp_path: Path) -> None:
    with fake_server() as server:
        opts = f"qa.options={{base_url: '{server.url}'}}"
        sets = ["caption.backend=annotations", "caption.annotations=sidecar", "qa.backend=openai",
                "qa.model=fake-model", opts, "qa.questions_per_video=4", "segment.stride_s=4"]  # fmt: skip
        rows = pipeline(videos, tmp_path / "a", *sets)
        calls = len(server.log)
        rewritten = pipeline(videos, tmp_path / "b", *sets, "qa.rewrite=true")
    assert len(rows) == 16 and calls == 16  # one call per question slot
    for r in rows:
        assert (r["error"] is None) == (r["question"] is not None), r
        assert r["generator"] == "openai:fake-model" and r["prompt_version"] == "qa-v1"
        if r["error"] is None:
            assert r["format"] == "mc" and len(r["options"]) == 4 and r["answer"] in "ABCD"
            assert r["evidence"] and r["raw"]
        else:
            assert r["error"].startswith(
                "invalid output: "
            )  # the fake model answers open questions with a letter
    assert any(r["error"] is None for r in rows)
    good = [r for r in rewritten if r["error"] is None]
    assert good and all(
        r["prompt_version"] == "qa-v1+rewrite-v1" and cot_problem(r["reasoning"]) is None
        for r in good
    )
    assert all(json.loads(r["raw"]).keys() == {"qa", "rewrite"} for r in good)


@pytest.mark.slow  # ~1-4 min on 2 shared cores: constrained decoding of 8 questions
def test_hf_backends_tiny_models(videos: Path, tmp_path: Path) -> None:
    """Captions from the tiny VLM and questions from the tiny LLM (random weights, JSON-constrained):
    every clip gets a row, every question slot gets a valid question or an error with a reason."""
    from lvr.models import build_tiny_llm, build_tiny_vlm

    vlm, llm = build_tiny_vlm(tmp_path / "vlm"), build_tiny_llm(tmp_path / "llm")
    cfg = load_config(DatagenConfig, None, [
        f"input.source={videos}", "segment.stride_s=6", "caption.backend=hf", f"caption.model={vlm}",
        "caption.frames=2", "caption.max_tokens=12", "caption.max_pixels=12544", "caption.options={batch_size: 4}",
    ])  # fmt: skip
    run_segment(cfg, tmp_path / "cap", progress=False)
    run_caption(cfg, tmp_path / "cap", progress=False)
    caps = read_table(tmp_path / "cap" / "captions", "captions").to_pylist()
    assert len(caps) == 8 and all((c["caption"] is None) != (c["error"] is None) for c in caps)
    assert all(c["backend"] == "hf" and c["prompt_version"] == "caption-v1" for c in caps)
    # random weights may well say nothing: then the row says so instead of storing ""
    assert all(
        c["frames"] == 2 if c["error"] is None else c["error"] == "empty caption" for c in caps
    )

    sets = ["caption.backend=annotations", "caption.annotations=sidecar", "segment.stride_s=6",
            "qa.backend=hf", f"qa.model={llm}", "qa.questions_per_video=2", "qa.max_tokens=200",
            "qa.temperature=0", "qa.options={max_string_chars: 60, max_array_items: 2}"]  # fmt: skip
    rows = pipeline(videos, tmp_path / "qa", *sets)
    assert len(rows) == 8
    for r in rows:
        assert (r["error"] is None) == (r["question"] is not None)
        assert r["error"] is None or r["error"].startswith(
            ("invalid output: ", "model call failed: ")
        ), r["error"]
        assert r["generator"] == f"hf:{llm}"
