"""A new video domain, as docs/datagen.md tells a user to build one: own config, own caption prompt,
own question categories, non-English text. Bad stage settings stop a run before any work; prompts
with braces, dollar signs and unicode reach the model as written; custom categories keep their
labels; every clip and question slot ends as a row."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from backend_server import fake_server

from lvr.artifacts import read_table
from lvr.config import ConfigError, from_dict, load_config, to_yaml
from lvr.datagen import caption, qa, segment
from lvr.datagen.config import DatagenConfig
from lvr.datagen.runner import run_datagen_stage
from lvr.errors import LvrError

REPO = Path(__file__).resolve().parents[1]

# A French/Chinese cooking domain; the instructions hold braces and a dollar sign on purpose.
CATEGORIES = (
    "qa.categories=[{name: étape, share: 0.6, instruction: 'ordre des gestes {couper → frire}, "
    "prix en $'}, {name: 食材, share: 0.4, instruction: 'which ingredient, and why'}]"
)
SHARES = "filter.category_shares={étape: 0.6, 食材: 0.4}"


def _cfg(*sets: str, **sections: dict[str, object]) -> DatagenConfig:
    return from_dict(DatagenConfig, sections, [CATEGORIES, SHARES, *sets])


@pytest.fixture(scope="module")
def one_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lvr.datagen.synthetic import make_videos

    src = tmp_path_factory.mktemp("cooking")
    make_videos(src, 1, seed=5, duration_s=4.0, width=64, height=48, fps=8.0, encoder_threads=1)
    return src


def _lvr(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "lvr.cli", *args], env=env, cwd=REPO, text=True,
                          capture_output=True)  # fmt: skip


def _prompt_file(tmp_path: Path, user: str) -> Path:
    path = tmp_path / "my_qa.yaml"
    path.write_text(yaml.safe_dump({"version": "cooking-qa-v1", "user": user}, allow_unicode=True))
    return path


# ---------------------------------------------------------------------------------------------
# A setting that would fail every clip or question alike fails before the stage (and the chain)
# does any work, with one line naming it.
# ---------------------------------------------------------------------------------------------

MODEL = ("caption.model=m", "qa.model=m")


def _bad_settings(tmp_path: Path) -> list[tuple[object, list[str], str]]:
    no_captions = _prompt_file(tmp_path, "Ask about $category in a $duration s video.")
    return [
        (qa.STAGE, [*MODEL, "qa.options.base_urll=http://x/v1"], "did you mean 'qa.options.base_url'"),
        (caption.STAGE, [*MODEL, "caption.options.concurrency=many"], "'caption.options.concurrency' expects an integer"),
        (qa.STAGE, [*MODEL, "qa.prompt=cooking_qa.yaml"], "'cooking_qa.yaml' (no such file from "),
        (qa.STAGE, [*MODEL, f"qa.prompt={no_captions}"], "must use $captions"),
        (qa.STAGE, ["caption.model=m"], "qa.backend=openai needs qa.model"),
        (qa.STAGE, ["qa.backend=template"], "qa.categories has ['étape', '食材']"),
        (qa.STAGE, ["qa.backend=template", "qa.categories=[{name: temporal, share: 1}]",
                    "filter.category_shares={}", "qa.template_kinds=[frist_color]"], "frist_color"),
        (caption.STAGE, ["caption.backend=hf", "caption.model=/nonexistent/my-vlm"],
         "model folder not found: /nonexistent/my-vlm"),
        (caption.STAGE, ["caption.backend=annotations", "caption.annotations=/nonexistent.json"],
         "caption.annotations /nonexistent.json does not exist"),
    ]  # fmt: skip


def test_bad_stage_settings_fail_before_the_stage_reads_anything(tmp_path: Path) -> None:
    # The run folder is empty: before, each stage first looked for its upstream shards (and in a
    # real chain found them, hours later) and only then met its own settings.
    for stage, sets, needle in _bad_settings(tmp_path):
        with pytest.raises(LvrError) as info:
            run_datagen_stage(stage, _cfg(*sets), tmp_path / "run", progress=False)  # type: ignore[arg-type]
        assert needle in str(info.value), (sets, str(info.value))
        assert "\n" not in str(info.value)


def test_run_stops_on_a_bad_qa_prompt_before_segmenting(one_video: Path, tmp_path: Path) -> None:
    prompt = _prompt_file(tmp_path, "Clips: $captions\nAsk about $category, for $dish lovers.")
    run = tmp_path / "run"
    sets = [f"input.source={one_video}", CATEGORIES, SHARES, "caption.model=m", "qa.model=m",
            f"qa.prompt={prompt}"]  # fmt: skip
    res = _lvr("datagen", "run", "--run", str(run), "-q", *[a for s in sets for a in ("--set", s)])
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr
    assert "uses $dish, which this stage does not fill" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not run.exists() and "segment:" not in res.stdout  # nothing was segmented


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--set", "filter.policy=my_policy.sql"], "filter policy file my_policy.sql does not exist"),
        (["--pass-rates", "no_pass_rates"], "no_pass_rates is neither a Parquet file nor a table folder (--pass-rates"),
    ],
)  # fmt: skip
def test_run_stops_on_a_missing_filter_file_before_segmenting(
    one_video: Path, tmp_path: Path, args: list[str], needle: str
) -> None:
    # The filter runs last: these used to stop the chain after segment, caption and qa.
    run = tmp_path / "run"
    sets = [f"input.source={one_video}", CATEGORIES, SHARES, "caption.model=m", "qa.model=m"]
    res = _lvr("datagen", "run", "--run", str(run), "-q", *args,
               *[a for s in sets for a in ("--set", s)])  # fmt: skip
    assert res.returncode != 0 and needle in res.stderr and "Traceback" not in res.stderr, (
        res.stderr
    )
    assert not run.exists() and "segment:" not in res.stdout


def test_caption_prompt_and_prompt_text_together_is_an_error() -> None:
    # prompt_text wins, so the prompt file the user named would never be read.
    with pytest.raises(ConfigError, match="caption.prompt .* and caption.prompt_text are both set"):
        _cfg(
            "caption.prompt=my_caption.yaml",
            "caption.prompt_text=Décrivez",
            "caption.prompt_version=v1",
        )


def test_a_category_with_filter_share_zero_is_a_config_error() -> None:
    # filter.sql rejects a category without a positive target share: every question of it would
    # be generated (and paid for) and then rejected.
    with pytest.raises(
        ConfigError, match=r"\['食材'\] have no filter.category_shares entry above 0"
    ):
        _cfg("filter.category_shares={étape: 0.6, 食材: 0}")


def test_set_takes_text_keys_as_written() -> None:
    # Read as YAML, these lost everything from '#', became a mapping, 1.1 and 83 (octal).
    cfg = _cfg("caption.prompt_text=Describe dish #1 in detail: {pan, knife}, price $5",
               "caption.prompt_version=1.10", "qa.model= 0123 ", "filter.seed='quoted: kept'",
               "filter.policy=null", "caption.options.concurrency=4", "qa.seed=7")  # fmt: skip
    assert cfg.caption.prompt_text == "Describe dish #1 in detail: {pan, knife}, price $5"
    assert (cfg.caption.prompt_version, cfg.qa.model) == ("1.10", "0123")
    assert cfg.filter.seed == "quoted: kept" and cfg.filter.policy is None  # YAML quotes, null
    assert cfg.caption.options == {"concurrency": 4} and cfg.qa.seed == 7  # other types: YAML
    with pytest.raises(ConfigError, match=r"expects a list, got \{'0': \{'share': 0.2\}\}"):
        _cfg("qa.categories.0.share=0.2")  # messages show values, not the override's insides


def test_extensions_without_a_dot_still_find_the_videos(one_video: Path, tmp_path: Path) -> None:
    # Before, `[mp4]` made every video an error row ("extension .mp4 is not in input.extensions").
    cfg = _cfg(f"input.source={one_video}", "input.extensions=[MP4, mkv]", "segment.stride_s=2",
               "segment.verify_decode=false")  # fmt: skip
    assert cfg.input.extensions == [".mp4", ".mkv"]
    run_datagen_stage(segment.STAGE, cfg, tmp_path / "run", progress=False)
    videos = read_table(tmp_path / "run" / "videos", "videos").to_pylist()
    assert len(videos) == 1 and videos[0]["error"] is None


def test_yaml_mistakes_name_their_line(tmp_path: Path) -> None:
    # PyYAML's first message line, all that was shown, names no place in the file.
    bad = tmp_path / "cooking.yaml"
    bad.write_text("qa:\n  categories:\n    - name: étape\n      instruction: Ask: why\n")
    with pytest.raises(ConfigError, match=r"line 4, column 23: mapping values .*\(quote a text"):
        load_config(DatagenConfig, bad)
    prompt = _prompt_file(tmp_path, "x")
    prompt.write_text("version: v1\nuser: |\n  ok\n\tbad tab\n")
    with pytest.raises(LvrError, match=r"not valid YAML: line 4, column 1"):
        run_datagen_stage(qa.STAGE, _cfg("qa.model=m", f"qa.prompt={prompt}"), tmp_path / "run")


def test_datagen_help_says_how_to_start_a_domain() -> None:
    from typer.testing import CliRunner

    from lvr.datagen.cli import app

    text = " ".join(CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"}).output.split())
    assert "configs/datagen/sports.yaml" in text and "Adding a domain" in text, text


def test_show_config_keeps_unicode_readable() -> None:
    text = to_yaml(_cfg())
    assert "name: étape" in text and "食材: 0.4" in text and "\\x" not in text and "\\u" not in text
    again = yaml.safe_load(text)
    assert [c["name"] for c in again["qa"]["categories"]] == ["étape", "食材"]


# ---------------------------------------------------------------------------------------------
# The whole chain on the domain's own prompts, through real HTTP on loopback
# ---------------------------------------------------------------------------------------------


def test_domain_prompts_and_categories_reach_the_model_and_the_rows(
    one_video: Path, tmp_path: Path
) -> None:
    caption_text = "Décrivez la scène {poêle, couteau}: prix $5 ou ${x}, 描述烹饪步骤。"
    qa_prompt = _prompt_file(
        tmp_path,
        "Vidéo de $duration s:\n$captions\nCatégorie $category: $instruction\n"
        'Réponds en JSON {"question": ...} avec $fields. Prix en $$.\n$format_rules',
    )
    with fake_server() as server:
        opts = f"{{base_url: '{server.url}', check_model: false, max_retries: 0}}"
        cfg = _cfg(f"input.source={one_video}", "segment.stride_s=2", "caption.model=vlm",
                   "caption.frames=2", f"caption.options={opts}", "caption.prompt_version=cooking-v1",
                   "qa.model=llm", f"qa.options={opts}", "qa.questions_per_video=5",
                   f"qa.prompt={qa_prompt}", caption={"prompt_text": caption_text})  # fmt: skip
        run = tmp_path / "run"
        for stage in (segment.STAGE, caption.STAGE, qa.STAGE):
            run_datagen_stage(stage, cfg, run, progress=False)
        texts = [a.user_text for a in server.log]
    clips = read_table(run / "clips", "clips").num_rows
    captions = read_table(run / "captions", "captions").to_pylist()
    assert clips == 2 and len(captions) == clips and all(c["error"] is None for c in captions)
    # the inline caption prompt is plain text: its $ and braces reach the model as written
    assert sum(t == caption_text for t in texts) == clips, texts
    asked = [t for t in texts if t.startswith("Vidéo de")]
    assert len(asked) == 5 and all("Prix en $." in t and '{"question": ...}' in t for t in asked)
    assert any("Catégorie étape: ordre des gestes {couper → frire}, prix en $" in t for t in asked)
    assert any("Catégorie 食材: which ingredient, and why" in t for t in asked)
    rows = read_table(run / "qa_raw", "qa_raw").to_pylist()
    assert len(rows) == 5  # one row per question slot, error or not
    assert sorted({r["category"] for r in rows}) == ["étape", "食材"]
