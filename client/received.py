"""The global versions a site received, and how it rebuilds the one an instruction names.

An instruction carries its global version in one of three forms (``common.downlink``): the
full state, the encoded step from a version the site holds, or a reference to a version it
holds. ``rebuild_global`` turns any of them into the version's state, checks it against the
SHA-256 in the (signed) header, and stores it, so that the coordinator can send the next
version as a step and this one's evaluation as a reference.

A site that lacks the version a step or reference needs, or whose copy does not match the
digest, refuses the instruction with ``GlobalVersionMissing`` (an ``UpdateRejected``): the
coordinator then forgets what it believed the site holds and sends the full state next time.

``<run store>/received/v<NNNN>.safetensors`` holds the newest ``KEEP_RECEIVED`` versions as
received (the sent modules only, ``<module>/<key>``), written atomically; without a folder
(tests, in-process tools) they live in memory.
"""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError

from client.kept_states import VersionedStates
from common import protocol as P
from common.adapters import AdapterState
from common.downlink import apply_step, check_rebuilt
from common.errors import UpdateRejected

RECEIVED_FOLDER = "received"
# A step starts from the version the site confirmed, the newest or the one before it (a reply
# the coordinator never saw); three leave room for a redone round.
KEEP_RECEIVED = 3


class GlobalVersionMissing(UpdateRejected):
    """The site does not hold (a sound copy of) the version an instruction builds on."""


class ReceivedVersions(VersionedStates):
    """The verified global versions one site holds for one run: in ``folder``, or memory."""

    def __init__(self, folder: Path | None) -> None:
        super().__init__(folder, "v", KEEP_RECEIVED)

    def load(self, version: int) -> AdapterState | None:
        """Version ``version`` as stored, or None if this site does not hold it (or the file
        is unreadable: the digest check would refuse it anyway)."""
        try:
            return self.read(version)
        except (KeyError, OSError, ValueError, SafetensorError):
            return None


def rebuild_global(
    form: str,
    version: int,
    digest: str | None,
    versions: ReceivedVersions,
    *,
    full: AdapterState | None = None,
    step: bytes | None = None,
    base: int | None = None,
    max_bytes: int,
) -> AdapterState:
    """Global ``version``'s state from an instruction's ``form``, checked and stored.

    ``full``: the state (form ``full``); ``step`` and ``base``: the encoded step and the version
    it starts from (form ``step``). ``digest``: the header's SHA-256 of the version; None only
    from a coordinator that sends the full state and no digest (nothing to check then).

    Raises
    ------
    GlobalVersionMissing
        A step or reference names a version this site does not hold.
    UpdateRejected
        The form is unknown or lacks its parts, the step is malformed, or the rebuilt state
        does not have ``digest`` (then nothing is stored).
    """
    if form == P.FORM_FULL:
        if full is None:
            raise UpdateRejected("the instruction's global form is 'full' but it carries no state")
        state = full
    elif form == P.FORM_REFERENCE:
        state = _held(versions, version, "evaluates a reference to")
    elif form == P.FORM_STEP:
        if step is None or base is None or base >= version:
            raise UpdateRejected(f"the step to global v{version:04d} lacks its payload or base")
        state = apply_step(_held(versions, base, "sends a step from"), step, max_bytes)
    else:
        raise UpdateRejected(f"unknown global form {form[:32]!r}, expected one of {P.GLOBAL_FORMS}")
    if digest is None and form != P.FORM_FULL:
        raise UpdateRejected(f"the {form} to global v{version:04d} carries no SHA-256")
    if digest is not None:
        check_rebuilt(state, digest, version)
    if form != P.FORM_REFERENCE:
        versions.save(version, state)
    return state


def _held(versions: ReceivedVersions, version: int, what: str) -> AdapterState:
    state = versions.load(version)
    if state is None:
        held = ", ".join(f"v{v:04d}" for v in versions.versions()) or "none"
        raise GlobalVersionMissing(
            f"the instruction {what} global v{version:04d}, which this site does not hold "
            f"(it holds {held}); the coordinator sends the full state next time"
        )
    return state
