"""``federation.init-from``: version 0 of a new run is a published version, bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common.adapter_host import AdapterHost
from common.config import RunConfig, load_config
from common.errors import ConfigError
from common.models import load_base
from common.registry import Registry
from common.registry_format import ADAPTER_FILE
from server.init_from import check_init_sources, parse_init_from, read_init_sources
from tests.helpers.in_process import IN_PROCESS

TINY = Path(__file__).resolve().parents[2] / "examples" / "tiny.toml"


def _publish_source(run: Path, cfg: RunConfig) -> Registry:
    """A run folder whose registry holds shared v0 and v1 with non-zero, distinct B factors."""
    host = AdapterHost(cfg.model, {"shared": cfg.modules["shared"]}, None)
    registry = Registry(run / "registry")
    generator = torch.Generator().manual_seed(7)
    manifest = {"base_fingerprint": host.base.fingerprint, "run_id": "source-run"}
    for _ in range(2):
        state = {
            k: torch.randn(v.shape, generator=generator) for k, v in host.initial["shared"].items()
        }
        registry.publish("shared", state, host.loras["shared"], manifest)
    return registry


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("init-from") / "source"
    _publish_source(run, load_config(TINY))
    return run


def _cfg(spec: str, *overrides: str) -> RunConfig:
    return load_config(TINY, [f"federation.init-from='{spec}'", *overrides])


def test_spec_parses_path_module_and_version(source: Path) -> None:
    assert parse_init_from(str(source)) == (source, None, None)
    assert parse_init_from("runs/a:shared") == (Path("runs/a"), "shared", None)
    assert parse_init_from("runs/a:shared:3") == (Path("runs/a"), "shared", 3)
    assert parse_init_from("runs/a:shared:v0003") == (Path("runs/a"), "shared", 3)
    assert parse_init_from("runs/a:shared:latest") == (Path("runs/a"), "shared", None)
    for bad, words in (
        ("runs/a:Sh ared:1", "not a module name"),
        ("runs/a:shared:x", "expected a number"),
        ("a:b:c:d", "expected PATH"),
        (":shared", "expected PATH"),
    ):
        with pytest.raises(ConfigError, match=words):
            parse_init_from(bad)


def test_sources_are_the_published_tensors(source: Path) -> None:
    registry = Registry(source / "registry")
    latest = read_init_sources(_cfg(str(source)))["shared"]
    assert latest.version == 1
    published = load_file(str(source / "registry/shared/v0001" / ADAPTER_FILE))
    assert published and sorted(latest.state) == sorted(published)
    assert all(torch.equal(latest.state[k], published[k]) for k in published)
    first = read_init_sources(_cfg(f"{source / 'registry'}:shared:0"))["shared"]
    assert first.version == 0
    assert first.lineage["sha256"] == registry.get("shared", 0).manifest["sha256"][ADAPTER_FILE]
    assert first.lineage["registry"] == str((source / "registry").resolve())
    assert first.lineage["run_id"] == "source-run"


def test_bad_init_from_is_one_clear_error(source: Path, tmp_path: Path) -> None:
    cases = (
        (str(tmp_path), "holds no fedlora registry"),
        (str(tmp_path / "missing"), "no such folder"),
        (f"{source}:shared:9", r"shared: no version 9 \(versions: 0, 1\)"),
        (f"{source}:other", "the run has no sent module 'other'"),
    )
    for spec, words in cases:
        with pytest.raises(ConfigError, match=rf"federation\.init-from = .*{words}"):
            read_init_sources(_cfg(spec))
    with pytest.raises(ConfigError, match=r"rank, alpha, targets \(4, 8, .*the run's .* \(8, 8"):
        read_init_sources(_cfg(str(source), "modules.shared.rank=8"))


def test_source_from_another_base_is_refused_with_both_fingerprints(source: Path) -> None:
    sources = read_init_sources(_cfg(str(source)))
    old = sources["shared"].base_fingerprint
    new = load_base(load_config(TINY, ["model.seed=1"]).model).fingerprint
    assert old is not None and old != new
    host_initial = {"shared": sources["shared"].state}
    with pytest.raises(ConfigError, match=rf"trained on base {old}, this run's base is {new}"):
        check_init_sources(sources, new, host_initial)
    check_init_sources(sources, old, host_initial)  # the same base: accepted
    wrong = {"shared": {k: v[:1] for k, v in sources["shared"].state.items()}}
    with pytest.raises(ConfigError, match="do not fit the run's module"):
        check_init_sources(sources, old, wrong)


def test_a_bad_start_leaves_no_run_folder(source: Path, tmp_path: Path) -> None:
    from fedlora.simulate import simulate

    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="holds no fedlora registry"):
        simulate(_cfg(str(tmp_path)), out)
    old = read_init_sources(_cfg(str(source)))["shared"].base_fingerprint
    with pytest.raises(ConfigError, match=rf"trained on base {old}, this run's base is [0-9a-f]+"):
        simulate(_cfg(str(source), "model.seed=1"), out)
    assert not out.exists()


@pytest.mark.slow
def test_version_0_of_a_new_run_is_the_source_version(source: Path, tmp_path: Path) -> None:
    from fedlora.simulate import simulate

    out = tmp_path / "run"
    simulate(_cfg(str(source), "federation.rounds=1", IN_PROCESS), out)
    copied = out / "registry/shared/v0000"
    original = source / "registry/shared/v0001"
    # Bit-identical: the same tensors, saved as the same bytes.
    assert (copied / ADAPTER_FILE).read_bytes() == (original / ADAPTER_FILE).read_bytes()
    manifest = json.loads((copied / "manifest.json").read_text())
    assert manifest["init_from"]["version"] == 1 and manifest["init_from"]["module"] == "shared"
    assert manifest["init_from"]["base_fingerprint"] == manifest["base_fingerprint"]
    assert manifest["parent"] is None  # the new run's own lineage starts here
    # Round 1 trained on from there: v0001 differs from its start.
    assert (out / "registry/shared/v0001" / ADAPTER_FILE).read_bytes() != (
        copied / ADAPTER_FILE
    ).read_bytes()
