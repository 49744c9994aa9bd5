"""Coordinator checkpoints: everything resume needs, in one atomically written file.

``<run-dir>/checkpoint.safetensors`` holds the global adapter of every module and the server
optimizer's tensors; its metadata holds the round, versions, run id, config digest, the
optimizer's and accountant's scalar state and the coordinator's RNG state. It is written after
the aggregation of each round and before that round's version is published, so a restart
either redoes a round that left no trace or finishes publishing the one it checkpointed.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from common.adapters import AdapterState
from common.atomic import write_bytes_atomic
from common.errors import FedloraError

CHECKPOINT_FILE = "checkpoint.safetensors"
FORMAT = "fedlora-checkpoint/1"


class CheckpointError(FedloraError):
    """A checkpoint is unreadable or belongs to a different run configuration."""


@dataclass
class Checkpoint:
    round: int  # last round whose aggregate is in ``global_state``
    run_id: str
    config_digest: str
    versions: dict[str, int]  # module -> registry version that holds this round's state
    global_state: dict[str, AdapterState]  # module -> adapter tensors
    optimizer_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # JSON-able: optimizer/accountant
    rng_state: torch.Tensor | None = None  # torch CPU generator state of the coordinator


# Config sections and keys that change nothing a run computes: left out of the digest, so a run
# may be resumed with another value (another tracking server, the other simulation runtime),
# and a checkpoint made before such a section or key existed still resumes.
UNDIGESTED_SECTIONS = ("tracking",)
UNDIGESTED_KEYS = (("simulation", "backend"),)


def config_digest(config_json: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of the run config (resume refuses another config), less
    the ``UNDIGESTED_SECTIONS`` and ``UNDIGESTED_KEYS``."""
    digested = {k: v for k, v in config_json.items() if k not in UNDIGESTED_SECTIONS}
    for section, key in UNDIGESTED_KEYS:
        if isinstance(digested.get(section), dict):
            digested[section] = {k: v for k, v in digested[section].items() if k != key}
    text = json.dumps(digested, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def save_checkpoint(run_dir: Path, ckpt: Checkpoint) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for module, state in ckpt.global_state.items():
        for key, value in state.items():
            tensors[f"global/{module}/{key}"] = value.detach().cpu().contiguous()
    for key, value in ckpt.optimizer_tensors.items():
        tensors[f"optimizer/{key}"] = value.detach().cpu().contiguous()
    meta = {
        "format": FORMAT,
        "round": ckpt.round,
        "run_id": ckpt.run_id,
        "config_digest": ckpt.config_digest,
        "versions": ckpt.versions,
        "extra": ckpt.extra,
        "rng": None
        if ckpt.rng_state is None
        else base64.b64encode(ckpt.rng_state.numpy().tobytes()).decode(),
    }
    write_bytes_atomic(
        run_dir / CHECKPOINT_FILE, save(tensors, metadata={"meta": json.dumps(meta)})
    )


def load_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The run directory's checkpoint, or None if it has none."""
    path = run_dir / CHECKPOINT_FILE
    if not path.is_file():
        return None
    data = path.read_bytes()
    try:
        tensors = load(data)
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(json.loads(data[8 : 8 + header_len])["__metadata__"]["meta"])
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{path}: not a {FORMAT} file")
        return _from_parts(tensors, meta)
    except (SafetensorError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(exc).__name__})") from None


def _from_parts(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Checkpoint:
    global_state: dict[str, AdapterState] = {}
    optimizer: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        kind, _, rest = name.partition("/")
        if kind == "global":
            module, _, key = rest.partition("/")
            global_state.setdefault(module, {})[key] = tensor
        else:
            optimizer[rest] = tensor
    rng = None
    if meta["rng"] is not None:
        rng = torch.frombuffer(bytearray(base64.b64decode(meta["rng"])), dtype=torch.uint8)
    return Checkpoint(
        round=int(meta["round"]),
        run_id=str(meta["run_id"]),
        config_digest=str(meta["config_digest"]),
        versions={str(k): int(v) for k, v in meta["versions"].items()},
        global_state=global_state,
        optimizer_tensors=optimizer,
        extra=dict(meta["extra"]),
        rng_state=rng,
    )
