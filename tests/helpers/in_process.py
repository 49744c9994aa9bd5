"""The real coordinator and the real site glue in one process, with no Ray and no SuperLink.

``InProcessGrid`` is a Flower Grid that hands each instruction straight to the ClientApp, node
by node, each node keeping its own ``Context`` as a SuperNode would. The resume tests crash
the coordinator at a stage boundary with it; the site-check tests look at (and replay) what
one site receives.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID

from common import protocol as P
from tests.helpers.flower_identity import task_identity


def flower_task_identity() -> Iterator[None]:
    """What Flower's runtimes set in the ServerApp process before any message is made (use
    as a module fixture: ``pytest.fixture(scope="module", autouse=True)(...)``)."""
    with task_identity(SUPERLINK_NODE_ID):
        yield


class Crash(Exception):
    """Stands in for a killed coordinator process."""


def where(msg: Message) -> tuple[int, str]:
    """An instruction's ``(round, stage)``: the stage is the message type (``train``,
    ``evaluate``) or, for secure sum's later stages, the header's stage name."""
    header = msg.content.config_records[P.HEADER_RECORD]
    stage = str(header.get(P.KEY_STAGE, msg.metadata.message_type))
    return int(str(header[P.KEY_ROUND])), stage


def new_context(node: int, sites: int) -> Context:
    """Node ``node``'s context: partition ``node - 1`` of ``sites``, empty state."""
    return Context(
        run_id=1,
        node_id=node,
        node_config={"partition-id": node - 1, "num-partitions": sites},
        state=RecordDict(),
        run_config={},
    )


@dataclass
class InProcessGrid:
    """A Flower Grid that hands each instruction straight to the ClientApp, node by node.

    Node i + 1 is partition i (``site-<i>``). ``crash_before``: ``(round, stage)`` (see
    ``where``) of the first instruction that raises ``Crash`` instead of being delivered, or
    ``(round, stage, node)``: the nodes before ``node`` got theirs (and may have trained).
    ``before_delivery``: called with each instruction and its node's context just before the
    site gets it.
    """

    app: ClientApp
    sites: int
    crash_before: tuple[int, str] | tuple[int, str, int] | None = None
    before_delivery: Callable[[Message, Context], None] | None = None
    contexts: dict[int, Context] = field(default_factory=dict)

    def get_node_ids(self) -> Iterable[int]:
        return range(1, self.sites + 1)

    def send_and_receive(self, messages: Iterable[Message], timeout: float) -> list[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if self.crash_before in (where(msg), (*where(msg), node)):
                raise Crash(f"coordinator killed before sending {where(msg)} to node {node}")
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # what a Grid's push sets
            context = self.contexts.setdefault(node, new_context(node, self.sites))
            if self.before_delivery is not None:
                self.before_delivery(msg, context)
            replies.append(self.app(msg, context))
        return replies
