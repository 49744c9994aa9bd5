"""Registry: atomic versions, lineage, SHA-256 checks, never overwrite; verify and export."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict

from common.config import ModelConfig
from common.errors import RegistryError
from common.model_card import CARD_FILE
from common.models import LoadedBase, load_base
from common.registry import Registry
from common.registry_export import export, export_many, export_merged
from common.registry_format import ADAPTER_FILE, CONFIG_FILE, MANIFEST_FILE, sha256_file


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

    # The registry imports save_file when it writes (torch stays out of light commands).
    monkeypatch.setattr("safetensors.torch.save_file", failing_save)
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


# ---- verify and export, on real peft adapters of the tiny-llama base -------------------------

IDS = torch.tensor([[1, 5, 9, 30, 77, 120, 200, 3]])
SHARED = LoraConfig(
    r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
    init_lora_weights=False, task_type="CAUSAL_LM",
)  # fmt: skip
TOPIC = LoraConfig(
    r=2, lora_alpha=4, target_modules=["v_proj", "o_proj"], lora_dropout=0.0,
    init_lora_weights=False, task_type="CAUSAL_LM",
)  # fmt: skip


@dataclass
class Built:
    """A registry with shared v0000..v0001 and topic v0000, and the logits they give."""

    root: Path
    fingerprint: str
    logits: dict[str, torch.Tensor]


def tiny_base(seed: int = 0) -> LoadedBase:
    return load_base(ModelConfig(name="tiny-llama", device="cpu", seed=seed))


def logits_of(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def build_registry(root: Path) -> Built:
    """Two peft adapters with random (nonzero) factors on tiny-llama, published like a run."""
    base = tiny_base()
    logits = {"base": logits_of(base.model)}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = get_peft_model(base.model, SHARED, adapter_name="shared")
        model.add_adapter("topic", TOPIC)
    model.eval()
    for name in ("shared", "topic"):
        model.set_adapter(name)
        logits[name] = logits_of(model)
    model.base_model.set_adapter(["shared", "topic"])
    logits["both"] = logits_of(model)
    registry = Registry(root)
    common = {
        "base_fingerprint": base.fingerprint, "base_model": "tiny-llama", "rule": "fedavg",
        "epsilon": None, "privacy": "sealed",
    }  # fmt: skip
    shared = get_peft_model_state_dict(model, adapter_name="shared")
    zeros = {k: torch.zeros_like(v) for k, v in shared.items()}
    registry.publish("shared", zeros, SHARED, {**common, "round": 0, "cohort": [], "examples": 0})
    metrics = {"metrics": {"eval_loss": 1.25}, "cohort": ["site-0", "site-1"], "examples": 80}
    registry.publish("shared", shared, SHARED, {**common, "round": 1, **metrics})
    topic = get_peft_model_state_dict(model, adapter_name="topic")
    registry.publish("topic", topic, TOPIC, {**common, "round": 1, "cohort": ["site-1"]})
    return Built(root, base.fingerprint, logits)


@pytest.fixture(scope="module")
def built_once(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build_registry(tmp_path_factory.mktemp("run") / "registry")


@pytest.fixture
def built(built_once: Built, tmp_path: Path) -> Built:
    """A private copy that a test may tamper with."""
    root = tmp_path / "registry"
    shutil.copytree(built_once.root, root)
    return Built(root, built_once.fingerprint, built_once.logits)


def test_clean_registry_verifies(built: Built) -> None:
    registry = Registry(built.root)
    assert registry.modules() == ["shared", "topic"]
    assert registry.verify() == []
    assert registry.verify("topic", model_fingerprint=built.fingerprint) == []
    assert registry.leftovers() == []
    assert registry.get("shared").version == 1 and registry.get("shared", 0).version == 0


def test_verify_reports_a_tampered_tensor(built: Built) -> None:
    path = built.root / "shared" / "v0001" / ADAPTER_FILE
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.write_bytes(bytes(data))
    problems = Registry(built.root).verify()
    assert len(problems) == 1
    assert problems[0].startswith(f"shared/v0001: {ADAPTER_FILE} SHA-256 ")
    assert "does not match the manifest's" in problems[0]


def test_verify_reports_an_edited_adapter_config(built: Built) -> None:
    # A valid LoRA config with another alpha: peft would apply the same tensors differently.
    path = built.root / "shared" / "v0001" / CONFIG_FILE
    config = json.loads(path.read_text())
    config["lora_alpha"] = 4 * config["lora_alpha"]
    path.write_text(json.dumps(config))
    problems = Registry(built.root).verify()
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"shared/v0001: {CONFIG_FILE} SHA-256 ")


def test_verify_reports_missing_and_broken_files(built: Built) -> None:
    (built.root / "shared" / "v0001" / MANIFEST_FILE).unlink()
    (built.root / "topic" / "v0000" / CONFIG_FILE).write_text("{oops")
    problems = Registry(built.root).verify()
    assert f"shared/v0001: missing {MANIFEST_FILE}" in problems
    assert any(p.startswith(f"topic/v0000: {CONFIG_FILE} does not parse") for p in problems)


def test_verify_reports_a_broken_lineage(built: Built) -> None:
    manifest = built.root / "shared" / "v0001" / MANIFEST_FILE
    value = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**value, "parent": 5}))
    assert Registry(built.root).verify() == ["shared/v0001: parent is 5, expected 0"]
    shutil.rmtree(built.root / "shared" / "v0000")
    problems = Registry(built.root).verify("shared")
    assert "shared/v0000: missing (gap in the lineage)" in problems


def test_verify_reports_a_moved_version(built: Built) -> None:
    (built.root / "shared" / "v0001").rename(built.root / "shared" / "v0002")
    problems = Registry(built.root).verify()
    assert "shared/v0002: manifest version is 1, the folder says 2" in problems
    assert "shared/v0001: missing (gap in the lineage)" in problems


def test_verify_names_both_fingerprints(built: Built) -> None:
    other = "f" * 64
    problems = Registry(built.root).verify(model_fingerprint=other)
    assert len(problems) == 3
    assert problems[0] == (
        f"shared/v0000: base fingerprint {built.fingerprint} (manifest) differs from the "
        f"model's {other}"
    )


def test_leftover_temp_folders_are_warnings(built: Built) -> None:
    (built.root / "shared" / ".v0002.abc123").mkdir()
    shutil.copytree(built.root / "topic" / "v0000", built.root / "topic" / ".v0001.zz")
    registry = Registry(built.root)
    assert registry.verify() == []
    assert registry.leftovers() == [
        "shared/.v0002.abc123: leftover temp folder of a publish (incomplete)",
        "topic/.v0001.zz: leftover temp folder of a publish (complete, never renamed)",
    ]


def test_unknown_module_or_version_is_an_error(built: Built, tmp_path: Path) -> None:
    registry = Registry(built.root)
    with pytest.raises(RegistryError, match=r"no module 'nope' \(modules: shared, topic\)"):
        registry.verify("nope")
    with pytest.raises(RegistryError, match=r"shared: no version 7 \(versions: 0, 1\)"):
        export(registry, "shared", 7, tmp_path / "out")
    with pytest.raises(RegistryError, match="no registry folder"):
        Registry(tmp_path / "missing").verify()


def test_export_loads_with_identical_logits(built: Built, tmp_path: Path) -> None:
    out = export(Registry(built.root), "shared", None, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [ADAPTER_FILE, CONFIG_FILE, MANIFEST_FILE, CARD_FILE]
    )
    assert json.loads((out / CONFIG_FILE).read_text())["base_model_name_or_path"] == "tiny-llama"
    exported = PeftModel.from_pretrained(tiny_base().model, str(out))
    stored = PeftModel.from_pretrained(tiny_base().model, str(built.root / "shared" / "v0001"))
    torch.testing.assert_close(logits_of(exported), built.logits["shared"], rtol=0, atol=1e-6)
    assert torch.equal(logits_of(exported), logits_of(stored))
    assert not torch.allclose(logits_of(exported), built.logits["base"])


def test_export_never_overwrites_and_checks_the_hash(built: Built, tmp_path: Path) -> None:
    registry = Registry(built.root)
    (tmp_path / "empty").mkdir()
    export(registry, "topic", 0, tmp_path / "empty")  # an empty folder is fine
    with pytest.raises(RegistryError, match="not empty"):
        export(registry, "topic", 0, tmp_path / "empty")
    path = built.root / "topic" / "v0000" / ADAPTER_FILE
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    with pytest.raises(RegistryError, match="does not match the manifest"):
        export(registry, "topic", 0, tmp_path / "bad")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "registry"]  # no temp left


def test_export_many_loads_as_named_adapters(built: Built, tmp_path: Path) -> None:
    out = export_many(Registry(built.root), {"shared": None, "topic": 0}, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["shared", "topic"]
    model = PeftModel.from_pretrained(tiny_base().model, str(out / "shared"), adapter_name="shared")
    model.load_adapter(str(out / "topic"), adapter_name="topic")
    model.base_model.set_adapter(["shared", "topic"])
    torch.testing.assert_close(logits_of(model), built.logits["both"], rtol=0, atol=1e-6)


def test_export_merged_cat_equals_both_adapters_active(built: Built, tmp_path: Path) -> None:
    base = tiny_base()
    out = export_merged(
        Registry(built.root), [("shared", None), ("topic", None)], tmp_path / "merged", base
    )
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["r"] == 6 and sorted(config["target_modules"]) == ["o_proj", "q_proj", "v_proj"]
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert [s["module"] for s in manifest["merged_from"]] == ["shared", "topic"]
    assert config["base_model_name_or_path"] == "tiny-llama"  # not the folder it was loaded from
    card = ModelCard.load(out / CARD_FILE)
    assert card.data.library_name == "peft" and "merged shared v0001 + topic v0000" in card.text
    assert (
        manifest["merged_from"][0]["sha256"]
        == Registry(built.root).get("shared").manifest["sha256"][ADAPTER_FILE]
    )
    assert sha256_file(out / ADAPTER_FILE) == manifest["sha256"][ADAPTER_FILE]
    # The base given to export_merged is restored: no LoRA layers left, the same outputs.
    assert not any("lora_" in name for name, _ in base.model.named_modules())
    torch.testing.assert_close(logits_of(base.model), built.logits["base"], rtol=0, atol=0)
    merged = PeftModel.from_pretrained(base.model, str(out))
    torch.testing.assert_close(logits_of(merged), built.logits["both"], rtol=0, atol=1e-5)


def test_export_merged_weights_and_svd(built: Built, tmp_path: Path) -> None:
    registry = Registry(built.root)
    selection = {"shared": 1, "topic": 0}
    half = export_merged(registry, selection, tmp_path / "half", tiny_base(), weights=[0.5, 0.5])
    full_rank = export_merged(
        registry, selection, tmp_path / "svd6", tiny_base(), combination_type="svd", svd_rank=6
    )
    small = export_merged(
        registry, selection, tmp_path / "svd", tiny_base(), combination_type="svd"
    )
    assert json.loads((small / CONFIG_FILE).read_text())["r"] == 4
    outputs = {
        name: logits_of(PeftModel.from_pretrained(tiny_base().model, str(folder)))
        for name, folder in (("half", half), ("svd6", full_rank), ("svd", small))
    }
    # The sum of two rank <= 4 and 2 deltas has rank <= 6: an SVD at rank 6 loses nothing.
    torch.testing.assert_close(outputs["svd6"], built.logits["both"], rtol=0, atol=1e-4)
    assert not torch.allclose(outputs["half"], built.logits["both"], atol=1e-4)
    assert torch.isfinite(outputs["svd"]).all()


def test_export_merged_refusals(built: Built, tmp_path: Path) -> None:
    registry = Registry(built.root)
    with pytest.raises(RegistryError, match=r"differs from the model's"):
        export_merged(registry, {"shared": None, "topic": None}, tmp_path / "a", tiny_base(seed=1))
    with pytest.raises(RegistryError, match="2 weights for 1 modules"):
        export_merged(registry, {"shared": None}, tmp_path / "b", tiny_base(), weights=[1, 2])
    head = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"])
    state = {**_state(1.0), "base_model.model.lm_head.weight": torch.zeros(2, 2)}
    registry.publish("head", state, head, {"base_fingerprint": built.fingerprint})
    with pytest.raises(RegistryError, match="modules_to_save"):
        export_merged(registry, {"shared": None, "head": None}, tmp_path / "c", tiny_base())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["registry"]


# ---- portable adapters: the base's portable name and the model card ---------------------------


def test_publish_records_the_portable_base_name_and_a_card(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry")
    local = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])
    local.base_model_name_or_path = str(tmp_path)  # what peft fills in: the loaded folder
    facts = {
        "base_fingerprint": "ab" * 32, "rule": "ffa", "round": 3, "privacy": "secure-sum",
        "cohort": ["site-a", "site-b", "site-c"], "base_license": "apache-2.0",
        "data_license": "cc-by-sa-3.0", "labels": ["secret-label"],
    }  # fmt: skip
    hub = registry.publish("shared", _state(1.0), local, {**facts, "base_model": "org/base"})
    folder = registry.publish("shared", _state(1.0), local, {**facts, "base_model": str(tmp_path)})
    assert local.base_model_name_or_path == str(tmp_path)  # the caller's config is not edited
    assert json.loads((hub.path / CONFIG_FILE).read_text())["base_model_name_or_path"] == "org/base"
    assert json.loads((folder.path / CONFIG_FILE).read_text())["base_model_name_or_path"] is None
    card = ModelCard.load(hub.path / CARD_FILE)
    assert card.data.base_model == "org/base" and card.data.library_name == "peft"
    assert card.data.license == "apache-2.0"
    facts_shown = (
        "ab" * 32, "| aggregation rule | ffa |", "| federated rounds | 3 |",
        "| sites in the round | 3 |", "| data licence | cc-by-sa-3.0 |", "secure-sum",
    )  # fmt: skip
    for fact in facts_shown:
        assert fact in card.text, fact
    for secret in ("site-a", "site-b", "secret-label"):  # never the sites or their data
        assert secret not in card.content
    assert str(tmp_path) not in (folder.path / CARD_FILE).read_text()
    assert registry.verify() == []  # the card is not among the hashed files


def test_exported_card_carries_the_rounds_global_metrics(built: Built, tmp_path: Path) -> None:
    line = {
        "version": 1, "round": 1, "train_loss": 2.5, "eval_loss": 1.25, "eval_accuracy": None,
        "sites": {"site-0": {"evaluate": {"eval_loss": 9.0}}},
    }  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text(json.dumps(line) + "\n")
    out = export(Registry(built.root), "shared", None, tmp_path / "out")
    card = ModelCard.load(out / CARD_FILE)
    assert "| evaluation loss | 1.2500 |" in card.text
    assert "| train loss (mean over sites) | 2.5000 |" in card.text
    assert "accuracy" not in card.text and "site-0" not in card.text and "9.0" not in card.text
    assert "`tiny-llama` (fedlora alias)" in card.text


def test_export_makes_an_older_versions_local_base_path_portable(
    built: Built, tmp_path: Path
) -> None:
    """A version published before configs recorded the portable name names a local folder."""
    version = built.root / "shared" / "v0001"
    config = json.loads((version / CONFIG_FILE).read_text())
    config["base_model_name_or_path"] = "/home/someone/.cache/fedlora/tiny"
    (version / CONFIG_FILE).write_text(json.dumps(config))
    manifest = json.loads((version / MANIFEST_FILE).read_text())
    manifest["sha256"][CONFIG_FILE] = sha256_file(version / CONFIG_FILE)
    (version / MANIFEST_FILE).write_text(json.dumps(manifest))
    out = export(Registry(built.root), "shared", 1, tmp_path / "out")
    exported = json.loads((out / CONFIG_FILE).read_text())
    assert exported["base_model_name_or_path"] == "tiny-llama"
    copied = json.loads((out / MANIFEST_FILE).read_text())
    assert copied["sha256"][CONFIG_FILE] == sha256_file(out / CONFIG_FILE)
    assert "/home/someone" not in "".join(p.read_text() for p in out.glob("*.json"))
    PeftModel.from_pretrained(tiny_base().model, str(out))  # stock peft still loads it
