"""Pairwise-masked secure aggregation: parameters, peer graph, messages and primitives.

The protocol is Bonawitz et al. 2017 ("Practical Secure Aggregation for Privacy-Preserving
Machine Learning") with the k-regular peer graph of SecAgg+ (Bell et al. 2020). Sites are
numbered 1..N (the lead maps site names to ids); the coordinator learns only
``sum_i w_i * clip(x_i)`` and ``sum_i w_i`` over the sites that uploaded a masked input.

Stages (``SecAggSite`` in ``common.secagg_client``, ``SecAggServer`` in
``common.secagg_server``; every message is a frozen dataclass of ints, bytes and tuples, or a
``uint32`` array, so it fits a Flower ``ConfigRecord``/``ArrayRecord``):

0. advertise: two fresh X25519 key pairs (``c`` to encrypt shares, ``s`` to agree pairwise
   masks), a fresh 32-byte self-mask seed ``b``, and a signed ``KeyAdvert``.
1. share keys: ``s_sk`` and ``b`` Shamir-split t-of-(k+1) among the site's graph neighbours
   and the site itself (as in Bonawitz et al., where every user holds a share of its own
   secrets), each neighbour's pair of shares sealed with AES-GCM under
   HKDF(X25519(c_sk_i, c_pk_j)); the site keeps its own share of ``b`` (and discards its own
   share of ``s_sk``, which nobody may ever ask it for).
2. masked input: fixed-point levels of ``w * clip(x)`` and ``w``, plus PRG(b_i), plus
   PRG(s_ij) for neighbours j > i, minus PRG(s_ij) for j < i, all mod 2**32.
3. confirm (the consistency check of Bonawitz et al. 2017, section 6, against a coordinator
   that lies about who dropped): the coordinator sends every survivor the one list U of sites
   whose masked input it summed; each signs ``(context, U)`` with its identity key, once.
4. unmask: with at least t of its neighbours' (or its own) signatures over the same U, a site
   reveals b-shares of the neighbours in U and its own, s-shares of the neighbours not in U
   (never both for one peer); the coordinator reconstructs and removes the masks. Telling
   some sites that a victim survived and others that it dropped would need two lists each
   signed by t of the victim's neighbourhood, which honest sites (each signing one list)
   never give when t exceeds half of it. With the own share a survivor's ``b`` needs only
   t - 1 surviving neighbours: 5 sites on the full graph (k = 4, t = 3) recover from 2
   dropouts.

Primitives (all from ``cryptography``, plus pycryptodome's GF(2**128) Shamir that Flower's
``secure_aggregation.crypto.shamir`` wraps): X25519, HKDF-SHA256 with ``info`` binding the
purpose, the round context and the ids; AES-256-GCM with a random 96-bit nonce and associated
data binding sender, recipient and context; Ed25519 over the advert; SHA-256 commitment to
``b`` inside the signed advert, so a corrupt reconstruction is detected rather than silently
producing a wrong sum. The PRG is the ChaCha20 keystream (zero nonce: every 32-byte stream
key is derived for exactly one stream) read as little-endian ``uint32``; Flower's
``pseudo_rand_gen`` is not used because it seeds numpy's MT19937 with 32 bits.

For transports that carry flat records (a Flower ``ConfigRecord``), ``common.secagg_records``
packs each message into ``{kebab-case key: int | float | str | bytes | list}`` and unpacks it,
checking every type, size and count first.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from common.errors import ConfigError, FedloraError
from common.fixedpoint import MAX_SUM_LEVEL, ROUNDINGS, Levels, Rounding, max_level

DOMAIN = b"fedlora/secagg/1"
# Bounds checked before anything is parsed (bytes, counts).
MAX_SITES = 10_000
MAX_CONTEXT_BYTES = 1024
KEY_BYTES = 32  # X25519 public/private keys, seeds, derived keys
SIGNATURE_BYTES = 64  # Ed25519
SHARE_BYTES = 32  # one Shamir share of a 32-byte secret: two 16-byte GF(2**128) chunks
NONCE_BYTES = 12  # AES-GCM
TAG_BYTES = 16  # AES-GCM
CIPHERTEXT_BYTES = NONCE_BYTES + 2 * SHARE_BYTES + TAG_BYTES
# Shamir chunk size of pycryptodome (bytes).
_CHUNK = 16


class SecAggError(FedloraError):
    """A secure-aggregation message or round failed; the message says which and why.

    Raised for a bad signature, a malformed or misrouted message, too few sites or shares,
    a stage called out of order, or a site refusing an unsafe unmask request.
    """


@dataclass(frozen=True)
class SecAggParams:
    """Public parameters of one secure-aggregation round, identical at every site.

    Attributes
    ----------
    num_sites
        N; site ids are 1..N.
    threshold
        t: shares needed to reconstruct a secret; ``(degree + 1) // 2 < t <= degree``. A
        site's ``b`` has k + 1 holders (its neighbours and itself), its ``s_sk`` k (the
        neighbours); t above half of k + 1 means no two disjoint sets of holders can both
        reach t, so the coordinator cannot obtain a site's ``b`` and ``s_sk`` by telling some
        holders it survived and others that it dropped. t <= k keeps ``s_sk`` recoverable.
    degree
        k: neighbours per site in the peer graph; ``N - 1`` is the full graph of Bonawitz.
    min_survivors
        Fewest masked inputs the coordinator may unmask a sum of (at least 2, so a sum is
        never one site's input).
    clip_range
        c: every delta coordinate is clipped to ``[-c, c]`` before weighting.
    max_weight
        W: largest example weight a site may fold in.
    scale
        Fixed-point steps per unit of ``w * x``.
    weight_scale
        Fixed-point steps per unit of weight (a power of two: integer weights are exact).
    rounding
        ``"nearest"`` or ``"stochastic"`` (``common.fixedpoint``).
    """

    num_sites: int
    threshold: int
    degree: int
    min_survivors: int
    clip_range: float
    max_weight: float
    scale: float
    weight_scale: float
    rounding: Rounding = "nearest"

    def __post_init__(self) -> None:
        n, k, t = self.num_sites, self.degree, self.threshold
        for name in ("num_sites", "degree", "threshold", "min_survivors"):
            value = getattr(self, name)
            _check(type(value) is int, name, value, "an int")
        _check(2 <= n <= MAX_SITES, "num_sites", n, f"in [2, {MAX_SITES}]")
        _check(1 <= k <= n - 1, "degree", k, f"in [1, num_sites - 1 = {n - 1}]")
        _check(n * k % 2 == 0, "degree", k, "even when num_sites is odd (k-regular graph)")
        _check(k >= 2, "degree", k, "at least 2 (t must exceed (k + 1) / 2 and be at most k)")
        low = (k + 1) // 2 + 1
        _check(low <= t <= k, "threshold", t, f"in [(degree + 1) // 2 + 1 = {low}, degree = {k}]")
        _check(2 <= self.min_survivors <= n, "min_survivors", self.min_survivors, f"in [2, {n}]")
        for name in ("clip_range", "max_weight", "scale", "weight_scale"):
            value = getattr(self, name)
            _check(math.isfinite(value) and value > 0, name, value, "a finite number > 0")
        _check(self.rounding in ROUNDINGS, "rounding", self.rounding, f"one of {ROUNDINGS}")
        # No wrap-around: N sites at their largest level must still sum within int32.
        for name, level in (("scale", self.level_bound), ("weight_scale", self.weight_bound)):
            expected = f"num_sites * max level ({level}) <= 2**31 - 1"
            _check(n * level <= MAX_SUM_LEVEL, name, getattr(self, name), expected)

    @property
    def level_bound(self) -> int:
        """Largest level of one coordinate of ``w * clip(x)``: ``floor(W * c * scale)``."""
        return max_level(self.max_weight * self.clip_range, self.scale)

    @property
    def weight_bound(self) -> int:
        """Largest level of one weight: ``floor(W * weight_scale)``."""
        return max_level(self.max_weight, self.weight_scale)


def _check(ok: bool, name: str, value: object, expected: str) -> None:
    if not ok:
        raise ConfigError(f"secure aggregation parameter {name} = {value!r}: expected {expected}")


def params_for(
    num_sites: int,
    norm_bound: float,
    max_weight: float,
    *,
    degree: int | None = None,
    threshold: int | None = None,
    min_survivors: int | None = None,
    max_error: float | None = None,
    rounding: Rounding = "nearest",
) -> SecAggParams:
    """Choose clipping range and fixed-point scales from the configured norm bound.

    The clip range is the L2 norm bound C (a delta of norm <= C has every coordinate in
    [-C, C], so a norm-clipped delta is never clipped again). The scale is the largest with
    ``N * floor(W * C * scale) <= 2**31 - 1``: all N sites at weight W sending ±C sum without
    wrap-around. The weight scale is the largest power of two with the same property.

    Parameters
    ----------
    num_sites, norm_bound, max_weight
        N, C and W.
    degree, threshold, min_survivors
        k (default N - 1, full graph), t (default ``(k + 1) // 2 + 1``) and the fewest survivors
        (default ``max(2, t)``).
    max_error
        If given, the largest acceptable ``max_abs_error_per_coordinate``; a ConfigError
        otherwise, since the caller would silently lose precision.
    rounding
        ``"nearest"`` (default) or ``"stochastic"``.
    """
    _check(num_sites >= 2, "num_sites", num_sites, "at least 2")
    for name, value in (("norm_bound", norm_bound), ("max_weight", max_weight)):
        _check(math.isfinite(value) and value > 0, name, value, "a finite number > 0")
    k = num_sites - 1 if degree is None else degree
    t = (k + 1) // 2 + 1 if threshold is None else threshold
    per_site = MAX_SUM_LEVEL // num_sites
    params = SecAggParams(
        num_sites=num_sites,
        threshold=t,
        degree=k,
        min_survivors=max(2, t) if min_survivors is None else min_survivors,
        clip_range=float(norm_bound),
        max_weight=float(max_weight),
        scale=per_site / (max_weight * norm_bound),
        weight_scale=2.0 ** math.floor(math.log2(per_site / max_weight)),
        rounding=rounding,
    )
    if max_error is not None and max_abs_error_per_coordinate(params) > max_error:
        raise ConfigError(
            f"secure aggregation error bound {max_abs_error_per_coordinate(params):.3g} per "
            f"coordinate exceeds max_error = {max_error:.3g}; lower max_weight ({max_weight}) "
            f"or the norm bound ({norm_bound}) or the number of sites ({num_sites})"
        )
    return params


def max_abs_error_per_coordinate(params: SecAggParams, num_summed: int | None = None) -> float:
    """Bound on ``|decoded sum - sum_i w_i * clip(x_i)|`` for any one coordinate.

    ``n * u + n * W * c * 2**-50`` for n summed sites, where ``u = 0.5 / scale`` for nearest
    rounding and ``1 / scale`` for stochastic rounding (the quantisation error of one site),
    and the second term covers float64 rounding in weighting, scaling and decoding (a few
    ulps of the largest value). Clipping is not counted: with ``clip_range`` equal to the
    L2 norm bound, a norm-clipped delta is never clipped again.
    """
    n = params.num_sites if num_summed is None else num_summed
    unit = (0.5 if params.rounding == "nearest" else 1.0) / params.scale
    return n * unit + n * params.max_weight * params.clip_range * 2.0**-50


def max_abs_weight_error(params: SecAggParams, num_summed: int | None = None) -> float:
    """Bound on ``|decoded total weight - sum_i w_i|``: ``n * 0.5 / weight_scale``.

    Zero in practice for integer example counts whenever ``weight_scale >= 1``.
    """
    n = params.num_sites if num_summed is None else num_summed
    return n * 0.5 / params.weight_scale


def peer_graph(params: SecAggParams, seed: bytes) -> dict[int, tuple[int, ...]]:
    """The public k-regular peer graph of a round: ``{site id: sorted neighbour ids}``.

    Sites sit on a ring in the order of ``SHA-256(DOMAIN || seed || id)`` (so the public
    seed, not the coordinator, decides who is adjacent); each is adjacent to the ``k // 2``
    nearest on either side, plus the opposite site when k is odd (then N is even).
    """
    n, k = params.num_sites, params.degree
    ring = sorted(
        range(1, n + 1),
        key=lambda site: hashlib.sha256(DOMAIN + b"graph" + seed + _u32(site)).digest(),
    )
    offsets = [o for d in range(1, k // 2 + 1) for o in (d, -d)] + ([n // 2] if k % 2 else [])
    return {
        site: tuple(sorted(ring[(pos + o) % n] for o in offsets)) for pos, site in enumerate(ring)
    }


def neighbours(params: SecAggParams, site_id: int, seed: bytes) -> tuple[int, ...]:
    """Sorted neighbour ids of ``site_id`` in the round's peer graph (see ``peer_graph``)."""
    check_site_id(params, site_id)
    return peer_graph(params, seed)[site_id]


def holders(params: SecAggParams, site_id: int, seed: bytes) -> tuple[int, ...]:
    """Sorted ids holding shares of ``site_id``'s secrets: its neighbours and itself.

    The holder at position m (0-based) has Shamir index m + 1; the order is public, so the
    coordinator knows every share's index without being told.
    """
    return tuple(sorted((*neighbours(params, site_id, seed), site_id)))


def check_site_id(params: SecAggParams, site_id: int, what: str = "site id") -> None:
    """Raise SecAggError unless ``site_id`` is an int in 1..N."""
    if isinstance(site_id, bool) or not isinstance(site_id, int):
        raise SecAggError(f"{what} must be an int, got {type(site_id).__name__}")
    if not 1 <= site_id <= params.num_sites:
        raise SecAggError(f"{what} {site_id} outside 1..{params.num_sites}")


def check_context(context: bytes) -> None:
    """Raise SecAggError unless the round context is bytes of at most MAX_CONTEXT_BYTES."""
    if not isinstance(context, bytes) or not 1 <= len(context) <= MAX_CONTEXT_BYTES:
        raise SecAggError(f"round context must be 1..{MAX_CONTEXT_BYTES} bytes")


def check_bytes(value: object, length: int, what: str) -> bytes:
    """Return ``value`` if it is ``bytes`` of exactly ``length``; SecAggError otherwise."""
    if not isinstance(value, bytes) or len(value) != length:
        got = f"{len(value)} bytes" if isinstance(value, bytes) else type(value).__name__
        raise SecAggError(f"{what} must be {length} bytes, got {got}")
    return value


@dataclass(frozen=True)
class KeyAdvert:
    """Stage 0, site -> coordinator -> every site: a site's signed public keys.

    All fields are ``bytes`` except ``site_id``; sizes in the constants above.
    """

    site_id: int
    encryption_key: bytes  # X25519 public key c_pk, 32 bytes
    mask_key: bytes  # X25519 public key s_pk, 32 bytes
    seed_commitment: bytes  # SHA-256 of the self-mask seed b, 32 bytes
    signature: bytes  # Ed25519 over advert_message(...), 64 bytes


@dataclass(frozen=True)
class ConfirmRequest:
    """Stage 3, coordinator -> every survivor: the sites whose masked input is in the sum."""

    survivors: tuple[int, ...]  # sorted ids, the site itself among them


@dataclass(frozen=True)
class UnmaskRequest:
    """Stage 4, coordinator -> site: which of its neighbours survived or dropped.

    ``confirmations``: ``{site id: Ed25519 signature over confirm_message(context, U)}`` from
    the survivors that confirmed the same list U the site itself signed.
    """

    survivors: tuple[int, ...]  # neighbours that sent a masked input: reveal their b-shares
    dropped: tuple[int, ...]  # shared keys but sent no masked input: reveal s-shares
    confirmations: dict[int, bytes]


@dataclass(frozen=True)
class UnmaskReply:
    """Stage 4, site -> coordinator: ``{owner id: 32-byte share}`` of b and of s_sk.

    ``seed_shares`` holds the requested survivors' shares and the site's own.
    """

    seed_shares: dict[int, bytes]
    key_shares: dict[int, bytes]


def _u32(value: int) -> bytes:
    return value.to_bytes(4, "big")


def _bind(label: bytes, context: bytes, *ids: int) -> bytes:
    """Unambiguous binding of a purpose, the round context and ids (for info/AD/signature)."""
    return DOMAIN + b"|" + label + _u32(len(context)) + context + b"".join(map(_u32, ids))


def advert_message(context: bytes, site_id: int, c_pk: bytes, s_pk: bytes, commit: bytes) -> bytes:
    """The bytes an advert's Ed25519 signature covers."""
    return _bind(b"advert", context, site_id) + c_pk + s_pk + commit


def confirm_message(context: bytes, survivors: tuple[int, ...]) -> bytes:
    """The bytes a survivor's confirmation signature covers: the round and the list U."""
    return _bind(b"survivors", context, len(survivors), *survivors)


def verify_advert(advert: KeyAdvert, public_key: Ed25519PublicKey, context: bytes) -> None:
    """Check an advert's field sizes and its Ed25519 signature under the site's identity key.

    Raises
    ------
    SecAggError
        Naming the site and the field, or saying the signature does not verify.
    """
    what = f"advert of site {advert.site_id}"
    c_pk = check_bytes(advert.encryption_key, KEY_BYTES, f"{what}: encryption key")
    s_pk = check_bytes(advert.mask_key, KEY_BYTES, f"{what}: mask key")
    commit = check_bytes(advert.seed_commitment, KEY_BYTES, f"{what}: seed commitment")
    signature = check_bytes(advert.signature, SIGNATURE_BYTES, f"{what}: signature")
    try:
        public_key.verify(signature, advert_message(context, advert.site_id, c_pk, s_pk, commit))
    except InvalidSignature:
        raise SecAggError(
            f"{what}: signature does not verify under the site's enrolled key for this round"
        ) from None


def seed_commitment(context: bytes, site_id: int, seed: bytes) -> bytes:
    """SHA-256 commitment to a self-mask seed (reveals nothing about a random 32-byte seed)."""
    return hashlib.sha256(_bind(b"seed", context, site_id) + seed).digest()


def derive_key(secret: bytes, label: bytes, context: bytes, *ids: int) -> bytes:
    """HKDF-SHA256 of ``secret`` into a 32-byte key bound to purpose, context and ids."""
    info = _bind(label, context, *ids)
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(secret)


def agree(private_key: X25519PrivateKey, public_key: bytes, what: str) -> bytes:
    """X25519 shared secret with a peer's 32-byte public key.

    Raises
    ------
    SecAggError
        If the peer key is a low-order point (the shared secret would be all zeros).
    """
    try:
        return private_key.exchange(X25519PublicKey.from_public_bytes(public_key))
    except ValueError:
        raise SecAggError(f"{what}: X25519 key agreement failed (low-order public key)") from None


def pair_mask_key(secret: bytes, context: bytes, a: int, b: int) -> bytes:
    """Stream key of the pairwise mask of sites a and b (same key from either side)."""
    return derive_key(secret, b"pair-mask", context, min(a, b), max(a, b))


def self_mask_key(seed: bytes, context: bytes, site_id: int) -> bytes:
    """Stream key of a site's self mask, derived from its 32-byte seed b."""
    return derive_key(seed, b"self-mask", context, site_id)


def share_key(secret: bytes, context: bytes, sender: int, recipient: int) -> bytes:
    """AES-256-GCM key for the shares ``sender`` sends ``recipient`` (one key per direction)."""
    return derive_key(secret, b"share-key", context, sender, recipient)


def share_aad(context: bytes, sender: int, recipient: int) -> bytes:
    """AES-GCM associated data of the shares ``sender`` sends ``recipient``."""
    return _bind(b"share", context, sender, recipient)


def prg(key: bytes, length: int) -> Levels:
    """``length`` uniform ``uint32`` values: the ChaCha20 keystream of a one-use 32-byte key."""
    cipher = Cipher(algorithms.ChaCha20(check_bytes(key, KEY_BYTES, "PRG key"), bytes(16)), None)
    # Encrypting zeros yields the keystream; writing into a bytearray gives a writable array
    # without a copy (1.8 MB for an adapter of 460 800 coordinates).
    stream = bytearray(4 * length)
    cipher.encryptor().update_into(bytes(4 * length), stream)
    return np.frombuffer(stream, dtype="<u4")


def split_secret(secret: bytes, threshold: int, holders: int) -> list[bytes]:
    """Shamir-split a 32-byte secret t-of-n; share m (0-based) belongs to holder index m + 1."""
    halves = [
        Shamir.split(threshold, holders, secret[i : i + _CHUNK], False)
        for i in range(0, KEY_BYTES, _CHUNK)
    ]
    return [halves[0][m][1] + halves[1][m][1] for m in range(holders)]


def combine_secret(shares: dict[int, bytes]) -> bytes:
    """Recombine a 32-byte secret from ``{holder index (1-based): share}``, exactly t of them."""
    return b"".join(
        Shamir.combine([(index, share[i : i + _CHUNK]) for index, share in shares.items()], False)
        for i in range(0, SHARE_BYTES, _CHUNK)
    )
