"""`fedlora keys ...`: files written with the right modes, paths printed, key material never."""

from __future__ import annotations

import argparse
import base64
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from common.allow_list import load_allow_list
from common.keys import KEMS, load_coordinator_private, load_site_public
from fedlora.keys_cli import add_keys_parser, run_keys

REPO = Path(__file__).resolve().parent.parent
# `fedlora keys` alone in a fresh interpreter (the full CLI imports torch and Flower).
ENTRY = (
    "import argparse, sys\n"
    "from fedlora.keys_cli import add_keys_parser, run_keys\n"
    "parser = argparse.ArgumentParser(prog='fedlora')\n"
    "add_keys_parser(parser.add_subparsers(dest='command', required=True))\n"
    "sys.exit(run_keys(parser.parse_args()))\n"
)


def keys_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", ENTRY, "keys", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """Run a keys command in-process; return the exit code and everything printed."""
    parser = argparse.ArgumentParser(prog="fedlora")
    add_keys_parser(parser.add_subparsers(dest="command", required=True))
    code = run_keys(parser.parse_args(["keys", *args]))
    out, err = capsys.readouterr()
    return code, out + err


def secrets_in(folder: Path) -> list[str]:
    """Every private key's PEM lines and raw bytes (hex) under ``folder``."""
    found = []
    for path in folder.rglob("*.key"):
        text = path.read_text()
        found += [line for line in text.splitlines() if line and not line.startswith("-----")]
        for block in re.findall(r"-----BEGIN [A-Z ]+-----\n(.*?)-----END", text, re.DOTALL):
            found.append(base64.b64decode(block)[-32:].hex())
    return found


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_help_explains_the_files() -> None:
    result = keys_cli("--help")
    assert result.returncode == 0, result.stderr
    for text in ("coordinator.key", "coordinator.pub", "SITE.key", "allow-list", "0600"):
        assert text in result.stdout
    for command in ("coordinator", "site", "export-public", "enroll", "init", "add-site"):
        assert command in result.stdout
    assert "mlkem768-x25519" in keys_cli("coordinator", "--help").stdout


@pytest.mark.parametrize("kem", KEMS)
def test_whole_enrollment_flow(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kem: str
) -> None:
    coordinator, site = tmp_path / "coordinator", tmp_path / "site"
    outputs = []
    for args in (
        ["coordinator", "--out", str(coordinator), "--kem", kem],
        ["site", "hospital-a", "--out", str(site)],
        ["export-public", str(site / "hospital-a.key"), "--out", str(tmp_path / "sent.pub")],
        ["enroll", "--allow-list", str(coordinator / "allow.json"), "hospital-a",
         str(tmp_path / "sent.pub")],
    ):  # fmt: skip
        code, output = run(capsys, *args)
        assert code == 0, output
        outputs.append(output)
    assert str(coordinator / "coordinator.key") in outputs[0] and kem in outputs[0]
    assert str(site / "hospital-a.pub") in outputs[1] and "sha256:" in outputs[1]
    # The fingerprint printed when enrolling is the one the site printed: compare out of band.
    site_fingerprint = re.findall(r"sha256:[0-9a-f]{64}", outputs[1])[-1]
    assert site_fingerprint in outputs[3]
    assert mode_of(coordinator / "coordinator.key") == mode_of(site / "hospital-a.key") == 0o600
    assert load_coordinator_private(coordinator / "coordinator.key").kem == kem
    allow = load_allow_list(coordinator / "allow.json")
    expected = load_site_public(site / "hospital-a.pub").public_bytes_raw()
    assert allow.public_key("hospital-a").public_bytes_raw() == expected
    printed = "".join(outputs)
    for secret in secrets_in(tmp_path):
        assert secret not in printed


def test_errors_are_one_line_without_key_material(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _ = run(capsys, "site", "site-a", "--out", str(tmp_path))
    assert code == 0
    key = tmp_path / "site-a.key"
    key.chmod(0o644)
    code, output = run(capsys, "export-public", str(key), "--out", str(tmp_path / "x.pub"))
    assert code == 2 and f"chmod 600 {key}" in output and "Traceback" not in output
    key.chmod(0o600)
    code, output = run(capsys, "site", "site-a", "--out", str(tmp_path))
    assert code == 2 and "already exists" in output
    missing = tmp_path / "missing.pub"
    code, output = run(
        capsys, "enroll", "--allow-list", str(tmp_path / "a.json"), "s", str(missing)
    )
    assert code == 2 and str(missing) in output
    code, output = run(
        capsys, "enroll", "--allow-list", str(tmp_path / "a.json"), "bad/id", str(key)
    )
    assert code == 2 and "invalid site id" in output
    for secret in secrets_in(tmp_path):
        assert secret not in output


def test_enroll_replace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    allow = str(tmp_path / "allow.json")
    for folder in ("old", "new"):
        assert run(capsys, "site", "site-a", "--out", str(tmp_path / folder))[0] == 0
    assert (
        run(capsys, "enroll", "--allow-list", allow, "site-a", str(tmp_path / "old/site-a.pub"))[0]
        == 0
    )
    code, output = run(
        capsys, "enroll", "--allow-list", allow, "site-a", str(tmp_path / "new/site-a.pub")
    )
    assert code == 2 and "--replace" in output
    code, _ = run(
        capsys,
        "enroll",
        "--allow-list",
        allow,
        "site-a",
        str(tmp_path / "new/site-a.pub"),
        "--replace",
    )
    assert code == 0


def test_real_process_writes_a_0600_key(tmp_path: Path) -> None:
    result = keys_cli("site", "hospital-b", "--out", str(tmp_path / "k"))
    assert result.returncode == 0, result.stderr
    assert str(tmp_path / "k" / "hospital-b.key") in result.stdout
    assert mode_of(tmp_path / "k" / "hospital-b.key") == 0o600
    for secret in secrets_in(tmp_path):
        assert secret not in result.stdout + result.stderr
    bad = keys_cli("coordinator", "--out", str(tmp_path), "--kem", "rsa")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_deployment_init_and_add_site(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "deploy"
    code, output = run(capsys, "init", "--out", str(out), "--sites", "a,b", "--san", "127.0.0.1")
    assert code == 0, output
    assert mode_of(out / "sites" / "a" / "supernode.key") == 0o600
    assert list(load_allow_list(out / "coordinator" / "allow-list.json")) == ["a", "b"]
    code, output = run(capsys, "init", "--out", str(out), "--sites", "c")
    assert code == 2 and "keys add-site" in output
    code, output = run(capsys, "add-site", "--out", str(out), "c")
    assert code == 0 and (out / "sites" / "c" / "c.key").is_file(), output
    code, output = run(capsys, "add-site", "--out", str(out), "a")
    assert code == 2 and "--replace" in output
    before = (out / "sites" / "a" / "a.pub").read_bytes()
    assert run(capsys, "add-site", "--out", str(out), "a", "--replace")[0] == 0
    assert (out / "sites" / "a" / "a.pub").read_bytes() != before
    printed = capsys.readouterr().out + output
    for secret in secrets_in(out):
        assert secret not in printed
