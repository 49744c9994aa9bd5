"""The identity Flower's runtimes set in a process before any message is made there: a test
that builds ``Message`` objects by hand, outside a runtime, sets it with ``task_identity``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from flwr.supercore.task_identity import TaskIdentity


@contextmanager
def task_identity(node_id: int) -> Iterator[None]:
    """Run 1, task 1 on node ``node_id`` (0: a site; the SuperLink's id: a ServerApp) while the
    block runs; the identity before it afterwards."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", node_id)):
            patch.setattr(TaskIdentity, name, value)
        yield
