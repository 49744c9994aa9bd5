"""Deployment on 127.0.0.1 under crashes, and what the coordinator's disk holds afterwards.

One provisioned deployment (coordinator + sites a, b, c, TLS + SuperNode auth, sealed mode) is
shared by every test here; every process is a real `fedlora` command in its own process group,
stopped by PID at the end (also when a test fails).

- an uninterrupted 2-round run (the reference), during which the SuperLink's database is
  sampled: each train reply must pass through it as a sealed envelope, and neither a plaintext
  delta nor site a's data canary may ever be in it, nor in any site log (issue 3);
- the coordinator SIGKILLed during round 2 of 2 (its last round's training) and started again:
  the run finishes with every version once, bit-identical to the reference (issue 5);
- site c's SuperNode SIGKILLed during round 1 (federation.min-sites = 2): round 1 completes
  with a and b, and c, restarted with `fedlora site start`, is back in round 2's cohort.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import sqlite3
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from common.encoding import DELTA_FORMAT, encode_delta
from common.envelope import HEADER, MAGIC, EnvelopeContext
from common.registry import Registry
from common.registry_format import ADAPTER_FILE
from fedlora.deploy import APP_PACKAGES
from server.audit import EVENT_REPLY_REJECTED, EVENT_VERSION_PUBLISHED, read_entries
from tests.helpers.deployment import (
    BIN,
    REPO,
    Deployment,
    alive,
    free_port,
    process_tree,
    site_toml,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

SITES = ("a", "b", "c")
ROUNDS = 2  # a third round would check nothing the second does not (and cost 2 x ~40 s)
# A stage costs a ClientApp process per site (5-45 s on 2 busy cores); a site that dies is
# noticed by the SuperLink within 2 heartbeat intervals (60 s).
RUN_TIMEOUT = 1500.0
CANARY = f"fedlora-canary-{uuid.uuid4().hex}"  # planted in every example of site a
MARKER = DELTA_FORMAT.encode()  # the metadata tag of every plaintext delta
WINDOW = 32  # bytes before a marker that tell the app's own source code from a delta
TIMINGS: dict[str, float] = {}


def _rounds(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(x)["round"] for x in path.read_text().splitlines() if x.endswith("}")]


def _metrics(out: Path) -> dict[int, dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {line["round"]: line for line in map(json.loads, lines)}


def _digests(out: Path) -> list[str]:
    return [
        hashlib.sha256((v.path / ADAPTER_FILE).read_bytes()).hexdigest()
        for v in Registry(out / "registry").versions("shared")
    ]


# --------------------------------------------------------------------------- leak scanning


def _find_all(blob: bytes, needle: bytes) -> Iterator[int]:
    at = blob.find(needle)
    while at >= 0:
        yield at
        at = blob.find(needle, at + 1)


Windows = tuple[frozenset[bytes], frozenset[bytes]]


def _source_windows() -> Windows:
    """The bytes before and after the marker where it occurs in the app's own source files.

    Flower stores the app (FAB: the Python packages, uncompressed) in its database, and
    ``common/encoding.py`` names the format: those occurrences are code, not deltas. Either
    side must match (a database page boundary may cut into the other).
    """
    before, after = set(), set()
    for package in APP_PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            text = path.read_bytes()
            for at in _find_all(text, MARKER):
                before.add(text[max(0, at - WINDOW) : at])
                after.add(text[at + len(MARKER) : at + len(MARKER) + WINDOW])
    return frozenset(before), frozenset(after)


@dataclass
class Findings:
    envelopes: set[tuple[str, int, str]] = field(default_factory=set)  # (run id, round, site)
    leaks: set[str] = field(default_factory=set)

    def scan(self, name: str, blob: bytes, code: Windows) -> None:
        for at in _find_all(blob, MAGIC):
            try:
                _, _, _, info_length, _ = HEADER.unpack_from(blob, at)
                start = at + HEADER.size
                context = EnvelopeContext.from_info(blob[start : start + info_length])
            except (ValueError, TypeError, struct.error):  # the magic in code, a torn page
                continue
            self.envelopes.add((context.run_id, context.round, context.site_id))
        for at in _find_all(blob, MARKER):
            end = at + len(MARKER)
            if (
                blob[max(0, at - WINDOW) : at] not in code[0]
                and blob[end : end + WINDOW] not in code[1]
            ):
                self.leaks.add(f"plaintext delta tag in {name} at byte {at}")
        for at in _find_all(blob, CANARY.encode()):
            self.leaks.add(f"site a's data canary in {name} at byte {at}")


class StateSampler(threading.Thread):
    """Scans the coordinator's state folder (SuperLink database, WAL, ...) every ``interval``.

    Flower deletes a message's objects once the ServerApp has pulled it, and SQLite reuses the
    pages, so a scan after the run sees only the last envelopes; sampling while it runs sees
    every train reply pass through.
    """

    def __init__(self, folder: Path, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.folder = folder
        self.interval = interval
        self.findings = Findings()
        self.samples = 0
        self.errors: list[str] = []
        self._done = threading.Event()
        self._code = _source_windows()

    def run(self) -> None:
        seen: dict[Path, tuple[int, int]] = {}
        while not self._done.wait(self.interval):
            for path in sorted(self.folder.rglob("*")):
                try:
                    stat = path.stat()
                    if not path.is_file() or seen.get(path) == (stat.st_size, stat.st_mtime_ns):
                        continue
                    seen[path] = (stat.st_size, stat.st_mtime_ns)
                    blob = path.read_bytes()
                except OSError:
                    continue
                try:
                    self.findings.scan(str(path), blob, self._code)
                except Exception as exc:  # reported by the test, not lost with the thread
                    self.errors.append(f"{path}: {exc!r}")
            self.samples += 1

    def stop(self) -> Findings:
        self._done.set()
        self.join(timeout=30)
        return self.findings


# ----------------------------------------------------------------------------- deployment


@dataclass
class Federation:
    dep: Deployment
    coordinator: str = "coordinator-1"  # the name of the running coordinator's process

    @property
    def root(self) -> Path:
        return self.dep.root

    def start_coordinator(self, name: str) -> Path:
        self.coordinator = name
        args = ("coordinator", "start", "--config", "coordinator.toml")
        return self.dep.start(name, str(BIN / "fedlora"), *args)

    def start_site(self, site: str, name: str | None = None) -> Path:
        env = dict(self.dep.env, FLWR_HOME=str(self.root / f"flwr-{site}"))
        args = ("site", "start", "--config", f"site-{site}.toml")
        return self.dep.start(name or f"site-{site}", str(BIN / "fedlora"), *args, env=env)

    def submit(self, run_toml: str, name: str) -> Path:
        args = ("coordinator", "run", run_toml, "--config", "coordinator.toml", "--name", name)
        done = self.dep.fedlora(*args)
        assert done.returncode == 0, done.stdout + done.stderr
        return self.root / "runs" / name

    def check_running(self) -> bool:
        """True; an ``AssertionError`` naming a daemon that exited (its log's tail)."""
        for name, proc in self.dep.named.items():
            if proc.poll() is not None:
                tail = (self.root / f"{name}.log").read_text()[-3000:]
                raise AssertionError(f"{name} exited with {proc.returncode}:\n{tail}")
        return True

    def wait_finished(self, out: Path, timeout: float = RUN_TIMEOUT) -> None:
        wait_for(
            lambda: self.check_running() and (out / "summary.json").is_file(),
            timeout,
            f"{out.name}'s summary.json",
        )

    def log_marks(self) -> dict[str, int]:
        return {p.name: p.stat().st_size for p in self.root.glob("site-*.log")}

    def log_since(self, name: str, marks: dict[str, int]) -> str:
        with (self.root / name).open("rb") as log:
            log.seek(marks.get(name, 0))
            return log.read().decode(errors="replace")

    def serverapps(self) -> list[tuple[int, int]]:
        """The running ServerApp processes: the coordinator's descendants in another session."""
        tree = process_tree(self.dep.named[self.coordinator].pid)
        return [
            (pid, started)
            for pid, started in tree
            if b"flwr-serverapp" in Path(f"/proc/{pid}/cmdline").read_bytes()
        ]


def _run_toml(rounds: int, federation: str = "") -> str:
    text = (REPO / "examples/tiny.toml").read_text()
    text = text.replace(
        'path = "data/dolly-tiny.jsonl"', f'path = "{REPO}/examples/data/dolly-tiny.jsonl"'
    )
    return text.replace("rounds = 3", f"rounds = {rounds}{federation}")


def _write_files(root: Path, port: int) -> None:
    lines = (REPO / "examples/data/dolly-tiny.jsonl").read_text().splitlines()
    for index, site in enumerate(SITES):
        rows = [json.loads(line) for line in lines[index :: len(SITES)]]
        if site == "a":
            for row in rows:
                row["context"] = f"{row['context']} {CANARY}".strip()
        (root / f"{site}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (root / f"site-{site}.toml").write_text(site_toml(site, index, free_port(), port))
    (root / "coordinator.toml").write_text(
        f'[coordinator]\nkeys = "keys/coordinator"\nstate = "state"\nruns = "runs"\n'
        f'host = "127.0.0.1"\nport = {port}\n'
    )
    (root / "run-full.toml").write_text(_run_toml(ROUNDS))
    (root / "run2-min2.toml").write_text(_run_toml(2, "\nmin-sites = 2"))


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    started = time.monotonic()
    root = tmp_path_factory.mktemp("resilience")
    env = dict(
        os.environ,
        FLWR_HOME=str(root / "flwr"),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        HF_HUB_OFFLINE="1",
    )
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    dep = Deployment(root, free_port(), env)
    _write_files(root, dep.port)
    done = dep.fedlora("keys", "init", "--out", "keys", "--sites", ",".join(SITES))
    assert done.returncode == 0, done.stdout + done.stderr
    federation = Federation(dep)
    try:
        coordinator = federation.start_coordinator("coordinator-1")
        wait_for(
            lambda: all(f"site {s} " in coordinator.read_text() for s in SITES),
            120,
            "site registration",
        )
        logs = [federation.start_site(site) for site in SITES]
        wait_for(
            lambda: (
                federation.check_running()
                and all("SuperNode ID" in log.read_text() for log in logs)
            ),
            180,
            "every site to connect",
        )
        TIMINGS["setup"] = time.monotonic() - started
        yield federation
    finally:
        dep.stop()
        print("\ntimings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in TIMINGS.items()))


@dataclass(frozen=True)
class Reference:
    out: Path
    findings: Findings  # what the SuperLink's state folder held while it ran
    samples: int
    errors: list[str]


@pytest.fixture(scope="module")
def reference(fed: Federation) -> Reference:
    """An uninterrupted sealed run of ROUNDS rounds, the SuperLink's state sampled while it runs."""
    started = time.monotonic()
    sampler = StateSampler(fed.root / "state")
    sampler.start()
    try:
        out = fed.submit("run-full.toml", "reference")
        fed.wait_finished(out)
    finally:
        findings = sampler.stop()
    TIMINGS[f"reference run ({ROUNDS} rounds)"] = time.monotonic() - started
    return Reference(out, findings, sampler.samples, sampler.errors)


# ---------------------------------------------------------------------------------- tests


def test_sealed_run_leaves_no_plaintext_in_superlink_state_or_site_logs(
    fed: Federation, reference: Reference
) -> None:
    # The checks can see what they look for: a plaintext delta carries the tag, a does the canary.
    import torch

    assert MARKER in encode_delta({"x.lora_A.weight": torch.zeros(2, 2)}, "fp32")
    assert CANARY in (fed.root / "a.jsonl").read_text()

    run_id = json.loads((reference.out / "summary.json").read_text())["run_id"]
    seen = {(r, s) for rid, r, s in reference.findings.envelopes if rid == run_id}
    expected = {(r, s) for r in range(1, ROUNDS + 1) for s in SITES}
    assert reference.samples > 0 and not reference.errors, reference.errors
    assert seen >= expected, f"train replies never seen sealed in the DB: {expected - seen}"
    assert not reference.findings.leaks, sorted(reference.findings.leaks)[:10]

    after = Findings()  # and what is left now: the database and every log
    code = _source_windows()
    files = [p for p in (fed.root / "state").rglob("*") if p.is_file()]
    files += sorted(fed.root.glob("*.log"))
    for path in files:
        after.scan(str(path), path.read_bytes(), code)
    assert not after.leaks, sorted(after.leaks)[:10]


def test_coordinator_sigkill_in_round_2_resumes_bit_identical(
    fed: Federation, reference: Reference
) -> None:
    started = time.monotonic()
    marks = fed.log_marks()
    out = fed.submit("run-full.toml", "resumed")

    def in_round_2_training() -> bool:
        fed.check_running()
        trains = any("round 2 step" in fed.log_since(f"site-{s}.log", marks) for s in SITES)
        return _rounds(out) == [0, 1] and trains

    wait_for(in_round_2_training, RUN_TIMEOUT, "round 2's training at a site")
    fed.dep.kill(fed.coordinator)  # the SuperLink, its SuperExec and the ServerApp
    assert _rounds(out) == [0, 1] and not (out / "summary.json").exists()
    killed = time.monotonic()

    log = fed.start_coordinator("coordinator-2")  # resubmits the unfinished run
    fed.wait_finished(out)
    TIMINGS["killed + resumed run"] = time.monotonic() - started
    TIMINGS["  of which after the restart"] = time.monotonic() - killed

    assert "resubmitting the unfinished run" in log.read_text()
    versions = Registry(out / "registry").versions("shared")
    assert [v.version for v in versions] == list(range(ROUNDS + 1))
    assert sorted(p.name for p in (out / "registry" / "shared").iterdir()) == [
        f"v{v:04d}" for v in range(ROUNDS + 1)
    ]  # no second copy, no half-written folder
    published = [
        e["version"]
        for e in read_entries(out / "audit.jsonl")
        if e["event"] == EVENT_VERSION_PUBLISHED
    ]
    assert published == list(range(ROUNDS + 1))
    assert _rounds(out) == list(range(ROUNDS + 1))
    assert all(sorted(m["cohort"]) == list(SITES) for r, m in _metrics(out).items() if r)

    # Every published version, not only the last, is bit-identical to the reference's.
    assert _digests(out) == _digests(reference.out), list(
        zip(_digests(out), _digests(reference.out), strict=True)
    )


def _online_until(fed: Federation, node_id: int) -> float:
    database = fed.root / "state" / "superlink.db"
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10) as db:
        signed = node_id - 2**64 if node_id >= 2**63 else node_id  # stored as sint64
        row = db.execute("SELECT online_until FROM node WHERE node_id = ?", (signed,)).fetchone()
    return float(row[0])


def test_site_killed_mid_round_rejoins_next_round(fed: Federation) -> None:
    started = time.monotonic()
    marks = fed.log_marks()
    node_c = int(re.findall(r"SuperNode ID: (\d+)", (fed.root / "site-c.log").read_text())[-1])
    out = fed.submit("run2-min2.toml", "dropout")

    # Round 0 only evaluates: the run's first train message is round 1's. Killed as soon as
    # it is received, c is surely still starting its ClientApp or training, not uploading.
    def c_got_round_1() -> bool:
        text = fed.log_since("site-c.log", marks)
        return fed.check_running() and "Receiving: train message" in text

    wait_for(c_got_round_1, RUN_TIMEOUT, "site c to receive round 1's instruction")
    fed.dep.kill("site-c")
    killed = time.monotonic()

    # The SuperLink answers for c once c misses its heartbeats; round 1 goes on with a and b.
    wait_for(
        lambda: fed.check_running() and (out / "registry/shared/v0001").is_dir(),
        RUN_TIMEOUT,
        "round 1 to aggregate without c",
    )
    assert _online_until(fed, node_c) < time.time()
    TIMINGS["kill of c → round 1 aggregated"] = time.monotonic() - killed

    # c comes back with the same key, hence the same node id. The ServerApp waits (SIGSTOP)
    # until c is connected, so that round 2's instructions find it online however long this
    # machine takes to start a site; a real coordinator would simply reach it a round later.
    paused = fed.serverapps()
    assert paused, "no ServerApp process found under the coordinator"
    restart = time.monotonic()
    try:
        for pid in alive(paused):
            os.kill(pid, signal.SIGSTOP)
        log = fed.start_site("c", "site-c-2")
        # Under 2 x 30 s heartbeat patience minus one interval: the run must not be timed out.
        wait_for(lambda: "SuperNode ID" in log.read_text(), 30, "the restarted site c to connect")
    finally:
        for pid in alive(paused):
            os.kill(pid, signal.SIGCONT)
    TIMINGS["restart of c until connected"] = time.monotonic() - restart

    fed.wait_finished(out)
    TIMINGS["site-kill run (2 rounds)"] = time.monotonic() - started
    metrics = _metrics(out)
    assert sorted(metrics) == [0, 1, 2]
    assert metrics[1]["cohort"] == ["a", "b"]
    dropped = [
        e
        for e in read_entries(out / "audit.jsonl")
        if e["event"] == EVENT_REPLY_REJECTED and e["round"] == 1 and e["stage"] == "train"
    ]
    # The SuperLink answers for c (as node 1); the coordinator maps the reply to the node it
    # instructed, which so far only evaluated (round 0): named by its unsigned claim.
    assert len(dropped) == 1 and "Node Unavailable" in dropped[0]["reason"], dropped
    assert dropped[0]["site"] == f"node-{node_c} (claims c)", dropped
    assert metrics[2]["cohort"] == ["a", "b", "c"]  # c rejoined the next round
    assert [v.version for v in Registry(out / "registry").versions("shared")] == [0, 1, 2]
    assert "c round 2 step" in log.read_text()
