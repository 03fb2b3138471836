"""User mistakes around `lvr datagen` and `lvr inspect`: one line and a non-zero exit, never a
traceback, never a silent wrong answer, never a user's file touched."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lvr.datagen.sources import (
    SYNTHETIC_MARK,
    InputConfig,
    InputError,
    SyntheticInput,
    render_synthetic,
)

REPO = Path(__file__).resolve().parents[1]


def lvr(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "lvr.cli", *args], env=env, cwd=REPO, text=True,
                          capture_output=True)  # fmt: skip


def one_line(res: subprocess.CompletedProcess[str], needle: str) -> None:
    assert res.returncode != 0, res.stdout + res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    assert needle in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr


# ---------------------------------------------------------------------------------------------
# 2. synthetic videos only go into a folder lvr owns
# ---------------------------------------------------------------------------------------------

_TINY = SyntheticInput(videos=1, duration_s=1.0, width=64, height=48, fps=8.0)


def test_synthetic_rendering_never_writes_into_a_user_folder(tmp_path: Path) -> None:
    mine = tmp_path / "my_videos"
    mine.mkdir()
    (mine / "holiday.mp4").write_bytes(b"not really a video")
    with pytest.raises(InputError, match="holds files lvr did not render"):
        render_synthetic(InputConfig(source=str(mine), synthetic=_TINY), tmp_path / "inputs")
    assert [p.name for p in mine.iterdir()] == ["holiday.mp4"]
    a_file = tmp_path / "list.txt"
    a_file.write_text("x")
    with pytest.raises(InputError, match="is a file"):
        render_synthetic(InputConfig(source=str(a_file), synthetic=_TINY), tmp_path / "inputs")
    # a new folder becomes lvr's (marked), and a second render reuses it
    new = tmp_path / "new" / "videos"
    assert render_synthetic(InputConfig(source=str(new), synthetic=_TINY), tmp_path) == str(new)
    assert (new / SYNTHETIC_MARK).is_file() and len(list(new.glob("*.mp4"))) == 1
    render_synthetic(InputConfig(source=str(new), synthetic=_TINY), tmp_path)
    (new / SYNTHETIC_MARK).unlink()  # a folder of an older lvr: only synthetic names
    render_synthetic(InputConfig(source=str(new), synthetic=_TINY), tmp_path)
    assert (new / SYNTHETIC_MARK).is_file()


def test_demo_config_refuses_a_user_video_folder(tmp_path: Path) -> None:
    mine = tmp_path / "my_videos"
    mine.mkdir()
    (mine / "holiday.mp4").write_bytes(b"x")
    res = lvr("datagen", "run", "--config", "configs/datagen/demo.yaml", "--run",
              str(tmp_path / "run"), "--set", f"input.source={mine}", "-q")  # fmt: skip
    one_line(res, "set input.synthetic.videos=0")
    assert [p.name for p in mine.iterdir()] == ["holiday.mp4"]


# ---------------------------------------------------------------------------------------------
# 4. a stage with no usable row stops the run (non-zero, grouped reasons)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lvr.datagen.synthetic import make_videos

    src = tmp_path_factory.mktemp("videos")
    make_videos(src, 2, seed=3, duration_s=4.0, width=96, height=64, fps=12.0, encoder_threads=1)
    return src


def _api_run(src: Path, run: Path, base_url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    opts = f"{{base_url: '{base_url}', max_retries: 0}}"
    sets = [f"input.source={src}", "segment.stride_s=2", "caption.backend=openai",
            "caption.model=fake-model", "caption.frames=2", f"caption.options={opts}",
            "qa.backend=openai", "qa.model=fake-model", "qa.questions_per_video=2",
            f"qa.options={opts}", "filter.min_reasoning_chars=1", *extra]  # fmt: skip
    return lvr("datagen", "run", "--run", str(run), "-q", *[a for s in sets for a in ("--set", s)])


def test_every_call_failing_is_a_failed_run(two_videos: Path, tmp_path: Path) -> None:
    import json

    from backend_server import fake_server

    from lvr.testing.fake_server import FaultConfig

    with fake_server(faults=FaultConfig(rate=1.0, kinds=("500",))) as server:
        res = _api_run(two_videos, tmp_path / "run", server.url)
    one_line(res, "caption: no usable captions row")
    assert "HTTP 500: injected failure" in res.stderr and "qa:" not in res.stdout
    manifest = json.loads((tmp_path / "run" / "_stages" / "caption" / "manifest.json").read_text())
    assert manifest["errors"]["captions"] == manifest["rows"]["captions"] > 0  # rows are kept


def test_rejected_key_stops_at_once(two_videos: Path, tmp_path: Path) -> None:
    from backend_server import fake_server

    with fake_server(api_key="sk-right-key-123456") as server:
        # the listing (preflight) is off: the first chat request meets the 401
        res = _api_run(two_videos, tmp_path / "run", server.url,
                       "caption.options.preflight=false", "caption.options.api_key=sk-wrong-key-98765")  # fmt: skip
        assert len(server.log) == 0 or len(server.log) <= 4  # not every row was sent
    one_line(res, "rejected the API key")
    assert "api_key" in res.stderr and "sk-wrong-key-98765" not in res.stderr


def test_list_of_missing_videos_is_a_failed_run(tmp_path: Path) -> None:
    listing = tmp_path / "videos.txt"
    listing.write_text(f"{tmp_path / 'gone1.mp4'}\n{tmp_path / 'gone2.mp4'}\n")
    res = lvr("datagen", "run", "--run", str(tmp_path / "run"), "-q", "--set",
              f"input.source={listing}", "--set", "caption.backend=annotations", "--set",
              "caption.annotations=sidecar", "--set", "qa.model=m")  # fmt: skip
    one_line(res, "segment: no usable clips row")


def test_base_url_with_credentials_is_one_line(two_videos: Path, tmp_path: Path) -> None:
    res = _api_run(two_videos, tmp_path / "run", "http://user:hunter2secret@127.0.0.1:9/v1")
    one_line(res, "holds credentials")
    assert "hunter2secret" not in res.stderr + res.stdout and "api_key" in res.stderr


# ---------------------------------------------------------------------------------------------
# 5. tracebacks for user mistakes
# ---------------------------------------------------------------------------------------------


def test_run_that_is_a_file_is_one_line(tmp_path: Path) -> None:
    a_file = tmp_path / "demo.yaml"
    a_file.write_text("x: 1\n")
    one_line(lvr("datagen", "run", "--config", "configs/datagen/demo.yaml", "--run", str(a_file), "-q"),
             "is a file, not a run folder")  # fmt: skip
    one_line(lvr("demo", "--run", str(a_file)), "is a file, not a run folder")
    assert a_file.read_text() == "x: 1\n"


def test_garbage_parquet_in_a_stage_folder_is_one_line(tmp_path: Path) -> None:
    from lvr.artifacts import rows_to_table, write_parquet

    run = tmp_path / "ws"
    row = {"qa_id": "q1", "video_id": "v1", "category": "temporal", "format": "mc",
           "question": "What happens first?", "options": ["a", "b", "c", "d"], "answer": "B"}  # fmt: skip
    write_parquet(run / "qa_raw" / "00000.parquet", rows_to_table([row], "qa_raw"), "qa_raw")
    (run / "qa_raw" / "00001.parquet").write_bytes(b"PAR1 garbage")
    one_line(lvr("datagen", "filter", "--run", str(run)), "not a readable Parquet file")
    one_line(lvr("inspect", str(run / "qa_raw")), "not a readable Parquet file")


# ---------------------------------------------------------------------------------------------
# 6. messages
# ---------------------------------------------------------------------------------------------


def test_messages_name_the_real_cause(tmp_path: Path) -> None:
    one_line(lvr("datagen", "migrate", "--run", str(tmp_path / "nonexist")), "does not exist")
    one_line(lvr("datagen", "filter", "--run", str(tmp_path / "none3")), "lvr datagen qa")


def test_failed_stage_records_failure_in_manifest(two_videos: Path, tmp_path: Path) -> None:
    import json

    from backend_server import fake_server

    with fake_server(api_key="sk-right-key-123456") as server:
        res = _api_run(two_videos, tmp_path / "run", server.url,
                       "caption.options.preflight=false", "caption.options.api_key=sk-wrong-key-98765")  # fmt: skip
    assert res.returncode == 2
    manifest = json.loads((tmp_path / "run" / "_stages" / "caption" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "rejected the API key" in manifest["error"]
    assert "sk-wrong-key-98765" not in json.dumps(manifest)


# ---------------------------------------------------------------------------------------------
# 7. help texts and progress
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [["datagen", "run"], ["datagen", "caption"], ["sft"], ["rl"], ["eval", "run"], ["demo"]],
)
def test_set_help_example_is_valid_for_its_command(command: list[str]) -> None:
    import re

    help_text = " ".join(lvr(*command, "--help").stdout.split())
    example = re.search(r"--set (\S+=\S+)", help_text)
    assert example, help_text
    res = lvr(*command, "--set", example.group(1), "--show-config")
    assert res.returncode == 0, (example.group(1), res.stderr)


def test_help_names_the_current_qa_path() -> None:
    from lvr.eval import benchmarks

    assert "filter/qa" not in " ".join(lvr("eval", "questions", "--help").stdout.split())
    assert "filter/qa" not in (benchmarks.__doc__ or "")


def test_synthetic_rendering_shows_progress(tmp_path: Path) -> None:
    import io

    from rich.console import Console

    console = Console(file=io.StringIO(), force_terminal=True, width=100)
    render_synthetic(InputConfig(source=str(tmp_path / "v"), synthetic=_TINY), tmp_path,
                     progress=True, console=console)  # fmt: skip
    assert "render synthetic videos" in console.file.getvalue()
