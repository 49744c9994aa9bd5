"""A site rebuilds each global version from its form, checks its SHA-256, and keeps it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from client.received import (
    KEEP_RECEIVED,
    GlobalVersionMissing,
    ReceivedVersions,
    rebuild_global,
)
from common import protocol as P
from common.downlink import published_step, state_sha256
from common.errors import UpdateRejected

MAX_BYTES = 1 << 20


def _state(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "shared/q.lora_A.weight": torch.randn(4, 16, generator=gen),
        "shared/q.lora_B.weight": torch.randn(16, 4, generator=gen) * 1e-3,
    }


@pytest.fixture(params=["memory", "disk"])
def versions(request: pytest.FixtureRequest, tmp_path: Path) -> ReceivedVersions:
    return ReceivedVersions(None if request.param == "memory" else tmp_path / "received")


def _full(versions: ReceivedVersions, version: int, state: dict[str, torch.Tensor]) -> None:
    rebuild_global(
        P.FORM_FULL, version, state_sha256(state), versions, full=state, max_bytes=MAX_BYTES
    )


def test_full_then_step_then_reference_round_trip(versions: ReceivedVersions) -> None:
    v0 = _state(0)
    _full(versions, 0, v0)
    payload, v1 = published_step(v0, _state(1), "fp16", MAX_BYTES)
    digest = state_sha256(v1)
    rebuilt = rebuild_global(
        P.FORM_STEP, 1, digest, versions, step=payload, base=0, max_bytes=MAX_BYTES
    )
    assert all(torch.equal(rebuilt[k], v1[k]) for k in v1)
    referenced = rebuild_global(P.FORM_REFERENCE, 1, digest, versions, max_bytes=MAX_BYTES)
    assert state_sha256(referenced) == digest
    assert versions.versions() == [0, 1]


def test_a_step_or_reference_to_a_version_the_site_lacks_is_a_clear_error(
    versions: ReceivedVersions,
) -> None:
    _full(versions, 0, _state(0))
    payload, v2 = published_step(_state(1), _state(2), "fp16", MAX_BYTES)
    with pytest.raises(GlobalVersionMissing, match=r"step from global v0001.*holds v0000"):
        rebuild_global(
            P.FORM_STEP, 2, state_sha256(v2), versions, step=payload, base=1, max_bytes=MAX_BYTES
        )
    with pytest.raises(GlobalVersionMissing, match=r"reference to global v0002.*full state"):
        rebuild_global(P.FORM_REFERENCE, 2, state_sha256(v2), versions, max_bytes=MAX_BYTES)
    assert versions.versions() == [0]


def test_a_mismatched_hash_is_refused_and_nothing_is_stored(versions: ReceivedVersions) -> None:
    v0, other = _state(0), _state(9)
    with pytest.raises(UpdateRejected, match="SHA-256"):
        rebuild_global(P.FORM_FULL, 0, state_sha256(other), versions, full=v0, max_bytes=MAX_BYTES)
    _full(versions, 0, v0)
    payload, _ = published_step(v0, _state(1), "fp16", MAX_BYTES)
    with pytest.raises(UpdateRejected, match="SHA-256"):  # the step is right, the digest not
        rebuild_global(
            P.FORM_STEP, 1, state_sha256(other), versions, step=payload, base=0, max_bytes=MAX_BYTES
        )
    assert versions.versions() == [0]


def test_a_corrupt_stored_copy_is_refused_and_a_full_state_repairs_it(tmp_path: Path) -> None:
    versions = ReceivedVersions(tmp_path / "received")
    v0 = _state(0)
    _full(versions, 0, v0)
    path = tmp_path / "received" / "v0000.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40  # one flipped bit of the last tensor value
    path.write_bytes(bytes(data))
    digest = state_sha256(v0)
    with pytest.raises(UpdateRejected, match="SHA-256"):
        rebuild_global(P.FORM_REFERENCE, 0, digest, versions, max_bytes=MAX_BYTES)
    path.write_bytes(b"not safetensors")
    with pytest.raises(GlobalVersionMissing):
        rebuild_global(P.FORM_REFERENCE, 0, digest, versions, max_bytes=MAX_BYTES)
    _full(versions, 0, v0)  # the coordinator's fallback after the error reply
    assert state_sha256(versions.load(0) or {}) == digest


def test_a_step_or_reference_without_its_parts_or_digest_is_refused(
    versions: ReceivedVersions,
) -> None:
    _full(versions, 0, _state(0))
    with pytest.raises(UpdateRejected, match="lacks its payload"):
        rebuild_global(P.FORM_STEP, 1, "0" * 64, versions, base=0, max_bytes=MAX_BYTES)
    with pytest.raises(UpdateRejected, match="carries no SHA-256"):
        rebuild_global(P.FORM_REFERENCE, 0, None, versions, max_bytes=MAX_BYTES)
    with pytest.raises(UpdateRejected, match="unknown global form"):
        rebuild_global("delta", 0, "0" * 64, versions, max_bytes=MAX_BYTES)
    with pytest.raises(UpdateRejected, match="carries no state"):
        rebuild_global(P.FORM_FULL, 0, "0" * 64, versions, max_bytes=MAX_BYTES)


def test_only_the_newest_versions_are_kept(versions: ReceivedVersions) -> None:
    for version in range(KEEP_RECEIVED + 2):
        _full(versions, version, _state(version))
    assert versions.versions() == list(range(2, KEEP_RECEIVED + 2))
