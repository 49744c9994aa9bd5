"""The simulation-level cases of the fault matrix: each a real Flower simulation of
``examples/tiny.toml`` with one kind of fault, judged by what the run left on disk.

``benchmarks/fault_matrix.py`` runs every case and prints the tables; ``tests/test_faults.py``
runs each once and asserts its checks. A case returns ``CaseResult`` rows: counts read back
from the run folder (``metrics.jsonl``, ``audit.jsonl``, the registry) plus named checks of
the outcome the case expects. The coordinator runs in this process (Flower's simulation runs
the ServerApp in a thread), the sites in Ray workers.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from fault_inject import (
    CRASH,
    DUPLICATE,
    HUGE_NORM,
    INFLATED_COUNT,
    NAN_DELTA,
    REPLAY,
    ROGUE_SITE,
    STALL,
    UNENROLLED,
    WRONG_SHAPE,
    Fault,
    FaultPlan,
    faulty_app,
    stall_mark,
)

from client.app import SiteKeys, make_client_app
from common.config import load_config
from common.errors import FedloraError
from common.keys import COORDINATOR_KEY_NAME, generate_site_key, public_path_for
from common.registry import Registry
from fedlora.simulate import (
    provision_keys,
    run_in_simulation_runtime,
    scratch_folders,
    set_offline_environment,
    simulate,
)
from server.app import make_server_app
from server.audit import (
    AUDIT_FILE,
    EVENT_REPLY_ACCEPTED,
    EVENT_REPLY_REJECTED,
    EVENT_ROUND_STARTED,
    EVENT_RUN_STOPPED,
    EVENT_VERSION_PUBLISHED,
    read_entries,
)
from server.checkpoint import load_checkpoint
from server.federation import prepare
from server.metrics import read_metrics
from server.rundir import RunDirLock

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "examples" / "tiny.toml"
ALL3 = ["site-0", "site-1", "site-2"]
# Round timeout of the slow-site case (seconds). An honest tiny-llama site trains in under a
# second, but each Ray worker's first message (round 0's evaluation) loads torch and the model:
# 20+ s on a loaded 2-core machine, and round 0 is under the same timeout.
SLOW_TIMEOUT = 30.0


@dataclass
class CaseResult:
    """One row of the fault matrix and the checks behind its verdict."""

    case: str
    expected: str
    rounds_completed: int
    accepted: int  # train replies accepted (audit)
    rejected: int  # train replies rejected, errors and timeouts included (audit)
    published: int  # version folders in the registry
    expected_versions: int  # v0 plus one per completed round
    half_written: int  # temp folders (or other stray entries) in the registry
    checks: dict[str, bool]
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def lost(self) -> int:
        return self.expected_versions - self.published

    @property
    def failed(self) -> list[str]:
        return [name for name, passed in self.checks.items() if not passed]

    @property
    def verdict(self) -> str:
        return "ok" if not self.failed and self.lost == 0 and self.half_written == 0 else "FAIL"

    def row(self) -> list[Any]:
        return [
            self.case,
            self.expected,
            self.rounds_completed,
            self.accepted,
            self.rejected,
            self.published,
            self.lost,
            self.half_written,
            self.verdict,
        ]


MATRIX_COLUMNS = [
    "case",
    "expected outcome",
    "rounds completed",
    "updates accepted",
    "updates rejected",
    "versions published",
    "versions lost",
    "half-written visible",
    "verdict",
]


# -- running a faulty federation and reading back what it left ---------------------------------
def run_faulty(out: Path, overrides: list[str], faults: tuple[Fault, ...]) -> None:
    """Simulate ``examples/tiny.toml`` with ``overrides``; the sites misbehave as ``faults``."""
    set_offline_environment()
    cfg = load_config(TINY, overrides)
    sealing, _ = provision_keys(cfg, out)
    rogue = out / "rogue-keys"  # a key pair nobody enrolled, and the coordinator's public key
    generate_site_key(rogue, ROGUE_SITE)
    public = public_path_for(out / "keys" / COORDINATOR_KEY_NAME)
    shutil.copy(public, rogue / public.name)
    plan = FaultPlan(faults, out / "keys", rogue, out, cfg.aggregation.max_examples)
    plan.marks.mkdir()
    app = faulty_app(make_client_app(cfg, SiteKeys(out / "keys"), out / "sites"), plan)
    with scratch_folders(), RunDirLock(out):
        coord = prepare(cfg, out, sealing)
        run_in_simulation_runtime(make_server_app(coord), app, cfg)


def by_round(out: Path) -> dict[int, dict[str, Any]]:
    """``metrics.jsonl`` lines by round number."""
    return {line["round"]: line for line in read_metrics(out)}


def registry_entries(out: Path) -> list[str]:
    """Every name in the registry's module folder: versions, and anything half-written."""
    folder = out / "registry" / "shared"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def tally(case: str, expected: str, out: Path, checks: dict[str, bool]) -> CaseResult:
    """The matrix row of run folder ``out``; adds the checks every case shares."""
    audit = read_entries(out / AUDIT_FILE)
    rounds = [m for r, m in by_round(out).items() if r >= 1 and "failed" not in m]
    versions = [v.version for v in Registry(out / "registry").versions("shared")]
    published_events = [e["version"] for e in audit if e["event"] == EVENT_VERSION_PUBLISHED]
    stray = [name for name in registry_entries(out) if name not in {f"v{v:04d}" for v in versions}]

    def train_events(event: str) -> int:
        return sum(1 for e in audit if e["event"] == event and e.get("stage") == "train")

    checks = {
        **checks,
        "versions run v0000.. without gaps": versions == list(range(len(versions))),
        "each version published (audited) exactly once": published_events == versions,
        "registry verifies": Registry(out / "registry").verify() == [],
    }
    return CaseResult(
        case=case,
        expected=expected,
        rounds_completed=len(rounds),
        accepted=train_events(EVENT_REPLY_ACCEPTED),
        rejected=train_events(EVENT_REPLY_REJECTED),
        published=len(versions),
        expected_versions=1 + len(rounds),
        half_written=len(stray),
        checks=checks,
        details={"out": str(out), "stray": stray},
    )


def reasons(line: dict[str, Any], site: str) -> list[str]:
    """Rejection reasons of one round's metrics line whose site name mentions ``site``."""
    return [r["reason"] for r in line["rejected"] if site in r["site"]]


# -- the cases ---------------------------------------------------------------------------------
def site_crash_before_training(work: Path, extra: Sequence[str] = ()) -> list[CaseResult]:
    """a. site-1's ClientApp raises on round 1's train instruction, then behaves."""
    out = work / "a-crash-before-training"
    overrides = ["federation.rounds=2", "federation.min-sites=2", *extra]
    run_faulty(out, overrides, (Fault(site=1, round=1, stage="train", kind=CRASH),))
    m = by_round(out)
    checks = {
        "round 1 aggregates site-0 and site-2": m[1]["cohort"] == ["site-0", "site-2"],
        "site-1's crash is recorded in round 1": any(
            "crashed" in r for r in reasons(m[1], "site-1")
        ),
        "site-1 rejoins in round 2": m[2]["cohort"] == ALL3,
    }
    result = tally("a. site crash before training", "round completes", out, checks)
    result.details["round 1 rejected"] = m[1]["rejected"]
    return [result]


def site_crash_after_upload(work: Path, extra: Sequence[str] = ()) -> list[CaseResult]:
    """b. site-1 uploads in round 1, crashes evaluating it and at round 2's train."""
    out = work / "b-crash-after-upload"
    faults = (
        Fault(site=1, round=1, stage="evaluate", kind=CRASH),
        Fault(site=1, round=2, stage="train", kind=CRASH),
    )
    run_faulty(out, ["federation.rounds=2", "federation.min-sites=2", *extra], faults)
    m = by_round(out)
    v1 = Registry(out / "registry").get("shared", 1).manifest
    checks = {
        "round 1 aggregates all three (the upload counts)": m[1]["cohort"] == ALL3,
        "v0001's lineage names site-1": "site-1" in v1["cohort"],
        "round 1's evaluation records site-1's crash": bool(reasons(m[1], "site-1")),
        "round 2 aggregates site-0 and site-2": m[2]["cohort"] == ["site-0", "site-2"],
        "round 2 records site-1's crash": any("crashed" in r for r in reasons(m[2], "site-1")),
    }
    result = tally("b. site crash after upload", "round completes", out, checks)
    result.details["rejected"] = {r: m[r]["rejected"] for r in (1, 2)}
    return [result]


def slow_site_beyond_timeout(work: Path, timeout: float = SLOW_TIMEOUT) -> list[CaseResult]:
    """c. site-1 answers round 1's train instruction only after the round closed without it.

    It answers once v0001 exists (so after the timeout), and in round 2 two seconds after
    that late reply left: the late reply sits at the SuperLink while round 2 collects.
    """
    out = work / "c-slow-site"
    late_mark = f"marks/{stall_mark(1, 1)}"
    faults = (
        Fault(site=1, round=1, stage="train", kind=STALL, after="registry/shared/v0001"),
        Fault(site=1, round=2, stage="train", kind=STALL, after=late_mark, seconds=2.0),
    )
    overrides = [
        "federation.rounds=2",
        "federation.min-sites=2",
        f"federation.round-timeout={timeout}",
    ]
    run_faulty(out, overrides, faults)
    m = by_round(out)
    late, again = _sent_at(out / late_mark), _sent_at(out / "marks" / stall_mark(1, 2))
    # When the coordinator accepted round 2's train replies (it had collected all of them).
    collected = [
        _epoch(e["time"])
        for e in read_entries(out / AUDIT_FILE)
        if e["event"] == EVENT_REPLY_ACCEPTED and e["round"] == 2 and e["stage"] == "train"
    ]
    missing = [r for r in m[1]["rejected"] if "no reply within" in r["reason"]]
    checks = {
        "round 1 aggregates site-0 and site-2": m[1]["cohort"] == ["site-0", "site-2"],
        "round 1 waited the whole timeout": m[1]["seconds_train"] >= timeout - 1.0,
        "round 1 records one missing reply, not an honest site's": len(missing) == 1
        and missing[0]["site"] not in ALL3,
        "the late reply reached the SuperLink before round 2 collected": late is not None
        and again is not None
        and bool(collected)
        and late + 1.5 < again < min(collected),
        "round 2 counts each site once, rejects nothing": m[2]["cohort"] == ALL3
        and not m[2]["rejected"],
    }
    result = tally("c. slow site beyond round timeout", "round completes", out, checks)
    result.details |= {
        "round-timeout s": timeout,
        "round 1 train s": round(m[1]["seconds_train"], 1),
        "round 1 rejected": m[1]["rejected"],
        "late reply left, s before round 2 collected": None
        if late is None or not collected
        else round(min(collected) - late, 1),
    }
    return [result]


def _sent_at(mark: Path) -> float | None:
    """When a stalled site answered (epoch seconds), from its mark file."""
    return float(json.loads(mark.read_text())["sent_at"]) if mark.is_file() else None


@contextmanager
def disk_full_at(version: int) -> Iterator[None]:
    """The registry's tensor write fails with ENOSPC for ``version``, as on a full disk.

    The one fake of the matrix: it replaces the function ``common.registry_format`` writes the
    adapter tensors with (``safetensors.torch.save_file``, imported when the registry
    writes), in this process (where the simulated coordinator runs).
    """
    import safetensors.torch  # the registry imports save_file from here when it writes

    real = safetensors.torch.save_file

    def save_file(tensors: Any, filename: str, metadata: Any = None) -> None:
        if Path(filename).parent.name.startswith(f".v{version:04d}."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        real(tensors, filename, metadata=metadata)

    safetensors.torch.save_file = save_file
    try:
        yield
    finally:
        safetensors.torch.save_file = real


def disk_full_while_publishing(work: Path, extra: Sequence[str] = ()) -> list[CaseResult]:
    """d. Writing v0002 fails with ENOSPC; the run stops; ``--resume`` completes it."""
    out = work / "d-disk-full"
    cfg = load_config(TINY, ["federation.rounds=3", *extra])
    error: Exception | None = None
    with disk_full_at(2):
        try:
            simulate(cfg, out)
        except (FedloraError, OSError) as exc:  # OSError: the failure escaped unreported
            error = exc
    stopped = [e for e in read_entries(out / AUDIT_FILE) if e["event"] == EVENT_RUN_STOPPED]
    ckpt = load_checkpoint(out)
    checks = {
        "the run stops with a fedlora error": isinstance(error, FedloraError),
        "the error names the full disk and --resume": "No space left" in str(error)
        and "--resume" in str(error),
        "the audit log records why the run stopped": bool(stopped)
        and "No space left" in stopped[-1]["reason"],
        "v0000 and v0001 only": registry_entries(out) == ["v0000", "v0001"],
        "no summary (the run is unfinished)": not (out / "summary.json").exists(),
        "the checkpoint holds round 2 (written whole before the publish)": ckpt is not None
        and ckpt.round == 2,
    }
    first = tally("d1. disk full writing v0002", "run stops, failure recorded", out, checks)
    first.details |= {"error": str(error), "checkpoint round": ckpt.round if ckpt else None}

    summary = simulate(cfg, out, resume=True)
    m = by_round(out)
    checks = {
        "every round recorded once": [line["round"] for line in read_metrics(out)] == [0, 1, 2, 3],
        "v0000..v0003, nothing else": registry_entries(out) == [f"v{v:04d}" for v in range(4)],
        "the summary ends at v0003": summary["final_version"] == 3,
        "round 2 is not retrained: v0002 comes from the checkpoint": [
            e["round"] for e in read_entries(out / AUDIT_FILE) if e["event"] == EVENT_ROUND_STARTED
        ]
        == [1, 2, 3],
        "round 3 aggregates all three": m[3]["cohort"] == ALL3,
    }
    second = tally("d2. --resume after d1", "run completes", out, checks)
    return [first, second]


# Hostile kind -> (the site whose reply it is: partition id, the name the coordinator sees it
# under, and a piece of the rejection reason that names the fault).
HOSTILE_SITES: dict[str, tuple[int, str, str]] = {
    NAN_DELTA: (2, "site-2", "non-finite"),
    WRONG_SHAPE: (3, "site-3", "shape"),
    HUGE_NORM: (4, "site-4", "norm"),
    INFLATED_COUNT: (5, "site-5", "aggregation.max-examples"),
    REPLAY: (6, "site-6", "envelope is for round 1"),
    DUPLICATE: (7, "site-1", "same site"),  # node 7 replies a second time as site-1
    UNENROLLED: (8, ROGUE_SITE, "not enrolled"),
}
HOSTILE_COLUMNS = ["hostile reply", "sent by", "seen as", "rejected", "reason", "round completed"]
# Honest per-site delta norms of tiny.toml are ~0.1-1; the huge-norm reply's is ~10^4.
MAX_DELTA_NORM = 50.0


def hostile_replies(work: Path, extra: Sequence[str] = ()) -> list[CaseResult]:
    """e. Round 2: seven sites each send one kind of hostile reply, two are honest."""
    out = work / "e-hostile-replies"
    faults = tuple(
        Fault(site=site, round=2, stage="train", kind=kind, target=1)
        for kind, (site, _, _) in HOSTILE_SITES.items()
    )
    overrides = [
        "federation.sites=9",
        "federation.rounds=2",
        "federation.min-sites=1",
        "data.partition='iid'",
        f"aggregation.max-delta-norm={MAX_DELTA_NORM}",
        *extra,
    ]
    run_faulty(out, overrides, faults)
    m = by_round(out)
    rows, checks = [], {}
    for kind, (site, seen_as, expected_reason) in HOSTILE_SITES.items():
        found = [r for r in m[2]["rejected"] if r["site"] == seen_as]
        named = len(found) == 1 and expected_reason in found[0]["reason"]
        checks[f"{kind} rejected with a reason naming it"] = named
        reason = found[0]["reason"] if found else "-"
        rows.append(
            [
                kind,
                f"site-{site}",
                seen_as,
                "yes" if found else "no",
                reason,
                "yes" if "v0002" in registry_entries(out) else "no",
            ]
        )
    checks |= {
        "round 1 aggregates all nine": m[1]["cohort"] == [f"site-{i}" for i in range(9)],
        "round 2 aggregates the two honest sites": m[2]["cohort"] == ["site-0", "site-1"],
        "nothing else rejected in round 2": len(m[2]["rejected"]) == len(HOSTILE_SITES),
    }
    result = tally(
        "e. hostile replies (7 kinds, one round)", "rejected, round completes", out, checks
    )
    result.details |= {"hostile rows": rows, "round 2 rejected": m[2]["rejected"]}
    return [result]


CASES: dict[str, Callable[[Path], list[CaseResult]]] = {
    "a": site_crash_before_training,
    "b": site_crash_after_upload,
    "c": slow_site_beyond_timeout,
    "d": disk_full_while_publishing,
    "e": hostile_replies,
}


def _epoch(stamp: str) -> float:
    """Seconds since the epoch of an audit ``time`` (ISO 8601, UTC, ``Z``)."""
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
