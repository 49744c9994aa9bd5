"""The real coordinator and the real site glue in one process, with no Ray and no SuperLink,
and a coordinator that can be made to crash.

``InProcessGrid`` is the in-process runtime's Grid (``fedlora/in_process.py``) with two test
hooks: the resume tests crash the coordinator at a stage boundary with it; the site-check
tests look at (and replay) what one site receives.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID

from common import protocol as P
from fedlora import in_process
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


class InProcessGrid(in_process.InProcessGrid):
    """The in-process runtime's Grid (run 1), with test hooks.

    ``crash_before``: ``(round, stage)`` (see ``where``) of the first instruction that raises
    ``Crash`` instead of being delivered, or ``(round, stage, node)``: the nodes before
    ``node`` got theirs (and may have trained). ``before_delivery``: called with each
    instruction and its node's context just before the site gets it.
    """

    def __init__(
        self,
        app: ClientApp,
        sites: int,
        crash_before: tuple[int, str] | tuple[int, str, int] | None = None,
        before_delivery: Callable[[Message, Context], None] | None = None,
    ) -> None:
        super().__init__(app, sites)
        self.crash_before = crash_before
        self.before_delivery = before_delivery

    def deliver(self, message: Message, context: Context) -> Message:
        node = message.metadata.dst_node_id
        if self.crash_before in (where(message), (*where(message), node)):
            raise Crash(f"coordinator killed before sending {where(message)} to node {node}")
        if self.before_delivery is not None:
            self.before_delivery(message, context)
        return super().deliver(message, context)


# The override that runs a simulation on the in-process runtime (``fedlora/in_process.py``):
# about 20 s less per run than Ray on 2 cores. ``tests/test_simulation.py`` checks that both
# runtimes publish the same versions; the tests of Ray itself (timeouts, Ctrl-C, the demo) and
# of deployment run real processes.
IN_PROCESS = "simulation.backend='in-process'"
