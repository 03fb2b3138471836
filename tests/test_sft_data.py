"""SFT data: labels, video tokens, truncation by frames, decode failures, step plans."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lvr.demo.color_task import make_color_qa
from lvr.media import sample_video  # noqa: E402
from lvr.train import data  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from lvr.models.loading import load_vlm
    from lvr.models.tiny import build_tiny_vlm

    tmp = tmp_path_factory.mktemp("sftdata")
    qa = make_color_qa(tmp / "data", 4, 0, seed=3, size=56, bad_videos=1)
    _, processor = load_vlm(build_tiny_vlm(tmp / "tiny"))
    return qa, processor


def test_read_qa_keeps_split_and_sorts(setup):
    qa, _ = setup
    rows = data.read_qa(qa, "sft")
    assert len(rows) == 5
    assert [r.qa_id for r in rows] == sorted(r.qa_id for r in rows)
    with pytest.raises(data.DataError, match="split='rl'"):
        data.read_qa(qa, "rl")


def test_read_qa_names_a_jsonl_export_instead_of_asking_to_delete_it(tmp_path):
    # `lvr datagen export` output given as data.qa: it used to be "not a readable Parquet file
    # ...; remove or replace it", pointing at deleting the user's export.
    export = tmp_path / "sft.jsonl"
    export.write_text('{"problem_id": "q1", "problem": "Which?", "answer": "<answer>A</answer>"}\n')
    with pytest.raises(data.DataError, match=r"is a JSONL export.*data.qa to the run's qa folder"):
        data.read_qa(export, "sft")
    assert export.is_file()


def test_labels_cover_exactly_the_assistant_answer(setup):
    qa, processor = setup
    from lvr.models.inputs import end_of_turn_ids

    row = data.read_qa(qa, "sft")[0]
    s = data.load_sample(processor, row, data.FrameSpec(frames=8), max_seq_len=4096)
    ids, labels = s.inputs["input_ids"][0], s.inputs["labels"][0]
    target = data.target_text(row, "think")
    assert target.startswith("<think>The first color is") and target.endswith(
        f"<answer>{row.answer}</answer>"
    )
    expected = processor.tokenizer(target, add_special_tokens=False)["input_ids"]
    expected = expected + end_of_turn_ids(processor)
    n = len(expected)
    # Token by token: the last n positions are labelled with themselves, everything else is -100.
    assert labels[-n:].tolist() == expected == ids[-n:].tolist()
    assert (labels[:-n] == -100).all()
    assert processor.tokenizer.decode(labels[-n:]).startswith("<think>")
    # The prompt (system, video, question, options) carries no label at all.
    prompt = processor.tokenizer.decode(ids[:-n])
    assert "Which color appears first?" in prompt and prompt.rstrip().endswith("assistant")


def test_video_tokens_match_processor_count(setup):
    qa, processor = setup
    row = data.read_qa(qa, "sft")[1]
    s = data.load_sample(processor, row, data.FrameSpec(frames=8), max_seq_len=4096)
    frames = sample_video(row.video_path, data.FrameSpec(frames=8)).frames
    out = processor.video_processor(videos=[frames], do_sample_frames=False, return_tensors="pt")
    merge = processor.video_processor.merge_size
    expected = int(out["video_grid_thw"].prod()) // merge**2
    video_id = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert int((s.inputs["input_ids"] == video_id).sum()) == expected == s.video_tokens
    assert torch.equal(s.inputs["video_grid_thw"], out["video_grid_thw"])
    assert s.frames == 8 and expected == (8 // 2) * (56 // 28) ** 2


def test_overlong_sample_is_truncated_by_frames_not_tokens(setup):
    qa, processor = setup
    row = data.read_qa(qa, "sft")[2]
    full = data.load_sample(processor, row, data.FrameSpec(frames=16), max_seq_len=4096)
    limit = full.inputs["input_ids"].shape[1] - 10  # 16 frames no longer fit
    cut = data.load_sample(processor, row, data.FrameSpec(frames=16), max_seq_len=limit)
    assert cut.error is None and cut.truncated
    assert cut.frames < 16 and cut.frames % 2 == 0
    assert cut.inputs["input_ids"].shape[1] <= limit
    # Text (prompt and target) is intact: only video tokens went away.
    text = lambda s: s.inputs["input_ids"][s.inputs["mm_token_type_ids"] == 0].tolist()  # noqa: E731
    assert text(cut) == text(full)
    assert cut.video_tokens < full.video_tokens
    # Cannot fit even min_frames: an error, not a token cut.
    tiny = data.load_sample(processor, row, data.FrameSpec(frames=16, min_frames=2), max_seq_len=40)
    assert tiny.inputs is None and tiny.error.startswith("too long")


def test_undecodable_video_is_an_error_not_a_substitute(setup):
    qa, processor = setup
    bad = [r for r in data.read_qa(qa, "sft") if "bad_" in r.video_path][0]
    s = data.load_sample(processor, bad, data.FrameSpec(frames=8), max_seq_len=4096)
    assert s.inputs is None and s.error.startswith("decode: VideoDecodeError")
    assert bad.video_path in s.error


def test_plan_is_seeded_length_grouped_and_rank_split():
    lengths = [5, 50, 7, 48, 6, 52, 9, 47]
    plan = data.plan_steps(lengths, global_batch=4, num_steps=5, seed=1)
    assert plan == data.plan_steps(lengths, global_batch=4, num_steps=5, seed=1)
    assert plan != data.plan_steps(lengths, global_batch=4, num_steps=5, seed=2)
    assert sorted(plan[0] + plan[1]) == list(range(8))  # one epoch = every row once
    for step in plan:
        assert [lengths[i] for i in step] == sorted((lengths[i] for i in step), reverse=True)
    # The micro-batches of 2 ranks x 2 accumulation steps cover the step's rows exactly once.
    parts = [data.rank_micro_batches(plan[0], 1, 2, r, 2) for r in range(2)]
    assert sorted(i for p in parts for mb in p for i in mb) == sorted(plan[0])
    with pytest.raises(data.DataError, match="cannot fill"):
        data.plan_steps([1, 2], global_batch=4, num_steps=1, seed=0)


@pytest.mark.parametrize("options", ["fixed", "shuffled"])
def test_color_task_answer_follows_the_rendered_order(tmp_path: Path, options: str) -> None:
    """The gold letter names the color the renderer showed first; letters are balanced; a
    rerun reuses the videos and another variant renders new ones."""
    import pyarrow.parquet as pq

    from lvr.datagen.synthetic import read_sidecar
    from lvr.demo.color_task import FIXED_OPTIONS

    qa = make_color_qa(tmp_path, 8, 0, seed=4, size=32, options=options)
    rows = pq.read_table(qa / "00000.parquet").to_pylist()
    for r in rows:
        first = read_sidecar(r["video_path"])["facts"]["color_order"][0]
        assert r["options"]["ABCD".index(r["answer"])] == first
        assert f"The first color is {first} ({r['answer']})" in r["reasoning"]
        if options == "fixed":
            assert r["options"] == FIXED_OPTIONS
    assert sorted(r["answer"] for r in rows) == sorted("ABCD" * 2)
    mtimes = {r["video_path"]: os.path.getmtime(r["video_path"]) for r in rows}
    make_color_qa(tmp_path, 8, 0, seed=4, size=32, options=options)
    assert all(os.path.getmtime(p) == t for p, t in mtimes.items())
    other = "shuffled" if options == "fixed" else "fixed"
    again = pq.read_table(make_color_qa(tmp_path, 8, 0, seed=4, size=32, options=other)
                          / "00000.parquet").to_pylist()  # fmt: skip
    assert {r["video_path"] for r in again}.isdisjoint(mtimes)
