"""Fuzz the coordinator's intake of sealed deltas: N hostile envelopes, zero accepted, zero crashes.

Every case is one envelope that the coordinator receives while it expects a reply from one
enrolled site for one round. It runs exactly what the coordinator runs on a reply::

    payload = open_delta(envelope, coordinator_key, allow_list, expected_context, bound)
    delta = decode_delta(payload, max_payload_bytes, expected=global_manifest)

Outcomes: *rejected* (``UpdateRejected``, the only exception either function may raise),
*accepted* (both returned: target 0 for every mutation of an envelope) or *crashed* (any other
exception: target 0). The cases are drawn from these classes, seeded:

- ``bit-flip``, ``byte-set``, ``truncate``, ``insert``, ``delete-span``, ``header-field``:
  mutations of a valid envelope of the expected site and round;
- ``splice``: the prefix of one valid envelope and the suffix of another (other site/round);
- ``resigned-mutation``: the expected site itself re-signs a mutated body;
- ``forged-by-enrolled``: another enrolled site re-signs or re-addresses the expected site's
  envelope, or seals its own under the expected site's id;
- ``unenrolled``: a site missing from the allow-list seals under its own or an enrolled id;
- ``replay``: a valid envelope offered for another round, module version, module or run;
- ``wrong-coordinator``: sealed to another coordinator key (of either KEM);
- ``sealed-garbage``: the expected site correctly seals a *mutated delta payload*. The envelope
  opens by design; ``decode_delta`` must reject it or return finite tensors of the expected
  shapes (``well-formed``: a different but valid delta, left to the norm check). Here
  *accepted* counts decoded deltas that break that promise.

Usage::

    python benchmarks/fuzz_envelopes.py [--count 10000] [--seed 0] [--out FILE.json]

Prints a table, writes JSON (default ``benchmarks/out/fuzz_envelopes.json``) and exits 1 when
any case was accepted or crashed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import random
import re
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from common.allow_list import AllowList  # noqa: E402
from common.encoding import decode_delta, encode_delta, max_encoded_size  # noqa: E402
from common.envelope import (  # noqa: E402
    HEADER,
    SIGNATURE_BYTES,
    SIGNATURE_DOMAIN,
    EnvelopeContext,
    max_envelope_bytes,
    open_delta,
    seal_delta,
)
from common.errors import UpdateRejected  # noqa: E402
from common.keys import CoordinatorPrivateKey  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "out" / "fuzz_envelopes.json"
SITES = ("site-a", "site-b", "site-c")
ROUNDS = (1, 2, 3)
ENCODINGS = ("fp32", "fp16", "int8")
RUN_ID = "fuzz-run"
MODULE = "shared"
FINGERPRINT = "ab" * 32
# The global adapter every delta must match: two LoRA pairs of a 16-wide model at rank 4.
MANIFEST = {
    "layers.0.q_proj.lora_A.weight": (4, 16),
    "layers.0.q_proj.lora_B.weight": (16, 4),
    "layers.0.v_proj.lora_A.weight": (4, 16),
    "layers.0.v_proj.lora_B.weight": (16, 4),
}
# Largest fp32 payload of MANIFEST (bytes): the coordinator's privacy.max-payload-bytes here.
MAX_PAYLOAD = max_encoded_size(MANIFEST, "fp32")
MAX_ENVELOPE = max_envelope_bytes(MAX_PAYLOAD)
# Share of cases per class (relative weights).
CLASS_WEIGHTS = {
    "bit-flip": 14,
    "byte-set": 6,
    "truncate": 8,
    "insert": 8,
    "delete-span": 6,
    "header-field": 6,
    "splice": 10,
    "resigned-mutation": 10,
    "forged-by-enrolled": 8,
    "unenrolled": 4,
    "replay": 8,
    "wrong-coordinator": 4,
    "sealed-garbage": 8,
}
MAX_LISTED = 20  # crashes and acceptances listed in the JSON, each with a reproducer


@dataclass(frozen=True)
class Keys:
    """Two coordinators (one per KEM), three enrolled sites and one stranger, from the seed."""

    coordinators: dict[str, CoordinatorPrivateKey]
    strangers: dict[str, CoordinatorPrivateKey]  # other coordinators' keys, same KEMs
    sites: dict[str, Ed25519PrivateKey]
    unenrolled: Ed25519PrivateKey
    allow_list: AllowList


def make_keys(rng: random.Random) -> Keys:
    def ed() -> Ed25519PrivateKey:
        return Ed25519PrivateKey.from_private_bytes(rng.randbytes(32))

    def coordinator(kem: str) -> CoordinatorPrivateKey:
        x = X25519PrivateKey.from_private_bytes(rng.randbytes(32))
        pq = MLKEM768PrivateKey.from_seed_bytes(rng.randbytes(64)) if kem != "x25519" else None
        return CoordinatorPrivateKey(x, pq)

    kems = ("x25519", "mlkem768-x25519")
    sites = {site: ed() for site in SITES}
    return Keys(
        coordinators={kem: coordinator(kem) for kem in kems},
        strangers={kem: coordinator(kem) for kem in kems},
        sites=sites,
        unenrolled=ed(),
        allow_list=AllowList({site: key.public_key() for site, key in sites.items()}),
    )


def context(site: str, round_: int, **changes: Any) -> EnvelopeContext:
    base = EnvelopeContext(
        run_id=RUN_ID,
        round=round_,
        site_id=site,
        module=MODULE,
        version=round_ - 1,
        base_fingerprint=FINGERPRINT,
    )
    return dataclasses.replace(base, **changes)


def random_delta(rng: random.Random) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(rng.getrandbits(63))
    return {key: torch.randn(shape, generator=gen) * 1e-2 for key, shape in MANIFEST.items()}


@dataclass(frozen=True)
class Case:
    """One envelope and the reply the coordinator was waiting for when it arrived."""

    kind: str
    kem: str
    envelope: bytes
    expected: EnvelopeContext
    coordinator: CoordinatorPrivateKey
    mutated_payload: bool = False  # sealed-garbage: the envelope is honest, the payload is not


# A case builder: (valid envelope, its context, its coordinator key, KEM) ->
# (envelope, expected context, coordinator key, sealed-garbage?).
Builder = Callable[
    [bytes, EnvelopeContext, CoordinatorPrivateKey, str],
    tuple[bytes, EnvelopeContext, CoordinatorPrivateKey, bool],
]


class Generator:
    """Valid envelopes of every (kem, site, round), and hostile cases derived from them."""

    def __init__(self, keys: Keys, rng: random.Random) -> None:
        self.keys, self.rng = keys, rng
        self.payloads = {
            (site, round_): encode_delta(random_delta(rng), rng.choice(ENCODINGS))  # type: ignore[arg-type]
            for site in SITES
            for round_ in ROUNDS
        }
        self.valid: dict[tuple[str, str, int], bytes] = {}
        for kem in keys.coordinators:
            for (site, round_), payload in self.payloads.items():
                self.valid[(kem, site, round_)] = self.seal(kem, payload, context(site, round_))

    def seal(
        self, kem: str, payload: bytes, ctx: EnvelopeContext, signer: str | None = None
    ) -> bytes:
        key = (
            self.keys.unenrolled if signer == "stranger" else self.keys.sites[signer or ctx.site_id]
        )
        return seal_delta(payload, self.keys.coordinators[kem].public_key(), key, ctx)

    def controls(self) -> list[Case]:
        """Every unmutated valid envelope: each must open and decode (the harness works)."""
        return [
            Case("control", kem, env, context(site, round_), self.keys.coordinators[kem])
            for (kem, site, round_), env in self.valid.items()
        ]

    def case(self, kind: str) -> Case:
        rng = self.rng
        kem = rng.choice(("x25519", "x25519", "mlkem768-x25519"))
        site, round_ = rng.choice(SITES), rng.choice(ROUNDS)
        original = self.valid[(kem, site, round_)]
        expected = context(site, round_)
        coordinator = self.keys.coordinators[kem]
        make: Builder = getattr(self, "_" + kind.replace("-", "_"))
        for _ in range(100):  # a mutation that reproduces a valid reply is not a mutation
            envelope, want, coord, garbage = make(original, expected, coordinator, kem)
            if garbage or not self.is_honest(envelope, want, coord):
                return Case(kind, kem, envelope, want, coord, garbage)
        raise RuntimeError(f"class {kind} keeps reproducing valid envelopes")

    def is_honest(self, envelope: bytes, want: EnvelopeContext, coord: Any) -> bool:
        """Whether ``envelope`` is the valid reply to ``want`` for coordinator ``coord``."""
        return any(
            coord is self.keys.coordinators[kem]
            and want == context(want.site_id, want.round)
            and envelope == self.valid.get((kem, want.site_id, want.round))
            for kem in self.keys.coordinators
        )

    # The builders (see ``Builder``), one per class.

    def _bit_flip(self, env: bytes, exp: EnvelopeContext, coord: Any, kem: str) -> Any:
        data = bytearray(env)
        for _ in range(self.rng.randint(1, 8)):
            data[self.rng.randrange(len(data))] ^= 1 << self.rng.randrange(8)
        return bytes(data), exp, coord, False

    def _byte_set(self, env: bytes, exp: EnvelopeContext, coord: Any, kem: str) -> Any:
        data = bytearray(env)
        for _ in range(self.rng.randint(1, 16)):
            data[self.rng.randrange(len(data))] = self.rng.randrange(256)
        return bytes(data), exp, coord, False

    def _truncate(self, env: bytes, exp: EnvelopeContext, coord: Any, kem: str) -> Any:
        cut = self.rng.randrange(len(env))
        kept = env[:cut] if self.rng.random() < 0.7 else env[cut + 1 :]
        return kept, exp, coord, False

    def _insert(self, env: bytes, exp: EnvelopeContext, coord: Any, kem: str) -> Any:
        at = self.rng.randrange(len(env) + 1)
        extra = self.rng.randbytes(self.rng.choice((1, 2, 8, 64, 1024)))
        return env[:at] + extra + env[at:], exp, coord, False

    def _delete_span(self, env: bytes, exp: EnvelopeContext, coord: Any, kem: str) -> Any:
        start = self.rng.randrange(len(env))
        end = min(len(env), start + self.rng.choice((1, 4, 32, 512)))
        return env[:start] + env[end:], exp, coord, False

    def _header_field(self, env: bytes, exp: EnvelopeContext, coord: Any, kem: str) -> Any:
        """Rewrite one header field (version, suite or a length) to a chosen or random value."""
        fields = list(HEADER.unpack_from(env))
        index = self.rng.randrange(1, 5)
        bits = {1: 8, 2: 8, 3: 16, 4: 32}[index]
        nudged = fields[index] + self.rng.choice((-1, 1, 16, 1120))
        fields[index] = self.rng.choice((nudged % 2**bits, self.rng.getrandbits(bits), 0))
        return HEADER.pack(*fields) + env[HEADER.size :], exp, coord, False

    def _splice(self, env: bytes, exp: EnvelopeContext, coord: Any, kem: str) -> Any:
        other_key = self.rng.choice([k for k in self.valid if k != (kem, exp.site_id, exp.round)])
        other = self.valid[other_key]
        cut_a, cut_b = self.rng.randrange(len(env) + 1), self.rng.randrange(len(other) + 1)
        if self.rng.random() < 0.5:  # same cut in both: fields line up when lengths agree
            cut_b = min(cut_a, len(other))
        spliced = env[:cut_a] + other[cut_b:]
        if self.rng.random() < 0.5:
            exp = context(other_key[1], other_key[2])
            coord = self.keys.coordinators[other_key[0]]
        return spliced, exp, coord, False

    def _resigned_mutation(self, env: bytes, exp: EnvelopeContext, coord: Any, kem: str) -> Any:
        mutate = self.rng.choice((self._bit_flip, self._byte_set, self._insert, self._delete_span))
        body = mutate(env[:-SIGNATURE_BYTES], exp, coord, kem)[0]
        key = self.keys.sites[exp.site_id]
        return body + key.sign(SIGNATURE_DOMAIN + body), exp, coord, False

    def _forged_by_enrolled(self, env: bytes, exp: EnvelopeContext, coord: Any, kem: str) -> Any:
        attacker = self.rng.choice([s for s in SITES if s != exp.site_id])
        key = self.keys.sites[attacker]
        variant = self.rng.randrange(3)
        if variant == 0:  # the victim's body under the attacker's signature
            body = env[:-SIGNATURE_BYTES]
            return body + key.sign(SIGNATURE_DOMAIN + body), exp, coord, False
        if variant == 1:  # the victim's ciphertext re-addressed to the attacker, who signs it
            readdressed = readdress(env, context(attacker, exp.round))
            body = readdressed[:-SIGNATURE_BYTES]
            signed = body + key.sign(SIGNATURE_DOMAIN + body)
            return signed, context(attacker, exp.round), coord, False
        # A fresh envelope claiming the victim's id, sealed and signed by the attacker.
        payload = self.payloads[(attacker, exp.round)]
        return self.seal(kem, payload, exp, signer=attacker), exp, coord, False

    def _unenrolled(self, env: bytes, exp: EnvelopeContext, coord: Any, kem: str) -> Any:
        payload = self.payloads[(exp.site_id, exp.round)]
        if self.rng.random() < 0.5:  # claims an enrolled id
            return self.seal(kem, payload, exp, signer="stranger"), exp, coord, False
        own = context("site-z", exp.round)
        return self.seal(kem, payload, own, signer="stranger"), own, coord, False

    def _replay(self, env: bytes, exp: EnvelopeContext, coord: Any, kem: str) -> Any:
        field = self.rng.choice(("round", "round", "version", "module", "run_id"))
        value: Any = {
            "round": self.rng.choice([r for r in (*ROUNDS, 4, 100) if r != exp.round]),
            "version": exp.version + self.rng.choice((1, 2)),
            "module": "group-eu",
            "run_id": "another-run",
        }[field]
        return env, dataclasses.replace(exp, **{field: value}), coord, False

    def _wrong_coordinator(self, env: bytes, exp: EnvelopeContext, coord: Any, kem: str) -> Any:
        other_kem = self.rng.choice(list(self.keys.strangers))
        return env, exp, self.keys.strangers[other_kem], False

    def _sealed_garbage(self, env: bytes, exp: EnvelopeContext, coord: Any, kem: str) -> Any:
        payload = bytearray(self.payloads[(exp.site_id, exp.round)])
        for _ in range(self.rng.randint(1, 6)):
            action = self.rng.randrange(3)
            at = self.rng.randrange(len(payload) + (action == 1))
            if action == 0 and payload:
                payload[at] ^= 1 << self.rng.randrange(8)
            elif action == 1:
                payload[at:at] = self.rng.randbytes(self.rng.choice((1, 4, 64)))
            else:
                del payload[at : at + self.rng.choice((1, 8, 256))]
        return self.seal(kem, bytes(payload), exp), exp, coord, True


def readdress(envelope: bytes, ctx: EnvelopeContext) -> bytes:
    """The same HPKE output under another clear-text context (signature left as it was)."""
    magic, version, suite, info_len, sealed_len = HEADER.unpack_from(envelope)
    info = ctx.info()
    sealed = envelope[HEADER.size + info_len : HEADER.size + info_len + sealed_len]
    header = HEADER.pack(magic, version, suite, len(info), len(sealed))
    return header + info + sealed + envelope[-SIGNATURE_BYTES:]


def coordinator_intake(case: Case, keys: Keys) -> dict[str, torch.Tensor]:
    """What the coordinator does with one reply (raises UpdateRejected to refuse it)."""
    payload = open_delta(
        case.envelope, case.coordinator, keys.allow_list, case.expected, MAX_ENVELOPE
    )
    return decode_delta(payload, MAX_PAYLOAD, expected=MANIFEST)


def well_formed(delta: dict[str, torch.Tensor]) -> bool:
    return list(delta) == list(MANIFEST) and all(
        tuple(t.shape) == MANIFEST[k] and t.dtype == torch.float32 and bool(torch.isfinite(t).all())
        for k, t in delta.items()
    )


def reason_class(message: str) -> str:
    """A rejection reason with its values blanked, for the per-class histogram."""
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", message)
    text = re.sub(r"\d+", "N", text)
    return text[:72]


def run_fuzz(count: int = 10_000, seed: int = 0) -> dict[str, Any]:
    """Run ``count`` cases from ``seed``; return the figures (see the module docstring)."""
    rng = random.Random(seed)
    keys = make_keys(rng)
    gen = Generator(keys, rng)
    for control in gen.controls():  # the harness must accept what it should
        coordinator_intake(control, keys)
    kinds = list(CLASS_WEIGHTS)
    weights = [CLASS_WEIGHTS[k] for k in kinds]
    stats = {k: Counter[str]() for k in kinds}
    reasons = {k: Counter[str]() for k in kinds}
    crashes: list[dict[str, Any]] = []
    accepted: list[dict[str, Any]] = []
    slowest = 0.0
    start = time.perf_counter()
    for index in range(count):
        kind = rng.choices(kinds, weights)[0]
        case = gen.case(kind)
        stats[kind]["cases"] += 1
        began = time.perf_counter()
        try:
            delta = coordinator_intake(case, keys)
        except UpdateRejected as err:
            stats[kind]["rejected"] += 1
            reasons[kind][reason_class(str(err))] += 1
        except Exception as err:  # a crash is exactly what this counts
            stats[kind]["crashed"] += 1
            if len(crashes) < MAX_LISTED:
                crashes.append(_listing(index, case, err, traceback.format_exc(limit=4)))
        else:
            if case.mutated_payload and well_formed(delta):
                stats[kind]["well_formed"] += 1
            else:
                stats[kind]["accepted"] += 1
                if len(accepted) < MAX_LISTED:
                    accepted.append(_listing(index, case, None, ""))
        slowest = max(slowest, time.perf_counter() - began)
    seconds = time.perf_counter() - start
    classes = {k: {f: stats[k][f] for f in _FIELDS} for k in kinds}
    total = {f: sum(c[f] for c in classes.values()) for f in _FIELDS}
    return {
        "count": count,
        "seed": seed,
        "seconds": round(seconds, 3),
        "cases_per_second": round(count / seconds, 1) if seconds else None,
        "slowest_case_ms": round(slowest * 1e3, 3),
        "controls_opened": len(gen.valid),
        "max_payload_bytes": MAX_PAYLOAD,
        "max_envelope_bytes": MAX_ENVELOPE,
        "classes": classes,
        "total": total,
        "reasons": {k: dict(reasons[k].most_common(8)) for k in kinds},
        "crashes": crashes,
        "accepted": accepted,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


_FIELDS = ("cases", "rejected", "accepted", "well_formed", "crashed")


def _listing(index: int, case: Case, err: BaseException | None, trace: str) -> dict[str, Any]:
    item: dict[str, Any] = {
        "index": index,
        "class": case.kind,
        "kem": case.kem,
        "expected": dataclasses.asdict(case.expected),
        "envelope_bytes": len(case.envelope),
        "envelope_head_hex": case.envelope[:48].hex(),
    }
    if err is not None:
        item["error"] = f"{type(err).__name__}: {str(err)[:300]}"
        item["traceback"] = trace
    return item


def print_table(report: dict[str, Any]) -> None:
    header = (
        f"{'class':<20} {'cases':>7} {'rejected':>9} {'accepted':>9} "
        f"{'well-formed':>12} {'crashed':>8}"
    )
    print(header)
    print("-" * len(header))
    rows = [*report["classes"].items(), ("total", report["total"])]
    for name, c in rows:
        if name == "total":
            print("-" * len(header))
        print(
            f"{name:<20} {c['cases']:>7} {c['rejected']:>9} {c['accepted']:>9} "
            f"{c['well_formed']:>12} {c['crashed']:>8}"
        )
    print(
        f"\n{report['count']} cases, seed {report['seed']}: {report['seconds']:.1f} s "
        f"({report['cases_per_second']} cases/s, slowest {report['slowest_case_ms']:.1f} ms); "
        f"{report['controls_opened']} unmutated controls opened and decoded"
    )
    for item in report["crashes"][:5]:
        print(f"CRASH #{item['index']} ({item['class']}): {item['error']}")
    for item in report["accepted"][:5]:
        print(f"ACCEPTED #{item['index']} ({item['class']}, {item['kem']})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=10_000, help="cases to run (default 10000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of keys and mutations")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON report to write")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be at least 1")
    report = run_fuzz(args.count, args.seed)
    print_table(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    failed = report["total"]["accepted"] + report["total"]["crashed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
