"""Module names and scopes: the words a run config validates and every part of a run uses.

A run declares named LoRA modules (``[modules.<name>]``), each with a scope: ``shared``
(aggregated over every site), ``group:<name>`` (over the sites ``[groups.<name>]`` lists) or
``private`` (trained at each site, never sent). ``common.config`` checks names and scopes with
these; ``common.modules`` works out who holds what from the parsed config. Kept apart from
both so that neither imports the other back.
"""

from __future__ import annotations

import re

MODULE_NAME = re.compile(r"[a-z][a-z0-9_-]{0,39}")
SHARED, PRIVATE, GROUP_PREFIX = "shared", "private", "group:"


def module_group(scope: str) -> str | None:
    """The group a ``group:<name>`` scope names; None for ``shared`` and ``private``."""
    return scope[len(GROUP_PREFIX) :] if scope.startswith(GROUP_PREFIX) else None
