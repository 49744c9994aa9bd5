"""The identity Flower's runtimes set in a process before any message is made there: a test
that builds ``Message`` objects by hand, outside a runtime, sets it with ``task_identity``."""

from __future__ import annotations

from contextlib import AbstractContextManager

from fedlora import in_process


def task_identity(node_id: int) -> AbstractContextManager[None]:
    """Run 1, task 1 on node ``node_id`` (0: a site; the SuperLink's id: a ServerApp) while the
    block runs; the identity before it afterwards (``fedlora.in_process.task_identity``)."""
    return in_process.task_identity(1, node_id)
