"""The site daemon's resident worker over a real Unix socket, against an in-process site.

The worker runs in a thread of the test process on a temporary socket, with
``examples/tiny.toml``'s tiny model and a 40-example site file; ``RemoteSite`` must give the
very same deltas and losses as a ``SiteRuntime`` built in process (each with its own store).
"""

from __future__ import annotations

import json
import socket
import stat
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from client.deploy_app import build_runtime
from client.remote_site import RemoteSite
from client.site import SiteRuntime
from client.site_store import SiteStore
from client.worker import SiteWorker, WorkerServer, bind_worker, serve_worker
from client.worker_wire import (
    MAGIC,
    MAX_FRAME_BODY_BYTES,
    SiteWorkerError,
    WorkerFrameError,
    pack_states,
    recv_frame,
    unpack_states,
)
from common.config import SitePlan, load_config, site_plan
from common.errors import ConfigError, FingerprintMismatch, UpdateRejected
from common.modules import join_modules
from common.site_config import SiteConfig, load_site_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def site_cfg(tmp_path_factory: pytest.TempPathFactory) -> SiteConfig:
    root = tmp_path_factory.mktemp("site")
    lines = (REPO / "examples/data/dolly-tiny.jsonl").read_text().splitlines()[:40]
    (root / "a.jsonl").write_text("\n".join(lines) + "\n")
    (root / "site.toml").write_text(
        '[site]\nid = "a"\nkeys = "keys"\nindex = 2\n\n'
        '[coordinator]\naddress = "127.0.0.1:9092"\n\n'
        '[model]\nname = "tiny-llama"\ndevice = "cpu"\n\n'
        '[data]\npath = "a.jsonl"\nformat = "instruction"\nholdout = 0.2\n'
    )
    return load_site_config(root / "site.toml")


@pytest.fixture(scope="module")
def plan() -> SitePlan:
    return site_plan(load_config(REPO / "examples/tiny.toml"))


@pytest.fixture(scope="module")
def worker(
    site_cfg: SiteConfig, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerServer]:
    path = tmp_path_factory.mktemp("w") / "fedlora-site-a" / "worker.sock"
    with serve_worker(SiteWorker(site_cfg), path) as server:
        yield server
    assert not path.exists()  # removed on exit


@pytest.fixture(scope="module")
def local(
    site_cfg: SiteConfig, plan: SitePlan, tmp_path_factory: pytest.TempPathFactory
) -> SiteRuntime:
    runtime = build_runtime(site_cfg, plan)
    runtime.store = SiteStore(tmp_path_factory.mktemp("local-store"))  # not the worker's
    return runtime


def _assert_same(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> None:
    assert list(left) == list(right)
    for key in left:
        assert left[key].dtype == right[key].dtype
        assert torch.equal(left[key], right[key]), key


class _Steps(list[tuple[int, int, float]]):
    """An ``on_step`` callback that records (step, steps, loss)."""

    def __call__(self, step: int, steps: int, loss: float) -> None:
        self.append((step, steps, loss))


@pytest.mark.parametrize("rule", ["fedavg", "fedsa"])
def test_remote_site_trains_and_evaluates_bit_identically(
    worker: WorkerServer, local: SiteRuntime, plan: SitePlan, rule: str
) -> None:
    plan = plan.model_copy(update={"rule": rule})
    remote = RemoteSite(worker.path, plan)
    assert (remote.site_id, remote.fingerprint) == (local.site_id, local.fingerprint)
    received = {k: v + 0.01 for k, v in join_modules(local.host.initial).items()}
    for version in (10 * len(rule), 10 * len(rule) + 1):  # the second starts from the first's
        steps = _Steps()  # kept tensors (fedsa: B), each side from its own store
        mine = local.train(received, plan, version + 1, version)
        theirs = remote.train(received, plan, version + 1, version, steps)
        _assert_same(mine.delta, theirs.delta)
        assert (mine.examples, mine.clip_scale) == (theirs.examples, theirs.clip_scale)
        assert (mine.result.loss, mine.result.steps) == (theirs.result.loss, theirs.result.steps)
        assert [s[0] for s in steps] == list(range(1, plan.train.local_steps + 1))
        assert steps[-1][2] == theirs.result.last_loss
    kept = local.store.for_run("local").load_kept(before=version + 1)
    assert bool(kept) == (rule == "fedsa")
    assert local.evaluate(received, plan, version + 1) == remote.evaluate(
        received, plan, version + 1
    )


def test_the_clientapp_keeps_received_versions_where_the_worker_keeps_its_store(
    worker: WorkerServer, site_cfg: SiteConfig, plan: SitePlan
) -> None:
    """The per-message ClientApp rebuilds each global version (client.received) in the site's
    store, the folder the worker's own ``SiteStore`` names for the run."""
    remote = RemoteSite(worker.path, plan, site_cfg.state_dir)
    theirs = SiteStore(site_cfg.state_dir).for_run("run-1").received.folder
    assert remote.received_versions("run-1").folder == theirs is not None
    with pytest.raises(UpdateRejected, match="not a plain name"):
        remote.received_versions("../elsewhere")


def test_the_clientapp_keeps_the_privacy_ledger_in_the_sites_store(
    worker: WorkerServer, site_cfg: SiteConfig, plan: SitePlan
) -> None:
    """Each message's ClientApp process is new: what a site released under DP must outlive
    it, in the store (client.privacy_ledger), for the next run's policy check."""
    RemoteSite(worker.path, plan, site_cfg.state_dir).ledger.record("run-1", 3, 1.0)
    assert RemoteSite(worker.path, plan, site_cfg.state_dir).ledger.earlier("run-2") == ((1.0, 3),)


def test_socket_is_private_to_the_site_user(worker: WorkerServer) -> None:
    assert stat.S_ISSOCK(worker.path.lstat().st_mode)
    assert stat.S_IMODE(worker.path.lstat().st_mode) == 0o600
    assert stat.S_IMODE(worker.path.parent.stat().st_mode) == 0o700


def _raw_request(path: Path, data: bytes) -> dict[str, object]:
    """Send raw bytes to the worker; the header of the frame it answers with."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(path))
        sock.sendall(data)
        return recv_frame(sock).header


def test_malformed_and_oversized_frames_are_refused_and_the_worker_lives_on(
    worker: WorkerServer, plan: SitePlan
) -> None:
    prefix = struct.Struct(">4sIQ")
    stranger = pack_states({"x": {"k": torch.ones(1)}})  # a state no request carries
    cases = {
        "not a site worker frame": b"GET / HTTP/1.1\r\n\r\n",
        "header of": prefix.pack(MAGIC, 2**30, 0),
        "body of": prefix.pack(MAGIC, 2, MAX_FRAME_BODY_BYTES + 1) + b"{}",
        "not JSON": prefix.pack(MAGIC, 3, 0) + b"{x}",
        "connection closed": prefix.pack(MAGIC, 100, 0) + b"{",
        "unexpected tensor": prefix.pack(MAGIC, 2, len(stranger)) + b"{}" + stranger,
    }
    for message, data in cases.items():
        if message == "connection closed":  # a truncated frame: the client half-closes
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(30)
                sock.connect(str(worker.path))
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
                reply = recv_frame(sock).header
        else:
            reply = _raw_request(worker.path, data)
        assert reply["kind"] == "error" and reply["type"] == "WorkerFrameError", reply
        assert message in str(reply["message"])
    unknown = json.dumps({"kind": "reboot", "plan": plan.model_dump_json()}).encode()
    reply = _raw_request(worker.path, prefix.pack(MAGIC, len(unknown), 0) + unknown)
    assert reply["type"] == "WorkerFrameError" and "reboot" in str(reply["message"])
    assert RemoteSite(worker.path, plan).site_id == "a"  # still serving


def test_errors_come_back_as_the_same_fedlora_error(worker: WorkerServer, plan: SitePlan) -> None:
    with pytest.raises(ConfigError, match=r"model\.task"):
        RemoteSite(worker.path, plan.model_copy(update={"task": "classification"}))
    remote = RemoteSite(worker.path, plan)
    with pytest.raises(FingerprintMismatch, match="0" * 64):
        remote.check_fingerprint("0" * 64)
    with pytest.raises(WorkerFrameError, match="unexpected tensor"):
        unpack_states(pack_states({"x": {"k": torch.ones(1)}}), frozenset({"received"}))


def test_an_absent_worker_and_a_second_daemon_are_refused(
    worker: WorkerServer, site_cfg: SiteConfig, plan: SitePlan, tmp_path: Path
) -> None:
    with pytest.raises(SiteWorkerError, match="not reachable"):
        RemoteSite(tmp_path / "absent.sock", plan)
    with pytest.raises(SiteWorkerError, match="another site daemon"):
        bind_worker(SiteWorker(site_cfg), worker.path)
    stale = tmp_path / "d" / "worker.sock"  # a socket left by a daemon that was SIGKILLed
    stale.parent.mkdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(stale))
    server = bind_worker(SiteWorker(site_cfg), stale)
    server.server_close()
    assert stat.S_IMODE(stale.parent.stat().st_mode) == 0o700


def test_the_clientapp_module_imports_no_transformers_or_peft() -> None:
    code = (
        "import sys, client.deploy_app; "
        "print(sorted(m for m in ('transformers', 'peft', 'datasets') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]"
