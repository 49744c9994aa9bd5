"""Site sampling at the coordinator: who is connected, which site each node is, the cohort.

With ``federation.fraction-train`` or ``fraction-evaluate`` below 1, each stage instructs a
cohort drawn by ``common.sampling`` from the *site ids* of the connected nodes, not their
Flower node ids: node ids are random per SuperLink registration (and per simulation), so a
resumed run could not draw the same sites from them. The coordinator learns a node's site id
once, with a signed identify query (``P.QUERY_IDENTIFY``) that the site answers with its id
only; the claim is authenticated later, by the site's signed train and evaluate replies, as
before. Only the cohort gets train or evaluate instructions.

A node whose identify failed, a quarantined node, a site id outside the allow-list (modes with
keys) and a site id claimed by two nodes are not available: the draw sees only what every
honest run would see, so that it stays a function of the available site ids.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from common import protocol as P
from common.config import SITE_ID_PATTERN
from common.errors import FedloraError
from common.sampling import STAGE_TRAIN, cohort_size, draw_cohort
from server.strategy import FedLoraStrategy, reply_node, sent_nodes

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cohort:
    """One stage's draw: the nodes instructed, their sites, and how many were available."""

    stage: str
    nodes: list[int]
    sites: list[str]
    available: int

    def fields(self) -> dict[str, object]:
        """For ``metrics.jsonl`` and the audit log: the sampled sites, sorted, and the pool."""
        return {f"sampled_{self.stage}": self.sites, "available_sites": self.available}


@dataclass
class CohortSampler:
    """Draws each stage's cohort for ``strategy`` over ``grid`` (``federation.fraction-*``)."""

    strategy: FedLoraStrategy
    names: dict[int, str] = field(default_factory=dict)  # node id -> the site id it claimed
    failed: dict[int, str] = field(default_factory=dict)  # node id -> why identify failed

    def draw(self, grid: Grid, server_round: int, stage: str) -> Cohort:
        """Wait for ``min-available-sites`` identified sites, then draw ``stage``'s cohort.

        Raises
        ------
        FedloraError
            When fewer than ``min-available-sites`` sites are available within
            ``federation.round-timeout`` (naming what was missing).
        """
        fed = self.strategy.cfg.federation
        pool = self._available(grid, server_round)
        fraction = fed.fraction_train if stage == STAGE_TRAIN else fed.fraction_evaluate
        # Evaluation aggregates nothing, so min-sites binds the training cohort only.
        floor = fed.min_sites if stage == STAGE_TRAIN else None
        size = cohort_size(fraction, len(pool), floor)
        sites = draw_cohort(pool, size, fed.sampling_seed, server_round, stage)
        return Cohort(stage, [pool[site] for site in sites], sites, len(pool))

    def _available(self, grid: Grid, server_round: int) -> dict[str, int]:
        fed = self.strategy.cfg.federation
        deadline = time.monotonic() + fed.round_timeout
        while True:
            nodes = sorted(set(grid.get_node_ids()) - set(self.strategy.quarantined))
            unknown = [n for n in nodes if n not in self.names and n not in self.failed]
            if unknown:
                self._identify(grid, unknown, server_round)
            pool = self._pool(nodes)
            if len(pool) >= fed.available_floor:
                return pool
            if time.monotonic() > deadline:
                raise FedloraError(
                    f"round {server_round}: {len(pool)} sites available (connected, identified, "
                    f"not quarantined), federation.min-available-sites needs "
                    f"{fed.available_floor}; identify failures: {self.failed}"
                )
            time.sleep(1.0)

    def _pool(self, nodes: list[int]) -> dict[str, int]:
        """Site id -> node of the available sites; a site id two nodes claim is left out."""
        claims: dict[str, list[int]] = {}
        for node in nodes:
            if node in self.names:
                claims.setdefault(self.names[node], []).append(node)
        pool = {}
        for site, holders in sorted(claims.items()):
            if len(holders) > 1:
                logger.warning("site %s is claimed by nodes %s: not sampled", site, holders)
                continue
            pool[site] = holders[0]
        return pool

    def _identify(self, grid: Grid, nodes: list[int], server_round: int) -> None:
        """Ask each of ``nodes`` once which site it is (a signed query; the reply is a claim)."""
        strategy = self.strategy
        content = strategy.signed(
            RecordDict({P.HEADER_RECORD: strategy._header(server_round)}), MessageType.QUERY
        )
        messages = [Message(content, dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
        sent = sent_nodes(messages)
        timeout = strategy.cfg.federation.round_timeout
        for reply in grid.send_and_receive(messages, timeout=timeout):
            node = reply_node(reply, sent)
            try:
                self.names[node] = self._claim(reply)
            except FedloraError as exc:
                self.failed[node] = str(exc)
                logger.warning("node %s is not sampled: %s", node, exc)
        for node in nodes:
            if node not in self.names and node not in self.failed:
                self.failed[node] = f"no identify reply within {timeout:g} s"

    def _claim(self, reply: Message) -> str:
        if reply.has_error():
            raise FedloraError(f"identify refused: {reply.error.reason}")
        record = reply.content.config_records.get(P.UPDATE_RECORD, ConfigRecord())
        site = record.get(P.KEY_SITE)
        if not isinstance(site, str) or not SITE_ID_PATTERN.fullmatch(site):
            raise FedloraError(f"identify reply names no valid site id: {str(site)[:80]!r}")
        sealing = self.strategy.sealing
        if sealing is not None and site not in sealing.allow_list:
            raise FedloraError(f"identify reply names {site}, which is not in the allow-list")
        return site
