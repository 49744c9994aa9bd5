"""A lying coordinator against secure sum, through the real Flower apps (the in-process
simulation runtime, tiny model).

The first attack (issue 13, finding 2): the coordinator puts its own key advert in place of a
victim's neighbours', so that it can open the shares the victim seals to them and unmask the
victim's input alone. The coordinator holds the allow-list, but the sites check adverts
against the roster that the enrollment authority signed, which the coordinator cannot forge:
every site whose neighbour advert was replaced refuses the share stage, the round publishes
nothing and the coordinator learns no delta.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from client.app import SiteKeys, make_client_app
from client.roster_serial import ROSTER_SERIAL_FILE
from common import protocol as P
from common.config import load_config
from common.keys import load_site_private
from common.registry import Registry
from common.roster import ENROLL_KEY_NAME, roster_bytes
from common.secagg import ConfirmRequest, KeyAdvert, UnmaskRequest, advert_message
from common.secagg_server import SecAggServer
from fedlora.in_process import run_in_process
from fedlora.simulate import provision_keys
from server.app import make_server_app
from server.audit import AUDIT_FILE, EVENT_REPLY_REJECTED, read_entries
from server.federation import prepare, run_federation
from server.secure_sum import SecureSumRound

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
    run_in_process(make_server_app(coord), app, 3)

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


def test_inconsistent_dropout_story_gets_no_mask_key_of_the_victim(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The coordinator shows sites 1 and 2 the true survivor list, and site 3 a list without
    site 1, the victim, hoping that site 3 reveals its share of the victim's mask key while
    site 2 reveals its share of the victim's self-mask seed. Site 3 holds only its own
    signature over its list (t = 2 of 3 are needed) and refuses to unmask."""
    cfg = load_config(
        TINY, ["federation.rounds=1", "data.partition='iid'", "privacy.mode='secure-sum'"]
    )
    sealing, _ = provision_keys(cfg, tmp_path)
    honest_masked = SecAggServer.collect_masked
    honest_confirm = SecAggServer.collect_confirmations
    told: dict[int, tuple[int, ...]] = {}

    def two_stories(self: SecAggServer, masked: Mapping[int, object]) -> dict[int, ConfirmRequest]:
        lists = honest_masked(self, masked)  # type: ignore[arg-type]
        everyone = self.state.survivors
        for site in everyone:
            told[site] = everyone if site != max(everyone) else everyone[1:]  # victim: min
        return {site: ConfirmRequest(told[site]) for site in lists}

    def forward(self: SecAggServer, signatures: Mapping[int, bytes]) -> dict[int, UnmaskRequest]:
        requests = honest_confirm(self, signatures)  # drops the signature over the other list
        liar = max(told)
        victim = min(told)
        peers = sorted(self.graph[liar])
        requests[liar] = UnmaskRequest(
            survivors=tuple(p for p in peers if p != victim),
            dropped=(victim,),
            confirmations={s: sig for s, sig in signatures.items() if told[s] == told[liar]},
        )
        return requests

    monkeypatch.setattr(SecAggServer, "collect_masked", two_stories)
    monkeypatch.setattr(SecAggServer, "collect_confirmations", forward)
    coord = prepare(cfg, tmp_path, sealing)
    app = make_client_app(cfg, SiteKeys(tmp_path / "keys"), tmp_path / "sites")
    run_in_process(make_server_app(coord), app, 3)

    assert told and len(set(told.values())) == 2, told  # the attack ran
    refusals = [
        entry["reason"]
        for entry in read_entries(tmp_path / AUDIT_FILE)
        if entry["event"] == EVENT_REPLY_REJECTED and entry["round"] == 1
    ]
    assert any(
        "refuses to unmask" in reason and "1 of its neighbourhood confirmed" in reason
        for reason in refusals
    ), refusals


def test_an_older_roster_is_refused_after_a_newer_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Round 1 relays roster serial 2; round 2 relays serial 1, an older roster signed by the
    same enrollment key (one from before a key rotation, say). Every site has remembered
    serial 2 in its store and refuses round 2 at its first secure-sum stage."""
    cfg = load_config(
        TINY, ["federation.rounds=2", "data.partition='iid'", "privacy.mode='secure-sum'"]
    )
    sealing, _ = provision_keys(cfg, tmp_path)
    enroll = load_site_private(tmp_path / "keys" / ENROLL_KEY_NAME)
    keys = {site: sealing.allow_list.public_key(site) for site in sealing.allow_list}
    older, newer = (roster_bytes(keys, enroll, serial) for serial in (1, 2))
    honest_header = SecureSumRound._header

    def relayed(self: SecureSumRound, stage: str) -> ConfigRecord:
        header = honest_header(self, stage)
        header[P.KEY_ROSTER] = newer if self.round == 1 else older
        return header

    monkeypatch.setattr(SecureSumRound, "_header", relayed)
    coord = prepare(cfg, tmp_path, dataclasses.replace(sealing, roster=newer))
    app = make_client_app(cfg, SiteKeys(tmp_path / "keys"), tmp_path / "sites")
    run_in_process(make_server_app(coord), app, 3)

    metrics = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "failed" not in metrics[1], metrics[1]  # serial 2 accepted
    assert "failed" in metrics[2], metrics[2]
    refusals = [
        entry["reason"]
        for entry in read_entries(tmp_path / AUDIT_FILE)
        if entry["event"] == EVENT_REPLY_REJECTED and entry["round"] == 2
    ]
    assert sum("relays roster serial 1" in r and "accepted serial 2" in r for r in refusals) == 3, (
        refusals
    )
    assert Registry(tmp_path / "registry").latest("shared").version == 1  # type: ignore[union-attr]
    for site in ("site-0", "site-1", "site-2"):  # remembered in each site's store, across runs
        assert (tmp_path / "sites" / site / ROSTER_SERIAL_FILE).read_text() == "2\n"


def rescaling(inner: ClientApp, weight: float) -> ClientApp:
    """Site 0 adds ``weight`` to the weight slot of its masked input (the last element): masks
    add mod 2**32, so the unmasked total weight moves by as much."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        reply = inner(msg, context)
        header = msg.content.config_records[P.HEADER_RECORD]
        stage = header.get(P.KEY_STAGE, P.STAGE_TRAIN)
        if stage == P.STAGE_MASK and int(context.node_config["partition-id"]) == 0:
            masked = reply.content.array_records[P.SECAGG_RECORD].to_numpy_ndarrays()[0]
            scale = json.loads(str(header[P.KEY_SECAGG_PARAMS]))["weight_scale"]
            masked = masked.copy()
            masked[-1] = np.uint32((int(masked[-1]) + round(weight * scale)) % 2**32)
            reply.content.array_records[P.SECAGG_RECORD] = ArrayRecord([masked])
        return reply

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return inner(msg, context)

    return app


# +31,000: above 3 sites x max-weight 10,000. A negative weight (shrinking the denominator)
# is caught by the same bound: tests/server/test_secure_sum_bounds.py.
@pytest.mark.parametrize("weight", [31_000.0])
def test_a_site_rescaling_the_aggregate_is_caught(tmp_path: Path, weight: float) -> None:
    """A weight wrapped around the field (far above max-weight, or negative to shrink the
    denominator) makes the unmasked total weight impossible: the round publishes nothing."""
    cfg = load_config(
        TINY, ["federation.rounds=1", "data.partition='iid'", "privacy.mode='secure-sum'"]
    )
    sealing, _ = provision_keys(cfg, tmp_path)
    coord = prepare(cfg, tmp_path, sealing)
    honest = make_client_app(cfg, SiteKeys(tmp_path / "keys"), tmp_path / "sites")
    app = rescaling(honest, weight)
    run_in_process(make_server_app(coord), app, 3)
    metrics = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "total weight" in metrics[1].get("failed", ""), metrics[1]
    assert Registry(tmp_path / "registry").latest("shared").version == 0  # type: ignore[union-attr]


class CrashBeforeUnmask:
    """A Grid proxy whose coordinator 'crashes' in round 1 after the masked inputs arrived
    (before it could unmask and checkpoint): a resumed run then redoes round 1."""

    def __init__(self, inner: Grid) -> None:
        self.inner = inner

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def send_and_receive(self, messages: Iterable[Message], timeout: float) -> list[Message]:
        messages = list(messages)
        for msg in messages:
            header = msg.content.config_records[P.HEADER_RECORD]
            if header.get(P.KEY_STAGE) == P.STAGE_UNMASK:
                raise CoordinatorCrashed
        return list(self.inner.send_and_receive(messages, timeout=timeout))


class CoordinatorCrashed(Exception):
    pass


def test_a_redone_round_gets_no_second_masked_input(tmp_path: Path) -> None:
    """Masks of one delta under two survivor sets would reveal it: every site refuses the
    redone round's mask stage, and the run goes on with the next round."""
    cfg = load_config(
        TINY, ["federation.rounds=2", "data.partition='iid'", "privacy.mode='secure-sum'"]
    )
    sealing, _ = provision_keys(cfg, tmp_path)
    app = make_client_app(cfg, SiteKeys(tmp_path / "keys"), tmp_path / "sites")
    coord = prepare(cfg, tmp_path, sealing)
    crashing = ServerApp()

    @crashing.main()
    def main(grid: Grid, context: Context) -> None:
        with contextlib.suppress(CoordinatorCrashed):
            run_federation(CrashBeforeUnmask(grid), coord)  # type: ignore[arg-type]

    run_in_process(crashing, app, 3)
    claims = sorted(tmp_path.glob("sites/site-*/*/secure-sum/round-1"))
    assert len(claims) == 3  # every site sent its masked input for round 1
    assert Registry(tmp_path / "registry").latest("shared").version == 0  # type: ignore[union-attr]

    resumed = prepare(cfg, tmp_path, sealing)
    run_in_process(make_server_app(resumed, resume=True), app, 3)
    metrics = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    redo = [m for m in metrics if m["round"] == 1]
    assert "failed" in redo[-1], redo
    refusals = [
        entry["reason"]
        for entry in read_entries(tmp_path / AUDIT_FILE)
        if entry["event"] == EVENT_REPLY_REJECTED and entry["round"] == 1
    ]
    assert sum("already sent a masked input" in r for r in refusals) == 3, refusals
    last = metrics[-1]
    assert last["round"] == 2 and "failed" not in last, last
    assert Registry(tmp_path / "registry").latest("shared").version == 1  # type: ignore[union-attr]
