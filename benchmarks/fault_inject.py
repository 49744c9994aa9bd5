"""Fault injection for the fault matrix: a ClientApp wrapper that makes chosen sites misbehave.

Every site runs the real fedlora ClientApp. In the round and stage a ``Fault`` names, one site
crashes, stalls, or sends a hostile train reply instead; everything else is honest. Hostile
replies are built the way a malicious site would build them: with its own (or a stolen, or an
unenrolled) signing key and the coordinator's public key, so each one reaches the check meant
to stop it instead of failing an earlier one.

The wrapper runs inside Flower's Ray workers, which import this module by name: they inherit
the driver's ``sys.path``, so ``benchmarks/`` must be on it before the simulation starts.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from client.app import SiteKeys
from common import protocol as P
from common.adapters import AdapterState
from common.encoding import encode_delta
from common.envelope import EnvelopeContext, seal_delta
from common.modules import split_modules

# What a faulty site does. The first two are failures, the rest hostile train replies.
CRASH = "crash"  # the ClientApp raises: Flower answers with an error reply
STALL = "stall"  # answers honestly, but only ``Fault.seconds`` after ``Fault.after`` exists
NAN_DELTA = "nan-delta"  # a NaN in the (correctly sealed) delta bytes
WRONG_SHAPE = "wrong-shape"  # one tensor with an extra row
HUGE_NORM = "huge-norm"  # every entry 100: L2 norm far above aggregation.max-delta-norm
INFLATED_COUNT = "inflated-count"  # claims 1000 x aggregation.max-examples examples
REPLAY = "replay"  # resends its previous round's envelope under this round's header
DUPLICATE = "duplicate"  # a second reply in the name (and with the key) of ``Fault.target``
UNENROLLED = "unenrolled-key"  # signed with a key the allow-list does not hold
HOSTILE_KINDS = (
    NAN_DELTA,
    WRONG_SHAPE,
    HUGE_NORM,
    INFLATED_COUNT,
    REPLAY,
    DUPLICATE,
    UNENROLLED,
)

ROGUE_SITE = "site-rogue"  # the name the unenrolled key signs as
MAX_STALL_SECONDS = 300.0  # a stalled site gives up waiting for ``Fault.after`` (seconds)
REPLAY_RECORD = "fault-replay"  # node state: the site's last sent envelope
# Node state: the shapes of the module's global tensors, from the last instruction that carried
# the full state (round 0's evaluation does; later ones may carry a step or a reference).
SHAPES_RECORD = "fault-shapes"
MODULE = "shared"  # the fault cases run examples/tiny.toml: one shared module


@dataclass(frozen=True)
class Fault:
    """Site ``site`` (its partition id) misbehaves as ``kind`` at ``stage`` of ``round``."""

    site: int
    round: int
    stage: str  # Flower message type: "train" or "evaluate"
    kind: str
    after: str = ""  # STALL: a path in the run folder to wait for, e.g. a registry version
    seconds: float = 0.0  # STALL: further sleep once ``after`` exists (seconds)
    target: int = 0  # DUPLICATE: the site whose reply is sent a second time


@dataclass(frozen=True)
class FaultPlan:
    """The faults of one run and the files the faulty sites use."""

    faults: tuple[Fault, ...]
    keys: Path  # the simulation's key folder: coordinator.pub and every site's key
    rogue_keys: Path  # coordinator.pub and ROGUE_SITE's key, which nobody enrolled
    run_dir: Path  # the run folder; a stalled site notes when it answered in ``marks/``
    max_examples: int  # aggregation.max-examples of the run

    def find(self, site: int, server_round: int, stage: str) -> Fault | None:
        for fault in self.faults:
            if (fault.site, fault.round, fault.stage) == (site, server_round, stage):
                return fault
        return None

    @property
    def marks(self) -> Path:
        return self.run_dir / "marks"

    def replays(self, site: int) -> bool:
        return any(f.site == site and f.kind == REPLAY for f in self.faults)


def stall_mark(site: int, server_round: int) -> str:
    """The file (in ``FaultPlan.marks``) a stalled site writes as it answers."""
    return f"stall-site-{site}-round-{server_round}.json"


class SiteCrashed(RuntimeError):
    """Raised inside a ClientApp to simulate a crash of the site's process."""


def faulty_app(inner: ClientApp, plan: FaultPlan) -> ClientApp:
    """A ClientApp that runs ``inner`` for every site, except where ``plan`` names a fault."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return _handle(inner, plan, msg, context)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return _handle(inner, plan, msg, context)

    return app


def _handle(inner: ClientApp, plan: FaultPlan, msg: Message, context: Context) -> Message:
    site = int(context.node_config["partition-id"])
    stage = msg.metadata.message_type
    server_round = int(str(msg.content.config_records[P.HEADER_RECORD][P.KEY_ROUND]))
    fault = plan.find(site, server_round, stage)
    _note_shapes(msg, context)
    reply = inner(msg, context) if fault is None else _misbehave(inner, plan, fault, msg, context)
    if stage == "train" and fault is None and plan.replays(site) and reply.has_content():
        envelope = reply.content.config_records[P.UPDATE_RECORD][P.delta_key(MODULE)]
        context.state.config_records[REPLAY_RECORD] = ConfigRecord({P.delta_key(MODULE): envelope})
    return reply


def _misbehave(
    inner: ClientApp, plan: FaultPlan, fault: Fault, msg: Message, context: Context
) -> Message:
    if fault.kind == CRASH:
        raise SiteCrashed(f"site-{fault.site} crashed (fault injection, round {fault.round})")
    if fault.kind == STALL:
        deadline = time.monotonic() + MAX_STALL_SECONDS
        while not (plan.run_dir / fault.after).exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(fault.seconds)
        reply = inner(msg, context)
        mark = plan.marks / stall_mark(fault.site, fault.round)
        mark.write_text(json.dumps({"sent_at": time.time()}), encoding="utf-8")
        return reply
    if fault.kind == DUPLICATE:
        config = {**context.node_config, "partition-id": fault.target}
        twin = Context(context.run_id, context.node_id, config, context.state, context.run_config)
        return inner(msg, twin)
    reply = inner(msg, context)  # honest training first: the reply's records are genuine
    HOSTILE_EDITS[fault.kind](plan, fault, msg, reply, context)
    return reply


# -- hostile train replies ---------------------------------------------------------------------
def _envelope_context(msg: Message, site_id: str, module: str = MODULE) -> EnvelopeContext:
    header = msg.content.config_records[P.HEADER_RECORD]
    return EnvelopeContext(
        run_id=str(header[P.KEY_RUN_ID]),
        round=int(str(header[P.KEY_ROUND])),
        site_id=site_id,
        module=module,
        version=int(str(header[P.KEY_VERSION])),
        base_fingerprint=str(header[P.KEY_FINGERPRINT]),
    )


def _reseal(msg: Message, reply: Message, keys: Path, site_id: str, payload: bytes) -> None:
    """Replace the reply's delta with ``payload`` sealed and signed as ``site_id``."""
    public, signing = SiteKeys(keys).load(site_id)
    envelope = seal_delta(payload, public, signing, _envelope_context(msg, site_id))
    update = reply.content.config_records[P.UPDATE_RECORD]
    update[P.KEY_SITE] = site_id
    update[P.delta_key(MODULE)] = envelope
    if P.KEY_REPORT in update:  # sealed mode: the report must come from site_id too
        _reseal_report(msg, reply, keys, site_id, examples=10)


def _reseal_report(msg: Message, reply: Message, keys: Path, site_id: str, examples: int) -> None:
    """Replace the reply's sealed report with one claiming ``examples``, signed as ``site_id``."""
    public, signing = SiteKeys(keys).load(site_id)
    values = dict.fromkeys(P.REPORT_KEYS, 1.0) | {P.METRIC_EXAMPLES: examples}
    context = _envelope_context(msg, site_id, P.REPORT_MODULE)
    envelope = seal_delta(P.report_bytes(values), public, signing, context)
    reply.content.config_records[P.UPDATE_RECORD][P.KEY_REPORT] = envelope


def _note_shapes(msg: Message, context: Context) -> None:
    arrays = msg.content.array_records.get(P.GLOBAL_RECORD)
    if arrays is not None:
        state = split_modules(arrays.to_torch_state_dict())[MODULE]
        shapes = {key: json.dumps(list(value.shape)) for key, value in state.items()}
        context.state.config_records[SHAPES_RECORD] = ConfigRecord(shapes)  # type: ignore[arg-type]


def _zeros(context: Context) -> AdapterState:
    """A delta of the right keys and shapes (the module's global tensors: the fedavg rule)."""
    shapes = context.state.config_records[SHAPES_RECORD]
    return {key: torch.zeros(*json.loads(str(shape))) for key, shape in shapes.items()}


def _nan_delta(plan: FaultPlan, fault: Fault, msg: Message, reply: Message, ctx: Context) -> None:
    # encode_delta refuses NaN, so write the bits of a float32 NaN over the first value of the
    # data section, as a hostile (or broken) site's own encoder would send it.
    payload = encode_delta(_zeros(ctx))
    start = 8 + int.from_bytes(payload[:8], "little")
    payload = payload[:start] + b"\x00\x00\xc0\x7f" + payload[start + 4 :]
    _reseal(msg, reply, plan.keys, f"site-{fault.site}", payload)


def _wrong_shape(plan: FaultPlan, fault: Fault, msg: Message, reply: Message, ctx: Context) -> None:
    delta = _zeros(ctx)
    first = sorted(delta)[0]
    delta[first] = torch.zeros(delta[first].shape[0] + 1, *delta[first].shape[1:])
    _reseal(msg, reply, plan.keys, f"site-{fault.site}", encode_delta(delta))


def _huge_norm(plan: FaultPlan, fault: Fault, msg: Message, reply: Message, ctx: Context) -> None:
    delta = {key: torch.full_like(value, 100.0) for key, value in _zeros(ctx).items()}
    _reseal(msg, reply, plan.keys, f"site-{fault.site}", encode_delta(delta))


def _inflated_count(
    plan: FaultPlan, fault: Fault, msg: Message, reply: Message, _: Context
) -> None:
    # The site signs its own lie: the coordinator's bound on the count must catch it.
    _reseal_report(msg, reply, plan.keys, f"site-{fault.site}", plan.max_examples * 1000)


def _replay(_p: FaultPlan, _f: Fault, _m: Message, reply: Message, context: Context) -> None:
    stored = context.state.config_records[REPLAY_RECORD][P.delta_key(MODULE)]
    reply.content.config_records[P.UPDATE_RECORD][P.delta_key(MODULE)] = stored


def _unenrolled(plan: FaultPlan, _f: Fault, msg: Message, reply: Message, ctx: Context) -> None:
    _reseal(msg, reply, plan.rogue_keys, ROGUE_SITE, encode_delta(_zeros(ctx)))


HOSTILE_EDITS: dict[str, Callable[[FaultPlan, Fault, Message, Message, Context], None]] = {
    NAN_DELTA: _nan_delta,
    WRONG_SHAPE: _wrong_shape,
    HUGE_NORM: _huge_norm,
    INFLATED_COUNT: _inflated_count,
    REPLAY: _replay,
    UNENROLLED: _unenrolled,
}
