"""The in-process runtime's Grid (``fedlora/in_process.py``) with a ClientApp of a few lines:
what crosses is a wire copy, a raising site gets Flower's error reply, each node keeps its
context, and the ServerApp identity is set only while the run lasts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.task_identity import TaskIdentity

from fedlora.in_process import run_in_process

TINY = Path(__file__).resolve().parent.parent / "examples" / "tiny.toml"


def _app(seen: list[tuple[int, int, Message]]) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        partition = int(context.node_config["partition-id"])
        if partition == 1:
            raise RuntimeError("site-1 is down")
        calls = int(str(context.state.config_records.get("calls", {}).get("n", 0))) + 1
        context.state.config_records["calls"] = ConfigRecord({"n": calls})
        msg.content.config_records["x"]["value"] = -1  # a site may scribble on what it got
        seen.append((partition, calls, msg))
        return Message(RecordDict({"y": ConfigRecord({"calls": calls})}), reply_to=msg)

    return app


def test_replies_errors_contexts_and_identity() -> None:
    seen: list[tuple[int, int, Message]] = []
    sent: list[Message] = []
    replies: list[list[Message]] = []
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        assert TaskIdentity.node_id == SUPERLINK_NODE_ID == context.node_id
        assert list(grid.get_node_ids()) == [1, 2, 3]
        for _ in range(2):
            batch = [
                Message(RecordDict({"x": ConfigRecord({"value": 7})}), node, "train")
                for node in grid.get_node_ids()
            ]
            sent.extend(batch)
            replies.append(list(grid.send_and_receive(batch)))

    before = TaskIdentity._node_id
    run_in_process(server, _app(seen), sites=3)
    assert TaskIdentity._node_id == before  # the identity before the run is back

    assert [(p, c) for p, c, _ in seen] == [(0, 1), (2, 1), (0, 2), (2, 2)]  # contexts kept
    assert all(m.content.config_records["x"]["value"] == 7 for m in sent)  # a copy crossed
    for batch in replies:
        ok = [r for r in batch if not r.has_error()]
        failed = [r for r in batch if r.has_error()]
        assert len(ok) == 2 and len(failed) == 1
        assert failed[0].error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
        assert "site-1 is down" in failed[0].error.reason
        assert failed[0].metadata.reply_to_message_id  # it answers its instruction
    assert {r.metadata.reply_to_message_id for r in replies[0]} == {
        m.metadata.message_id for m in sent[:3]
    }


def test_an_instruction_to_a_node_that_is_not_there_is_refused() -> None:
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        grid.send_and_receive([Message(RecordDict(), 9, "train")])

    with pytest.raises(ValueError, match="no node 9 in this simulation of 2 sites"):
        run_in_process(server, _app([]), sites=2)


def test_a_simulation_in_process_releases_its_sites_memory(tmp_path: Path) -> None:
    """The base model, data and virtual sites a run loaded in this process are released when it
    ends (a Ray worker takes them with it), so a sweep does not keep one model per setting."""
    from client import app as site_glue
    from common.config import load_config
    from fedlora.simulate import simulate

    cfg = load_config(TINY, ["federation.rounds=1", "simulation.backend='in-process'"])
    hosts: list[int] = []
    original = site_glue._host

    def counting_host(*args: Any) -> Any:
        hosts.append(len(site_glue._HOSTS))
        return original(*args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(site_glue, "_host", counting_host)
        simulate(cfg, tmp_path / "run")
    assert hosts and max(hosts) >= 1  # the sites did use the process's host
    assert not site_glue._HOSTS and not site_glue._DATASETS and not site_glue._RUNTIMES


def test_the_backend_is_not_part_of_the_config_digest() -> None:
    """A run may resume on the other runtime, and a checkpoint made before the key existed
    (its config has no ``simulation.backend``) still matches; other simulation keys count."""
    from common.config import config_to_dict, load_config
    from server.checkpoint import config_digest

    ray = config_to_dict(load_config(TINY))
    in_process = config_to_dict(load_config(TINY, ["simulation.backend='in-process'"]))
    older = {**ray, "simulation": {k: v for k, v in ray["simulation"].items() if k != "backend"}}
    cores = config_to_dict(load_config(TINY, ["simulation.cpus-per-site=2"]))
    assert ray["simulation"]["backend"] == "ray"
    assert config_digest(ray) == config_digest(in_process) == config_digest(older)
    assert config_digest(ray) != config_digest(cores)
