"""Secure-sum mode: one training round as five Message-API stages of pairwise-masked secure
aggregation (Bonawitz et al. 2017; SecAgg+ peer graph), run by the ServerApp.

    train + advertise -> share keys -> masked input -> confirm survivors -> unmask

The confirm stage is the consistency check against a coordinator that tells different sites
different stories about who dropped (``common.secagg``).

The coordinator learns only ``sum_i w_i * clip(delta_i)`` and ``sum_i w_i`` over the sites
that uploaded a masked input; sites that drop after sharing keys are recovered from the
Shamir shares their neighbours hold. Only sum-only rules are allowed (config validation).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from common import protocol as P
from common.adapters import AdapterState
from common.config import RunConfig
from common.fixedpoint import Layout, flatten, unflatten
from common.secagg import (
    KeyAdvert,
    SecAggError,
    SecAggParams,
    max_abs_error_per_coordinate,
    max_abs_weight_error,
    params_for,
    verify_advert,
)
from common.secagg_records import (
    adverts_from_record,
    adverts_to_record,
    confirm_request_to_record,
    confirmation_from_record,
    shares_from_record,
    shares_to_record,
    unmask_reply_from_record,
    unmask_request_to_record,
)
from common.secagg_server import SecAggResult, SecAggServer
from server.strategy import FedLoraStrategy, StageLog, reply_node, sent_nodes

logger = logging.getLogger(__name__)


def _config(values: Mapping[str, Any]) -> ConfigRecord:
    """A ConfigRecord from one of ``common.secagg``'s flat record dicts."""
    plain: dict[str, Any] = dict(values)
    return ConfigRecord(plain)


def record_bytes(record: Mapping[str, Any]) -> int:
    """Payload bytes of a stage record: bytes as they are, ints as 8 bytes, lists summed."""

    def size(value: Any) -> int:
        if isinstance(value, bytes | str):
            return len(value)
        if isinstance(value, list):
            return sum(size(item) for item in value)
        return 8

    return sum(size(value) for value in record.values())


def site_numbers(site_names: Iterable[str]) -> dict[str, int]:
    """Public integer ids 1..N of the enrolled sites, in name order."""
    return {name: index + 1 for index, name in enumerate(sorted(site_names))}


def secagg_params(cfg: RunConfig, num_sites: int) -> SecAggParams:
    """Clip range and fixed-point scale from the configured bounds (error known in advance)."""
    ss, dp = cfg.privacy.secure_sum, cfg.privacy.dp
    # With DP every site has weight 1 (DP-FedAvg); otherwise its example count, bounded.
    max_weight = 1.0 if dp.enabled else float(ss.max_weight)
    clip = dp.clip + 6 * dp.noise_multiplier * dp.clip if dp.enabled else ss.clip_range
    return params_for(
        num_sites,
        clip,
        max_weight,
        degree=ss.degree,
        threshold=ss.threshold,
        min_survivors=cfg.federation.min_sites,
    )


def check_sum_bounds(result: SecAggResult, params: SecAggParams) -> None:
    """Refuse an unmasked sum that no set of honest inputs can produce.

    Each honest site weighs between 1 (DP, or one example) and ``max-weight``, and clips every
    coordinate to ``clip-range`` before weighting, so ``n`` survivors' total weight lies in
    ``[n, n * max-weight]`` and every coordinate of the weighted sum within ``total weight *
    clip-range`` (plus the fixed-point error). A site that wraps its weight or its values
    around the field to rescale the aggregate lands outside (unless it stays within what one
    honest site could send: masked inputs cannot be range-checked one by one).

    Raises
    ------
    SecAggError
        Naming the bound that failed; the round then publishes nothing.
    """
    n = len(result.survivors)
    weight_error = max_abs_weight_error(params, n)
    if not n - weight_error <= result.total_weight <= n * params.max_weight + weight_error:
        raise SecAggError(
            f"unmasked total weight {result.total_weight:g} outside [{n}, "
            f"{n * params.max_weight:g}] for {n} survivors: a site's weight was out of range"
        )
    bound = result.total_weight * params.clip_range + max_abs_error_per_coordinate(params, n)
    largest = float(np.max(np.abs(result.weighted_sum))) if result.weighted_sum.size else 0.0
    if not largest <= bound:  # NaN-safe
        raise SecAggError(
            f"unmasked sum has a coordinate of size {largest:.6g}, above total weight x "
            f"clip-range = {bound:.6g}: a site's input was out of range"
        )


class SecureSumRound:
    """Drives the five stages of one round over a Grid and returns the new global state."""

    def __init__(self, strategy: FedLoraStrategy, grid: Grid, server_round: int) -> None:
        assert strategy.sealing is not None  # the allow-list holds the sites' identity keys
        self.strategy, self.grid, self.round = strategy, grid, server_round
        allow = strategy.sealing.allow_list
        # Numbered and masked among the sampled cohort only (federation.fraction-train): the
        # sites not drawn are no one's neighbours and their keys are not in the round.
        cohort = strategy.cohort_sites
        self.numbers = site_numbers(allow if cohort is None else cohort)
        self.names = {number: name for name, number in self.numbers.items()}
        self.params = secagg_params(strategy.cfg, len(self.numbers))
        self.context = P.secure_sum_context(strategy._header(server_round))
        self.log = StageLog()
        self.nodes: dict[int, int] = {}  # secagg id -> Flower node id
        self.refusals: dict[int, str] = {}  # what a site answered instead of its part
        self.keys = {self.numbers[name]: allow.public_key(name) for name in self.numbers}

    def _header(self, stage: str) -> ConfigRecord:
        header = self.strategy._header(self.round)
        header[P.KEY_STAGE] = stage
        header[P.KEY_SECAGG_PARAMS] = json.dumps(dataclasses.asdict(self.params))
        header[P.KEY_SITE_NUMBERS] = json.dumps(self.numbers)
        roster = self.strategy.sealing.roster if self.strategy.sealing else None
        if roster is None:
            raise SecAggError(
                "secure sum needs the enrollment authority's signed site roster (keys folder "
                "roster.signed, written by `fedlora keys init` / `add-site`): without it sites "
                "cannot check their neighbours' keys"
            )
        header[P.KEY_ROSTER] = roster
        return header

    def _exchange(
        self, stage: str, payloads: dict[int, RecordDict], timeout: float
    ) -> dict[int, Message]:
        """Send each site its payload; return the good replies by secagg id."""
        messages = []
        for number, content in payloads.items():
            content.config_records[P.HEADER_RECORD] = self._header(stage)
            self.strategy.signed(content, MessageType.TRAIN)
            messages.append(
                Message(content, dst_node_id=self.nodes[number], message_type=MessageType.TRAIN)
            )
        replies: dict[int, Message] = {}
        received = list(self.grid.send_and_receive(messages, timeout=timeout))
        by_node = {node: number for number, node in self.nodes.items()}
        sent = sent_nodes(messages)
        for reply in received:
            sender = by_node.get(reply_node(reply, sent))
            if sender is None:
                continue
            if reply.has_error():
                self.log.reject(self.names[sender], f"{stage}: {reply.error.reason}")
                self.refusals.setdefault(sender, f"{stage}: {reply.error.reason}")
                continue
            replies[sender] = reply
        return replies

    def _train_and_advertise(self, arrays: ArrayRecord) -> dict[int, KeyAdvert]:
        """Stage 1: every site trains and replies with its signed key advert and metrics."""
        aggregator = self.strategy.aggregator
        control = None
        if aggregator.control is not None:
            control = ArrayRecord(aggregator.control_for(arrays.to_torch_state_dict()))
        messages, self.log.bytes_down = self.strategy.downlink_messages(
            self._header(P.STAGE_TRAIN), arrays, MessageType.TRAIN, control
        )
        adverts: dict[int, KeyAdvert] = {}
        received = list(self.grid.send_and_receive(messages, timeout=self._timeout))
        sent = sent_nodes(messages)
        for reply in received:
            node = reply_node(reply, sent)
            site = self.strategy._site_of(reply, node)
            if reply.has_error():
                self.log.reject(site, f"site reported an error: {reply.error.reason}")
                self.strategy.downlink.forget(node)  # full state next time
                continue
            number = self.numbers.get(site)
            if number is None:
                self.log.reject(site, "unknown site in secure-sum round")
                continue
            try:
                record = reply.content.config_records[P.SECAGG_RECORD]
                advert = adverts_from_record(dict(record))[number]
                # Checked before the reply takes the site's slot, so that a node merely
                # claiming a site cannot lock the real one out of the round.
                verify_advert(advert, self.keys[number], self.context)
            except (SecAggError, KeyError) as exc:
                self.log.reject(site, f"malformed or unsigned key advert: {exc}")
                continue
            if number in self.nodes:
                self.log.reject(site, "a second signed advert from this site in the round")
                continue
            adverts[number] = advert
            self.strategy.downlink.confirm(node, self.strategy.version)
            self.log.bytes_up += record_bytes(record)
            self.nodes[number] = reply.metadata.src_node_id
            # No per-site figures in secure-sum mode: a site's loss, example count or clip
            # scale would single it out of the sum (the sites do not send them).
            self.log.accepted[site] = {}
        return adverts

    @property
    def _timeout(self) -> float:
        return self.strategy.cfg.federation.round_timeout

    def _records(self, replies: dict[int, Message]) -> dict[int, dict[str, Any]]:
        out: dict[int, dict[str, Any]] = {}
        for number, reply in replies.items():
            record = reply.content.config_records.get(P.SECAGG_RECORD)
            if record is not None:
                self.log.bytes_up += record_bytes(record)
                out[number] = dict(record)
        return out

    def run(self, arrays: ArrayRecord) -> ArrayRecord:
        """All five stages; the new global adapter from the unmasked sum.

        Raises
        ------
        SecAggError
            When too few sites are left at some stage; the reason also names what the
            sites that refused a stage said (a site that will not confirm or unmask says why).
        """
        try:
            return self._run(arrays)
        except SecAggError as exc:
            if not self.refusals:
                raise
            said = "; ".join(
                f"{self.names.get(n, f'#{n}')}: {why}" for n, why in sorted(self.refusals.items())
            )
            raise SecAggError(f"{exc}; the sites that refused said: {said}") from exc

    def _run(self, arrays: ArrayRecord) -> ArrayRecord:
        global_state = arrays.to_torch_state_dict()
        keys = self.strategy.aggregator.sent_keys(global_state)
        sent = {k: global_state[k] for k in keys}
        if self.strategy.aggregator.control is not None:  # SCAFFOLD: each dc_i after the delta
            sent |= {P.CONTROL_FLAT_PREFIX + k: global_state[k] for k in keys}
        _, layout = flatten(sent)
        length = sum(int(np.prod(shape)) for _, shape in layout)
        server = SecAggServer(self.params, self.context, self.keys, length)
        broadcast = server.collect_adverts(self._train_and_advertise(arrays))
        advert_record = adverts_to_record(broadcast)
        shares = self._records(
            self._exchange(
                P.STAGE_SHARE,
                {n: RecordDict({P.SECAGG_RECORD: _config(advert_record)}) for n in broadcast},
                self._timeout,
            )
        )
        routed = server.route_shares({n: shares_from_record(r) for n, r in shares.items()})
        masked_replies = self._exchange(
            P.STAGE_MASK,
            {
                n: RecordDict({P.SECAGG_RECORD: _config(shares_to_record(s))})
                for n, s in routed.items()
            },
            self._timeout,
        )
        masked: dict[int, npt.NDArray[np.uint32]] = {}
        for number, reply in masked_replies.items():
            record = reply.content.array_records.get(P.SECAGG_RECORD)
            if record is not None:
                vector = record.to_numpy_ndarrays()[0]
                self.log.bytes_up += vector.nbytes
                masked[number] = vector
        confirm = self._records(
            self._exchange(
                P.STAGE_CONFIRM,
                {
                    n: RecordDict({P.SECAGG_RECORD: _config(confirm_request_to_record(r))})
                    for n, r in server.collect_masked(masked).items()
                },
                self._timeout,
            )
        )
        requests = server.collect_confirmations(
            {n: confirmation_from_record(r) for n, r in confirm.items()}
        )
        unmask = self._records(
            self._exchange(
                P.STAGE_UNMASK,
                {
                    n: RecordDict({P.SECAGG_RECORD: _config(unmask_request_to_record(r))})
                    for n, r in requests.items()
                },
                self._timeout,
            )
        )
        result = server.unmask({n: unmask_reply_from_record(r) for n, r in unmask.items()})
        return ArrayRecord(self._apply(global_state, result, layout))

    def _apply(
        self, global_state: AdapterState, result: SecAggResult, layout: Layout
    ) -> AdapterState:
        for number, reason in result.rejected.items():
            self.log.reject(self.names.get(number, f"#{number}"), f"secure-sum: {reason}")
        survivors = {self.names[n] for n in result.survivors}
        # Survivors' adverts were signature-checked: their nodes are who they claimed.
        for number in result.survivors:
            self.strategy.node_sites[self.nodes[number]] = self.names[number]
        self.log.accepted = {s: m for s, m in self.log.accepted.items() if s in survivors}
        check_sum_bounds(result, self.params)
        unmasked = unflatten(result.weighted_sum, layout)
        weighted_sum = {
            k: v for k, v in unmasked.items() if not k.startswith(P.CONTROL_FLAT_PREFIX)
        }
        aggregator = self.strategy.aggregator
        mean = aggregator.mean_from_sum(weighted_sum, result.total_weight)
        self.log.extra["secure_sum_max_abs_error"] = max_abs_error_per_coordinate(
            self.params, len(result.survivors)
        ) / max(result.total_weight, 1e-12)
        new_state = aggregator.apply_mean(global_state, mean)
        control_sum = {
            k[len(P.CONTROL_FLAT_PREFIX) :]: v
            for k, v in unmasked.items()
            if k.startswith(P.CONTROL_FLAT_PREFIX)
        }
        if control_sum:
            aggregator.update_control_from_sum(
                control_sum, result.total_weight, len(result.survivors)
            )
        return new_state
