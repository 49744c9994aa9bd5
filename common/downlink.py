"""The down-link as a step: what a site rebuilds a global version from, and its digest.

A global version ``t`` reaches a site in one of three forms (``P.KEY_GLOBAL_FORM``): the full
state, a *step* from version ``t - 1`` (encoded like an up-link delta, ``common.encoding``), or
a *reference* to a version the site already holds. Whatever the form, the site checks what it
ends up with against ``state_sha256`` of version ``t``, carried in the signed header.

An fp16 (or int8, int4) step is lossy, so ``base + decode(encode(new - base))`` is not ``new``.
Rather than let every site hold a slightly different state, the coordinator *publishes* what
the step rebuilds (``published_step``): version ``t`` is by definition ``base + decoded step``,
computed by the one function both sides call (``apply_step``), element-wise in float32, which
IEEE arithmetic makes bit-identical on every machine. The coordinator's registry, checkpoint,
full-state instructions and digest all hold that state, so one digest fits every site. The
rounding is that of an up-link delta (fp16: 2^-11 of each step element, steps below 6e-8
flush to zero), applied once per version to the aggregate step, not accumulated: the next
round aggregates from the published state.

Pure tensor functions: no I/O, no Flower.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping

import torch

from common.adapters import AdapterState, check_shapes, check_values, compute_delta, state_shapes
from common.encoding import Encoding, decode_delta, encode_delta
from common.errors import UpdateRejected
from common.payload_format import STEP_FORMAT

_DIGEST_DOMAIN = b"fedlora-global-state/1\x00"


def _field(data: bytes) -> bytes:
    return struct.pack(">Q", len(data)) + data


def state_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (hex) of an adapter state: every tensor's name, dtype, shape and little-endian
    bytes, in sorted name order, length-prefixed so that no two states encode alike.

    Independent of the container the state travelled in (ArrayRecord, safetensors file,
    rebuilt in memory): equal tensors give equal digests.
    """
    digest = hashlib.sha256(_DIGEST_DOMAIN)
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        meta = f"{tensor.dtype}|{list(tensor.shape)}".encode()
        digest.update(_field(name.encode()) + _field(meta))
        digest.update(_field(tensor.view(torch.uint8).numpy().tobytes()))
    return digest.hexdigest()


def apply_step(base: Mapping[str, torch.Tensor], payload: bytes, max_bytes: int) -> AdapterState:
    """``base + decode(payload)`` per tensor, in ``base``'s dtypes: version ``t`` from ``t - 1``.

    Raises
    ------
    UpdateRejected
        The payload is malformed, oversized, or its names and shapes are not ``base``'s.
    """
    check_values(base, what="base state")
    step = decode_delta(payload, max_bytes, expected=state_shapes(base), fmt=STEP_FORMAT)
    rebuilt: AdapterState = {}
    for key, tensor in base.items():
        start = tensor.detach().to("cpu", torch.float32)
        rebuilt[key] = (start + step[key]).to(tensor.dtype)  # one rounding: exact on any IEEE CPU
    return rebuilt


def published_step(
    base: Mapping[str, torch.Tensor],
    new: Mapping[str, torch.Tensor],
    encoding: Encoding,
    max_bytes: int,
) -> tuple[bytes, AdapterState]:
    """The step ``new - base`` encoded, and the state a site rebuilds from it (to publish).

    Raises
    ------
    UpdateRejected
        ``new`` and ``base`` differ in names or shapes, or the step cannot be encoded (fp16:
        beyond its range).
    """
    check_shapes(state_shapes(new), state_shapes(base), what="new global state")
    payload = encode_delta(compute_delta(new, base), encoding, STEP_FORMAT)
    return payload, apply_step(base, payload, max_bytes)


def check_rebuilt(state: Mapping[str, torch.Tensor], expected: str, version: int) -> None:
    """Raise ``UpdateRejected`` unless ``state`` has the digest of global ``version``."""
    actual = state_sha256(state)
    if actual != expected:
        raise UpdateRejected(
            f"global v{version:04d} as rebuilt here has SHA-256 {actual[:16]}…, the signed "
            f"instruction says {expected[:16]}…: refusing it (the coordinator sends the full "
            "state next time)"
        )
