"""The coordinator's strategy on Flower's Message API: send the global adapter, validate and
aggregate the sites' deltas, collect evaluations.

A bad reply (error, wrong base, wrong round, duplicate, malformed, oversized, non-finite or
wrongly shaped delta, implausible example count), or none within the round timeout, is logged
with its reason and left out; the round aggregates the rest. ``AggregationError`` is raised
only when too few replies remain.

Every reply is validated in full (its delta decoded and checked) before any is aggregated, so
the aggregation weights are known. When the mean needs only the weighted sum
(``Aggregator.streams``), an accepted reply keeps its opened payload, not its decoded delta,
and the aggregator decodes and sums the payloads one at a time: the coordinator holds the
encoded payloads and one adapter, not N decoded adapters.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    MetricRecordValues,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from common import protocol as P
from common.adapters import AdapterState, AggregationError, check_delta, check_norm
from common.allow_list import AllowList
from common.config import RunConfig, SitePlan
from common.encoding import decode_delta, decode_delta_flat
from common.envelope import EnvelopeContext, max_envelope_bytes, open_delta
from common.errors import FedloraError, UpdateRejected
from common.instructions import sign_instruction
from common.keys import CoordinatorPrivateKey, KeyMaterialError
from common.modules import join_modules, sent_modules, split_modules
from common.scopes import PRIVATE
from common.streaming import FlatLayout
from server.aggregate import Aggregator, SiteDelta, SitePayloads
from server.downlink import Downlink, arrays_sha256

logger = logging.getLogger(__name__)

MetricValue = MetricRecordValues


@dataclass(frozen=True)
class Sealing:
    """What the coordinator needs to open sealed envelopes and sign its instructions."""

    coordinator: CoordinatorPrivateKey
    allow_list: AllowList
    instruction_key: Ed25519PrivateKey  # every site pins its public half (common.instructions)
    # The enrollment authority's signed roster (common.roster), relayed to secure-sum sites.
    roster: bytes | None = None


@dataclass(frozen=True)
class AcceptedUpdate:
    site: str
    examples: int
    delta: AdapterState  # decoded; empty when the aggregator streams
    metrics: dict[str, float]
    payload_bytes: int
    payloads: dict[str, bytes] = field(default_factory=dict)  # module -> opened, when streaming
    control: AdapterState = field(default_factory=dict)  # SCAFFOLD's c_i(new) - c_i, decoded


@dataclass
class StageLog:
    """What happened in one stage (train or evaluate) of one round, for metrics and audit."""

    accepted: dict[str, dict[str, float]] = field(default_factory=dict)
    rejected: list[dict[str, str]] = field(default_factory=list)
    bytes_up: int = 0
    bytes_down: int = 0
    seconds: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)  # mode-specific figures

    def reject(self, site: str, reason: str) -> None:
        logger.warning("rejected reply from %s: %s", site, reason)
        self.rejected.append({"site": site, "reason": reason})


class FedLoraStrategy(Strategy):
    """Weighted FedAvg of adapter deltas, with per-reply validation."""

    def __init__(
        self,
        cfg: RunConfig,
        plan: SitePlan,
        fingerprint: str,
        run_id: str,
        sealing: Sealing | None = None,
    ) -> None:
        if cfg.privacy.mode != "none" and sealing is None:
            raise KeyMaterialError(
                f"privacy.mode = {cfg.privacy.mode!r} needs the coordinator's key and allow-list"
            )
        self.cfg = cfg
        self.plan = plan
        self.fingerprint = fingerprint
        self.run_id = run_id
        self.sealing = sealing
        self.aggregator = Aggregator(cfg)
        # Which form of each version each node gets (reference, step, full): server.downlink.
        self.downlink = Downlink(cfg.federation.downlink, cfg.privacy.max_payload_bytes)
        self.version = 0  # the global version the current instructions carry
        self.node_ids: list[int] = []
        # federation.fraction-*: the nodes (and their sites) this stage instructs, drawn by
        # server.cohort; None = every node in node_ids (no sampling).
        self.cohort_nodes: list[int] | None = None
        self.cohort_sites: list[str] | None = None
        self.offences: dict[int, int] = {}  # Flower node id -> rejected train replies
        self.quarantined: dict[int, str] = {}  # node id -> the site name it last claimed
        # Node id -> site of its last accepted train reply (signature-checked when sealed),
        # and -> the site its last evaluate reply claimed (unsigned): they name a node's later
        # error replies, e.g. of a site that died mid-round.
        self.node_sites: dict[int, str] = {}
        self.node_claims: dict[int, str] = {}
        self._sent: list[Message] = []  # the current stage's instructions
        self.train_log = StageLog()
        self.eval_log = StageLog()
        self._global: AdapterState = {}
        self._global_modules: dict[str, AdapterState] = {}  # the same, split once per round

    # -- instructions ------------------------------------------------------------------------
    def _header(self, server_round: int) -> ConfigRecord:
        return ConfigRecord(
            {
                P.KEY_PROTOCOL: P.PROTOCOL_VERSION,
                P.KEY_RUN_ID: self.run_id,
                P.KEY_ROUND: server_round,
                P.KEY_MODULE: ",".join(self.aggregator.modules),
                P.KEY_VERSION: self.version,
                P.KEY_FINGERPRINT: self.fingerprint,
                P.KEY_PLAN: self.plan.model_dump_json(by_alias=True),
            }
        )

    def signed(self, content: RecordDict, message_type: str) -> RecordDict:
        """``content`` signed with the instruction key (where the mode has keys), in place."""
        if self.sealing is not None:
            sign_instruction(content, message_type, self.sealing.instruction_key)
        return content

    def downlink_messages(
        self,
        header: ConfigRecord,
        arrays: ArrayRecord,
        message_type: str,
        control: ArrayRecord | None = None,
    ) -> tuple[list[Message], int]:
        """One signed instruction per node carrying ``arrays`` (the header's version) in the
        form that node gets (``server.downlink``); and the bytes down, all nodes together.
        ``control``: SCAFFOLD's ``c``, signed into every instruction (``P.CONTROL_RECORD``).

        Nodes that get the same form share one content (one signature)."""
        version = int(str(header[P.KEY_VERSION]))
        digest = arrays_sha256(arrays)
        contents: dict[str, tuple[RecordDict, int]] = {}
        messages: list[Message] = []
        down = 0
        for node in self.instructed:
            form = self.downlink.form(node, version)
            if form not in contents:
                content, size = self.downlink.content(form, header, arrays, digest)
                if control is not None:
                    content.array_records[P.CONTROL_RECORD] = control
                    size += sum(len(a.data) for a in control.values())
                contents[form] = (self.signed(content, message_type), size)
            content, size = contents[form]
            messages.append(Message(content, dst_node_id=node, message_type=message_type))
            down += size
        return messages, down

    @property
    def instructed(self) -> list[int]:
        """The nodes this stage instructs: the sampled cohort, else every node."""
        return self.node_ids if self.cohort_nodes is None else list(self.cohort_nodes)

    def _instructions(
        self,
        server_round: int,
        arrays: ArrayRecord,
        message_type: str,
        log: StageLog,
        control: ArrayRecord | None = None,
    ) -> list[Message]:
        self._sent, log.bytes_down = self.downlink_messages(
            self._header(server_round), arrays, message_type, control
        )
        return list(self._sent)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._global = arrays.to_torch_state_dict()
        self._global_modules = split_modules(self._global)
        self.train_log = StageLog()
        control = None
        if self.aggregator.control is not None:
            control = ArrayRecord(self.aggregator.control_for(self._global))
        return self._instructions(server_round, arrays, MessageType.TRAIN, self.train_log, control)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.eval_log = StageLog()
        return self._instructions(server_round, arrays, MessageType.EVALUATE, self.eval_log)

    # -- replies -----------------------------------------------------------------------------
    def _site_of(self, reply: Message, node: int) -> str:
        """The site a reply claims; for an error reply, the site its node last was."""
        if reply.has_content() and P.UPDATE_RECORD in reply.content.config_records:
            return str(reply.content.config_records[P.UPDATE_RECORD].get(P.KEY_SITE, "?"))
        return self._node_name(node)

    def _node_name(self, node: int) -> str:
        """The site a node last was (signed train reply), else claimed to be, else its id."""
        if node in self.node_sites:
            return self.node_sites[node]
        if node in self.node_claims:
            return f"node-{node} (claims {self.node_claims[node]})"
        return f"node-{node}"

    def _open_update(self, server_round: int, reply: Message) -> AcceptedUpdate:
        """Validate one train reply; raise ``UpdateRejected`` with the reason if it is bad."""
        if reply.has_error():
            raise UpdateRejected(f"site reported an error: {reply.error.reason}")
        update = reply.content.config_records.get(P.UPDATE_RECORD)
        if update is None:
            raise UpdateRejected("reply lacks the update record")
        if update.get(P.KEY_FINGERPRINT) != self.fingerprint:
            raise UpdateRejected(
                f"base fingerprint {update.get(P.KEY_FINGERPRINT)!r} differs from the "
                f"coordinator's {self.fingerprint}"
            )
        if update.get(P.KEY_ROUND) != server_round or update.get(P.KEY_VERSION) != self.version:
            raise UpdateRejected(
                f"reply is for round {update.get(P.KEY_ROUND)!r} / version "
                f"{update.get(P.KEY_VERSION)!r}, expected {server_round} / {self.version}"
            )
        site = self._site_of(reply, reply.metadata.src_node_id)
        metrics = self._figures(reply, site, server_round)
        examples = metrics.get(P.METRIC_EXAMPLES)
        if not isinstance(examples, int) or not 0 < examples <= self.cfg.aggregation.max_examples:
            raise UpdateRejected(
                f"example count {examples!r} outside 1..{self.cfg.aggregation.max_examples} "
                "(aggregation.max-examples)"
            )
        modules = self._check_modules(site, P.delta_modules(update.keys()))
        payloads = [update.get(P.delta_key(m)) for m in modules]
        wire_bytes = sum(len(x) for x in payloads if isinstance(x, bytes))
        delta: AdapterState = {}
        kept: dict[str, bytes] = {}
        streams = self.aggregator.streams
        for module, payload in zip(modules, payloads, strict=True):
            opened, plain = self._open_module(module, payload, site, server_round)
            if streams:  # the decoded delta is dropped here: it was only checked
                kept[module] = plain
            else:
                delta.update(join_modules({module: opened}))
        control: AdapterState = {}
        if self.aggregator.control is not None:
            for module in modules:
                payload = update.get(P.control_key(module))
                opened = self._open_control(module, payload, site, server_round)
                control.update(join_modules({module: opened}))
                wire_bytes += len(payload) if isinstance(payload, bytes) else 0
        values = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
        return AcceptedUpdate(site, examples, delta, values, wire_bytes, kept, control)

    def _figures(
        self, reply: Message, site: str, server_round: int, evaluate: bool = False
    ) -> Mapping[str, object]:
        """A reply's per-site figures: in the clear in mode ``none``, else opened from its
        sealed, signed report (secure-sum train replies carry none and never come here)."""
        what = "evaluate reply" if evaluate else "reply"
        if self.cfg.privacy.mode == "none":
            metrics = reply.content.metric_records.get(P.METRICS_RECORD)
            if metrics is None:
                raise UpdateRejected(f"{what} lacks the metrics record")
            return metrics
        update = reply.content.config_records.get(P.UPDATE_RECORD)
        envelope = None if update is None else update.get(P.KEY_REPORT)
        bound = max_envelope_bytes(P.MAX_REPORT_BYTES)
        if not isinstance(envelope, bytes) or len(envelope) > bound:
            raise UpdateRejected(f"{what} lacks its sealed report (or it is oversized)")
        if evaluate:
            opened = self._open(envelope, site, server_round, P.EVAL_REPORT_MODULE)
            return P.parse_report(opened, P.EVAL_REPORT_KEYS, P.EVAL_REPORT_OPTIONAL)
        return P.parse_report(self._open(envelope, site, server_round, P.REPORT_MODULE))

    def _check_modules(self, site: str, got: list[str]) -> list[str]:
        """The modules ``site`` must send; a reply carrying others or lacking one is rejected."""
        expected = sent_modules(self.cfg.modules, self.cfg.groups, site)
        for module in got:
            if module in expected:
                continue
            config = self.cfg.modules.get(module)
            if config is None:
                raise UpdateRejected(f"reply carries a delta of unknown module {module[:64]!r}")
            if config.scope == PRIVATE:
                raise UpdateRejected(f"module {module!r} is private and must never leave a site")
            raise UpdateRejected(
                f"module {module!r} ({config.scope}) aggregates over its group, and {site} "
                "is not in it (see [groups] in the run config)"
            )
        missing = sorted(set(expected) - set(got))
        if missing:
            raise UpdateRejected(f"reply lacks the delta of module(s) {missing}")
        return expected

    def _open_module(
        self, module: str, payload: object, site: str, server_round: int
    ) -> tuple[AdapterState, bytes]:
        """Open, decode and validate one module's payload against what the site started from;
        the decoded delta and the opened payload."""
        if not isinstance(payload, bytes):
            raise UpdateRejected(f"module {module!r}: delta payload is not bytes")
        bound = self.cfg.privacy.max_payload_bytes
        sealed = self.cfg.privacy.mode == "sealed"
        if sealed:
            bound = max_envelope_bytes(bound)
        if len(payload) > bound:
            raise UpdateRejected(
                f"module {module!r}: delta payload of {len(payload):,} bytes exceeds "
                f"privacy.max-payload-bytes = {bound:,}"
            )
        if sealed:
            payload = self._open(payload, site, server_round, module)
        start = self.aggregator.site_start(module, site, self._global_modules[module], self.version)
        reference = {k: start[k] for k in self.aggregator.rule.sent_keys(start)}
        shapes = {k: tuple(v.shape) for k, v in reference.items()}
        max_norm = self.cfg.aggregation.max_delta_norm
        if self.aggregator.streams:
            # One flat decode checks names, shapes and finite values (a reply's delta is only
            # checked here; the aggregator decodes it again when it adds it).
            layout = FlatLayout(shapes)
            flat = decode_delta_flat(payload, self.cfg.privacy.max_payload_bytes, layout)
            delta = layout.unflatten(flat)
        else:
            delta = decode_delta(payload, self.cfg.privacy.max_payload_bytes, expected=shapes)
        try:
            if self.aggregator.streams:
                check_norm(delta, max_norm)
            else:
                check_delta(delta, reference, max_norm=max_norm)
            self.aggregator.rule.check_payload(delta)
        except UpdateRejected as exc:
            raise UpdateRejected(f"module {module!r}: {exc}") from None
        return delta, payload

    def _open_control(
        self, module: str, payload: object, site: str, server_round: int
    ) -> AdapterState:
        """SCAFFOLD: open and decode one module's ``c_i(new) - c_i``; the sent keys' shapes,
        finite values, within the payload bound (no norm bound: it is a gradient estimate)."""
        if not isinstance(payload, bytes):
            raise UpdateRejected(f"module {module!r}: the reply lacks its control-variate change")
        bound = self.cfg.privacy.max_payload_bytes
        sealed = self.cfg.privacy.mode == "sealed"
        if len(payload) > (max_envelope_bytes(bound) if sealed else bound):
            raise UpdateRejected(
                f"module {module!r}: control-variate payload of {len(payload):,} bytes exceeds "
                f"privacy.max-payload-bytes = {bound:,}"
            )
        if sealed:
            payload = self._open(payload, site, server_round, P.control_envelope_module(module))
        start = self.aggregator.site_start(module, site, self._global_modules[module], self.version)
        shapes = {k: tuple(start[k].shape) for k in self.aggregator.rule.sent_keys(start)}
        try:
            return decode_delta(payload, bound, expected=shapes)
        except UpdateRejected as exc:
            raise UpdateRejected(f"module {module!r}, control variate: {exc}") from None

    def _open(self, envelope: bytes, site: str, server_round: int, module: str) -> bytes:
        """Verify the site's signature and decrypt, in memory only, for this exact context."""
        assert self.sealing is not None
        try:
            expected = EnvelopeContext(
                run_id=self.run_id,
                round=server_round,
                site_id=site,
                module=module,
                version=self.version,
                base_fingerprint=self.fingerprint,
            )
        except ValueError as exc:
            raise UpdateRejected(f"reply names an invalid site id: {exc}") from None
        bound = max_envelope_bytes(self.cfg.privacy.max_payload_bytes)
        return open_delta(
            envelope, self.sealing.coordinator, self.sealing.allow_list, expected, bound
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted: list[AcceptedUpdate] = []
        sent = sent_nodes(self._sent)
        answered: set[int] = set()
        for reply in replies:
            node = reply_node(reply, sent)
            answered.add(node)
            site = self._site_of(reply, node)
            try:
                update = self._open_update(server_round, reply)
                if any(a.site == update.site for a in accepted):
                    raise UpdateRejected("a second reply from the same site in one round")
            except UpdateRejected as exc:
                self.train_log.reject(site, str(exc))
                if not reply.has_error():  # a crash or timeout is no offence
                    self._count_offence(node, site)
                else:  # it may lack the version or hold a corrupt copy: full state next time
                    self.downlink.forget(node)
                continue
            accepted.append(update)
            self.downlink.confirm(node, self.version)
            self.node_sites[node] = update.site
            self.train_log.bytes_up += update.payload_bytes
            self.train_log.accepted[update.site] = update.metrics
        self._note_silent(self.train_log, sent, answered)
        needed = self.cfg.federation.min_sites or len(self.instructed)
        if len(accepted) < needed:
            raise AggregationError(
                f"round {server_round}: {len(accepted)} valid replies, federation.min-sites "
                f"needs {needed}; rejected: {self.train_log.rejected}"
            )
        # Replies arrive in any order; summing in site order makes the result reproducible
        # bit for bit (floating-point addition is not associative).
        accepted.sort(key=lambda a: a.site)
        if self.aggregator.streams:
            streamed = [SitePayloads(a.site, a.examples, a.payloads) for a in accepted]
            new_state = self.aggregator.aggregate_streaming(self._global, streamed)
        else:
            updates = [SiteDelta(a.site, a.examples, a.delta) for a in accepted]
            new_state = self.aggregator.aggregate(self._global, updates, server_round, self.version)
        self.aggregator.update_control([(a.examples, a.control) for a in accepted])
        return ArrayRecord(new_state), MetricRecord(_weighted(self.train_log.accepted))

    def _note_silent(self, log: StageLog, sent: Mapping[str, int], answered: set[int]) -> None:
        """Record the instructed nodes whose reply the grid stopped waiting for.

        A late reply is never counted: the grid only collects replies to the current
        instructions, so it stays unread at the SuperLink. Like a crash, no offence.
        """
        timeout = self.cfg.federation.round_timeout
        for node in sorted(set(sent.values()) - answered):
            log.reject(
                self._node_name(node), f"no reply within federation.round-timeout = {timeout:g} s"
            )

    def _count_offence(self, node: int, site: str) -> None:
        """Quarantine a node after ``federation.quarantine-after`` rejected replies.

        Counted per Flower node (authenticated by the SuperLink), not per claimed site name,
        so a forger cannot get an honest site quarantined by sending bad replies in its name.
        """
        limit = self.cfg.federation.quarantine_after
        self.offences[node] = self.offences.get(node, 0) + 1
        # (With sampling, a node that connected after the start is not in node_ids; the
        # cohort sampler leaves out every quarantined node.)
        if limit is not None and self.offences[node] >= limit and node not in self.quarantined:
            if node in self.node_ids:
                self.node_ids.remove(node)
            self.quarantined[node] = site
            logger.warning("quarantined %s (node %s) after %d rejected replies", site, node, limit)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        sent = sent_nodes(self._sent)
        answered: set[int] = set()
        for reply in replies:
            node = reply_node(reply, sent)
            answered.add(node)
            site = self._site_of(reply, node)
            if reply.has_content() and P.UPDATE_RECORD in reply.content.config_records:
                self.node_claims[node] = site
            if reply.has_error():
                self.eval_log.reject(site, f"site reported an error: {reply.error.reason}")
                self.downlink.forget(node)
                continue
            if site in self.eval_log.accepted:
                self.eval_log.reject(site, "a second evaluate reply from this site this round")
                continue
            try:
                metrics = self._figures(reply, site, server_round, evaluate=True)
            except UpdateRejected as exc:
                self.eval_log.reject(site, str(exc))
                continue
            self.eval_log.accepted[site] = {
                k: float(v) for k, v in metrics.items() if isinstance(v, int | float)
            }
            self.downlink.confirm(node, self.version)
        self._note_silent(self.eval_log, sent, answered)
        if not self.eval_log.accepted:
            return None
        return MetricRecord(_weighted(self.eval_log.accepted))

    def summary(self) -> None:
        logger.info(
            "fedlora strategy: rule=%s, server-lr=%s, privacy=%s, encoding=%s",
            self.cfg.aggregation.rule,
            self.cfg.aggregation.server_lr,
            self.cfg.privacy.mode,
            self.cfg.privacy.encoding,
        )


def _weighted(per_site: dict[str, dict[str, float]]) -> dict[str, MetricValue]:
    """Example-weighted means of the sites' loss/accuracy metrics (token-weighted for eval)."""
    out: dict[str, MetricValue] = {}
    for key in (P.METRIC_TRAIN_LOSS, P.METRIC_EVAL_LOSS, P.METRIC_EVAL_ACCURACY):
        weight_key = P.METRIC_EVAL_TOKENS if key == P.METRIC_EVAL_LOSS else P.METRIC_EXAMPLES
        pairs = [(m[key], m.get(weight_key, 0.0)) for m in per_site.values() if key in m]
        total = sum(w for _, w in pairs)
        if pairs and total > 0 and all(math.isfinite(v) for v, _ in pairs):
            out[key] = sum(v * w for v, w in pairs) / total
    return out


def sent_nodes(sent: Iterable[Message]) -> dict[str, int]:
    """Instruction message id -> its destination node (the grid sets ids when it sends)."""
    return {m.metadata.message_id: m.metadata.dst_node_id for m in sent if m.metadata.message_id}


def reply_node(reply: Message, sent: Mapping[str, int]) -> int:
    """The node a reply answers for.

    For a node that stopped heartbeating the SuperLink answers itself, as its own node id, so
    the instruction the reply refers to names the node, not the reply's sender.
    """
    return sent.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)


def wait_for_nodes(grid: Grid, count: int, timeout: float) -> list[int]:
    """Node ids once ``count`` sites are connected; a clear error instead of a silent hang."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes
        if time.monotonic() > deadline:
            raise FedloraError(
                f"only {len(nodes)} of {count} sites connected within {timeout:.0f} s "
                "(federation.min-available-sites, by default federation.sites)"
            )
        time.sleep(1.0)
