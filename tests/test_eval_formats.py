"""Benchmark files as users download them: each class of defect seen in released files, reproduced
by a small file written here (never a copy of the real ones), read into exact rows, reasoned error
rows, or ONE actionable error line."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lvr.eval.benchmarks import BenchmarkError, Source, load_questions
from lvr.eval.options import from_any, gold_label, order_labelled
from lvr.eval.sources import flatten_nested, read_records, sniff_format
from lvr.reasons import error_reason, summarize_errors

FIX = Path(__file__).parent / "fixtures" / "eval"


def _load(benchmark: str, data: Path, video_dir: Path | None = None) -> tuple[dict, list[str]]:
    src = Source(benchmark, str(data), video_dir)
    rows = {r["qa_id"]: r for r in load_questions(src).to_pylist()}
    return rows, src.notes


def _touch(root: Path, *names: str) -> Path:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"\x00")
    return root


# ---------------------------------------------------------------------------------------------
# MLVU: blank answers and candidates, a results file in the folder
# ---------------------------------------------------------------------------------------------


def _mlvu_folder(tmp_path: Path) -> Path:
    rec = {
        "video": "a.mp4",
        "duration": 300.0,
        "question": "Which shape?",
        "question_type": "plotQA",
    }
    records = [
        {**rec, "candidates": ["circle", "square", "cross", "star"], "answer": "square"},
        {**rec, "candidates": ["circle", "square", "cross", ""], "answer": ""},  # blank gold
        {**rec, "candidates": ["circle", "", "cross", "star"], "answer": ""},
        {**rec, "candidates": ["circle", "square", "", " "], "answer": "circle"},  # two blanks
        {**rec, "candidates": ["circle", "square", "square ", "star"], "answer": "square"},
    ]
    folder = tmp_path / "MLVU" / "json"
    folder.mkdir(parents=True)
    (folder / "1_plotQA.json").write_text(json.dumps(records))
    submission = [{"question_id": f"AR_{i}", "question_type": "anomaly_reco", "option": "A"}
                  for i in range(7)]  # fmt: skip
    (folder / "test_res_example.json").write_text(json.dumps(submission))
    return folder


def test_mlvu_blank_golds_and_options_are_error_rows(tmp_path: Path) -> None:
    videos = _touch(tmp_path / "v", "video/1_plotQA/a.mp4")
    rows, notes = _load("mlvu", _mlvu_folder(tmp_path).parent, videos)
    assert len(rows) == 5  # the results file added no question
    assert rows["mlvu/plotQA/0"]["answer"] == "B" and rows["mlvu/plotQA/0"]["error"] is None
    # A blank answer never becomes the blank option's letter.
    assert rows["mlvu/plotQA/1"]["answer"] is None
    assert rows["mlvu/plotQA/1"]["error"] == "option D is blank; answer is blank"
    assert rows["mlvu/plotQA/2"]["error"] == "option B is blank; answer is blank"
    assert rows["mlvu/plotQA/3"]["error"] == "options C and D are blank"
    assert "matches 2 candidates" in rows["mlvu/plotQA/4"]["error"]
    skipped = [n for n in notes if "test_res_example.json" in n]
    assert len(skipped) == 1 and "\n" not in skipped[0]
    assert "missing question, candidates, answer, video" in skipped[0]
    assert "found option, question_id, question_type" in skipped[0]


def test_results_file_alone_is_one_line_error(tmp_path: Path) -> None:
    folder = _mlvu_folder(tmp_path)
    with pytest.raises(BenchmarkError) as err:
        load_questions(Source("mlvu", str(folder / "test_res_example.json")))
    line = str(err.value)
    assert "\n" not in line and line.startswith("test_res_example.json is not a mlvu file")
    assert "expected fields question, candidates, answer, video" in line


# ---------------------------------------------------------------------------------------------
# Video-MME: the official nested template, not strict JSON
# ---------------------------------------------------------------------------------------------


def _template_text() -> str:
    """A video -> questions template written the way the official one is (trailing commas)."""
    videos = []
    for v in range(2):
        qs = []
        for k in range(3):
            opts = ",\n".join(f'            "{"ABCD"[i]}. opt{v}{k}{i}."' for i in range(4))
            qs.append(
                f'        {{\n          "question_id": "00{v + 1}-{k + 1}",\n'
                f'          "task_type": "Counting Problem",\n'
                f'          "question": "Q{v}{k}?",\n          "options": [\n{opts}\n          ],\n'
                f'          "answer": "{"ABC"[k]}",\n          "response": "",\n        }}'
            )
        videos.append(
            f'    {{\n      "video_id": "00{v + 1}",\n      "duration": "short",\n'
            f'      "domain": "Knowledge",\n      "sub_category": "History",\n'
            f'      "questions": [\n' + ",\n".join(qs) + "\n      ],\n    }"
        )
    return "[\n" + ",\n".join(videos) + ",\n]\n"


def test_videomme_nested_template_with_trailing_commas(tmp_path: Path) -> None:
    path = tmp_path / "output_test_template.json"
    path.write_text(_template_text())
    with pytest.raises(ValueError):
        json.loads(path.read_text())  # as published: not strict JSON
    videos = _touch(tmp_path / "v", "001.mp4", "002.mp4")
    rows, notes = _load("videomme", path, videos)
    assert list(rows) == [f"videomme/00{v}-{k}" for v in (1, 2) for k in (1, 2, 3)]
    q = rows["videomme/002-3"]
    assert q["options"] == ["opt120.", "opt121.", "opt122.", "opt123."]
    assert (q["answer"], q["category"], q["duration_bucket"], q["error"]) == (
        "C", "Counting Problem", "short", None)  # fmt: skip
    assert q["video_path"] == str(videos / "002.mp4")
    assert any("not strict JSON" in n and "read leniently" in n for n in notes)
    assert any("2 nested records expanded to 6 questions" in n for n in notes)


def test_nested_flattening_keeps_parent_fields() -> None:
    flat, parents = flatten_nested([{"key": "v", "qa": [{"uid": 1}, {"uid": 2, "key": "w"}]}])
    assert parents == 1 and flat == [{"key": "v", "uid": 1}, {"key": "w", "uid": 2}]


def test_videomme_options_string_out_of_order_and_blank(tmp_path: Path) -> None:
    base = {"videoID": "vid", "question": "Q?", "duration": "long", "task_type": "OCR Problems"}
    recs = [
        {**base, "question_id": "1-1", "options": "B. two\nA. one\nD. four\nC. three", "answer": "D"},
        {**base, "question_id": "1-2", "options": ["A. one", "B. ", "C. three", "D. four"], "answer": "A"},
        {**base, "question_id": "1-3", "options": ["A. one", "B. two"], "answer": ""},
        {**base, "question_id": "1-4", "options": ["A. x", "B. y", "C. x", "D. z"], "answer": "C"},
    ]  # fmt: skip
    path = tmp_path / "videomme.json"
    path.write_text(json.dumps(recs))
    rows, notes = _load("videomme", path, _touch(tmp_path / "v", "vid.mp4"))
    assert rows["videomme/1-1"]["options"] == ["one", "two", "three", "four"]
    assert rows["videomme/1-1"]["answer"] == "D" and rows["videomme/1-1"]["error"] is None
    assert rows["videomme/1-2"]["error"] == "option B is blank"
    assert rows["videomme/1-3"]["error"] == "answer is blank"
    # Same text twice (Video-MME ships ten): kept, scored by letter, and said once in a note.
    assert rows["videomme/1-4"]["error"] is None
    assert [n for n in notes if "same text" in n] == [
        "videomme: 1 question(s) kept as published although options X and X have the same text; "
        "scored by label: videomme/1-4 (options A and C have the same text)"
    ]


# ---------------------------------------------------------------------------------------------
# LongVideo-Reason as redistributed
# ---------------------------------------------------------------------------------------------


def test_longvideo_reason_redistribution(tmp_path: Path) -> None:
    recs = [
        {"videos": ["eval_videos/merged/aaa.mp4"], "data_source": "longvideo-reason",
         "problem": "<image>Why does it move?  \nA. x  \nB. y  \nC. z  \nD. w  \n", "solution": "B",
         "extra_info": {"answer_type": "multiple_choice", "problem_id": 4}},
        {"videos": ["eval_videos/merged/bbb.mp4"], "data_source": "longvideo-reason",
         "problem": "<image>What is the goal?\nC. third\nA. first\nB. second\nD. fourth\n",
         "solution": "C", "extra_info": {"answer_type": "multiple_choice", "problem_id": 9}},
        {"videos": ["eval_videos/merged/bbb.mp4"], "data_source": "longvideo-reason",
         "problem": "<image>What next?\nC. third\nA. first\nC. again\nD. fourth\n",
         "solution": "C", "extra_info": {"answer_type": "multiple_choice", "problem_id": 10}},
    ]  # fmt: skip
    path = tmp_path / "LongVideoReason_test_processed.json"
    path.write_text(json.dumps(recs))
    videos = _touch(tmp_path / "v", "aaa.mp4", "bbb.mp4")
    rows, _ = _load("longvideo-reason", path, videos)
    assert list(rows) == ["longvideo-reason/4", "longvideo-reason/9", "longvideo-reason/10"]
    first = rows["longvideo-reason/4"]
    assert (first["question"], first["options"], first["answer"], first["error"]) == (
        "Why does it move?", ["x", "y", "z", "w"], "B", None)  # fmt: skip
    assert first["video_path"] == str(videos / "aaa.mp4")  # folder prefix the archive lacks
    reordered = rows["longvideo-reason/9"]
    assert reordered["options"] == ["first", "second", "third", "fourth"]
    assert reordered["answer"] == "C" and reordered["options"][2] == "third"
    assert rows["longvideo-reason/10"]["error"].startswith("option labels C, A, C, D are not A-D")


# ---------------------------------------------------------------------------------------------
# Wrong file for the adapter: one line naming the fields expected and found
# ---------------------------------------------------------------------------------------------

WRONG = [
    ("mlvu", FIX / "videomme" / "test.jsonl", "videomme"),
    ("longvideobench", FIX / "videomme" / "test.jsonl", "videomme"),
    ("videomme", FIX / "longvideobench" / "validation.json", "longvideobench"),
    ("videomme", FIX / "videomme_v2" / "test.jsonl", "videomme-v2"),
    ("video-holmes", FIX / "lvbench" / "video_info.meta.jsonl", "lvbench"),
    ("nextqa", FIX / "video_holmes" / "test_Video-Holmes.json", "video-holmes"),
    ("lvbench", FIX / "nextqa" / "val.csv", "nextqa"),
    ("videomme-v2", FIX / "mlvu" / "json" / "1_plotQA.json", "mlvu"),
]


@pytest.mark.parametrize(("benchmark", "data", "actual"), WRONG)
def test_wrong_benchmark_file_is_one_line(benchmark: str, data: Path, actual: str) -> None:
    with pytest.raises(BenchmarkError) as err:
        load_questions(Source(benchmark, str(data)))
    line = str(err.value)
    assert "\n" not in line and f"is not a {benchmark} file" in line
    assert "expected fields" in line and "; found " in line
    assert line.endswith(f"it looks like {actual}: pass --benchmark {actual}")


def test_right_fields_but_nothing_readable_is_one_line(tmp_path: Path) -> None:
    # Video-R1's Video-MME file has problem/solution/path (its options apart): Video-MME's.
    rec = {"problem": "What happens?", "solution": "<answer>A</answer>", "path": "v.mp4",
           "question": "What happens?", "options": ["A. x", "B. y"], "answer": "A", "videoID": "v"}  # fmt: skip
    path = tmp_path / "eval_videomme.json"
    path.write_text(json.dumps([rec] * 5))
    with pytest.raises(BenchmarkError) as err:
        load_questions(Source("longvideo-reason", str(path)))
    line = str(err.value)
    assert "\n" not in line
    assert "is not a longvideo-reason file (has videoID, a videomme field)" in line
    assert line.endswith("it looks like videomme: pass --benchmark videomme")


def test_qa_adapter_given_json_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "eval.json"
    path.write_text(json.dumps([{"question": "Q?"}]))
    with pytest.raises(BenchmarkError, match=r"is not a Parquet qa table .* pass its --benchmark"):
        load_questions(Source("qa", str(path)))


# ---------------------------------------------------------------------------------------------
# Files named for one format, holding another
# ---------------------------------------------------------------------------------------------


def test_files_are_read_by_content(tmp_path: Path) -> None:
    recs = [json.loads(line) for line in (FIX / "videomme" / "test.jsonl").read_text().splitlines()]
    fake_parquet = tmp_path / "test.parquet"
    fake_parquet.write_text(json.dumps(recs))  # a "Parquet" adapter given JSON
    jsonl_as_json = tmp_path / "test.json"
    jsonl_as_json.write_text("\n".join(json.dumps(r) for r in recs))
    real_parquet = tmp_path / "real.json"
    pq.write_table(pa.Table.from_pylist(recs), real_parquet)
    assert [sniff_format(p) for p in (fake_parquet, jsonl_as_json, real_parquet)] == [
        "json", "jsonl", "parquet"]  # fmt: skip
    for path in (fake_parquet, jsonl_as_json, real_parquet):
        notes: list[str] = []
        assert len(read_records(str(path), notes=notes)) == len(recs)
        assert notes and f"{path.name} holds" in notes[0]


def test_unreadable_json_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('[{"a": 1}, {"b": ')
    with pytest.raises(BenchmarkError) as err:
        read_records(str(path))
    assert "\n" not in str(err.value) and str(err.value).startswith(f"cannot read {path}")


# ---------------------------------------------------------------------------------------------
# Option and answer readers, reasons
# ---------------------------------------------------------------------------------------------


def test_option_shapes() -> None:
    assert from_any({"B": "y", "A": "x", "C": "z"}) == (["x", "y", "z"], None)
    assert from_any(["(A) x", "(B) y"]) == (["x", "y"], None)
    assert from_any(["x", "y"]) == (["x", "y"], None)  # prefixes stripped by a re-format
    assert from_any(["A. x", "y"])[1] == "option 1 'y' lacks its 'B. ' prefix"
    assert from_any("A. x\nB. y\nB. z")[1].startswith("option labels A, B, B are not A-C")
    assert from_any("Q?\nA. x\nB. y")[1].startswith("options text starts with an unlabelled line")
    assert (
        from_any([])[1] == "options list is empty" and from_any(None)[1] == "record has no options"
    )
    assert order_labelled([("1", "b"), ("0", "a")], "0123456789") == (["a", "b"], None)
    assert gold_label("<answer> C </answer>", "ABCD") == ("C", None)
    assert gold_label("B.", "ABCD")[1] == "answer 'B.' is not one option label"
    assert gold_label(3, "0123")[0] == "3" and gold_label(None, "AB")[1] == "answer is blank"


def test_errors_group_by_reason() -> None:
    messages = [f"video not found: v{i} (looked under /data/videos)" for i in range(40)]
    messages += ["option B is blank", "video: cannot decode video /x/y.mp4: Invalid data"]
    assert error_reason(messages[0]) == error_reason(messages[39])
    assert summarize_errors(messages) == (
        "40 x video not found: … (looked under …); 1 x option B is blank; "
        "1 x video: cannot decode video …: Invalid data"
    )


def test_folder_with_files_that_are_not_questions(tmp_path: Path) -> None:
    folder = tmp_path / "videomme"
    folder.mkdir()
    (folder / "test.jsonl").write_text((FIX / "videomme" / "test.jsonl").read_text())
    (folder / "meta.json").write_text(json.dumps({"version": 2, "name": "Video-MME"}))
    notes: list[str] = []
    assert len(read_records(str(folder), notes=notes)) == 6  # 5 questions + the meta object
    rows, notes = _load("videomme", folder)
    assert len(rows) == 5
    assert any(
        n.startswith("skipped (read 1 other file(s)): meta.json is not a videomme file")
        for n in notes
    )


def test_a_broken_file_in_a_benchmark_folder_stops_the_read(tmp_path: Path) -> None:
    """A truncated download beside the other files must not vanish from the score."""
    folder = tmp_path / "videomme"
    folder.mkdir()
    lines = (FIX / "videomme" / "test.jsonl").read_text().splitlines()
    (folder / "part1.jsonl").write_text("\n".join(lines[:3]) + "\n")
    (folder / "part2.jsonl").write_text(lines[3] + "\n" + lines[4][: len(lines[4]) // 2])
    with pytest.raises(BenchmarkError, match=r"cannot read .*part2.jsonl: line 2.*move it out"):
        read_records(str(folder))
    with pytest.raises(BenchmarkError) as info:
        _load("videomme", folder)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# JSON laid out in every way a writer lays it out; labels of any type
# ---------------------------------------------------------------------------------------------


def _vmme_records() -> list[dict]:
    return [json.loads(line) for line in (FIX / "videomme" / "test.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("indent", [None, 1])
def test_a_json_object_reads_the_same_on_one_line_and_pretty_printed(
    tmp_path: Path, indent: int | None
) -> None:
    records = _vmme_records()
    cases = {
        "wrapped.json": ({"version": "1.0", "data": records}, 5),
        "keyed.json": ({r["question_id"]: r for r in records}, 5),
        "single.json": (records[0], 1),  # one record: its options list is no record list
        "single.jsonl": (records[0], 1),
    }
    for name, (obj, count) in cases.items():
        path = tmp_path / name
        path.write_text(json.dumps(obj, indent=indent))
        rows, notes = _load("videomme", path)
        assert len(rows) == count, name
        assert all(
            r["error"] is None or r["error"].startswith("video not found") for r in rows.values()
        )
        assert "videomme/001-1" in rows, name  # native ids, also from a dict's keys
    keyed = tmp_path / "keyed_no_ids.json"
    keyed.write_text(json.dumps({f"q{i}": {k: v for k, v in r.items() if k != "question_id"}
                                 for i, r in enumerate(records)}))  # fmt: skip
    assert "videomme/q3" in _load("videomme", keyed)[0]


def test_jsonl_with_a_byte_order_mark_reads(tmp_path: Path) -> None:
    path = tmp_path / "test.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (FIX / "videomme" / "test.jsonl").read_bytes())
    assert len(_load("videomme", path)[0]) == 5


def test_labels_of_any_type_become_text(tmp_path: Path) -> None:
    records = _vmme_records()
    records[0]["task_type"] = ["Counting Problem", "OCR Problems"]
    records[1]["task_type"] = 7
    path = tmp_path / "test.json"
    path.write_text(json.dumps(records))
    rows, _ = _load("videomme", path)
    assert rows["videomme/001-1"]["category"] == "Counting Problem, OCR Problems"
    assert rows["videomme/001-2"]["category"] == "7"
    lvb = json.loads((FIX / "longvideobench" / "lvb_val.json").read_text())
    lvb[0]["question_category"], lvb[1]["duration_group"] = 3, [15, 60]
    path = tmp_path / "lvb_val.json"
    path.write_text(json.dumps(lvb))
    rows = list(_load("longvideobench", path)[0].values())
    assert rows[0]["category"] == "3" and rows[1]["duration_bucket"] == "15, 60"


def test_longvideobench_candidates_padded_or_labelled(tmp_path: Path) -> None:
    base = json.loads((FIX / "longvideobench" / "lvb_val.json").read_text())[0]
    padded = {**base, "id": "padded", "candidates": ["red", "green", "blue", "N/A", "N/A"],
              "correct_choice": 2}  # fmt: skip
    labelled = {**base, "id": "labelled", "candidates": ["B. green", "A. red", "C. blue"],
                "correct_choice": 0}  # fmt: skip
    path = tmp_path / "lvb_val.json"
    path.write_text(json.dumps([padded, labelled]))
    rows, _ = _load("longvideobench", path)
    assert (rows["longvideobench/padded"]["options"], rows["longvideobench/padded"]["answer"]) == (
        ["red", "green", "blue"], "C")  # fmt: skip
    # correct_choice indexes the list as given: its first item is the option labelled B.
    assert (rows["longvideobench/labelled"]["options"], rows["longvideobench/labelled"]["answer"]) == (
        ["red", "green", "blue"], "B")  # fmt: skip


def test_notes_count_expanded_questions_and_renamed_ids(tmp_path: Path) -> None:
    records = _vmme_records()
    nested = {
        k: v
        for k, v in records[0].items()
        if k not in ("question", "options", "answer", "question_id")
    }
    nested["questions"] = [
        {k: r[k] for k in ("question", "options", "answer", "question_id")} for r in records[:2]
    ]
    path = tmp_path / "test.json"
    path.write_text(json.dumps([nested, *records[2:], records[4]]))
    rows, notes = _load("videomme", path)
    assert len(rows) == 6
    assert "videomme: 1 nested records expanded to 2 questions" in notes
    assert any(n.startswith("1 question(s) repeat an earlier id") for n in notes)
    assert f"videomme/{records[4]['question_id']}#2" in rows


def test_records_as_other_writers_write_them(tmp_path: Path) -> None:
    """Options apart from the problem (Video-R1), an answer-format line after the options, a
    list kept as text by a table writer, a float index written beside nulls."""
    lvr_r = [
        {"problem_id": 7, "problem": "Which comes first?", "options": ["A. red", "B. blue"],
         "solution": "<answer>B</answer>", "videos": "a.mp4"},
        {"problem_id": 8, "problem": "Which comes first?\nA. red\nB. blue\n"
         "Answer with the option's letter from the given choices directly.",
         "solution": "<answer>A</answer>", "videos": "a.mp4"},
    ]  # fmt: skip
    path = tmp_path / "eval.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lvr_r))
    rows, _ = _load("longvideo-reason", path)
    assert [(r["question"], r["options"], r["answer"]) for r in rows.values()] == [
        ("Which comes first?", ["red", "blue"], "B"),
        ("Which comes first?", ["red", "blue"], "A"),
    ]
    records = _vmme_records()
    table = pa.Table.from_pylist(
        [
            {**r, "options": json.dumps(r["options"]) if i % 2 else repr(r["options"])}
            for i, r in enumerate(records)
        ]  # fmt: skip
    )
    pq.write_table(table, tmp_path / "test.parquet")
    rows, _ = _load("videomme", tmp_path / "test.parquet")
    assert rows["videomme/001-1"]["options"] == ["One.", "Two.", "Three.", "Four."]
    assert all(
        r["error"] is None or r["error"].startswith("video not found") for r in rows.values()
    )
    lvb = json.loads((FIX / "longvideobench" / "lvb_val.json").read_text())
    lvb[0]["correct_choice"] = float(lvb[0]["correct_choice"])
    (tmp_path / "lvb_val.json").write_text(json.dumps(lvb))
    first = next(iter(_load("longvideobench", tmp_path / "lvb_val.json")[0].values()))
    assert first["answer"] == "C" and "correct_choice" not in (first["error"] or "")


def test_a_video_is_found_under_another_container_or_extension_case(tmp_path: Path) -> None:
    from lvr.eval.sources import resolve_video

    _touch(tmp_path, "X.mkv", "vidU.MP4", "videos/Y.mp4", "Y.webm")
    assert resolve_video(tmp_path, "X.mp4", ("videos",)) == (str(tmp_path / "X.mkv"), None)
    assert resolve_video(tmp_path, "vidU", ("videos",)) == (str(tmp_path / "vidU.MP4"), None)
    # The named file wins over the same stem in another container, in any folder tried.
    assert resolve_video(tmp_path, "Y.mp4", ("videos",)) == (str(tmp_path / "videos/Y.mp4"), None)
    assert resolve_video(tmp_path, "Z.mp4", ("videos",))[1].startswith("video not found: Z.mp4")
