"""The command line: error paths print one line and leave no output; help lists the commands.

Run both in-process (typer's CliRunner) and through the installed console
scripts, since the scripts are what users type and their entry points are
where a missing import or a stray traceback would show.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import CLIPS
from wruntime.cli import app, transcribe_app

JFK = CLIPS["jfk"][0]
runner = CliRunner()


def _bad_inputs(tmp_path: Path) -> dict[str, Path]:
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio" * 10)
    empty = tmp_path / "empty.flac"
    empty.write_bytes(b"")
    folder = tmp_path / "folder.wav"
    folder.mkdir()
    return {
        "missing": tmp_path / "missing.wav",
        "directory": folder,
        "corrupt": corrupt,
        "empty": empty,
    }


def _one_error_line(stderr: str, name: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and name in lines[0], lines[0]
    assert "Traceback" not in stderr


@pytest.mark.parametrize("kind", ["missing", "directory", "corrupt", "empty"])
def test_bad_file_in_process(tmp_path: Path, kind: str) -> None:
    path = _bad_inputs(tmp_path)[kind]
    out_dir = tmp_path / "out"
    result = runner.invoke(transcribe_app, [str(path), "-o", str(out_dir)])
    assert result.exit_code == 1
    _one_error_line(result.stderr, path.name)
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_all_bad_files_are_reported(tmp_path: Path) -> None:
    bad = _bad_inputs(tmp_path)
    result = runner.invoke(transcribe_app, [*map(str, bad.values()), "-o", str(tmp_path / "o")])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == len(bad)
    for line, path in zip(lines, bad.values(), strict=True):
        assert line.startswith(f"error: {path}: ")


def test_unknown_model_is_one_line(tmp_path: Path) -> None:
    result = runner.invoke(
        transcribe_app, [str(JFK), "--model", "nosuch-fp16", "-o", str(tmp_path)]
    )
    assert result.exit_code == 1
    _one_error_line(result.stderr, "nosuch-fp16")
    assert os.listdir(tmp_path) == []


def test_bad_option_value_is_a_usage_error(tmp_path: Path) -> None:
    result = runner.invoke(transcribe_app, [str(JFK), "--output-format", "docx"])
    assert result.exit_code == 2
    assert "docx" in result.output + result.stderr


def test_wruntime_help_lists_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("transcribe", "build", "list", "inspect", "remove"):
        assert command in result.stdout
    sub = runner.invoke(app, ["transcribe", "--help"], env={"COLUMNS": "200"})
    assert sub.exit_code == 0
    for option in ("--model", "--word-timestamps", "--output-format", "--encoder-units"):
        assert option in sub.stdout


def test_wruntime_transcribe_reports_like_wtranscribe(tmp_path: Path) -> None:
    missing = tmp_path / "nope.flac"
    result = runner.invoke(app, ["transcribe", str(missing)])
    assert result.exit_code == 1
    _one_error_line(result.stderr, "nope.flac")


# ---------------------------------------------------------------- installed console scripts


def _script(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail(f"console script {name} is not installed (pip install -e .)")
    return found


@pytest.mark.parametrize("kind", ["missing", "directory", "corrupt"])
def test_console_script_bad_file(tmp_path: Path, kind: str) -> None:
    path = _bad_inputs(tmp_path)[kind]
    out_dir = tmp_path / "out"
    proc = subprocess.run(
        [_script("wtranscribe"), str(path), "-o", str(out_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    _one_error_line(proc.stderr, path.name)
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_console_script_unknown_model(tmp_path: Path) -> None:
    proc = subprocess.run(
        [_script("wtranscribe"), str(JFK), "--model", "whisper-huge-fp7", "-o", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    _one_error_line(proc.stderr, "whisper-huge-fp7")
    assert os.listdir(tmp_path) == []


def test_console_script_wruntime_inspect_unknown(tmp_path: Path) -> None:
    proc = subprocess.run(
        [_script("wruntime"), "inspect", "nosuch-fp16"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr


# ---------------------------------------------------------------- with the real model


def test_good_file_is_written_though_another_fails(tmp_path: Path, test_home: Path) -> None:
    out_dir = tmp_path / "out"
    missing = tmp_path / "missing.wav"
    result = runner.invoke(
        transcribe_app,
        [str(missing), str(JFK), "-o", str(out_dir), "-f", "all", "--beam-size", "0", "--profile"],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 1  # one file failed
    _one_error_line(result.stderr, "missing.wav")
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        f"jfk.{ext}" for ext in ("txt", "srt", "vtt", "tsv", "json")
    )
    text = (out_dir / "jfk.txt").read_text(encoding="utf-8").lower()
    assert "ask not what your country can do for you" in text
    assert "[00:00.000 -->" in result.stdout  # segments stream to stdout
    assert "encoder" in result.stdout and "RTF" in result.stdout  # --profile table
