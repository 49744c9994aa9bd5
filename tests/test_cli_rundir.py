"""A start that fails leaves nothing behind: no run folder contents, no scratch folder.

Each case runs the real `fedlora` command; none of them gets as far as a round.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from fedlora.simulate import scratch_folders
from server.rundir import RunDirLock
from tests.helpers.subprocesses import fedlora

REPO = Path(__file__).resolve().parent.parent


def one_error_line(result: subprocess.CompletedProcess[str], *words: str) -> None:
    """rc 2, and the last line of stdout is the error naming ``words``; no traceback."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("error: "), result.stdout
    for word in words:
        assert word in last


@pytest.mark.parametrize("command", [["simulate", "examples/tiny.toml"], ["demo"]])
def test_resume_without_a_run_is_an_error(tmp_path: Path, command: list[str]) -> None:
    missing, empty = tmp_path / "missing", tmp_path / "empty"
    empty.mkdir()
    for out, what in ((missing, "does not exist"), (empty, "holds no run")):
        result = fedlora(*command, "--out", str(out), "--resume")
        one_error_line(result, str(out), what, "nothing to resume")
        assert len(result.stdout.strip().splitlines()) == 1
    assert not missing.exists()
    assert list(empty.iterdir()) == []


@pytest.mark.parametrize(
    ("command", "arguments"),
    [
        ("simulate", ["examples/tiny.toml"]),
        ("demo", []),
        ("compare", ["examples/tiny.toml"]),
        ("report", ["runs/none"]),
        ("keys init", ["--sites", "a"]),
        ("registry export", ["runs/none", "--module", "shared"]),
    ],
)
def test_out_naming_a_file_is_a_usage_error(
    tmp_path: Path, command: str, arguments: list[str]
) -> None:
    out = tmp_path / "notes.txt"
    out.write_text("mine\n")
    result = fedlora(*command.split(), *arguments, "--out", str(out))
    assert result.returncode == 2
    assert "Traceback" not in result.stdout + result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"fedlora {command}: error: argument --out: {out} is a file, not a folder"
    assert out.read_text() == "mine\n"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("data.path=no-such-file.jsonl", ["data.path", "no-such-file.jsonl"]),
        ("model.name=no-such-model", ["model.name", "no-such-model"]),
    ],
)
def test_data_and_model_errors_write_nothing(
    tmp_path: Path, override: str, words: list[str]
) -> None:
    """The data and the model are checked before `.lock`, `keys/` or `config.json` exist."""
    out = tmp_path / "run"
    result = fedlora("simulate", "examples/tiny.toml", "--out", str(out), "--set", override)
    one_error_line(result, *words)
    assert not out.exists()


@pytest.mark.slow
def test_scratch_folder_is_removed_when_the_start_fails(tmp_path: Path) -> None:
    """A failure after the scratch folder exists (here: the run folder is locked)."""
    scratch_parent = tmp_path / "tmp"
    scratch_parent.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("FLWR_HOME", "RAY_TMPDIR")}
    env["TMPDIR"] = str(scratch_parent)
    out = tmp_path / "run"
    with RunDirLock(out):
        result = fedlora("simulate", "examples/tiny.toml", "--out", str(out), env=env)
    one_error_line(result, "in use by another coordinator")
    assert list(scratch_parent.iterdir()) == []
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # the holder's, no keys/


def test_scratch_folders_are_removed_and_unset_on_interrupt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv("FLWR_HOME", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "mine"))
    with pytest.raises(KeyboardInterrupt), scratch_folders():
        flwr_home = Path(os.environ["FLWR_HOME"])
        assert flwr_home.parent.name.startswith("fedlora-")
        assert os.environ["RAY_TMPDIR"] == str(tmp_path / "mine")  # the user's is kept
        raise KeyboardInterrupt
    assert "FLWR_HOME" not in os.environ
    assert os.environ["RAY_TMPDIR"] == str(tmp_path / "mine")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
