"""One site's runtime: its base model, adapter and data, and the two things it does per round.

``SiteRuntime.train`` turns the received global modules into a *delta* (trained - received)
of each module the site sends; ``SiteRuntime.evaluate`` measures the received version (with
the site's private modules) on its held-out split. What the site keeps between rounds, and
the versions it holds, live in its ``SiteStore``.
No Flower and no crypto here; ``client.app`` is the glue that carries these over messages.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from client.drift import DriftCorrection, join_kept, split_kept, trained_parameters
from client.kept_states import KeptStates
from client.losses import label_counts
from client.privacy_ledger import PrivacyLedger
from client.received import ReceivedVersions
from client.roster_serial import RosterSerial
from client.site_api import SiteUpdate, StepCallback
from client.site_store import SiteStore
from client.train import freeze_lora_a, train_local
from common.adapter_host import AdapterHost
from common.adapters import AdapterState, compute_delta
from common.config import ModuleConfig, SitePlan
from common.data import Kind, SiteData
from common.dp import clip_delta
from common.errors import ConfigError, FingerprintMismatch, UpdateRejected
from common.evaluation import EvalResult, evaluate_encoded
from common.exact import factors_for_site_rank, rank_fill_seed
from common.modules import join_modules, site_modules, split_modules
from common.rules import get_rule
from common.scopes import PRIVATE
from common.tokens import encode_examples, iterate_batches

logger = logging.getLogger(__name__)

# The run id of in-process use without a coordinator (compare's arms, tests).
LOCAL_RUN = "local"


def round_seed(seed: int, server_round: int, site_index: int) -> int:
    """A distinct, reproducible seed for each (run seed, round, site)."""
    return (seed * 1_000_003 + server_round * 1_009 + site_index) % (2**31 - 1)


def start_states(
    received: AdapterState,
    kept: AdapterState,
    plan: SitePlan,
    held: Mapping[str, ModuleConfig],
    initial: Mapping[str, AdapterState],
    version: int,
) -> dict[str, AdapterState]:
    """Where each module a site holds starts from at global ``version``.

    A sent module starts from the received global (projected to the site's own rank when it
    has one, ``factors_for_site_rank``) with the tensors the site keeps (fedsa's B) on top; a
    private module from what the site kept, else its seeded initialisation.
    """
    received_by, kept_by = split_modules(received), split_modules(kept)
    start: dict[str, AdapterState] = {}
    for name, module in held.items():
        if module.scope == PRIVATE:
            start[name] = kept_by.get(name) or dict(initial[name])
            continue
        if name not in received_by:
            raise UpdateRejected(f"the instruction carries no global state of module {name!r}")
        state = received_by[name]
        run_module = plan.modules[name]
        if module.rank != run_module.rank:
            state = factors_for_site_rank(
                state,
                module.rank,
                run_module.alpha / run_module.rank,
                module.alpha / module.rank,
                fill_seed=rank_fill_seed(plan.train.seed, version, name),
            )
        start[name] = {**state, **kept_by.get(name, {})}
    return start


class SiteRuntime:
    """A site's data, the adapter host it trains on, and its store (what it keeps)."""

    def __init__(
        self,
        host: AdapterHost,
        data: SiteData,
        kind: Kind,
        site_id: str,
        site_index: int,
        store: SiteStore | None = None,
    ) -> None:
        self.host = host
        self.data = data
        self.kind = kind
        self.site_id = site_id
        self.site_index = site_index
        self.store = store or SiteStore(None)
        self.roster = RosterSerial(self.store.root)
        self.ledger = PrivacyLedger(self.store.root)  # DP releases across runs
        self._encoded: dict[tuple[str, int], list[dict[str, torch.Tensor]]] = {}

    @property
    def fingerprint(self) -> str:
        return self.host.base.fingerprint

    def received_versions(self, run_id: str) -> ReceivedVersions:
        """The global versions of run ``run_id`` this site holds, in its store."""
        return self.store.for_run(run_id).received

    def claim_masked_input(self, run_id: str, server_round: int) -> None:
        """Secure sum: one masked input per (run, round), recorded in the store."""
        self.store.for_run(run_id).claim_masked_input(server_round)

    def check_roster(self, serial: int) -> None:
        """Secure sum: no roster older than one accepted before (``client.roster_serial``)."""
        self.roster.check(serial)

    def accept_roster(self, serial: int) -> None:
        """Secure sum: no roster older than one accepted before (``client.roster_serial``)."""
        self.roster.accept(serial)

    def residuals(self, run_id: str) -> KeptStates:
        """Error feedback's residuals of run ``run_id``, in the site's store."""
        return self.store.for_run(run_id).residuals

    def check_fingerprint(self, expected: str) -> None:
        """Refuse to work for a coordinator whose base model differs from ours."""
        if expected != self.fingerprint:
            raise FingerprintMismatch(expected, self.fingerprint, where=self.site_id)

    def _items(self, split: str, max_length: int) -> list[dict[str, torch.Tensor]]:
        key = (split, max_length)
        if key not in self._encoded:
            examples = self.data.train if split == "train" else self.data.heldout
            self._encoded[key] = encode_examples(
                examples, self.kind, self.host.base.tokenizer, max_length
            )
        return self._encoded[key]

    def _label_counts(self) -> torch.Tensor | None:
        """Examples per label id in this site's training split (classification; stays here)."""
        num_labels = self.host.base.model.config.num_labels
        if self.host.task != "classification" or num_labels is None:
            return None
        labels = [e.label for e in self.data.train if e.label is not None]
        return label_counts(labels, int(num_labels))

    def _held(self, plan: SitePlan) -> dict[str, ModuleConfig]:
        held = site_modules(plan.modules, plan.groups, self.site_id)
        if held != self.host.modules:
            raise ConfigError(
                f"{self.site_id}: the run's modules for this site ({sorted(held)}) differ from "
                f"the ones its adapter host was built with ({sorted(self.host.modules)})"
            )
        return held

    def _start(
        self, received: AdapterState, plan: SitePlan, version: int, store: SiteStore
    ) -> dict[str, Any]:
        """Load where this version starts into the host; record it in the site registry."""
        held = self._held(plan)
        kept, _ = split_kept(store.load_kept(before=version))
        start = start_states(received, kept, plan, held, self.host.initial, version)
        self.host.load(start)
        sources = {
            name: "trained at this site"
            if module.scope == PRIVATE
            else "received" + (" + this site's B (fedsa)" if plan.rule == "fedsa" else "")
            for name, module in held.items()
        }
        manifest = {"site": self.site_id, "base_fingerprint": self.fingerprint}
        store.record(version, start, self.host.loras, manifest, sources)
        return start

    def train(
        self,
        received: AdapterState,
        plan: SitePlan,
        server_round: int,
        version: int,
        on_step: StepCallback | None = None,
        run_id: str = LOCAL_RUN,
        control: AdapterState | None = None,
    ) -> SiteUpdate:
        """Train every module this site holds from global ``version``; return the delta.

        ``received`` is the global state of the sent modules (``<module>/<key>``). The rule
        decides what trains and what leaves: ``ffa`` freezes A (identical at every site) and
        sends B; ``fedsa`` sends A and keeps B here; private modules are kept whole, in the
        store's part for ``run_id``. ``control``: SCAFFOLD's ``c`` over the sent tensors
        (``client.drift``; None = off); the site's own ``c_i`` is kept in its store, and the
        update carries ``c_i(new) - c_i``.
        """
        store = self.store.for_run(run_id)
        start = self._start(received, plan, version, store)
        rule = get_rule(plan.rule)
        if plan.rule == "ffa":
            freeze_lora_a(self.host.model)
        seed = round_seed(plan.train.seed, server_round, self.site_index)
        items = self._items("train", plan.train.max_length)
        batches = iterate_batches(items, plan.train.batch_size, seed, self.host.pad_token_id)
        drift = None
        if control is not None:
            shared = [n for n, m in self.host.modules.items() if m.scope != PRIVATE]
            params = trained_parameters(self.host.model, shared)
            sent_keys = {f"{n}/{k}" for n in shared for k in rule.sent_keys(start[n])}
            params = {k: p for k, p in params.items() if k in sent_keys}
            own = split_kept(store.load_kept(before=version))[1]
            # c covers every sent module; a site trains only those it holds (groups).
            mine = {k: v for k, v in control.items() if k.partition("/")[0] in shared}
            drift = DriftCorrection(params, mine, own)
        result = train_local(
            self.host.model, batches, plan.train, seed, on_step, self._label_counts(), drift
        )
        trained = self.host.states()
        sent: dict[str, AdapterState] = {}
        kept: dict[str, AdapterState] = {}
        for name, module in self.host.modules.items():
            if module.scope == PRIVATE:
                kept[name] = trained[name]
                continue
            delta = compute_delta(trained[name], start[name])
            keys = set(rule.sent_keys(delta))
            sent[name] = {k: v for k, v in delta.items() if k in keys}
            if plan.rule == "fedsa":
                kept[name] = {k: v for k, v in trained[name].items() if k not in keys}
        flat = join_modules(sent)
        scale = 1.0
        if plan.clip is not None:
            flat, scale = clip_delta(flat, plan.clip)
        if drift is None:
            store.save_kept(version, join_modules(kept))
            return SiteUpdate(flat, len(self.data.train), result, scale)
        new_own = drift.new_own()
        store.save_kept(version, join_kept(join_modules(kept), new_own))
        return SiteUpdate(flat, len(self.data.train), result, scale, drift.sent(new_own))

    def evaluate(
        self, received: AdapterState, plan: SitePlan, version: int, run_id: str = LOCAL_RUN
    ) -> EvalResult:
        """Evaluate global ``version`` (+ this site's private tensors) on the held-out split."""
        self._start(received, plan, version, self.store.for_run(run_id))
        items = self._items("heldout", plan.train.max_length)
        return evaluate_encoded(self.host.model, items, self.host.task, self.host.pad_token_id)
