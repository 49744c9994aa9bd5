"""Bytes per site per round: fedlora's delta encodings vs the full adapter and the base model.

For each adapter (SmolLM2-135M r=8 on q,v and on every linear layer; Mistral-7B r=32 on q,v
and on every linear layer) the up-link payload of one site and round is sized for fp32, fp16,
int8 (per-tensor scale), int8-block (a bf16 scale per 128 values) and int4 (a bf16 scale per 64
values) deltas, each with every LoRA tensor (``fedavg``) or the B factors only (``ffa``,
``common.rules.ffa_sent_keys``). References: the full adapter state in fp32 as Flower ndarrays
(``np.save`` per tensor: what the FlowerTune baseline sends each way) and the base model.

SmolLM2 sizes are measured: ``common.encoding.encode_delta`` on random tensors with the real
peft names and shapes (checked against ``get_peft_model`` on the real model). Mistral-7B sizes
are computed from shapes alone: exact data bytes plus the safetensors header that
``header_bytes`` reconstructs; on the SmolLM2 rows that estimate is within 256 bytes of the
real payload (``estimate_minus_measured`` in the JSON; int8 scales vary in length).
``--measure-7b`` encodes random 7B-shaped tensors too (about 2 GiB of memory, a minute).

The sealed envelope's overhead (``common.envelope``, both KEMs) is measured on one payload, and
each encoding's error is measured on real aggregated deltas ``v<k> - v<k-1>`` of a run's
registry (``--run-dir``; ``runs/demo`` by default, or any SmolLM2 run such as ``fedlora
compare``'s federated run), with the bytes of each payload against fp32.

    python benchmarks/bench_communication.py [--run-dir runs/demo] [--measure-7b] [--no-model]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_output import REPO, header, print_table, write_result

from common.adapters import num_parameters
from common.block_quant import block_count
from common.encoding import BLOCK_ENCODINGS, Encoding, decode_delta, encode_delta
from common.rules import ffa_sent_keys

ENCODINGS: tuple[Encoding, ...] = ("fp32", "fp16", "int8", "int8-block", "int4")
_WIRE_BYTES = {"fp32": 4, "fp16": 2, "int8": 1}
_HEADER_DTYPE = {"fp32": "F32", "fp16": "F16", "int8": "I8"}
# np.save's header for a small-rank float array (bytes): magic, version, dict, padding to 64.
_NPY_HEADER_BYTES = 128
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
ALL_LINEAR = ATTENTION + MLP


@dataclass(frozen=True)
class DecoderDims:
    """The dimensions of a Llama/Mistral decoder that fix its parameter and LoRA shapes."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """``{module: (out_features, in_features)}`` of one layer's linear modules."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {
            "q_proj": (q, self.hidden), "k_proj": (kv, self.hidden),
            "v_proj": (kv, self.hidden), "o_proj": (self.hidden, q),
            "gate_proj": (self.intermediate, self.hidden),
            "up_proj": (self.intermediate, self.hidden),
            "down_proj": (self.hidden, self.intermediate),
        }  # fmt: skip

    def base_parameters(self) -> int:
        """Every weight of the base model (embeddings, layers, norms, LM head)."""
        per_layer = sum(o * i for o, i in self.linear_shapes().values()) + 2 * self.hidden
        head = 0 if self.tied_embeddings else self.vocab * self.hidden
        return self.vocab * self.hidden + self.layers * per_layer + self.hidden + head


SMOLLM2 = DecoderDims("smollm2-135m", 576, 30, 9, 3, 64, 1536, 49152, tied_embeddings=True)
# Mistral-7B-v0.3 (the FlowerTune LLM baseline's model): GQA with 8 KV heads, vocab 32768.
MISTRAL_7B = DecoderDims("mistral-7b-v0.3", 4096, 32, 32, 8, 128, 14336, 32768, False)


def lora_shapes(dims: DecoderDims, targets: tuple[str, ...], rank: int) -> dict[str, tuple]:
    """peft's saved names and shapes of a LoRA adapter: A (r, in), B (out, r) per target."""
    shapes: dict[str, tuple] = {}
    linear = dims.linear_shapes()
    for layer in range(dims.layers):
        for module in targets:
            part = "self_attn" if module in ATTENTION else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{part}.{module}"
            out_features, in_features = linear[module]
            shapes[f"{prefix}.lora_A.weight"] = (rank, in_features)
            shapes[f"{prefix}.lora_B.weight"] = (out_features, rank)
    return shapes


def real_smollm2_shapes(targets: tuple[str, ...], rank: int) -> tuple[dict[str, tuple], int]:
    """Names and shapes from peft on the real SmolLM2 model, and its base parameter count."""
    from peft import LoraConfig, TaskType, get_peft_model
    from peft.utils import get_peft_model_state_dict

    from common.config import ModelConfig
    from common.models import load_base

    base = load_base(ModelConfig(name="smollm2-135m", device="cpu")).model
    parameters = sum(p.numel() for p in base.parameters())
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets),
                        task_type=TaskType.CAUSAL_LM)  # fmt: skip
    state = get_peft_model_state_dict(get_peft_model(base, config))
    return {key: tuple(t.shape) for key, t in state.items()}, parameters


# ---------------------------------------------------------------------------- sizes


def block_payload_bytes(shapes: dict[str, tuple], encoding: Encoding) -> int:
    """int8-block / int4 payload size from shapes: codes, bf16 scales and the header with the
    layout (names and shapes) in its metadata."""
    block = BLOCK_ENCODINGS[encoding][1]
    sizes = [math.prod(shapes[k]) for k in sorted(shapes)]
    codes = sum(sizes) if encoding == "int8-block" else -(-sum(sizes) // 2)
    scales = 2 * block_count(sizes, block)
    layout = json.dumps([[k, list(shapes[k])] for k in sorted(shapes)], separators=(",", ":"))
    metadata = {"format": "fedlora-delta/1", "encoding": encoding,
                "block": str(block), "layout": layout}  # fmt: skip
    dtype = "I8" if encoding == "int8-block" else "U8"
    entries = {
        "__metadata__": metadata,
        "codes": {"dtype": dtype, "shape": [codes], "data_offsets": [scales, scales + codes]},
        "scales": {"dtype": "BF16", "shape": [scales // 2], "data_offsets": [0, scales]},
    }
    text = json.dumps(entries, separators=(",", ":"))
    return 8 + math.ceil(len(text.encode()) / 8) * 8 + codes + scales


def header_bytes(shapes: dict[str, tuple], encoding: Encoding) -> int:
    """Length of the safetensors header ``encode_delta`` writes (8-byte prefix included).

    safetensors writes compact JSON: ``__metadata__`` first, then every tensor's dtype, shape
    and data offsets, padded with spaces to a multiple of 8 bytes. int8 adds a JSON string of
    per-tensor scales; a scale is a float64 repr, taken here as 22 characters (e.g.
    ``1.2345678901234567e-05``); real scales are 18 to 23 characters.
    """
    metadata = {"format": "fedlora-delta/1", "encoding": encoding}
    if encoding == "int8":
        metadata["scales"] = json.dumps(dict.fromkeys(shapes, 1.2345678901234567e-05))
    entries: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, shape in shapes.items():
        size = math.prod(shape) * _WIRE_BYTES[encoding]
        entries[name] = {"dtype": _HEADER_DTYPE[encoding], "shape": list(shape),
                         "data_offsets": [offset, offset + size]}  # fmt: skip
        offset += size
    text = json.dumps(entries, separators=(",", ":"))
    return 8 + math.ceil(len(text.encode()) / 8) * 8


def estimated_payload(shapes: dict[str, tuple], encoding: Encoding) -> int:
    """``encode_delta`` payload size from shapes alone: header plus exact data bytes."""
    if encoding in BLOCK_ENCODINGS:
        return block_payload_bytes(shapes, encoding)
    data = sum(math.prod(s) for s in shapes.values()) * _WIRE_BYTES[encoding]
    return header_bytes(shapes, encoding) + data


def random_delta(shapes: dict[str, tuple], seed: int = 0) -> dict[str, torch.Tensor]:
    """A delta of the given shapes, values of a typical per-round LoRA change (~1e-3)."""
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=generator) * 1e-3 for k, s in shapes.items()}


def measured_payload(delta: dict[str, torch.Tensor], encoding: Encoding) -> int:
    """Bytes of the real ``encode_delta`` payload."""
    return len(encode_delta(delta, encoding))


def flower_ndarrays_bytes(shapes: dict[str, tuple]) -> int:
    """The full fp32 adapter as Flower ndarrays: ``np.save`` of every tensor (FlowerTune)."""
    return sum(math.prod(s) * 4 + _NPY_HEADER_BYTES for s in shapes.values())


def check_npy_header() -> None:
    """``_NPY_HEADER_BYTES`` is what Flower's ``ndarray_to_bytes`` (np.save) really adds."""
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((576, 8), np.float32), allow_pickle=False)
    assert len(buffer.getvalue()) - 576 * 8 * 4 == _NPY_HEADER_BYTES


# ---------------------------------------------------------------------------- rows


def adapter_rows(
    label: str, shapes: dict[str, tuple], base_params: int, measure: bool
) -> dict[str, Any]:
    """Sizes of every encoding x (all keys, ffa keys) for one adapter, with the references."""
    flowertune = flower_ndarrays_bytes(shapes)
    base_fp32 = base_params * 4
    delta = random_delta(shapes) if measure else None
    rows = []
    for keys_name, keys in (
        ("all (fedavg)", list(shapes)),
        ("B only (ffa)", ffa_sent_keys(shapes)),
    ):
        sent = {k: shapes[k] for k in keys}
        for encoding in ENCODINGS:
            estimate = estimated_payload(sent, encoding)
            measured = measured_payload({k: delta[k] for k in keys}, encoding) if delta else None
            size = measured if measured is not None else estimate
            rows.append({
                "keys": keys_name, "encoding": encoding,
                "parameters": sum(math.prod(s) for s in sent.values()),
                "bytes": size, "measured": measured is not None,
                "estimate_minus_measured": None if measured is None else estimate - measured,
                "vs_full_adapter_fp32": size / flowertune, "vs_base_fp32": size / base_fp32,
            })  # fmt: skip
    return {
        "adapter": label,
        "tensors": len(shapes),
        "parameters": sum(math.prod(s) for s in shapes.values()),
        "full_adapter_fp32_flower_bytes": flowertune,
        "base_parameters": base_params,
        "base_fp32_bytes": base_fp32,
        "base_bf16_bytes": base_params * 2,
        "rows": rows,
    }


def envelope_overhead(payload: bytes) -> dict[str, int]:
    """Bytes a sealed envelope adds to ``payload``, per KEM (header, context, enc, tag, sig)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from common.envelope import EnvelopeContext, seal_delta
    from common.keys import CoordinatorPrivateKey

    context = EnvelopeContext(run_id="b3f45af477144c959535bb5f99f7e49d", round=3,
                              site_id="site-0", module="shared", version=2,
                              base_fingerprint="8886438b" * 8)  # fmt: skip
    site = Ed25519PrivateKey.generate()
    overhead = {}
    for kem, pq in (("x25519", None), ("mlkem768-x25519", MLKEM768PrivateKey.generate())):
        coordinator = CoordinatorPrivateKey(X25519PrivateKey.generate(), pq).public_key()
        overhead[kem] = len(seal_delta(payload, coordinator, site, context)) - len(payload)
    return overhead


# ---------------------------------------------------------------------------- int8 quality


def encoding_error(delta: dict[str, torch.Tensor], encoding: Encoding) -> dict[str, float]:
    """Relative L2 error of one encode/decode round trip: whole delta and worst tensor."""
    decoded = decode_delta(encode_delta(delta, encoding), max_bytes=2**31)
    diff = sum(float((decoded[k].double() - t.double()).norm()) ** 2 for k, t in delta.items())
    norm = sum(float(t.double().norm()) ** 2 for t in delta.values())
    worst = max(
        float((decoded[k].double() - t.double()).norm() / t.double().norm())
        for k, t in delta.items()
        if float(t.norm()) > 0
    )
    return {"relative_l2": math.sqrt(diff / norm), "worst_tensor_relative_l2": worst}


def registry_delta(run_dir: Path, newer: int, older: int) -> dict[str, torch.Tensor]:
    """``v<newer> - v<older>`` of the ``shared`` module: an aggregated delta of a real run."""
    from safetensors.torch import load_file

    folder = run_dir / "registry" / "shared"
    new = load_file(str(folder / f"v{newer:04d}" / "adapter_model.safetensors"))
    old = load_file(str(folder / f"v{older:04d}" / "adapter_model.safetensors"))
    return {key: new[key].float() - old[key].float() for key in sorted(new)}


def quality(run_dir: Path) -> list[dict[str, Any]]:
    """Every encoding's error and bytes on the real deltas v1 - v0, v3 - v2 and v5 - v4."""
    results = []
    for newer, older in ((1, 0), (3, 2), (5, 4)):
        try:
            delta = registry_delta(run_dir, newer, older)
        except (FileNotFoundError, OSError) as exc:
            print(f"skipping v{newer} - v{older} of {run_dir}: {exc}")
            continue
        norm = math.sqrt(sum(float(t.double().norm()) ** 2 for t in delta.values()))
        fp32 = measured_payload(delta, "fp32")
        for encoding in ENCODINGS[1:]:
            size = measured_payload(delta, encoding)
            results.append({"delta": f"v{newer:04d} - v{older:04d}", "encoding": encoding,
                            "delta_l2_norm": norm, "parameters": num_parameters(delta),
                            "bytes": size, "vs_fp32_payload": size / fp32,
                            **encoding_error(delta, encoding)})  # fmt: skip
    return results


# ---------------------------------------------------------------------------- main


def adapters(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every adapter's size table; SmolLM2 from the real model unless ``--no-model``."""
    found = []
    for targets, label in ((("q_proj", "v_proj"), "q,v"), (ALL_LINEAR, "all linear")):
        shapes = lora_shapes(SMOLLM2, targets, rank=8)
        base_params = SMOLLM2.base_parameters()
        if not args.no_model:
            real, real_params = real_smollm2_shapes(targets, rank=8)
            if real != shapes or real_params != base_params:
                raise SystemExit(f"SmolLM2 {label}: computed shapes differ from peft's")
        found.append(adapter_rows(f"smollm2-135m r=8 {label}", shapes, base_params, True))
    for targets, label in ((("q_proj", "v_proj"), "q,v"), (ALL_LINEAR, "all linear")):
        shapes = lora_shapes(MISTRAL_7B, targets, rank=32)
        found.append(adapter_rows(f"mistral-7b r=32 {label}", shapes,
                                  MISTRAL_7B.base_parameters(), args.measure_7b))  # fmt: skip
    return found


def print_adapter(table: dict[str, Any]) -> None:
    print_table(
        f"{table['adapter']}: {table['parameters']:,} LoRA parameters in {table['tensors']} "
        f"tensors; full adapter fp32 (Flower ndarrays) {table['full_adapter_fp32_flower_bytes']:,}"
        f" B; base model fp32 {table['base_fp32_bytes']:,} B",
        ["keys", "encoding", "parameters", "bytes/site/round", "measured", "vs full fp32",
         "vs base fp32", "<= 1/4 full"],
        [[r["keys"], r["encoding"], f"{r['parameters']:,}", f"{r['bytes']:,}",
          "yes" if r["measured"] else "shapes", f"{r['vs_full_adapter_fp32']:.4f}",
          f"{r['vs_base_fp32']:.2e}", "yes" if r["vs_full_adapter_fp32"] <= 0.25 else "NO"]
         for r in table["rows"]],
    )  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=REPO / "runs" / "demo")
    parser.add_argument("--measure-7b", action="store_true", help="encode 7B-shaped tensors too")
    parser.add_argument("--no-model", action="store_true", help="SmolLM2 shapes from its config")
    args = parser.parse_args()
    started = header("bench_communication")
    check_npy_header()
    tables = adapters(args)
    for table in tables:
        print_adapter(table)
    payload = encode_delta(random_delta(lora_shapes(SMOLLM2, ("q_proj", "v_proj"), 8)), "fp16")
    overhead = envelope_overhead(payload)
    print(f"\nsealed envelope overhead: {overhead} bytes per payload")
    errors = quality(args.run_dir)
    print_table(
        f"encoding error on real aggregated deltas of {args.run_dir}",
        ["delta", "encoding", "parameters", "delta L2", "bytes", "vs fp32", "relative L2 error",
         "worst tensor"],
        [[e["delta"], e["encoding"], f"{e['parameters']:,}", f"{e['delta_l2_norm']:.4g}",
          f"{e['bytes']:,}", f"{e['vs_fp32_payload']:.4f}", f"{e['relative_l2']:.2e}",
          f"{e['worst_tensor_relative_l2']:.2e}"] for e in errors],
    )  # fmt: skip
    flowertune = next(t for t in tables if t["adapter"] == "mistral-7b r=32 q,v")
    result = {**started, "adapters": tables,
              "envelope_overhead_bytes": overhead, "encoding_error": errors,
              "flowertune_check": {"parameters": flowertune["parameters"],
                                   "fp32_bytes": flowertune["parameters"] * 4}}  # fmt: skip
    write_result("bench_communication" + ("_measured_7b" if args.measure_7b else ""), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
