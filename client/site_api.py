"""What a site is to the ClientApp: the ``Site`` protocol and the results a site returns
(``EvalResult`` is ``common.evaluation``'s, which the coordinator's evaluation returns too).

Two kinds of site satisfy ``Site``: ``client.site.SiteRuntime`` (model and data in this
process) and ``client.remote_site.RemoteSite`` (a thin proxy of the site daemon's resident
worker). This module imports neither torch-heavy libraries (transformers, peft) nor Flower, so
the per-message ClientApp process of a deployed site stays cheap to start.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from common.adapters import AdapterState
from common.config import SitePlan
from common.evaluation import EvalResult

if TYPE_CHECKING:
    from client.kept_states import KeptStates
    from client.privacy_ledger import PrivacyLedger
    from client.received import ReceivedVersions

# Called after every optimizer step with (step, steps, loss): the app turns it into progress.
StepCallback = Callable[[int, int, float], None]


@dataclass(frozen=True)
class TrainResult:
    loss: float  # mean training loss over the local steps (nats per token or per example)
    first_loss: float
    last_loss: float
    steps: int
    seconds: float
    peak_memory_bytes: int


@dataclass(frozen=True)
class SiteUpdate:
    # ``<module>/<key>`` of the sent modules, only the keys the rule sends (clipped when the
    # plan says so); what the site keeps (private modules, fedsa's B) stays in its store.
    delta: AdapterState
    examples: int  # training examples at this site (the aggregation weight it claims)
    result: TrainResult
    clip_scale: float = 1.0  # factor the DP clipping applied (1.0 = within the bound)
    # SCAFFOLD (client.drift): ``c_i(new) - c_i`` over the delta's keys; None when off.
    control: AdapterState | None = None


class Site(Protocol):
    """One site as the ClientApp uses it: who it is, its base model, train and evaluate."""

    @property
    def site_id(self) -> str: ...

    @property
    def fingerprint(self) -> str: ...

    @property
    def ledger(self) -> PrivacyLedger:
        """The site's DP releases across runs, in its store (``client.privacy_ledger``)."""
        ...

    def check_fingerprint(self, expected: str) -> None:
        """Raise ``FingerprintMismatch`` unless the site's base model is ``expected``."""

    def received_versions(self, run_id: str) -> ReceivedVersions:
        """The global versions of run ``run_id`` this site holds (``client.received``)."""
        ...

    def claim_masked_input(self, run_id: str, server_round: int) -> None:
        """Secure sum: raise ``UpdateRejected`` if this (run, round) already got a masked
        input from this site (``client.round_claims``); otherwise record that it does now."""

    def check_roster(self, serial: int) -> None:
        """Secure sum: raise ``UpdateRejected`` if this site accepted a newer signed roster
        than ``serial`` before (``client.roster_serial``); remember nothing."""

    def accept_roster(self, serial: int) -> None:
        """``check_roster``, then remember ``serial`` (once the instruction is acted on)."""

    def residuals(self, run_id: str) -> KeptStates:
        """The up-link's quantisation residuals of run ``run_id``, by round (error feedback)."""
        ...

    def train(
        self,
        received: AdapterState,
        plan: SitePlan,
        server_round: int,
        version: int,
        on_step: StepCallback | None = None,
        run_id: str = ...,
        control: AdapterState | None = None,
    ) -> SiteUpdate:
        """Train from global ``version`` of run ``run_id`` (``received``: ``<module>/<key>``);
        ``control``: SCAFFOLD's ``c`` (``client.drift``), or None."""
        ...

    def evaluate(
        self, received: AdapterState, plan: SitePlan, version: int, run_id: str = ...
    ) -> EvalResult:
        """Evaluate global ``version`` (+ the site's private modules) on its held-out split."""
        ...
