"""Every check a site makes, tested on every instruction where it applies (issue 20).

A site checks what it receives: the coordinator's signature (``common.instructions``), its own
policy (``common.site_policy``), the base fingerprint, the SHA-256 of the global version it
rebuilds (full state or down-link step, ``client.received``), the serial of the signed roster
(``client.roster_serial``) and freshness (one masked input per round, ``client.round_claims``;
each secure-sum stage once and in order). A check that one instruction type skipped would pass
a test that another type's refusal satisfies, so each row below sends one instruction that
violates exactly one check, and asserts that the site refuses it with an error naming the
check and that nothing changed at the site: no file in its store, no byte of its secure-sum
state (so no training either: training writes the store).

How: the real coordinator (``server.federation``) and the real site glue (``client.app``)
run one round in this process over ``InProcessGrid``, once sealed and once secure-sum, and
every instruction to site-0 is kept together with site-0's store and protocol state just
before it arrived. A row replays one kept instruction, altered, to a fresh copy of that store
and state. Where the alteration is inside the signed content, the row re-signs it with the
coordinator's own instruction key, so that only the check under test can refuse it. Each
instruction's unaltered replay is accepted and does change the site (``test_honest_...``),
which shows that the refusals come from the violation and that the snapshot sees changes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client.app import ERROR_REFUSED, SiteKeys, client_app, simulation_sites
from client.roster_serial import ROSTER_SERIAL_FILE
from client.round_claims import CLAIMS_FOLDER
from common import protocol as P
from common.config import RunConfig, SitePolicy, load_config
from common.instructions import instruction_digest, instruction_key_path, sign_instruction
from common.keys import COORDINATOR_KEY_NAME, load_site_private
from fedlora.in_process import site_context
from fedlora.simulate import provision_keys
from server.federation import prepare, run_federation
from tests.helpers.in_process import InProcessGrid, flower_task_identity, where

pytestmark = pytest.mark.slow  # one real round per privacy mode (tiny model, ~10 s each)

TINY = Path(__file__).resolve().parents[2] / "examples" / "tiny.toml"
SITE = 1  # the node whose instructions are kept: site-0
MODES = {
    "sealed": ["privacy.mode='sealed'"],
    "secure-sum": ["privacy.mode='secure-sum'"],
}
# The instructions of one round, in order: a secure-sum round's train instruction is its
# first stage; the next four carry no adapter. The global version travels as the full state in
# round 0's evaluation (``ROUND_0``), as a reference in round 1's train instruction (the site
# evaluated that version) and as a down-link step in its evaluation.
ROUND_0 = "evaluate@round-0"
STAGES = {
    "sealed": [ROUND_0, "train", "evaluate"],
    "secure-sum": [
        ROUND_0,
        P.STAGE_TRAIN,
        P.STAGE_SHARE,
        P.STAGE_MASK,
        P.STAGE_CONFIRM,
        P.STAGE_UNMASK,
        "evaluate",
    ],
}

task_identity = pytest.fixture(scope="module", autouse=True)(flower_task_identity)


@dataclass(frozen=True)
class Kept:
    """One instruction to site-0 and what the site held just before it arrived."""

    content: RecordDict
    message_type: str
    state: RecordDict  # the node's context.state (secure-sum protocol state)
    store: Path  # a copy of the site's store folder


@dataclass
class Round:
    """One honest round of one privacy mode, as site-0 saw it."""

    cfg: RunConfig
    keys: Path
    run_id: str
    kept: dict[str, Kept] = field(default_factory=dict)


def _config(mode: str) -> RunConfig:
    overrides = ["federation.rounds=1", "data.partition='iid'", "train.local-steps=1"]
    return load_config(TINY, [*overrides, *MODES[mode]])


def _record(mode: str, out: Path) -> Round:
    cfg = _config(mode)
    sealing, _ = provision_keys(cfg, out)
    app = client_app(simulation_sites(cfg, out / "sites"), SiteKeys(out / "keys"))
    coord = prepare(cfg, out, sealing)
    kept = Round(cfg, out / "keys", coord.run_id)

    def keep(msg: Message, context: Context) -> None:
        server_round, stage = where(msg)
        if msg.metadata.dst_node_id != SITE:
            return
        stage = ROUND_0 if server_round == 0 else stage
        store, snapshot = out / "sites" / "site-0", out / "snapshots" / stage
        if store.exists():
            shutil.copytree(store, snapshot)
        else:
            snapshot.mkdir(parents=True)
        kept.kept[stage] = Kept(
            copy.deepcopy(msg.content),
            msg.metadata.message_type,
            copy.deepcopy(context.state),
            snapshot,
        )

    run_federation(InProcessGrid(app, cfg.federation.sites, before_delivery=keep), coord)
    assert sorted(kept.kept) == sorted(STAGES[mode]), sorted(kept.kept)
    return kept


@pytest.fixture(scope="module")
def rounds(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Round]:
    """The recorded round of a privacy mode, run the first time a test needs it."""
    done: dict[str, Round] = {}

    def get(mode: str) -> Round:
        if mode not in done:
            done[mode] = _record(mode, tmp_path_factory.mktemp(f"round-{mode}"))
        return done[mode]

    return get


@dataclass
class Replay:
    """One kept instruction about to be replayed: its content, the site's state and store."""

    round: Round
    stage: str
    content: RecordDict
    state: RecordDict
    store: Path

    @property
    def header(self) -> ConfigRecord:
        return self.content.config_records[P.HEADER_RECORD]

    def resign(self, key: Ed25519PrivateKey | None = None) -> None:
        """Sign the (altered) content again: with the coordinator's own instruction key
        unless ``key`` is given."""
        if key is None:
            coordinator = instruction_key_path(self.round.keys / COORDINATOR_KEY_NAME)
            key = load_site_private(coordinator)
        message_type = self.round.kept[self.stage].message_type
        sign_instruction(self.content, message_type, key)


Violation = Callable[[Replay], None]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _state(state: RecordDict) -> bytes:
    return instruction_digest(state, "node-state")  # SHA-256 over every record


@dataclass(frozen=True)
class Outcome:
    reply: Message
    store_changed: bool
    state_changed: bool


def _replay(
    rounds: Callable[[str], Round], mode: str, stage: str, tmp: Path, violate: Violation | None
) -> Outcome:
    recorded = rounds(mode)
    kept = recorded.kept[stage]
    sites = tmp / "sites"
    store = sites / "site-0"
    shutil.copytree(kept.store, store)
    replay = Replay(recorded, stage, copy.deepcopy(kept.content), copy.deepcopy(kept.state), store)
    if violate is not None:
        violate(replay)
    files, state = _files(store), _state(replay.state)
    msg = Message(replay.content, dst_node_id=SITE, message_type=kept.message_type)
    msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
    context = site_context(1, SITE, recorded.cfg.federation.sites)
    context.state = replay.state
    # A deployed site's default policy: sealed or secure-sum, never plain deltas.
    app = client_app(
        simulation_sites(recorded.cfg, sites), SiteKeys(recorded.keys), lambda _: SitePolicy()
    )
    reply = app(msg, context)
    return Outcome(reply, _files(store) != files, _state(context.state) != state)


def forged_signature(replay: Replay) -> None:
    """Signed by a key that is not the pinned coordinator key (an outsider, a relay)."""
    replay.resign(Ed25519PrivateKey.generate())


def plan_below_policy(replay: Replay) -> None:
    """The coordinator itself asks for plain deltas, which the site's policy does not allow."""
    plan = json.loads(str(replay.header[P.KEY_PLAN]))
    plan["privacy-mode"] = "none"
    replay.header[P.KEY_PLAN] = json.dumps(plan)
    replay.resign()


def foreign_base(replay: Replay) -> None:
    """The coordinator runs another base model."""
    replay.header[P.KEY_FINGERPRINT] = hashlib.sha256(b"another base model").hexdigest()
    replay.resign()


def wrong_global_digest(replay: Replay) -> None:
    """The global version (full state or down-link step) is not the one the header names."""
    replay.header[P.KEY_GLOBAL_SHA256] = hashlib.sha256(b"another version").hexdigest()
    replay.resign()


def newer_roster_accepted(replay: Replay) -> None:
    """The site accepted a newer roster before: this instruction relays an older one."""
    (replay.store / ROSTER_SERIAL_FILE).write_text("99\n")


def masked_input_already_sent(replay: Replay) -> None:
    """The site sent a masked input for this round before (a redone round)."""
    claims = replay.store / replay.round.run_id / CLAIMS_FOLDER
    claims.mkdir(parents=True, exist_ok=True)
    (claims / "round-1").touch()


def stage_already_run(replay: Replay) -> None:
    """The stage is replayed after it ran: the site's state is the next stage's."""
    stages = STAGES["secure-sum"]
    following = stages[stages.index(replay.stage) + 1]
    replay.state = copy.deepcopy(replay.round.kept[following].state)


def round_already_over(replay: Replay) -> None:
    """The stage is replayed after the round ended at the site (its state was deleted)."""
    replay.state = copy.deepcopy(replay.round.kept["evaluate"].state)


CHECKS: dict[str, tuple[Violation, str]] = {
    "signature": (forged_signature, "does not verify with the pinned coordinator-sign.pub"),
    "policy": (plan_below_policy, "policy.privacy-modes"),
    "fingerprint": (foreign_base, "base model fingerprint mismatch"),
    "global-sha256": (wrong_global_digest, "the signed instruction says"),
    "roster-serial": (newer_roster_accepted, "but this site has accepted serial 99"),
    "one-masked-input": (masked_input_already_sent, "already sent a masked input for round 1"),
    "stage-once": (stage_already_run, "called, expected"),
    "round-in-progress": (round_already_over, "no secure-sum round in progress"),
}
_SIGNED = ["signature", "policy", "fingerprint"]
_SECURE_SUM_STAGES = [P.STAGE_SHARE, P.STAGE_MASK, P.STAGE_CONFIRM, P.STAGE_UNMASK]
# (privacy mode, instruction, check): every check on every instruction where it applies.
ROWS = [
    *[
        ("sealed", stage, c)
        for stage in (ROUND_0, "train", "evaluate")
        for c in [*_SIGNED, "global-sha256"]
    ],
    *[("secure-sum", P.STAGE_TRAIN, c) for c in [*_SIGNED, "global-sha256", "roster-serial"]],
    *[("secure-sum", s, c) for s in _SECURE_SUM_STAGES for c in [*_SIGNED, "roster-serial"]],
    ("secure-sum", P.STAGE_MASK, "one-masked-input"),
    ("secure-sum", P.STAGE_SHARE, "stage-once"),
    ("secure-sum", P.STAGE_CONFIRM, "stage-once"),
    ("secure-sum", P.STAGE_UNMASK, "round-in-progress"),
    *[("secure-sum", "evaluate", c) for c in [*_SIGNED, "global-sha256"]],
]


@pytest.mark.parametrize(("mode", "stage", "check"), ROWS, ids=lambda x: str(x))
def test_site_refuses_an_instruction_that_fails_one_check(
    rounds: Callable[[str], Round], tmp_path: Path, mode: str, stage: str, check: str
) -> None:
    violate, reason = CHECKS[check]
    outcome = _replay(rounds, mode, stage, tmp_path, violate)
    assert outcome.reply.has_error(), f"{mode} {stage} accepted despite failing {check}"
    assert outcome.reply.error.code == ERROR_REFUSED
    assert reason in str(outcome.reply.error.reason), outcome.reply.error.reason
    assert not outcome.store_changed, "the refusing site changed its store (trained?)"
    assert not outcome.state_changed, "the refusing site changed its secure-sum state"


@pytest.mark.parametrize(
    ("mode", "stage"),
    [(mode, stage) for mode, stages in STAGES.items() for stage in stages],
    ids=lambda x: str(x),
)
def test_honest_instruction_is_accepted_and_changes_the_site(
    rounds: Callable[[str], Round], tmp_path: Path, mode: str, stage: str
) -> None:
    """The control: the same instruction unaltered, on the same store and state, is acted on
    (so each refusal above is the check's doing), and acting on it shows in the snapshot."""
    outcome = _replay(rounds, mode, stage, tmp_path, None)
    assert not outcome.reply.has_error(), outcome.reply.error.reason
    if stage in (ROUND_0, "train", "evaluate"):  # the received version, the site registry
        assert outcome.store_changed
    if mode == "secure-sum" and stage not in (ROUND_0, "evaluate"):  # the protocol moves on
        assert outcome.state_changed
