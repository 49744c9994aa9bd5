"""A lying coordinator against secure sum, through real Flower (simulation, tiny model).

The attack (issue 13, finding 2): the coordinator puts its own key advert in place of a
victim's neighbours', so that it can open the shares the victim seals to them and unmask the
victim's input alone. The coordinator holds the allow-list, but the sites check adverts
against the roster that the enrollment authority signed, which the coordinator cannot forge:
every site whose neighbour advert was replaced refuses the share stage, the round publishes
nothing and the coordinator learns no delta.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.simulation import run_simulation

from client.app import SiteKeys, make_client_app
from common.config import load_config
from common.secagg import KeyAdvert, advert_message
from common.secagg_server import SecAggServer
from fedlora.simulate import backend_config, provision_keys
from server.app import make_server_app
from server.audit import AUDIT_FILE, EVENT_REPLY_REJECTED, read_entries
from server.federation import prepare
from server.registry import Registry

pytestmark = pytest.mark.slow

TINY = Path(__file__).resolve().parent.parent / "examples" / "tiny.toml"


def test_substituted_advert_is_refused_by_the_sites(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config(
        TINY, ["federation.rounds=1", "data.partition='iid'", "privacy.mode='secure-sum'"]
    )
    sealing, _ = provision_keys(cfg, tmp_path)
    honest_collect = SecAggServer.collect_adverts
    own_key = Ed25519PrivateKey.generate()  # the coordinator signs with a key of its own
    swapped: list[int] = []

    def substitute(self: SecAggServer, adverts: Mapping[int, KeyAdvert]) -> dict[int, KeyAdvert]:
        broadcast = honest_collect(self, adverts)
        victim = min(broadcast)  # its advert is replaced for everyone it shares with
        # Key pairs the coordinator holds: shares sealed to them would open at the coordinator.
        c_pk, s_pk = (X25519PrivateKey.generate().public_key().public_bytes_raw() for _ in "cs")
        commit = broadcast[victim].seed_commitment
        message = advert_message(self.context, victim, c_pk, s_pk, commit)
        broadcast[victim] = KeyAdvert(victim, c_pk, s_pk, commit, own_key.sign(message))
        swapped.append(victim)
        return broadcast

    monkeypatch.setattr(SecAggServer, "collect_adverts", substitute)
    coord = prepare(cfg, tmp_path, sealing)
    app = make_client_app(cfg, SiteKeys(tmp_path / "keys"), tmp_path / "sites")
    run_simulation(make_server_app(coord), app, 3, backend_config=backend_config(cfg))

    assert swapped, "the attack never ran"
    refusals = [
        entry["reason"]
        for entry in read_entries(tmp_path / AUDIT_FILE)
        if entry["event"] == EVENT_REPLY_REJECTED and entry["round"] == 1
    ]
    # Both other sites check the victim's advert against the roster and refuse to share.
    assert sum("signature does not verify" in reason for reason in refusals) >= 2, refusals
    metrics = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "failed" in metrics[1], metrics[1]
    assert Registry(tmp_path / "registry").latest("shared").version == 0  # type: ignore[union-attr]
