"""Known answers for the secure-aggregation primitives: derived keys, bound bytes, error bounds.

Sites and a coordinator of different builds must derive the same keys and sign the same bytes,
so each derivation is checked against the construction ``common.secagg`` documents, rebuilt
here: HKDF-SHA256 (no salt) with ``info = DOMAIN | label || u32 len(context) || context || u32
ids``. The error bounds, which runs log, are checked against their formulas where every term
shows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from common.errors import ConfigError
from common.secagg import (
    DOMAIN,
    MAX_SITES,
    KeyAdvert,
    SecAggError,
    SecAggParams,
    advert_message,
    agree,
    check_bytes,
    check_context,
    check_site_id,
    confirm_message,
    max_abs_error_per_coordinate,
    max_abs_weight_error,
    pair_mask_key,
    params_for,
    peer_graph,
    seed_commitment,
    self_mask_key,
    share_aad,
    share_key,
    verify_advert,
)

SECRET = bytes(range(32))
CONTEXT = b"fedlora/1|run-test|round-1"


def _binding(label: bytes, context: bytes, *ids: int) -> bytes:
    ids_bytes = b"".join(i.to_bytes(4, "big") for i in ids)
    return DOMAIN + b"|" + label + len(context).to_bytes(4, "big") + context + ids_bytes


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def test_keys_are_hkdf_sha256_bound_to_purpose_context_and_ids() -> None:
    # The pair mask key orders the pair, so both sites derive it; the share key is directed.
    expected_pair = _hkdf(SECRET, _binding(b"pair-mask", CONTEXT, 2, 5))
    assert pair_mask_key(SECRET, CONTEXT, 5, 2) == expected_pair
    assert pair_mask_key(SECRET, CONTEXT, 2, 5) == expected_pair
    assert self_mask_key(SECRET, CONTEXT, 3) == _hkdf(SECRET, _binding(b"self-mask", CONTEXT, 3))
    assert share_key(SECRET, CONTEXT, 5, 2) == _hkdf(SECRET, _binding(b"share-key", CONTEXT, 5, 2))


def test_signed_and_authenticated_bytes_are_the_documented_bindings() -> None:
    # A confirmation covers the count of survivors, then each id.
    assert confirm_message(CONTEXT, (1, 3)) == _binding(b"survivors", CONTEXT, 2, 1, 3)
    assert share_aad(CONTEXT, 5, 2) == _binding(b"share", CONTEXT, 5, 2)
    keys = bytes(32), bytes(range(32)), bytes(range(1, 33))
    assert advert_message(CONTEXT, 3, *keys) == _binding(b"advert", CONTEXT, 3) + b"".join(keys)
    expected_commitment = hashlib.sha256(_binding(b"seed", CONTEXT, 3) + SECRET).digest()
    assert seed_commitment(CONTEXT, 3, SECRET) == expected_commitment


@pytest.mark.parametrize("context", [b"x", b"x" * 1024])
def test_round_context_of_1_to_1024_bytes_is_accepted(context: bytes) -> None:
    check_context(context)


@pytest.mark.parametrize("context", [b"", b"x" * 1025, "x" * 10, bytearray(b"x")])
def test_other_round_contexts_are_refused(context: object) -> None:
    with pytest.raises(SecAggError, match=r"^round context must be 1\.\.1024 bytes$"):
        check_context(context)  # type: ignore[arg-type]


def test_a_wrong_size_or_type_is_named_in_the_refusal() -> None:
    assert check_bytes(SECRET, 32, "mask key") is SECRET
    with pytest.raises(SecAggError, match=r"^mask key must be 32 bytes, got 31 bytes$"):
        check_bytes(SECRET[:31], 32, "mask key")
    with pytest.raises(SecAggError, match=r"^mask key must be 32 bytes, got str$"):
        check_bytes("x" * 32, 32, "mask key")


@pytest.mark.parametrize(
    ("field", "label", "size"),
    [("encryption_key", "encryption key", 32), ("mask_key", "mask key", 32),
     ("seed_commitment", "seed commitment", 32), ("signature", "signature", 64)],
)  # fmt: skip
def test_advert_with_a_short_field_is_refused_naming_site_and_field(
    field: str, label: str, size: int
) -> None:
    advert = KeyAdvert(3, bytes(32), bytes(32), bytes(32), bytes(64))
    short = dataclasses.replace(advert, **{field: bytes(size - 1)})
    reason = f"^advert of site 3: {label} must be {size} bytes, got {size - 1} bytes$"
    with pytest.raises(SecAggError, match=reason):
        verify_advert(short, Ed25519PrivateKey.generate().public_key(), CONTEXT)


def test_agreement_with_a_low_order_point_is_refused_naming_the_message() -> None:
    reason = r"^advert of site 3: X25519 key agreement failed \(low-order public key\)$"
    with pytest.raises(SecAggError, match=reason):
        agree(X25519PrivateKey.generate(), bytes(32), "advert of site 3")


def _params(rounding: str = "nearest") -> SecAggParams:
    # Scale 1 and W * c = 2**20: the float64 term n * W * c * 2**-50 is 2**-30 per site, large
    # enough to see next to the quantisation term.
    return SecAggParams(
        num_sites=3, threshold=2, degree=2, min_survivors=2, clip_range=2.0**10,
        max_weight=2.0**10, scale=1.0, weight_scale=4.0, rounding=rounding,  # type: ignore[arg-type]
    )  # fmt: skip


def test_error_bound_per_coordinate_is_quantisation_plus_float64_rounding() -> None:
    assert max_abs_error_per_coordinate(_params()) == 3 * 0.5 + 3 * 2.0**-30
    assert max_abs_error_per_coordinate(_params(), 2) == 2 * 0.5 + 2 * 2.0**-30
    assert max_abs_error_per_coordinate(_params("stochastic"), 2) == 2 * 1.0 + 2 * 2.0**-30


def test_weight_error_bound_is_half_a_step_per_summed_site() -> None:
    assert max_abs_weight_error(_params()) == 3 * 0.5 / 4
    assert max_abs_weight_error(_params(), 2) == 2 * 0.5 / 4


@pytest.mark.parametrize(("num_sites", "degree"), [(7, 2), (8, 3)])
def test_peer_graph_is_the_ring_the_public_seed_orders(num_sites: int, degree: int) -> None:
    """Sites sit on a ring sorted by SHA-256(DOMAIN || "graph" || seed || u32 id); each is
    adjacent to its nearest on either side, plus the opposite site when the degree is odd."""
    seed = b"round-seed"
    params = params_for(num_sites, 1.0, 1.0, degree=degree)

    def position(site: int) -> bytes:
        return hashlib.sha256(DOMAIN + b"graph" + seed + site.to_bytes(4, "big")).digest()

    ring = sorted(range(1, num_sites + 1), key=position)
    steps = (1, -1, num_sites // 2) if degree % 2 else (1, -1)
    expected = {
        site: tuple(sorted(ring[(at + step) % num_sites] for step in steps))
        for at, site in enumerate(ring)
    }
    assert peer_graph(params, seed) == expected


def test_a_site_id_that_is_not_an_int_in_range_is_refused_naming_it() -> None:
    params = params_for(5, 1.0, 1.0)
    for good in (1, 5):
        check_site_id(params, good)
    with pytest.raises(SecAggError, match=r"^site id must be an int, got bool$"):
        check_site_id(params, True)
    with pytest.raises(SecAggError, match=r"^site id must be an int, got str$"):
        check_site_id(params, "3")  # type: ignore[arg-type]
    for bad in (0, 6):
        with pytest.raises(SecAggError, match=rf"^sender {bad} outside 1\.\.5$"):
            check_site_id(params, bad, "sender")


BASE = params_for(5, 1.0, 1000.0)  # N = 5, k = 4, t = 3, min_survivors = 3
BASE_6 = params_for(6, 1.0, 1000.0)  # N = 6, k = 5: every degree passes the parity check


@pytest.mark.parametrize(
    ("base", "changes", "reason"),
    [(BASE, {"num_sites": 5.0}, "num_sites = 5.0: expected an int"),
     (BASE, {"degree": 4.0}, "degree = 4.0: expected an int"),
     (BASE, {"threshold": 3.0}, "threshold = 3.0: expected an int"),
     (BASE, {"min_survivors": 3.0}, "min_survivors = 3.0: expected an int"),
     (BASE, {"num_sites": 1}, "num_sites = 1: expected in [2, 10000]"),
     (BASE, {"num_sites": MAX_SITES + 1}, "num_sites = 10001: expected in [2, 10000]"),
     (BASE, {"num_sites": 2}, "degree = 4: expected in [1, num_sites - 1 = 1]"),
     (BASE, {"degree": 0}, "degree = 0: expected in [1, num_sites - 1 = 4]"),
     (BASE, {"degree": 5}, "degree = 5: expected in [1, num_sites - 1 = 4]"),
     (BASE, {"degree": 3}, "degree = 3: expected even when num_sites is odd (k-regular graph)"),
     (BASE_6, {"degree": 1, "threshold": 1},
      "degree = 1: expected at least 2 (t must exceed (k + 1) / 2 and be at most k)"),
     (BASE, {"threshold": 2}, "threshold = 2: expected in [(degree + 1) // 2 + 1 = 3, degree = 4]"),
     (BASE, {"threshold": 5}, "threshold = 5: expected in [(degree + 1) // 2 + 1 = 3, degree = 4]"),
     (BASE, {"min_survivors": 1}, "min_survivors = 1: expected in [2, 5]"),
     (BASE, {"min_survivors": 6}, "min_survivors = 6: expected in [2, 5]"),
     (BASE, {"clip_range": 0.0}, "clip_range = 0.0: expected a finite number > 0"),
     (BASE, {"max_weight": float("inf")}, "max_weight = inf: expected a finite number > 0"),
     (BASE, {"scale": float("nan")}, "scale = nan: expected a finite number > 0"),
     (BASE, {"weight_scale": -1.0}, "weight_scale = -1.0: expected a finite number > 0"),
     (BASE, {"rounding": "up"}, "rounding = 'up': expected one of ('nearest', 'stochastic')"),
     (BASE, {"scale": BASE.scale * 2},
      f"scale = {BASE.scale * 2!r}: expected num_sites * max level (858993458) <= 2**31 - 1"),
     (BASE, {"weight_scale": 2.0**19},
      "weight_scale = 524288.0: expected num_sites * max level (524288000) <= 2**31 - 1")],
)  # fmt: skip
def test_each_impossible_parameter_is_refused_naming_it(
    base: SecAggParams, changes: dict[str, object], reason: str
) -> None:
    expected = f"^secure aggregation parameter {re.escape(reason)}$"
    with pytest.raises(ConfigError, match=expected):
        dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_parameter_bounds_are_inclusive() -> None:
    for changes in ({"threshold": 4}, {"min_survivors": 2}, {"min_survivors": 5}):
        dataclasses.replace(BASE, **changes)  # type: ignore[arg-type]
    assert params_for(MAX_SITES, 1.0, 1.0, degree=4).num_sites == MAX_SITES


@pytest.mark.parametrize(
    ("norm_bound", "max_weight", "reason"),
    [(0.0, 1.0, "norm_bound = 0.0: expected a finite number > 0"),
     (1.0, float("nan"), "max_weight = nan: expected a finite number > 0")],
)  # fmt: skip
def test_params_for_names_the_bad_bound(norm_bound: float, max_weight: float, reason: str) -> None:
    with pytest.raises(ConfigError, match=f"^secure aggregation parameter {re.escape(reason)}$"):
        params_for(5, norm_bound, max_weight)
    one_site = r"^secure aggregation parameter num_sites = 1: expected at least 2$"
    with pytest.raises(ConfigError, match=one_site):
        params_for(1, 1.0, 1.0)
    # Two sites pass this check; their full graph (k = 1) is what fails.
    with pytest.raises(ConfigError, match=r"^secure aggregation parameter degree = 1: expected at"):
        params_for(2, 1.0, 1.0)


def test_params_for_defaults_are_the_full_graph_and_the_smallest_safe_threshold() -> None:
    three = params_for(3, 1, 1000)  # integer bounds are stored as floats
    assert (three.degree, three.threshold, three.min_survivors) == (2, 2, 2)
    assert type(three.clip_range) is float and type(three.max_weight) is float
    ten = params_for(10, 1.0, 1000.0, min_survivors=9)
    assert (ten.degree, ten.threshold, ten.min_survivors) == (9, 6, 9)
    assert BASE.scale == (2**31 - 1) // 5 / 1000.0


def test_params_for_accepts_an_error_bound_equal_to_its_own() -> None:
    bound = max_abs_error_per_coordinate(params_for(10, 1.0, 1000.0))
    assert params_for(10, 1.0, 1000.0, max_error=bound).num_sites == 10
