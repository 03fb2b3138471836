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
