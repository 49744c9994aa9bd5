"""Deployment pieces without processes: provisioning, configs, commands, site checks, the FAB."""

from __future__ import annotations

import io
import json
import stat
import zipfile
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from client.deploy_app import check_site_groups, run_label_names
from common.allow_list import load_allow_list
from common.config import (
    RunConfig,
    config_from_dict,
    load_config,
    parse_override,
    read_toml,
    resolve_paths,
    site_plan,
)
from common.errors import ConfigError
from common.keys import KeyMaterialError, load_site_public
from common.roster import parse_roster
from common.site_config import load_coordinator_config, load_site_config
from fedlora.deploy import _run_config_arg, stage_app, superlink_command, unfinished_run
from fedlora.deploy_keys import Layout, enroll_site, init_deployment, site_keygen
from fedlora.deploy_site import SiteCheckError, check_keys, check_site, supernode_command
from server.deploy_app import DeployedRun
from server.federation import run_labels

REPO = Path(__file__).resolve().parent.parent
SITES = ["a", "b"]


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return init_deployment(tmp_path / "keys", SITES, ["coord.example.org"])


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_writes_ca_tls_and_one_bundle_per_site(layout: Layout) -> None:
    c = layout.coordinator
    for private in (layout.ca / "ca.key", c / "superlink.key", c / "coordinator.key"):
        assert _mode(private) == 0o600
    ca = x509.load_pem_x509_certificate((c / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((c / "superlink.crt").read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "coord.example.org" in san.get_values_for_type(x509.DNSName)
    assert "localhost" in san.get_values_for_type(x509.DNSName)  # the coordinator's own CLI
    assert sorted(load_allow_list(layout.allow_list)) == SITES
    assert sorted(p.stem for p in layout.supernodes.glob("*.pub")) == SITES


def test_a_site_bundle_holds_only_what_that_site_needs(layout: Layout) -> None:
    bundle = layout.site("a")
    names = sorted(p.name for p in bundle.iterdir())
    assert names == sorted(
        [
            "a.key",
            "a.pub",
            "ca.crt",
            "coordinator.pub",
            "coordinator-sign.pub",
            "enroll.pub",
            "supernode.key",
            "supernode.pub",
        ]
    )
    # The instruction key the site pins is the coordinator's (its private half stays there).
    pinned = (bundle / "coordinator-sign.pub").read_bytes()
    assert pinned == (layout.coordinator / "coordinator-sign.pub").read_bytes()
    assert _mode(layout.coordinator / "coordinator-sign.key") == 0o600
    assert _mode(bundle / "a.key") == _mode(bundle / "supernode.key") == 0o600
    node = load_ssh_private_key((bundle / "supernode.key").read_bytes(), password=None)
    assert isinstance(node, ec.EllipticCurvePrivateKey)  # Flower's SuperNode auth: ECDSA
    public = (bundle / "supernode.pub").read_bytes()
    assert public.startswith(b"ecdsa-sha2-nistp256 ")
    assert isinstance(load_ssh_public_key(public), ec.EllipticCurvePublicKey)
    assert public == (layout.supernodes / "a.pub").read_bytes()


def test_a_site_that_makes_its_own_keys_hands_over_only_public_ones(
    layout: Layout, tmp_path: Path
) -> None:
    """Key custody: the private keys are made at the site; the authority enrolls the public
    halves, and nothing it writes holds a private key of the site."""
    at_site = tmp_path / "at-site"
    envelope_pub, node_pub = site_keygen(at_site, "d")
    handed_over = tmp_path / "handed-over"
    handed_over.mkdir()
    for path in (envelope_pub, node_pub):
        (handed_over / path.name).write_bytes(path.read_bytes())
    bundle = enroll_site(layout, "d", public_keys=handed_over)
    assert not list(layout.root.rglob("d.key")) and not (bundle / "supernode.key").exists()
    assert sorted(p.name for p in bundle.iterdir()) == sorted(
        ["ca.crt", "coordinator.pub", "coordinator-sign.pub", "enroll.pub", "d.pub",
         "supernode.pub"]
    )  # fmt: skip
    enrolled = load_allow_list(layout.allow_list).public_key("d")
    assert enrolled.public_bytes_raw() == load_site_public(envelope_pub).public_bytes_raw()
    assert (layout.supernodes / "d.pub").read_bytes() == node_pub.read_bytes()
    pinned = load_site_public(bundle / "enroll.pub")
    roster = parse_roster((layout.coordinator / "roster.signed").read_bytes(), pinned)
    assert roster["d"].public_bytes_raw() == enrolled.public_bytes_raw()
    # The site's private keys stay where they were made, 0600.
    assert _mode(at_site / "d.key") == _mode(at_site / "supernode.key") == 0o600


def test_enrolling_public_keys_checks_what_it_is_given(layout: Layout, tmp_path: Path) -> None:
    at_site = tmp_path / "at-site"
    site_keygen(at_site, "e")
    with pytest.raises(KeyMaterialError, match="site-keygen"):
        enroll_site(layout, "e", public_keys=tmp_path / "nowhere")
    (at_site / "supernode.pub").write_bytes((at_site / "e.pub").read_bytes())  # wrong kind
    with pytest.raises(KeyMaterialError, match=r"supernode\.pub"):
        enroll_site(layout, "e", public_keys=at_site)
    assert not layout.site("e").exists()  # a refused enrollment writes nothing
    assert "e" not in load_allow_list(layout.allow_list)
    with pytest.raises(KeyMaterialError, match="never overwritten"):
        site_keygen(at_site, "e")


def test_add_site_enrolls_later_and_rotates_only_when_asked(layout: Layout) -> None:
    enroll_site(layout, "c")
    assert sorted(load_allow_list(layout.allow_list)) == [*SITES, "c"]
    # The signed roster follows the allow-list, and verifies with the key each bundle pins.
    pinned = load_site_public(layout.site("a") / "enroll.pub")
    roster = parse_roster((layout.coordinator / "roster.signed").read_bytes(), pinned)
    assert sorted(roster) == [*SITES, "c"]
    assert not (layout.coordinator / "enroll.key").exists()  # it stays with the CA
    old = (layout.supernodes / "c.pub").read_bytes()
    with pytest.raises(KeyMaterialError, match="--replace"):
        enroll_site(layout, "c")
    enroll_site(layout, "c", replace=True)
    assert (layout.supernodes / "c.pub").read_bytes() != old
    assert (layout.site("c") / "supernode.pub").read_bytes() != old


def test_init_refuses_an_existing_deployment_and_bad_ids(layout: Layout, tmp_path: Path) -> None:
    with pytest.raises(KeyMaterialError, match="already holds"):
        init_deployment(layout.root, ["x"], ["localhost"])
    with pytest.raises(KeyMaterialError, match="invalid site id"):
        init_deployment(tmp_path / "other", ["../evil"], ["localhost"])


def _site_toml(tmp_path: Path, layout: Layout, **model: object) -> Path:
    data = tmp_path / "a.jsonl"
    lines = (REPO / "examples/data/dolly-tiny.jsonl").read_text().splitlines()[:20]
    data.write_text("\n".join(lines) + "\n")
    extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in model.items())
    path = tmp_path / "site.toml"
    path.write_text(
        f'[site]\nid = "a"\nkeys = "{layout.site("a").relative_to(tmp_path)}"\n\n'
        '[coordinator]\naddress = "coord.example.org:9092"\n\n'
        f'[model]\nname = "tiny-llama"\ndevice = "cpu"\n{extra}\n'
        '[data]\npath = "a.jsonl"\nformat = "instruction"\n\n[supernode]\nport = 19094\n'
    )
    return path


def test_site_config_resolves_paths_and_builds_the_supernode_command(
    tmp_path: Path, layout: Layout
) -> None:
    path = _site_toml(tmp_path, layout)
    cfg = load_site_config(path)
    assert cfg.site.keys == layout.site("a").resolve()
    assert cfg.root_certificates == layout.site("a").resolve() / "ca.crt"
    command = supernode_command(cfg, path)
    joined = " ".join(command)
    assert "--insecure" not in command
    assert f"--root-certificates {cfg.root_certificates}" in joined
    assert f"--auth-supernode-private-key {cfg.site.keys / 'supernode.key'}" in joined
    assert f'site-config="{path.resolve()}"' in command
    assert command[command.index("--superlink") + 1] == "coord.example.org:9092"


def test_site_config_errors_name_the_key(tmp_path: Path, layout: Layout) -> None:
    path = _site_toml(tmp_path, layout)
    path.write_text(path.read_text().replace("[supernode]", "[supernode]\nprot = 1"))
    with pytest.raises(ConfigError, match=r"supernode\.prot: unknown key"):
        load_site_config(path)


def test_site_refuses_missing_data_keys_or_another_base(tmp_path: Path, layout: Layout) -> None:
    cfg = load_site_config(_site_toml(tmp_path, layout))
    local = check_site(cfg).fingerprint
    other = load_site_config(_site_toml(tmp_path, layout, seed=1))
    with pytest.raises(SiteCheckError) as err:
        check_site(other, expect_fingerprint=local)
    assert local in str(err.value) and check_site(other).fingerprint in str(err.value)
    (tmp_path / "a.jsonl").unlink()
    with pytest.raises(SiteCheckError, match=r"data\.path"):
        check_site(cfg)
    (layout.site("a") / "supernode.key").unlink()
    with pytest.raises(SiteCheckError, match="SuperNode auth key"):
        check_keys(cfg)


def test_coordinator_command_uses_tls_auth_and_no_dependency_installs(
    tmp_path: Path, layout: Layout
) -> None:
    path = tmp_path / "coordinator.toml"
    path.write_text(
        '[coordinator]\nkeys = "keys/coordinator"\nstate = "state"\nruns = "runs"\nport = 19092\n'
    )
    cfg = load_coordinator_config(path)
    command = superlink_command(cfg)
    for flag in ("--ssl-certfile", "--ssl-keyfile", "--ssl-ca-certfile"):
        assert Path(command[command.index(flag) + 1]).is_file()
    assert "--enable-supernode-auth" in command
    assert "--disable-runtime-dependency-installation" in command
    assert "--insecure" not in command
    assert command[command.index("--database") + 1] == str(tmp_path / "state/superlink.db")
    assert cfg.coordinator.control == "127.0.0.1:19092"
    # Restart: an unfinished run is resubmitted, a finished one is not.
    assert unfinished_run(cfg) is None
    (tmp_path / "state").mkdir()
    out = tmp_path / "runs/tiny"
    record = {"config": str(tmp_path / "run.toml"), "out": str(out)}
    (tmp_path / "state/active-run.json").write_text(json.dumps(record))
    assert unfinished_run(cfg) == (tmp_path / "run.toml", out)
    out.mkdir(parents=True)
    (out / "summary.json").write_text("{}")
    assert unfinished_run(cfg) is None


def test_server_app_run_config_needs_absolute_paths(tmp_path: Path) -> None:
    run = DeployedRun.from_run_config({"config": "/c/run.toml", "out": "/runs/x", "keys": ""})
    assert run.keys is None and run.out == Path("/runs/x")
    with pytest.raises(ConfigError, match="absolute path"):
        DeployedRun.from_run_config({"config": "run.toml", "out": "/runs/x"})
    arg = _run_config_arg(Path("/a b/run.toml"), Path("/r"), Path("/k"))
    assert arg == 'config="/a b/run.toml" out="/r" keys="/k"'


def test_the_app_bundle_holds_only_the_python_packages(tmp_path: Path) -> None:
    from flwr.cli.build import build_fab_from_disk

    fab = build_fab_from_disk(stage_app(tmp_path))
    assert len(fab) < 10 * 2**20
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    top = {name.split("/")[0] for name in names}
    assert top <= {"common", "client", "server", "fedlora", "pyproject.toml", ".info"}
    assert "server/deploy_app.py" in names and "client/deploy_app.py" in names
    assert not [n for n in names if n.endswith((".jsonl", ".csv", ".txt"))]


def test_example_configs_parse() -> None:
    site = load_site_config(REPO / "examples/site.toml")
    assert site.site.id == "site-1" and site.supernode.port == 9094
    coordinator = load_coordinator_config(REPO / "examples/coordinator.toml")
    assert coordinator.coordinator.host == "127.0.0.1" and coordinator.coordinator.port == 9093
    assert coordinator.proxy is not None and coordinator.proxy.port == 9092
    assert site.coordinator.address.endswith(":9092")  # sites reach the proxy
    unit = (REPO / "examples/systemd/fedlora-site.service").read_text()
    assert "fedlora site start --config" in unit and "Restart=always" in unit


def _no_data(config: Path, *overrides: str) -> RunConfig:
    """``config`` with data.path (and data.eval-path) removed, as a deployed run may be."""
    raw = read_toml(config)
    resolve_paths(raw, config.parent)
    del raw["data"]["path"]
    raw["data"].pop("eval-path", None)
    for text in overrides:
        key_path, value = parse_override(text)
        raw[key_path[0]][key_path[1]] = value
    return config_from_dict(raw)


def test_deployed_coordinator_reads_no_training_data() -> None:
    assert run_labels(_no_data(REPO / "examples/tiny.toml"), deployed=True) == (None, None)
    with pytest.raises(ConfigError, match=r"data\.path: a simulation needs"):
        run_labels(_no_data(REPO / "examples/tiny.toml"), deployed=False)


def test_deployed_classification_run_takes_its_labels_from_the_config_or_eval_file() -> None:
    banking = REPO / "examples/banking77.toml"
    with pytest.raises(ConfigError, match=r"data\.labels .* or data\.eval-path"):
        run_labels(_no_data(banking), deployed=True)
    labels, eval_set = run_labels(_no_data(banking, "data.labels=['b', 'a']"), deployed=True)
    assert labels == ["b", "a"] and eval_set is None
    eval_file = REPO / "examples/data/banking77-test.csv"
    cfg = _no_data(banking, f"data.eval-path='{eval_file}'")
    labels, eval_set = run_labels(cfg, deployed=True)
    assert eval_set is not None and labels == eval_set.label_names and len(labels) > 2


def test_site_uses_the_runs_label_ids_and_refuses_different_ones(tmp_path: Path) -> None:
    site_toml = tmp_path / "site.toml"
    text = (REPO / "examples/site.toml").read_text()
    site_toml.write_text(text.replace("[data]", '[data]\nlabels = ["x", "y"]'))
    with_labels = load_site_config(site_toml)
    cfg = load_config(REPO / "examples/tiny.toml")
    assert run_label_names(with_labels, site_plan(cfg, ["x", "y"])) == ["x", "y"]
    assert run_label_names(with_labels, site_plan(cfg)) == ["x", "y"]
    without = load_site_config(REPO / "examples/site.toml")
    assert run_label_names(without, site_plan(cfg, ["p", "q"])) == ["p", "q"]
    with pytest.raises(ConfigError, match="differ from the run's"):
        run_label_names(with_labels, site_plan(cfg, ["y", "x"]))


def test_site_refuses_a_run_that_puts_it_in_other_groups(tmp_path: Path, layout: Layout) -> None:
    path = _site_toml(tmp_path, layout)
    path.write_text(path.read_text().replace('id = "a"\n', 'id = "a"\ngroups = ["emea"]\n', 1))
    cfg = load_site_config(path)
    assert cfg.state_dir == layout.site("a").parent / "a-state"  # the default store, per site
    base = config_from_dict({"model": {"name": "tiny-llama"}, "data": {}})
    check_site_groups(cfg, site_plan(base.model_copy(update={"groups": {"emea": ["a"]}})))
    with pytest.raises(ConfigError, match=r"site.groups = \['emea'\].*put a in \['apac'\]"):
        check_site_groups(cfg, site_plan(base.model_copy(update={"groups": {"apac": ["a"]}})))
