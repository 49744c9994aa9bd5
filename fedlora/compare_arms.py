"""The arms of ``fedlora compare``, in the order its table lists them, their check, and the
default number of curve points.

Both ``fedlora.compare`` (which runs the arms) and ``fedlora.compare_cli`` (which parses
``--arms``) use them: the command line loads ``fedlora.compare`` only to run it, and
``fedlora.compare`` never imports the command line back.
"""

from __future__ import annotations

from collections.abc import Sequence

ARMS = (
    "base",
    "local-only",
    "federated",
    "personalized",
    "centralized",
    "centralized-equal-steps",
    "centralized-full",
)
# The in-process arms are evaluated about this many times over the rounds (--curve-points).
DEFAULT_CURVE_POINTS = 10


def check_arms(names: Sequence[str]) -> None:
    """Raise ValueError naming an unknown arm, none at all, or personalized without federated."""
    unknown = [name for name in names if name not in ARMS]
    if unknown:
        raise ValueError(f"unknown arm {unknown[0]!r}; expected some of {', '.join(ARMS)}")
    if not names:
        raise ValueError(f"no arm named; expected some of {', '.join(ARMS)}")
    if "personalized" in names and "federated" not in names:
        raise ValueError("arm 'personalized' starts from the federated adapter: add 'federated'")
