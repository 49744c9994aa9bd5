"""Registry: atomic versions, lineage, SHA-256 checks, never overwrite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from peft import LoraConfig

import server.registry as registry_module
from common.errors import RegistryError
from server.registry import ADAPTER_FILE, CONFIG_FILE, MANIFEST_FILE, Registry


def _state(value: float) -> dict[str, torch.Tensor]:
    return {
        "base_model.model.layer.q_proj.lora_A.weight": torch.full((4, 16), value),
        "base_model.model.layer.q_proj.lora_B.weight": torch.zeros(16, 4),
    }


LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])


def test_versions_are_numbered_with_lineage(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    v0 = registry.publish("shared", _state(1.0), LORA, {"round": 0})
    v1 = registry.publish("shared", _state(2.0), LORA, {"round": 1})
    assert (v0.version, v1.version) == (0, 1)
    assert v1.path.name == "v0001"
    assert v1.manifest["parent"] == 0 and v0.manifest["parent"] is None
    assert v1.manifest["round"] == 1
    for name in (ADAPTER_FILE, CONFIG_FILE, MANIFEST_FILE):
        assert (v1.path / name).is_file()
    torch.testing.assert_close(registry.load("shared", 1), _state(2.0))
    assert [v.version for v in registry.versions("shared")] == [0, 1]


def test_tampered_tensor_is_detected(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    version = registry.publish("shared", _state(1.0), LORA, {})
    data = bytearray((version.path / ADAPTER_FILE).read_bytes())
    data[-1] ^= 0x01
    (version.path / ADAPTER_FILE).write_bytes(bytes(data))
    with pytest.raises(RegistryError, match="does not match the manifest"):
        registry.load("shared", 0)


def test_missing_manifest_is_an_error(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    version = registry.publish("shared", _state(1.0), LORA, {})
    (version.path / MANIFEST_FILE).unlink()
    with pytest.raises(RegistryError, match=r"missing manifest\.json"):
        registry.load("shared", 0)


def test_failed_write_leaves_no_version_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = Registry(tmp_path)
    registry.publish("shared", _state(1.0), LORA, {})

    def failing_save(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(registry_module, "save_file", failing_save)
    with pytest.raises(OSError, match="No space left"):
        registry.publish("shared", _state(2.0), LORA, {})
    assert sorted(os.listdir(tmp_path / "shared")) == ["v0000"]


def test_existing_version_is_never_overwritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = Registry(tmp_path)
    registry.publish("shared", _state(1.0), LORA, {})
    # Another writer publishes v0001 between our look-up of the latest version and our rename.
    real_latest = registry.latest
    monkeypatch.setattr(registry, "latest", lambda module: real_latest(module))
    first = registry.publish("shared", _state(2.0), LORA, {})
    monkeypatch.setattr(registry, "latest", lambda module: registry.versions(module)[0])
    with pytest.raises((RegistryError, OSError)):
        registry.publish("shared", _state(3.0), LORA, {})
    torch.testing.assert_close(registry.load("shared", first.version), _state(2.0))
