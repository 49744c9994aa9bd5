"""``RemoteSite``: a site whose model and data live in the site daemon's resident worker.

The ClientApp process Flower starts for each message uses it exactly like an in-process
``SiteRuntime`` (the ``client.site_api.Site`` protocol): each call is one request over the
worker's Unix socket (``client.worker_wire``). Training progress comes back as ``step`` frames
and reaches ``on_step`` here, so the site's log reads as before.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from client.kept_states import RESIDUAL_FOLDER, KeptStates
from client.privacy_ledger import PrivacyLedger
from client.received import RECEIVED_FOLDER, ReceivedVersions
from client.roster_serial import RosterSerial
from client.round_claims import check_run_id, claim
from client.site_api import SiteUpdate, StepCallback, TrainResult
from client.worker_wire import (
    KIND_DESCRIBE,
    KIND_ERROR,
    KIND_EVAL,
    KIND_EVALUATE,
    KIND_SITE,
    KIND_STEP,
    KIND_TRAIN,
    KIND_UPDATE,
    Frame,
    SiteWorkerError,
    WorkerFrameError,
    field_of,
    raise_error,
    recv_frame,
    send_frame,
)
from common.adapters import AdapterState
from common.config import SitePlan
from common.errors import FingerprintMismatch
from common.evaluation import EvalResult

# As ``client.site.LOCAL_RUN`` (not imported: that module loads transformers and peft).
LOCAL_RUN = "local"

# Seconds to wait for the worker to accept a connection (it serves one request at a time,
# but accepts while busy; a full backlog means something is wrong).
CONNECT_TIMEOUT = 30.0
# The states a reply may carry.
_REPLY_STATES = frozenset({"delta"})


class RemoteSite:
    """A proxy of the site served at ``socket_path``, for one round plan."""

    def __init__(self, socket_path: Path, plan: SitePlan, state_dir: Path | None = None) -> None:
        self.socket_path = socket_path
        self.state_dir = state_dir  # the site's store (``site.state``): round claims live there
        # The worker builds (or finds) the plan's runtime now: a task or label mismatch is
        # refused here, as building the site in process would.
        reply = self._call({"kind": KIND_DESCRIBE, "plan": plan.model_dump_json()}, KIND_SITE)
        self.site_id = field_of(reply, "site_id", str)
        self._fingerprint = field_of(reply, "fingerprint", str)
        self._claimed: set[int] = set()
        self.roster = RosterSerial(state_dir)  # across runs, in the site's store
        self.ledger = PrivacyLedger(state_dir)  # DP releases across runs
        self._received: dict[str, ReceivedVersions] = {}
        self._residuals: dict[str, KeptStates] = {}

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def claim_masked_input(self, run_id: str, server_round: int) -> None:
        """``client.round_claims.claim`` in the site's store (shared with its worker)."""
        root = None if self.state_dir is None else self.state_dir / check_run_id(run_id)
        claim(root, server_round, self._claimed)

    def check_roster(self, serial: int) -> None:
        """``client.roster_serial``: refuse a roster older than the highest accepted."""
        self.roster.check(serial)

    def accept_roster(self, serial: int) -> None:
        """``client.roster_serial``: the highest roster serial, in the site's store."""
        self.roster.accept(serial)

    def residuals(self, run_id: str) -> KeptStates:
        """Error feedback's residuals of run ``run_id``, in the site's store (in memory for
        as long as this proxy lives when it has none)."""
        if run_id not in self._residuals:
            folder = None
            if self.state_dir is not None:
                folder = self.state_dir / check_run_id(run_id) / RESIDUAL_FOLDER
            self._residuals[run_id] = KeptStates(folder)
        return self._residuals[run_id]

    def received_versions(self, run_id: str) -> ReceivedVersions:
        """The site's received versions, in its store (shared with its worker)."""
        if self.state_dir is None:  # tests: memory, for as long as this proxy lives
            return self._received.setdefault(run_id, ReceivedVersions(None))
        return ReceivedVersions(self.state_dir / check_run_id(run_id) / RECEIVED_FOLDER)

    def check_fingerprint(self, expected: str) -> None:
        """Refuse to work for a coordinator whose base model differs from ours."""
        if expected != self._fingerprint:
            raise FingerprintMismatch(expected, self._fingerprint, where=self.site_id)

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
        """``SiteRuntime.train`` in the worker; progress is reported to ``on_step``."""
        request = {
            "kind": KIND_TRAIN,
            "plan": plan.model_dump_json(),
            "round": server_round,
            "version": version,
            "run_id": run_id,
        }
        states = {"received": received}
        if control is not None:
            states["control"] = control
        reply = self._call(request, KIND_UPDATE, states, on_step)
        result = TrainResult(
            loss=field_of(reply, "loss", float),
            first_loss=field_of(reply, "first_loss", float),
            last_loss=field_of(reply, "last_loss", float),
            steps=field_of(reply, "steps", int),
            seconds=field_of(reply, "seconds", float),
            peak_memory_bytes=field_of(reply, "peak_memory_bytes", int),
        )
        return SiteUpdate(
            delta=reply.states["delta"],
            examples=field_of(reply, "examples", int),
            result=result,
            clip_scale=field_of(reply, "clip_scale", float),
            control=reply.states.get("control"),
        )

    def evaluate(
        self, received: AdapterState, plan: SitePlan, version: int, run_id: str = LOCAL_RUN
    ) -> EvalResult:
        """``SiteRuntime.evaluate`` in the worker."""
        request = {
            "kind": KIND_EVALUATE,
            "plan": plan.model_dump_json(),
            "version": version,
            "run_id": run_id,
        }
        reply = self._call(request, KIND_EVAL, {"received": received})
        accuracy = reply.header.get("accuracy")
        return EvalResult(
            loss=field_of(reply, "loss", float),
            perplexity=field_of(reply, "perplexity", float),
            accuracy=None if accuracy is None else field_of(reply, "accuracy", float),
            examples=field_of(reply, "examples", int),
            tokens=field_of(reply, "tokens", int),
        )

    def _call(
        self,
        request: Mapping[str, Any],
        expect: str,
        states: Mapping[str, AdapterState] | None = None,
        on_step: StepCallback | None = None,
    ) -> Frame:
        """One request; its ``step`` frames go to ``on_step``; the reply of kind ``expect``."""
        with self._connect() as sock:
            try:
                send_frame(sock, request, states)
                while True:
                    reply = recv_frame(sock, _REPLY_STATES)
                    if reply.kind != KIND_STEP:
                        break
                    if on_step is not None:
                        step, steps = field_of(reply, "step", int), field_of(reply, "steps", int)
                        on_step(step, steps, field_of(reply, "loss", float))
            except OSError as exc:
                raise SiteWorkerError(
                    f"the site worker at {self.socket_path} dropped the connection ({exc})"
                ) from None
        if reply.kind == KIND_ERROR:
            raise_error(reply)
        if reply.kind != expect:
            raise WorkerFrameError(f"the site worker replied {reply.kind!r}, expected {expect!r}")
        return reply

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect(str(self.socket_path))
        except OSError as exc:
            sock.close()
            raise SiteWorkerError(
                f"the site worker at {self.socket_path} is not reachable ({exc}); it runs in "
                "the site daemon: `fedlora site start --config site.toml`"
            ) from None
        # Training may take minutes to hours; the coordinator's round timeout bounds a reply.
        sock.settimeout(None)
        return sock
