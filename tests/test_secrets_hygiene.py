"""Secrets hygiene: private keys are 0600 in 0700 folders and never printed or logged; a whole
federation, logged at DEBUG, leaks neither its training text (a canary planted in one site's
data) nor delta bytes into its logs, metrics, audit log, summary or manifests.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors.torch import load_file

from common.config import PrivacyConfig, config_from_dict
from common.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
CANARY = "CANARY-5e1f-hygiene-do-not-leak"
PEM_BLOCK = re.compile(r"-----BEGIN [A-Z0-9 ]+-----\n(.*?)-----END", re.DOTALL)
# The safetensors metadata tag of every encoded delta: a logged payload would carry it.
DELTA_TAG = "fedlora-delta/1"


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# Runs several ``fedlora -v ...`` commands in one process: importing fedlora.cli (torch, peft,
# Flower) costs seconds, and each command's output is what a user would see on the terminal.
_BATCH = """
import json, os, sys
from fedlora.cli import main
codes = [main(["-v", *argv]) for argv in json.loads(sys.argv[1])]
print("exit codes:", codes)
"""


def fedlora(*commands: list[str], umask: int | None = None) -> tuple[str, list[int]]:
    """Run each ``fedlora -v COMMAND`` in one subprocess; return its stdout + stderr and the
    exit codes."""
    result = subprocess.run(
        [sys.executable, "-c", _BATCH, json.dumps(commands)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        env={**os.environ, "COLUMNS": "200"},
        preexec_fn=None if umask is None else (lambda: os.umask(umask)),
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    codes = json.loads(re.findall(r"exit codes: (\[.*\])", output)[-1])
    return output, codes


def key_secrets(folder: Path) -> list[str]:
    """What a leak of any private key under ``folder`` would look like in text.

    Every base64 line of each PEM block, and the raw key bytes (the last 32 bytes of an
    X25519/Ed25519 PKCS#8 block, the 64-byte seed of an ML-KEM one) as hex and base64.
    """
    found: list[str] = []
    for path in sorted(folder.rglob("*.key")):
        for block in PEM_BLOCK.findall(path.read_text()):
            found += [line for line in block.splitlines() if len(line) >= 16]
            der = base64.b64decode(block)
            for raw in (der[-32:], der[-64:]):
                found += [raw.hex(), base64.b64encode(raw).decode().rstrip("=")[:40]]
    assert found, f"no private keys under {folder}"
    return found


def assert_absent(needles: list[str], text: str, where: str) -> None:
    for needle in needles:
        assert needle not in text, f"{where} leaks {needle[:24]}..."


# ---------------------------------------------------------------------------- key files


@pytest.mark.parametrize("kem", ["x25519", "mlkem768-x25519"])
def test_cli_writes_0600_keys_in_0700_folders_even_with_umask_0(tmp_path: Path, kem: str) -> None:
    coordinator, site = tmp_path / "new" / "coordinator", tmp_path / "new" / "site"
    output, codes = fedlora(
        ["keys", "coordinator", "--out", str(coordinator), "--kem", kem],
        ["keys", "site", "site-a", "--out", str(site)],
        ["keys", "export-public", str(site / "site-a.key"), "--out", str(tmp_path / "a.pub")],
        ["keys", "enroll", "--allow-list", str(tmp_path / "allow.json"), "site-a",
         str(tmp_path / "a.pub")],
        umask=0,
    )  # fmt: skip
    assert codes == [0, 0, 0, 0], output
    for folder in (coordinator, site):
        assert mode_of(folder) == 0o700, folder
    for private in (coordinator / "coordinator.key", site / "site-a.key"):
        assert mode_of(private) == 0o600, private
    assert mode_of(coordinator / "coordinator.pub") & 0o022 == 0  # public, but not writable
    assert "sha256:" in output  # fingerprints of public keys are what gets printed
    assert_absent(key_secrets(tmp_path), output, "fedlora keys output")
    assert_absent(key_secrets(tmp_path), (tmp_path / "allow.json").read_text(), "allow-list")


def test_cli_errors_never_echo_key_material(tmp_path: Path) -> None:
    key = tmp_path / "k" / "site-a.key"
    key.parent.mkdir(mode=0o700)
    key.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key.chmod(0o644)  # exposed
    # A broken key file whose body is a secret: the error names the file, never its bytes.
    broken = tmp_path / "broken.key"
    broken.write_text(f"-----BEGIN PRIVATE KEY-----\n{CANARY}\n-----END PRIVATE KEY-----\n")
    broken.chmod(0o600)
    output, codes = fedlora(
        ["keys", "export-public", str(key), "--out", str(tmp_path / "x.pub")],
        ["keys", "export-public", str(broken), "--out", str(tmp_path / "y.pub")],
    )
    assert codes == [2, 2], output
    assert "readable by group or others" in output and f"chmod 600 {key}" in output
    assert str(broken) in output and "is not a readable key" in output
    assert_absent(key_secrets(tmp_path / "k"), output, "exposed-key error")
    assert CANARY not in output


# ---------------------------------------------------------------------------- configs


def test_unknown_secret_looking_config_key_is_refused_without_echo(tmp_path: Path) -> None:
    data = tmp_path / "rows.jsonl"
    data.write_text('{"instruction": "a", "response": "b"}\n', encoding="utf-8")
    raw = {
        "model": {"name": "tiny-llama"},
        "data": {"path": str(data)},
        "privacy": {"password": CANARY},
    }
    with pytest.raises(ConfigError) as caught:
        config_from_dict(raw)
    assert "privacy.password: unknown key" in str(caught.value)
    assert CANARY not in str(caught.value)


PEM = (
    Ed25519PrivateKey.generate()
    .private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    .decode()
)
PEM_BODY = PEM_BLOCK.findall(PEM)[0].strip()


@pytest.mark.parametrize("key", ["privacy.coordinator-key", "model.name", "train.lr"])
def test_config_embedding_a_secret_is_refused_without_echo(tmp_path: Path, key: str) -> None:
    data = tmp_path / "rows.jsonl"
    data.write_text('{"instruction": "a", "response": "b"}\n', encoding="utf-8")
    raw: dict[str, Any] = {"model": {"name": "tiny-llama"}, "data": {"path": str(data)}}
    section, name = key.split(".")
    raw.setdefault(section, {})[name] = PEM
    with pytest.raises(ConfigError) as caught:
        config_from_dict(raw)
    message = str(caught.value)
    assert key in message and "file" in message
    for line in PEM_BODY.splitlines():
        assert line not in message


# ---------------------------------------------------------------------------- a whole run


def sealed_mode_available() -> bool:
    annotation = PrivacyConfig.model_fields["mode"].annotation
    return "sealed" in typing.get_args(annotation)


def plant_canary(source: Path, target: Path) -> int:
    """Copy the dolly slice with CANARY in every response of one category; return how many."""
    rows = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines()]
    category = rows[0]["category"]
    planted = 0
    for row in rows:
        if row["category"] == category:
            row["response"] = f"{row['response']} {CANARY}"
            row["instruction"] = f"{row['instruction']} ({CANARY})"
            planted += 1
    target.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return planted


def _windows(tensors: Iterable[torch.Tensor]) -> list[bytes]:
    """Windows of 24 bytes at four offsets of each tensor's float32 bytes. Low-entropy windows
    (zeros) are skipped: they would match hashes and counters."""
    windows: list[bytes] = []
    for tensor in tensors:
        raw = tensor.detach().to(torch.float32).contiguous().numpy().tobytes()
        for start in range(0, max(len(raw) - 24, 0), max(len(raw) // 4, 1)):
            window = raw[start : start + 24]
            if len(set(window)) >= 12:
                windows.append(window)
    return windows


def text_markers(windows: list[bytes]) -> list[str]:
    """Text forms of each window: hex, and base64 at each of the three alignments a logged
    payload could put it at."""
    markers: list[str] = []
    for window in windows:
        markers.append(window.hex())
        markers += [base64.b64encode(window[k : k + 18]).decode() for k in range(3)]
    return markers


def tensor_markers(registry: Path) -> list[str]:
    """``text_markers`` of every published tensor (the aggregates)."""
    paths = sorted(registry.rglob("adapter_model.safetensors"))
    return text_markers(_windows(t for p in paths for t in load_file(str(p)).values()))


def site_deltas(canary: dict[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    """Each site's round-1 delta, recomputed in this process (training is deterministic for a
    seed), and checked against the run: their mean, as published (``server.downlink``), is
    version 1, bit for bit.

    What the scan must never find is a single site's delta; the published aggregates are
    meant to be read.
    """
    from client.site import SiteRuntime
    from common.adapter_host import AdapterHost
    from common.config import load_config, site_plan
    from common.data import load_dataset
    from common.partition import site_data
    from common.registry import Registry
    from server.aggregate import Aggregator, SiteDelta
    from server.downlink import Downlink

    cfg = load_config(REPO / "examples" / "tiny.toml", canary["settings"])
    registry = Registry(canary["out"] / "registry")
    v0, v1 = ({f"shared/{k}": t for k, t in registry.load("shared", v).items()} for v in (0, 1))
    dataset = load_dataset(cfg.data)
    host = AdapterHost(cfg.model, cfg.modules, None)
    sites = cfg.federation.sites
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the simulation's workers (one CPU per site)
    try:
        deltas = {}
        for i in range(sites):
            data = site_data(dataset, i, sites, cfg.data)
            site = SiteRuntime(host, data, dataset.kind, f"site-{i}", i)
            deltas[f"site-{i}"] = site.train(v0, site_plan(cfg), server_round=1, version=0)
    finally:
        torch.set_num_threads(threads)
    updates = [SiteDelta(s, u.examples, u.delta) for s, u in deltas.items()]
    mean = Aggregator(cfg).aggregate(v0, updates, server_round=1, version=1)
    # Published as the coordinator does: v0 + the step as sites rebuild it (federation.downlink)
    published = Downlink(cfg.federation.downlink, cfg.privacy.max_payload_bytes).publish(
        1, v0, mean
    )
    assert v1 and all(torch.equal(published[k], v1[k]) for k in v1), "recomputed deltas differ"
    return {site: update.delta for site, update in deltas.items()}


@pytest.fixture(scope="module")
def canary_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("hygiene")
    data = work / "data" / "rows.jsonl"
    data.parent.mkdir()
    planted = plant_canary(REPO / "examples" / "data" / "dolly-tiny.jsonl", data)
    out = work / "run"
    settings = [f"data.path={data}"]
    if sealed_mode_available():  # the default mode once it exists: keys are made under out
        settings.append('privacy.mode="sealed"')
    overrides = [arg for setting in settings for arg in ("--set", setting)]
    command = [sys.executable, "-m", "fedlora.cli", "-v", "simulate", "examples/tiny.toml"]
    result = subprocess.run(
        [*command, "--out", str(out), *overrides],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
        env={**os.environ, "COLUMNS": "200"},
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    return {"out": out, "log": log, "planted": planted, "data": data, "settings": settings}


def text_files(out: Path) -> dict[str, str]:
    """Every file of the run folder a person or tool reads as text."""
    return {
        str(path.relative_to(out)): path.read_text(encoding="utf-8", errors="replace")
        for path in sorted(out.rglob("*"))
        if path.is_file() and path.suffix in (".json", ".jsonl", ".txt", ".log", ".md")
    }


@pytest.mark.slow
@pytest.mark.ray
def test_canary_never_leaves_the_site(canary_run: dict[str, Any]) -> None:
    out, log = canary_run["out"], canary_run["log"]
    assert canary_run["planted"] > 0
    assert CANARY in canary_run["data"].read_text()  # the site's own file, outside the run
    assert "round 3" in log or (out / "summary.json").is_file()
    assert CANARY not in log
    for path in sorted(out.rglob("*")):  # tensors, checkpoint and keys included
        if path.is_file():
            assert CANARY.encode() not in path.read_bytes(), path
    for name in ("metrics.jsonl", "audit.jsonl", "summary.json"):
        assert (out / name).is_file(), name  # so the scan above really covered them


@pytest.mark.slow
@pytest.mark.ray
def test_no_delta_bytes_in_logs_or_text_files(canary_run: dict[str, Any]) -> None:
    out, log = canary_run["out"], canary_run["log"]
    markers = tensor_markers(out / "registry")
    assert len(markers) > 20
    texts = {"captured log": log, **text_files(out)}
    assert any(name.endswith("manifest.json") for name in texts)
    for name, text in texts.items():
        assert DELTA_TAG not in text, name
        assert "tensor([" not in text, name
        assert_absent(markers, text, name)


@pytest.mark.slow
@pytest.mark.ray
def test_no_site_delta_anywhere_in_the_run(canary_run: dict[str, Any]) -> None:
    """No single site's delta, raw or as hex or base64 text, is in any file the run wrote
    (binary ones included: tensors, checkpoint, site stores) or in its log."""
    out = canary_run["out"]
    deltas = site_deltas(canary_run)
    assert len(deltas) == 3
    files = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    files["captured log"] = canary_run["log"].encode()
    assert any(name.endswith("checkpoint.safetensors") for name in files)
    for site, delta in deltas.items():
        windows = _windows(delta.values())
        assert len(windows) >= 2 * len(delta), site  # every tensor is represented
        needles = windows + [marker.encode() for marker in text_markers(windows)]
        for name, data in files.items():
            for needle in needles:
                assert needle not in data, f"{name} holds {site}'s delta"


@pytest.mark.slow
@pytest.mark.ray
def test_run_keys_are_private_and_never_logged(canary_run: dict[str, Any]) -> None:
    out, log = canary_run["out"], canary_run["log"]
    keys = sorted(out.rglob("*.key"))
    if not keys:
        pytest.skip("this run made no key files (privacy mode without keys)")
    for path in keys:
        assert mode_of(path) == 0o600, path
        assert mode_of(path.parent) == 0o700, path.parent
    secrets = key_secrets(out)
    assert_absent(secrets, log, "captured log")
    for path in sorted(out.rglob("*")):
        if path.is_file() and path.suffix != ".key":
            data = path.read_bytes()
            for secret in secrets:
                assert secret.encode() not in data, f"{path} holds a private key"


def test_tensor_markers_find_a_logged_payload(tmp_path: Path) -> None:
    """The marker scan is not vacuous: a payload logged as hex or base64 is caught."""
    from safetensors.torch import save_file

    folder = tmp_path / "registry" / "shared" / "v0001"
    folder.mkdir(parents=True)
    tensor = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    save_file({"a": tensor}, str(folder / "adapter_model.safetensors"))
    markers = tensor_markers(tmp_path / "registry")
    raw = tensor.numpy().tobytes()
    for offset in range(3):  # wherever the tensor sits in the logged payload
        logged = base64.b64encode(b"x" * offset + raw).decode()
        assert any(marker in logged for marker in markers)
    assert any(marker in raw.hex() for marker in markers)
    shutil.rmtree(folder)
