"""The site worker's wire format: length-prefixed frames over a local Unix socket.

A frame is ``MAGIC`` (4 bytes), the header length (u32, big-endian), the body length (u64,
big-endian), then a UTF-8 JSON object (the header) and the body: safetensors bytes holding
named adapter states, each tensor stored as ``<state>:<key>`` (``received:...``,
``delta:...``; keys are ``<module>/<peft key>``), or nothing; the header's ``states`` field
lists each state's keys in order (safetensors sorts them). No pickle, so reading a frame runs
no code; both lengths are checked against their bounds before anything is read.

One connection carries one request and its replies: ``step`` frames while training (progress),
then one result frame or one ``error`` frame. An error frame names the exception type and
message; the client raises the same ``FedloraError`` subclass, so the ClientApp's refusal
replies read as they do with an in-process site.
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import safetensors.torch
import torch
from safetensors import SafetensorError

from common.adapters import AdapterState
from common.encoding import MAX_HEADER_BYTES as MAX_SAFETENSORS_HEADER_BYTES
from common.errors import (
    ConfigError,
    DataError,
    FedloraError,
    FingerprintMismatch,
    ModelError,
    UpdateRejected,
)

MAGIC = b"FLW1"
_PREFIX = struct.Struct(">4sIQ")
# Largest JSON header (bytes): a site plan with a few thousand label names fits many times.
MAX_FRAME_HEADER_BYTES = 1 * 2**20
# Largest body (bytes): 2 GiB of fp32 adapter state (the received modules); far above
# privacy.max-payload-bytes (256 MiB by default), the most a site may send in one round.
MAX_FRAME_BODY_BYTES = 2 * 2**30
_STATE_SEPARATOR = ":"
_STATES_FIELD = "states"  # header field: {state name: [keys in order]}
_BODY_FORMAT = "fedlora-worker/1"

# Frame kinds: requests, then replies.
KIND_DESCRIBE = "describe"
KIND_TRAIN = "train"
KIND_EVALUATE = "evaluate"
KIND_SITE = "site"
KIND_UPDATE = "update"
KIND_EVAL = "eval"
KIND_STEP = "step"
KIND_ERROR = "error"


class WorkerFrameError(FedloraError):
    """A frame on the site worker's socket is malformed, truncated or over a bound."""


class SiteWorkerError(FedloraError):
    """The site worker cannot be reached, or failed with an error that is not fedlora's."""


# The errors an error frame may name; any other type reads as ``SiteWorkerError``.
_ERRORS: dict[str, type[FedloraError]] = {
    cls.__name__: cls
    for cls in (FedloraError, ConfigError, DataError, ModelError, UpdateRejected, WorkerFrameError)
}


@dataclass(frozen=True)
class Frame:
    header: dict[str, Any]
    states: dict[str, AdapterState] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return str(self.header.get("kind"))


def pack_states(states: Mapping[str, AdapterState]) -> bytes:
    """Named adapter states as one safetensors blob (CPU, contiguous, dtypes unchanged)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, state in states.items():
        for key, tensor in state.items():
            # A copy: safetensors refuses tensors that share storage.
            tensors[f"{name}{_STATE_SEPARATOR}{key}"] = tensor.detach().to("cpu").clone()
    if not tensors:
        return b""
    return safetensors.torch.save(tensors, metadata={"format": _BODY_FORMAT})


def unpack_states(body: bytes, allowed: frozenset[str]) -> dict[str, AdapterState]:
    """Reverse ``pack_states``; a state name outside ``allowed`` is refused."""
    if not body:
        return {}
    header_len = int.from_bytes(body[:8], "little") if len(body) >= 8 else len(body)
    if header_len > min(MAX_SAFETENSORS_HEADER_BYTES, len(body) - 8):
        raise WorkerFrameError(f"frame body declares a {header_len}-byte header, too long")
    try:
        tensors = safetensors.torch.load(body)
    except (SafetensorError, ValueError, RuntimeError, TypeError, KeyError, OverflowError) as err:
        raise WorkerFrameError(f"frame body is not safetensors: {err}") from err
    states: dict[str, AdapterState] = {name: {} for name in allowed}
    for full, tensor in tensors.items():
        name, sep, key = full.partition(_STATE_SEPARATOR)
        if not sep or name not in allowed:
            raise WorkerFrameError(f"unexpected tensor {full[:100]!r} in the frame body")
        # A copy: the loaded tensor may be a view of the frame's bytes.
        states[name][key] = tensor.clone()
    return states


def send_frame(
    sock: socket.socket,
    header: Mapping[str, Any],
    states: Mapping[str, AdapterState] | None = None,
) -> None:
    """Write one frame: prefix, JSON header, safetensors body."""
    listing = {name: list(state) for name, state in (states or {}).items()}
    head = json.dumps({**header, _STATES_FIELD: listing}, allow_nan=True).encode("utf-8")
    body = pack_states(states or {})
    if len(head) > MAX_FRAME_HEADER_BYTES or len(body) > MAX_FRAME_BODY_BYTES:
        raise WorkerFrameError(
            f"frame of {len(head)} + {len(body)} bytes is over the bounds "
            f"({MAX_FRAME_HEADER_BYTES} header, {MAX_FRAME_BODY_BYTES} body bytes)"
        )
    sock.sendall(_PREFIX.pack(MAGIC, len(head), len(body)) + head)
    if body:
        sock.sendall(body)


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        count = sock.recv_into(view[got:], size - got)
        if count == 0:
            raise WorkerFrameError(f"connection closed after {got} of {size} bytes of a frame")
        got += count
    return bytes(buffer)


def recv_frame(sock: socket.socket, allowed: frozenset[str] = frozenset()) -> Frame:
    """Read one frame; lengths are checked before reading, states must be in ``allowed``."""
    magic, head_len, body_len = _PREFIX.unpack(_recv_exact(sock, _PREFIX.size))
    if magic != MAGIC:
        raise WorkerFrameError(f"not a site worker frame (starts with {magic!r})")
    if head_len > MAX_FRAME_HEADER_BYTES:
        raise WorkerFrameError(
            f"frame header of {head_len} bytes is over the bound of {MAX_FRAME_HEADER_BYTES}"
        )
    if body_len > MAX_FRAME_BODY_BYTES:
        raise WorkerFrameError(
            f"frame body of {body_len} bytes is over the bound of {MAX_FRAME_BODY_BYTES}"
        )
    try:
        header = json.loads(_recv_exact(sock, head_len))
    except (ValueError, RecursionError) as err:  # JSON and UTF-8 errors
        raise WorkerFrameError(f"frame header is not JSON: {err}") from err
    if not isinstance(header, dict):
        raise WorkerFrameError("frame header is not a JSON object")
    body = _recv_exact(sock, body_len) if body_len else b""
    listing = header.pop(_STATES_FIELD, {})
    return Frame(header, _in_order(unpack_states(body, allowed), listing))


def _in_order(states: dict[str, AdapterState], listing: Any) -> dict[str, AdapterState]:
    """The states in the key order the header lists; the listing must match the body."""
    names = {name for name, state in states.items() if state}
    if not isinstance(listing, dict) or not names <= set(listing):
        raise WorkerFrameError("frame header does not list the states its body holds")
    ordered: dict[str, AdapterState] = {name: {} for name in states}
    for name, keys in listing.items():
        state = states.get(name, {})
        if not isinstance(keys, list) or sorted(map(str, keys)) != sorted(state):
            raise WorkerFrameError(f"frame header lists other keys for state {str(name)[:100]!r}")
        ordered[name] = {key: state[key] for key in keys}
    return ordered


T = TypeVar("T", str, int, float)


def field_of(frame: Frame, name: str, kind: type[T]) -> T:
    """A header field of the given type (an int is accepted as a float, a bool as neither)."""
    value: Any = frame.header.get(name)
    typed = isinstance(value, kind) or (kind is float and isinstance(value, int))
    if isinstance(value, bool) or not typed:
        raise WorkerFrameError(
            f"{frame.kind!r} frame: field {name!r} is {str(value)[:100]!r}, "
            f"expected {kind.__name__}"
        )
    return kind(value)


def error_header(exc: BaseException) -> dict[str, Any]:
    """The error frame for ``exc``: its type name and message (and a mismatch's digests)."""
    header: dict[str, Any] = {"kind": KIND_ERROR, "type": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, FingerprintMismatch):
        header |= {"expected": exc.expected, "actual": exc.actual}
    return header


def raise_error(frame: Frame) -> None:
    """Raise the exception an error frame describes."""
    kind = str(frame.header.get("type"))
    message = str(frame.header.get("message"))[:4096]
    if kind == FingerprintMismatch.__name__:
        raise FingerprintMismatch(
            str(frame.header.get("expected")), str(frame.header.get("actual")), "site worker"
        )
    if kind in _ERRORS:
        raise _ERRORS[kind](message)
    raise SiteWorkerError(f"the site worker failed: {kind}: {message}")
