"""`fedlora registry list|show|export|verify` on a registry of real tiny-llama peft adapters."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict

from common.config import ModelConfig
from common.keys import generate_coordinator_key, load_coordinator_private
from common.models import load_base
from common.registry import Registry
from common.registry_format import ADAPTER_FILE
from fedlora.registry_cli import main
from server.audit import (
    EVENT_RUN_STARTED,
    EVENT_VERSION_PUBLISHED,
    GENESIS,
    AuditLog,
    audit_mac_key,
    canonical_json,
    entry_hash,
    sha256_hex,
    verify_chain,
)

REPO = Path(__file__).resolve().parent.parent
IDS = torch.tensor([[1, 5, 9, 30, 77, 120]])
MODEL_SECTION = {"device": "cpu", "dtype": "auto", "name": "tiny-llama", "quantize": "none",
                 "seed": 0, "task": "causal-lm"}  # fmt: skip


def _lora(r: int, targets: list[str]) -> LoraConfig:
    return LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=targets, lora_dropout=0.0,
        init_lora_weights=False, task_type="CAUSAL_LM",
    )  # fmt: skip


def _build_run(run: Path) -> dict[str, torch.Tensor]:
    """A run folder: config.json, registry (shared v0..v1, topic v0), audit log MACed under
    keys/coordinator.key (as a simulation leaves them), metrics."""
    base = load_base(ModelConfig(name="tiny-llama", device="cpu"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = get_peft_model(base.model, _lora(4, ["q_proj", "v_proj"]), adapter_name="shared")
        model.add_adapter("topic", _lora(2, ["v_proj"]))
    model.eval()
    with torch.no_grad():
        shared_logits = model(input_ids=IDS).logits
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": MODEL_SECTION}))
    coordinator = load_coordinator_private(generate_coordinator_key(run / "keys"))
    mac_key = audit_mac_key(coordinator.secret_bytes())
    registry, audit = Registry(run / "registry"), AuditLog(run / "audit.jsonl", mac_key)
    audit.append(EVENT_RUN_STARTED, run_id="r1", base_fingerprint=base.fingerprint)
    meta = {"base_fingerprint": base.fingerprint, "rule": "fedavg", "epsilon": None}
    shared = get_peft_model_state_dict(model, adapter_name="shared")
    for module, state, info in (
        ("shared", {k: torch.zeros_like(v) for k, v in shared.items()}, {"round": 0}),
        ("shared", shared, {"round": 1, "cohort": ["site-0", "site-1"], "examples": 80}),
        ("topic", get_peft_model_state_dict(model, adapter_name="topic"), {"epsilon": 2.5}),
    ):
        version = registry.publish(module, state, model.peft_config[module], {**meta, **info})
        sha = version.manifest["sha256"][ADAPTER_FILE]
        audit.append(EVENT_VERSION_PUBLISHED, module=module, version=version.version, sha256=sha)
    lines = [{"round": r, "version": r, "eval_loss": loss} for r, loss in ((0, 3.5), (1, 3.25))]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return {"shared": shared_logits}


@pytest.fixture(scope="module")
def run_once(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    run = tmp_path_factory.mktemp("runs") / "run"
    return run, _build_run(run)


@pytest.fixture
def run(run_once: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> Path:
    """A private copy of the run folder that a test may tamper with."""
    shutil.copytree(run_once[0], tmp_path / "run")
    return tmp_path / "run"


def registry_cli(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_help_explains_the_actions() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fedlora.registry_cli", "export", "--help"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for word in ("--merge", "add_weighted_adapter", "--weights", "PeftModel.from_pretrained"):
        assert word in result.stdout
    top = subprocess.run(
        [sys.executable, "-m", "fedlora.registry_cli", "--help"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    for action in ("list", "show", "export", "verify"):
        assert action in top.stdout


def test_missing_run_folder_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fedlora.registry_cli", "verify", str(tmp_path / "nope")],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stdout.strip() == f"error: {tmp_path / 'nope'}: no such run folder"
    assert "Traceback" not in result.stderr


def test_list_shows_every_version(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = registry_cli(capsys, "list", run)
    assert code == 0
    rows = [line for line in out.splitlines() if "fedavg" in line]
    assert len(rows) == 3
    fingerprint = Registry(run / "registry").get("shared").manifest["base_fingerprint"]
    sha = Registry(run / "registry").get("shared").manifest["sha256"][ADAPTER_FILE]
    assert fingerprint[:12] in rows[1] and sha[:12] in rows[1]
    assert "loss 3.25" in rows[1] and "│ 2 " in rows[1] and "│ 80 " in rows[1]  # metrics.jsonl
    assert "2.5" in rows[2]  # ε of topic
    code, out = registry_cli(capsys, "list", run, "--module", "topic")
    assert code == 0 and "shared" not in out


def test_show_prints_the_manifest(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    registry = Registry(run / "registry")
    for version, number in (("latest", 1), ("v0000", 0), ("1", 1)):
        code, out = registry_cli(capsys, "show", run, "shared", version)
        assert code == 0
        assert json.loads(out) == registry.get("shared", number).manifest


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["show", "{run}", "nope", "0"], "no module 'nope' (modules: shared, topic)"),
        (["show", "{run}", "shared", "9"], "shared: no version 9 (versions: 0, 1)"),
        (["show", "{run}", "shared", "last"], "version 'last': expected a number"),
        (["list", "{tmp}"], "no registry/ folder"),
        (["export", "{run}", "--out", "{tmp}/o"], "exactly one of --module M or --modules"),
        (["export", "{run}", "--module", "shared", "--merge", "--out", "{tmp}/o"], "--merge needs"),
        (["export", "{run}", "--modules", "shared", "--weights", "1", "--out", "{tmp}/o"], "need"),
        (["export", "{run}", "--module", "shared", "--out", "{run}"], "not empty"),
    ],
)
def test_errors_exit_2_with_one_line(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    code, out = registry_cli(capsys, *(a.format(run=run, tmp=tmp_path) for a in args))
    assert code == 2
    assert out.startswith("error: ") and message in out and out.count("\n") == 1


def test_export_one_many_and_merged(
    run: Path, run_once: tuple[Path, dict[str, torch.Tensor]], capsys: pytest.CaptureFixture[str]
) -> None:
    shared_logits = run_once[1]["shared"]  # the in-memory peft model that was published
    code, _ = registry_cli(capsys, "export", run, "--module", "shared", "--out", run / "x1")
    assert code == 0
    model = PeftModel.from_pretrained(_base(), str(run / "x1"))
    torch.testing.assert_close(_logits(model), shared_logits, rtol=0, atol=1e-6)
    code, _ = registry_cli(
        capsys, "export", run, "--modules", "shared:0,topic", "--out", run / "x2"
    )
    assert code == 0 and sorted(p.name for p in (run / "x2").iterdir()) == ["shared", "topic"]
    assert json.loads((run / "x2" / "shared" / "manifest.json").read_text())["version"] == 0
    code, out = registry_cli(
        capsys, "export", run, "--modules", "shared,topic", "--merge", "--weights", "1,0",
        "--out", run / "x3",
    )  # fmt: skip
    assert code == 0, out
    merged = PeftModel.from_pretrained(_base(), str(run / "x3"))
    # Weight 0 for topic: the merged adapter behaves like shared alone.
    torch.testing.assert_close(_logits(merged), shared_logits, rtol=0, atol=1e-5)


def test_verify_ok_and_with_the_model(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = registry_cli(capsys, "verify", run)
    assert code == 0 and out.startswith("OK: 3 version(s) of 2 module(s)")
    assert "audit chain intact" in out
    code, out = registry_cli(capsys, "verify", run, "--model", "tiny-llama")
    assert code == 0 and "matches" in out, out


def test_verify_refuses_another_base(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (run / "config.json").write_text(json.dumps({"model": {**MODEL_SECTION, "seed": 1}}))
    code, out = registry_cli(capsys, "verify", run, "--model", "tiny-llama")
    assert code == 1
    assert out.count("differs from the model's") == 3 and "FAILED: 3 problem(s)" in out


def test_verify_reports_tampering(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tensors = run / "registry" / "topic" / "v0000" / ADAPTER_FILE
    tensors.write_bytes(tensors.read_bytes()[:-1] + b"\x07")
    lines = (run / "audit.jsonl").read_text().splitlines(keepends=True)
    entry = json.loads(lines[1])
    entry["version"] = 5
    lines[1] = json.dumps(entry) + "\n"
    (run / "audit.jsonl").write_text("".join(lines))
    code, out = registry_cli(capsys, "verify", run)
    assert code == 1
    assert "problem: topic/v0000: adapter_model.safetensors SHA-256" in out
    assert "problem: audit.jsonl line 2: hash does not match" in out
    assert "problem: shared/v0000: no version-published entry in audit.jsonl" in out


def test_verify_catches_a_truncated_audit_log(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = (run / "audit.jsonl").read_text().splitlines(keepends=True)
    (run / "audit.jsonl").write_text("".join(lines[:-1]))  # a valid, shorter chain
    (run / "registry" / "shared" / ".v0002.tmp").mkdir()
    code, out = registry_cli(capsys, "verify", run)
    assert code == 1
    assert "warning: shared/.v0002.tmp: leftover temp folder" in out
    assert "problem: topic/v0000: no version-published entry in audit.jsonl" in out


def _rechain(path: Path, edit: dict[str, object], line: int) -> None:
    """Edit one entry and recompute every hash and link after it: a valid chain again."""
    entries = [json.loads(x) for x in path.read_text().splitlines()]
    entries[line].update(edit)
    prev = GENESIS
    for entry in entries:
        entry["prev"] = prev
        entry["hash"] = entry_hash(entry)
        prev = sha256_hex(canonical_json(entry))
    path.write_bytes(b"".join(canonical_json(e) + b"\n" for e in entries))


def test_a_rewritten_audit_chain_fails_verify_under_the_coordinator_key(
    run: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _rechain(run / "audit.jsonl", {"run_id": "forged"}, line=0)
    assert verify_chain(run / "audit.jsonl") == []  # the chain alone cannot tell
    code, out = registry_cli(capsys, "verify", run)  # the run's own keys/coordinator.key
    assert code == 1
    assert "audit.jsonl line 1: has a MAC that does not verify" in out

    another = generate_coordinator_key(tmp_path / "other")  # not the key that wrote the log
    untouched = tmp_path / "untouched"
    _build_run(untouched)
    code, out = registry_cli(capsys, "verify", untouched, "--coordinator-key", another)
    assert code == 1 and out.count("MAC that does not verify") == 4, out

    shutil.rmtree(untouched / "keys")  # no key: the chain is checked, and the user is told
    code, out = registry_cli(capsys, "verify", untouched)
    assert code == 0 and "pass --coordinator-key to check its MACs" in out


def _base() -> torch.nn.Module:
    return load_base(ModelConfig(name="tiny-llama", device="cpu")).model


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits
