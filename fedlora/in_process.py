"""The in-process simulation runtime (``simulation.backend = "in-process"``): the real ServerApp
and ClientApp in one process, with no Ray.

Flower's simulation runtime runs each virtual site in a Ray worker process. Starting Ray and
its workers costs about 20 s on 2 cores for every run, and a site's code runs where a debugger
set in this process cannot reach it. This runtime keeps the coordinator's and the sites' code
exactly as they are and swaps only the transport: ``InProcessGrid`` is a Flower ``Grid`` that
hands each instruction to the ClientApp of its node, one node after another, each node keeping
its own ``Context`` as a SuperNode does.

What it keeps from a real runtime:

- every instruction and reply crosses as Flower's wire message: serialised to protobuf and
  parsed again (``flwr.common.serde``), so a site never holds the coordinator's objects and
  nothing travels that the wire could not carry;
- a ClientApp that raises is answered with an error reply naming the exception, as Flower's
  runtime answers it, and the round goes on with the other sites;
- the identity Flower sets in a ServerApp process (run, task, the SuperLink's node).

What it does not have: sites run one after another, not in parallel, so a round takes the
sum of the sites' times, and there is no timeout (a slow site is waited for). Use Ray to
measure round times or to test timeouts; ``tests/test_simulation.py`` checks that both
runtimes publish the same versions.
"""

from __future__ import annotations

import logging
import secrets
import traceback
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from flwr.app import Context, Message, RecordDict
from flwr.app.error import Error
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

logger = logging.getLogger(__name__)


def wire_copy(message: Message) -> Message:
    """``message`` as the other side receives it: serialised to Flower's protobuf and parsed."""
    return message_from_proto(message_to_proto(message))


def site_context(run_id: int, node: int, sites: int) -> Context:
    """Node ``node``'s context, as Flower's simulation gives it: partition ``node - 1`` of
    ``sites``, empty state."""
    return Context(
        run_id=run_id,
        node_id=node,
        node_config={"partition-id": node - 1, "num-partitions": sites},
        state=RecordDict(),
        run_config={},
    )


class InProcessGrid(Grid):
    """A Flower ``Grid`` that delivers each instruction to ``app`` in this process.

    Node ``i + 1`` is partition ``i`` (``site-<i>``). ``push_messages`` runs the ClientApp at
    once and keeps the reply until ``pull_messages`` asks for it.
    """

    def __init__(self, app: ClientApp, sites: int, run_id: int = 1) -> None:
        self.app = app
        self.sites = sites
        self.contexts: dict[int, Context] = {}
        self._run = Run.create_empty(run_id)
        self._replies: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return range(1, self.sites + 1)

    def deliver(self, message: Message, context: Context) -> Message:
        """The site's reply to ``message`` (both as they cross the wire); an error reply when
        the ClientApp raises, as Flower's runtime answers."""
        received = wire_copy(message)
        try:
            reply = self.app(received, context)
        except Exception as exc:  # a site's failure is its reply, never the coordinator's
            logger.error("site %s raised:\n%s", context.node_id, traceback.format_exc())
            reason = f"{type(exc)}:<'{exc}'>"
            code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
            reply = Message(Error(code=code, reason=reason), reply_to=received)
        reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        return wire_copy(reply)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # what a push sets
            node = message.metadata.dst_node_id
            if node not in self.get_node_ids():
                raise ValueError(f"no node {node} in this simulation of {self.sites} sites")
            if node not in self.contexts:
                self.contexts[node] = site_context(self.run.run_id, node, self.sites)
            context = self.contexts[node]
            self._replies[message.metadata.message_id] = self.deliver(message, context)
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Every reply (sites run in turn; ``timeout`` is not applied)."""
        return self.pull_messages(self.push_messages(messages))


@contextmanager
def task_identity(run_id: int, node_id: int) -> Iterator[None]:
    """The identity Flower's runtimes set in a process (messages are stamped with it): task 1
    of run ``run_id`` on node ``node_id`` (the SuperLink's id: a ServerApp) while the block
    runs; the one before it afterwards."""
    before = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, node_id
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = before


def run_in_process(server_app: ServerApp, client_app: ClientApp, sites: int) -> None:
    """Run ``server_app`` with ``sites`` virtual sites over an ``InProcessGrid``."""
    run_id = secrets.randbits(63) or 1  # as Flower draws a run id
    grid = InProcessGrid(client_app, sites, run_id)
    context = Context(
        run_id=run_id, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(), run_config={}
    )
    with task_identity(run_id, SUPERLINK_NODE_ID):
        server_app(grid, context)
