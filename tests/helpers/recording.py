"""What the simulation tests share: a Grid that records every message, and opening what a
site sealed as the coordinator does (the tests hold the coordinator's key)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from common import protocol as P
from common.envelope import EnvelopeContext, open_delta


@dataclass
class RecordingGrid:
    """A Grid proxy that keeps every instruction and reply that crosses it."""

    inner: Grid
    sent: list[Message] = field(default_factory=list)
    received: list[Message] = field(default_factory=list)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def send_and_receive(self, messages: Iterable[Message], timeout: float) -> list[Message]:
        messages = list(messages)
        self.sent.extend(messages)
        replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        self.received.extend(replies)
        return replies


def payload_bytes(message: Message) -> bytes:
    """Every byte of a message's content: array data, config values, metric values."""
    if not message.has_content():
        return (message.error.reason or "").encode()
    parts: list[bytes] = []
    for record in message.content.array_records.values():
        parts.extend(array.data for array in record.values())
    for record in message.content.config_records.values():
        for key, value in record.items():
            parts.append(key.encode())
            parts.append(value if isinstance(value, bytes) else str(value).encode())
    for record in message.content.metric_records.values():
        parts.append(repr(dict(record)).encode())
    return b"".join(parts)


def open_envelope(coord: Any, reply: Message, module: str) -> bytes:
    """One envelope of a reply: a module's delta, or a report (``P.REPORT_MODULE`` /
    ``P.EVAL_REPORT_MODULE``), opened for the reply's own round and version."""
    update = reply.content.config_records[P.UPDATE_RECORD]
    reports = (P.REPORT_MODULE, P.EVAL_REPORT_MODULE)
    envelope = update[P.KEY_REPORT if module in reports else P.delta_key(module)]
    assert isinstance(envelope, bytes)
    context = EnvelopeContext(
        run_id=coord.run_id,
        round=int(update[P.KEY_ROUND]),  # type: ignore[arg-type]
        site_id=str(update[P.KEY_SITE]),
        module=module,
        version=int(update[P.KEY_VERSION]),  # type: ignore[arg-type]
        base_fingerprint=coord.host.base.fingerprint,
    )
    sealing = coord.sealing
    return open_delta(envelope, sealing.coordinator, sealing.allow_list, context, 1 << 30)


def simulate_recorded(cfg: Any, out: Any) -> dict[str, Any]:
    """Run ``cfg`` as a real Flower simulation (on ``simulation.backend``) with every message
    recorded.

    Returns the config, run folder, ``RecordingGrid``, the coordinator and ``metrics.jsonl``.
    """
    import json

    from flwr.app import Context
    from flwr.serverapp import ServerApp

    from client.app import make_client_app
    from fedlora.simulate import SITES_FOLDER, provision_keys, run_in_simulation_runtime
    from server.federation import prepare, run_federation

    sealing, site_keys = provision_keys(cfg, out)
    coord = prepare(cfg, out, sealing)
    box: dict[str, RecordingGrid] = {}
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        box["grid"] = RecordingGrid(grid)
        run_federation(box["grid"], coord)  # type: ignore[arg-type]

    client = make_client_app(cfg, site_keys, out / SITES_FOLDER)
    run_in_simulation_runtime(app, client, cfg)
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {"cfg": cfg, "out": out, "grid": box["grid"], "coord": coord, "metrics": metrics}
