"""The `fedlora` command as a user runs it (a real subprocess)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers.subprocesses import fedlora

REPO = Path(__file__).resolve().parent.parent


def test_help_explains_commands() -> None:
    result = fedlora("--help")
    assert result.returncode == 0
    for command in ("simulate", "demo", "fingerprint"):
        assert command in result.stdout
    sim = fedlora("simulate", "--help")
    assert "--set" in sim.stdout and "metrics.jsonl" in sim.stdout


def test_fingerprint_prints_digest_last() -> None:
    first = fedlora("fingerprint", "tiny-llama")
    second = fedlora("fingerprint", "tiny-llama")
    assert first.returncode == 0, first.stderr
    digest = first.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert second.stdout.strip().splitlines()[-1] == digest
    other = fedlora("fingerprint", "tiny-llama", "--seed", "1")
    assert other.stdout.strip().splitlines()[-1] != digest


def test_bad_config_is_one_clear_error(tmp_path: Path) -> None:
    result = fedlora(
        "simulate", "examples/tiny.toml", "--out", str(tmp_path), "--set", "modules.shared.rank=0"
    )
    assert result.returncode == 2
    assert "modules.shared.rank" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "registry").exists()


@pytest.mark.parametrize(
    ("override", "key"),
    [("federation.sites=1000", "federation.sites"), ("model.name=no-such-model", "no-such-model")],
)
def test_impossible_run_fails_before_training(tmp_path: Path, override: str, key: str) -> None:
    result = fedlora("simulate", "examples/tiny.toml", "--out", str(tmp_path), "--set", override)
    assert result.returncode == 2, result.stdout + result.stderr
    assert key in result.stdout
    assert not (tmp_path / "registry").exists()
