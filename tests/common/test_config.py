"""Config parsing: every bad input is one ConfigError that names the key."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from common.config import RunConfig, SitePlan, load_config, parse_override, site_plan
from common.errors import ConfigError, RegistryError
from common.registry import Registry

MINIMAL = """
[model]
name = "tiny-llama"
[data]
path = "data.jsonl"
"""


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    (tmp_path / "data.jsonl").write_text('{"instruction": "a", "response": "b"}\n')
    path = tmp_path / "run.toml"
    path.write_text(MINIMAL)
    return path


def test_minimal_config_gets_defaults_and_resolves_paths(config_file: Path) -> None:
    cfg = load_config(config_file)
    assert isinstance(cfg, RunConfig)
    assert cfg.data.path == config_file.parent / "data.jsonl"
    assert cfg.modules["shared"].rank == 8
    assert cfg.privacy.mode == "sealed"  # the default: only sealed deltas leave a site


def test_examples_parse(examples_dir: Path) -> None:
    for name in ("tiny.toml", "demo.toml", "banking77.toml"):
        cfg = load_config(examples_dir / name)
        assert cfg.federation.sites >= 3, name


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ("[train]\nlocal-stpes = 3\n", "train.local-stpes"),
        ("[modules.shared]\nrank = 0\n", "modules.shared.rank"),
        ("[modules.shared]\nrank = -4\n", "modules.shared.rank"),
        ("[train]\nlr = 0\n", "train.lr"),
        ("[federation]\nsites = 0\n", "federation.sites"),
        ("[model]\ntask = 'translation'\n", "model.task"),
        ("[data]\npartition = 'by-column'\n", "data"),
        ("[federation]\nsites = 2\nmin-sites = 3\n", "federation"),
        ("[privacy]\nmode = 'telepathy'\n", "privacy.mode"),
        ("[modules.Other]\nrank = 4\n", "modules.Other: a module name is lowercase"),
        ('[modules.other]\nscope = "group:qa"\n', "no [groups] entry 'qa'"),
        ('[modules.other]\nscope = "team"\n', "expected 'shared', 'private' or 'group:<name>'"),
        ('[modules.shared]\nscope = "private"\n', "every module is private"),
        ("[modules.shared.site-ranks]\nsite-1 = 4\n", "need aggregation.rule = 'exact'"),
        ("[nonsense]\nx = 1\n", "nonsense"),
        ("[aggregation]\nrule = 'exact'\nserver-optimizer = 'fedadam'\n", "server-optimizer"),
        ("[aggregation]\nrule = 'median'\n", "aggregation.rule"),
        ("[privacy]\nmode = 'secure-sum'\n[aggregation]\nrule = 'exact'\n", "sum-only rule"),
        ("[privacy]\nmode = 'secure-sum'\n[federation]\nsites = 2\n", "sites >= 3"),
        ("[privacy]\nencoding = 'int2'\n", "privacy.encoding"),
        (
            "[privacy]\nmode = 'secure-sum'\nencoding = 'int4'\n",
            "privacy.encoding = 'int4' applies to privacy.mode 'sealed' and 'none' only",
        ),
        ("[privacy]\nmode = 'secure-sum'\nencoding = 'int8-block'\n", "fixed-point levels"),
        ("[privacy]\nmode = 'secure-sum'\nencoding = 'int8'\n", "privacy.secure-sum.clip-range"),
        ("[privacy.dp]\nenabled = true\nplacement = 'distributed'\n", "placement"),
        ("[privacy.dp]\nenabled = true\nclip = 0\n", "privacy.dp.clip"),
    ],
)
def test_bad_values_name_the_key(config_file: Path, extra: str, key: str) -> None:
    text = MINIMAL.replace("[model]", "[model]", 1)
    # Merge the extra section into the file (TOML forbids repeating a table).
    merged = _merge(text, extra)
    config_file.write_text(merged)
    with pytest.raises(ConfigError) as err:
        load_config(config_file)
    assert key in str(err.value)
    assert str(config_file) in str(err.value)


def _merge(base: str, extra: str) -> str:
    header = extra.splitlines()[0]
    if header in base:
        return base.replace(header, extra.rstrip("\n"), 1)
    return base + extra


def test_missing_data_file_names_key(config_file: Path) -> None:
    (config_file.parent / "data.jsonl").unlink()
    with pytest.raises(ConfigError, match=r"data\.path: file not found"):
        load_config(config_file)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")


def test_invalid_toml(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[model\nname=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)


def test_overrides_are_typed(config_file: Path) -> None:
    cfg = load_config(
        config_file,
        [
            "federation.sites=10",
            "train.lr=1e-4",
            "modules.shared.targets=['q_proj']",
            "data.partition=iid",
        ],
    )
    assert cfg.federation.sites == 10
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.modules["shared"].targets == ["q_proj"]
    assert cfg.data.partition == "iid"


def test_override_errors(config_file: Path) -> None:
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        parse_override("federation.sites")
    with pytest.raises(ConfigError, match="must name a section"):
        parse_override("sites=3")
    with pytest.raises(ConfigError, match=r"federation\.sites"):
        load_config(config_file, ["federation.sites=many"])


def test_site_plan_roundtrips_as_json(config_file: Path) -> None:
    cfg = load_config(config_file, ["train.local-steps=7"])
    plan = site_plan(cfg)
    again = type(plan).model_validate_json(plan.model_dump_json(by_alias=True))
    assert again == plan
    assert again.train.local_steps == 7


@pytest.mark.parametrize("encoding", ["int8-block", "int4"])
def test_block_encodings_are_sent_to_sites_in_sealed_and_plain_modes(
    config_file: Path, encoding: str
) -> None:
    for mode in ("sealed", "none"):
        cfg = load_config(config_file, [f"privacy.mode='{mode}'", f"privacy.encoding='{encoding}'"])
        assert site_plan(cfg).encoding == encoding


def test_dp_with_exact_rule_is_refused(config_file: Path) -> None:
    config_file.write_text(
        MINIMAL + "[aggregation]\nrule = 'exact'\n[privacy.dp]\nenabled = true\n"
    )
    with pytest.raises(ConfigError, match="exact"):
        load_config(config_file)


def test_missing_key_file_names_key(config_file: Path) -> None:
    config_file.write_text(MINIMAL + "[privacy]\ncoordinator-key = 'nope.key'\n")
    with pytest.raises(ConfigError, match=r"privacy\.coordinator-key: file not found"):
        load_config(config_file)


@pytest.mark.parametrize(
    ("where", "name"),
    [
        ("module", "/etc/fedlora"),
        ("module", "../outside"),
        ("module", "Shared"),
        ("group", "../g"),
        ("site", "../site-0"),
        ("site", "/abs"),
    ],
)
def test_site_refuses_a_plan_with_a_name_that_is_a_path(
    config_file: Path, where: str, name: str
) -> None:
    """A site parses the coordinator's plan with SitePlan; names there become folder names."""
    plan = json.loads(site_plan(load_config(config_file)).model_dump_json())
    if where == "module":
        plan["modules"][name] = plan["modules"].pop("shared")
    elif where == "group":
        plan["groups"] = {name: ["site-0"]}
    else:
        plan["groups"] = {"g": [name]}
    with pytest.raises(ValidationError, match=re.escape(name)):
        SitePlan.model_validate_json(json.dumps(plan))


def test_registry_refuses_a_module_folder_outside_it(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry")
    for name in ("/etc", "..", "a/b", ""):
        with pytest.raises(RegistryError, match="not a module name"):
            registry.module_dir(name)
    assert registry.module_dir("shared") == tmp_path / "registry" / "shared"


def test_error_feedback_is_on_for_quantised_uplinks_without_dp(examples_dir: Path) -> None:
    tiny = examples_dir / "tiny.toml"

    def plan(*overrides: str) -> bool:
        return site_plan(load_config(tiny, list(overrides))).error_feedback

    assert plan("privacy.encoding='int4'") and plan("privacy.encoding='int8'")
    assert not plan("privacy.encoding='fp16'") and not plan()
    dp = ["privacy.dp.enabled=true", "privacy.dp.noise-multiplier=1.0", "privacy.dp.clip=0.5"]
    assert not plan("privacy.encoding='int4'", *dp)  # unset: off with DP
    assert not plan("privacy.encoding='int4'", "privacy.error-feedback=false")
    with pytest.raises(ConfigError, match=r"needs a quantised privacy\.encoding"):
        load_config(tiny, ["privacy.error-feedback=true"])
    with pytest.raises(ConfigError, match=r"cannot be used with privacy\.dp"):
        load_config(tiny, ["privacy.encoding='int4'", "privacy.error-feedback=true", *dp])
