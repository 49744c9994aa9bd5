"""Secure-aggregation messages as flat records, and the checked readers of record fields.

Every message and a site's state pack into a flat ``{kebab-case key: value}`` mapping whose
values are int, float, str, bytes or lists of int or bytes, so each fits a Flower
``ConfigRecord`` as is; a dict ``{id: value}`` becomes two parallel lists (ids, values).
Every ``*_from_record`` checks types, lengths and counts before using a value and raises
SecAggError for anything malformed (never KeyError, TypeError or IndexError).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from common.errors import ConfigError
from common.fixedpoint import ROUNDINGS
from common.secagg import (
    CIPHERTEXT_BYTES,
    KEY_BYTES,
    MAX_SITES,
    SHARE_BYTES,
    SIGNATURE_BYTES,
    ConfirmRequest,
    KeyAdvert,
    SecAggError,
    SecAggParams,
    UnmaskReply,
    UnmaskRequest,
    check_bytes,
)

RecordValue = int | float | str | bytes | list[int] | list[bytes]
Record = dict[str, RecordValue]


def record_value(record: object, key: str, what: str) -> object:
    """``record[key]``; SecAggError if ``record`` is not a str-keyed mapping or lacks ``key``."""
    if not isinstance(record, Mapping):
        raise SecAggError(f"{what} must be a mapping, got {type(record).__name__}")
    if key not in record:
        raise SecAggError(f"{what} has no field {key!r}")
    return record[key]


def record_int(record: object, key: str, what: str, low: int, high: int) -> int:
    """An int (not bool) field in ``[low, high]``."""
    value = record_value(record, key, what)
    if isinstance(value, bool) or not isinstance(value, int):
        raise SecAggError(f"{what}: {key} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise SecAggError(f"{what}: {key} = {value} outside [{low}, {high}]")
    return value


def record_bytes(record: object, key: str, what: str, length: int) -> bytes:
    """A bytes field of exactly ``length`` bytes."""
    return check_bytes(record_value(record, key, what), length, f"{what}: {key}")


def _record_list(record: object, key: str, what: str, max_count: int) -> Sequence[object]:
    value = record_value(record, key, what)
    if not isinstance(value, list | tuple):
        raise SecAggError(f"{what}: {key} must be a list, got {type(value).__name__}")
    if len(value) > max_count:
        raise SecAggError(f"{what}: {key} holds {len(value)} items, at most {max_count} allowed")
    return value


def record_ids(record: object, key: str, what: str, max_id: int = MAX_SITES) -> list[int]:
    """A list of distinct int ids in ``1..max_id`` (at most MAX_SITES of them)."""
    ids = _record_list(record, key, what, MAX_SITES)
    for item in ids:
        if isinstance(item, bool) or not isinstance(item, int):
            raise SecAggError(f"{what}: {key} must hold ints, got {type(item).__name__}")
        if not 1 <= item <= max_id:
            raise SecAggError(f"{what}: {key} holds id {item} outside 1..{max_id}")
    if len(set(ids)) != len(ids):
        raise SecAggError(f"{what}: {key} holds duplicate ids")
    return list(ids)  # type: ignore[arg-type]  # each item checked to be an int above


def record_bytes_list(record: object, key: str, what: str, count: int, length: int) -> list[bytes]:
    """A list of exactly ``count`` bytes values, each exactly ``length`` bytes."""
    items = _record_list(record, key, what, MAX_SITES)
    if len(items) != count:
        raise SecAggError(f"{what}: {key} holds {len(items)} items, expected {count} (one per id)")
    return [check_bytes(item, length, f"{what}: {key}[{m}]") for m, item in enumerate(items)]


def params_to_record(params: SecAggParams) -> Record:
    """``SecAggParams`` as a flat record (keys ``num-sites`` ... ``rounding``)."""
    return {
        "num-sites": params.num_sites,
        "threshold": params.threshold,
        "degree": params.degree,
        "min-survivors": params.min_survivors,
        "clip-range": float(params.clip_range),
        "max-weight": float(params.max_weight),
        "scale": float(params.scale),
        "weight-scale": float(params.weight_scale),
        "rounding": params.rounding,
    }


def params_from_record(record: object) -> SecAggParams:
    """The inverse of ``params_to_record``; SecAggError for a malformed or invalid record."""
    what = "secure aggregation parameters"
    ints = {
        name: record_int(record, name.replace("_", "-"), what, 0, MAX_SITES)
        for name in ("num_sites", "threshold", "degree", "min_survivors")
    }
    floats: dict[str, float] = {}
    for name in ("clip_range", "max_weight", "scale", "weight_scale"):
        value = record_value(record, name.replace("_", "-"), what)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SecAggError(f"{what}: {name} must be a float, got {type(value).__name__}")
        floats[name] = float(value)
    rounding = record_value(record, "rounding", what)
    if not isinstance(rounding, str) or rounding not in ROUNDINGS:
        raise SecAggError(f"{what}: rounding must be one of {ROUNDINGS}")
    try:
        return SecAggParams(**ints, **floats, rounding=rounding)  # type: ignore[arg-type]
    except ConfigError as err:
        raise SecAggError(f"{what}: {err}") from err


def advert_to_record(advert: KeyAdvert) -> Record:
    """One ``KeyAdvert`` (stage 0, site -> coordinator) as a flat record.

    Keys: ``site-id`` (int), ``encryption-key``, ``mask-key``, ``seed-commitment`` (32 bytes
    each), ``signature`` (64 bytes).
    """
    return {
        "site-id": advert.site_id,
        "encryption-key": advert.encryption_key,
        "mask-key": advert.mask_key,
        "seed-commitment": advert.seed_commitment,
        "signature": advert.signature,
    }


def advert_from_record(record: object) -> KeyAdvert:
    """The inverse of ``advert_to_record``, every field type- and size-checked.

    The signature is not verified here (``verify_advert``; the coordinator and, with
    ``peer_keys``, the sites do). ``site-id`` is only checked to lie in 1..MAX_SITES.
    """
    what = "key advert"
    return KeyAdvert(
        site_id=record_int(record, "site-id", what, 1, MAX_SITES),
        encryption_key=record_bytes(record, "encryption-key", what, KEY_BYTES),
        mask_key=record_bytes(record, "mask-key", what, KEY_BYTES),
        seed_commitment=record_bytes(record, "seed-commitment", what, KEY_BYTES),
        signature=record_bytes(record, "signature", what, SIGNATURE_BYTES),
    )


_ADVERT_LISTS = (
    ("advert-encryption-keys", KEY_BYTES),
    ("advert-mask-keys", KEY_BYTES),
    ("advert-seed-commitments", KEY_BYTES),
    ("advert-signatures", SIGNATURE_BYTES),
)


def adverts_to_record(adverts: Mapping[int, KeyAdvert]) -> Record:
    """The coordinator's broadcast ``{site id: advert}`` (stage 0 -> 1) as parallel lists.

    Keys: ``advert-ids`` (list[int], each the advert's own ``site_id``),
    ``advert-encryption-keys``, ``advert-mask-keys``, ``advert-seed-commitments`` and
    ``advert-signatures`` (list[bytes], same order).

    Raises
    ------
    SecAggError
        If an advert is filed under an id other than its own ``site_id`` (the packed form
        cannot express that, so it is refused rather than silently re-keyed).
    """
    ids = sorted(adverts)
    for site in ids:
        if adverts[site].site_id != site:
            raise SecAggError(f"advert under id {site} claims site {adverts[site].site_id}")
    values = [adverts[site] for site in ids]
    return {
        "advert-ids": ids,
        "advert-encryption-keys": [a.encryption_key for a in values],
        "advert-mask-keys": [a.mask_key for a in values],
        "advert-seed-commitments": [a.seed_commitment for a in values],
        "advert-signatures": [a.signature for a in values],
    }


def adverts_from_record(record: object) -> dict[int, KeyAdvert]:
    """The inverse of ``adverts_to_record``: ``{site id: advert}``, all lists checked."""
    what = "key adverts"
    ids = record_ids(record, "advert-ids", what)
    lists = [record_bytes_list(record, key, what, len(ids), size) for key, size in _ADVERT_LISTS]
    return {
        site: KeyAdvert(site, c_pk, s_pk, commit, signature)
        for site, c_pk, s_pk, commit, signature in zip(ids, *lists, strict=True)
    }


def shares_to_record(shares: Mapping[int, bytes]) -> Record:
    """Sealed shares ``{site id: CIPHERTEXT_BYTES ciphertext}`` as parallel lists.

    Used both for a site's ``share_keys`` output (keyed by recipient) and for the packet the
    coordinator routes to one site for ``masked_input`` (keyed by sender). Keys:
    ``share-ids`` (list[int]) and ``share-ciphertexts`` (list[bytes], same order).
    """
    ids = sorted(shares)
    return {"share-ids": ids, "share-ciphertexts": [shares[site] for site in ids]}


def shares_from_record(record: object) -> dict[int, bytes]:
    """The inverse of ``shares_to_record``; each ciphertext must be CIPHERTEXT_BYTES."""
    what = "sealed shares"
    ids = record_ids(record, "share-ids", what)
    blobs = record_bytes_list(record, "share-ciphertexts", what, len(ids), CIPHERTEXT_BYTES)
    return dict(zip(ids, blobs, strict=True))


def confirm_request_to_record(request: ConfirmRequest) -> Record:
    """A ``ConfirmRequest`` as ``survivors`` (list[int])."""
    return {"survivors": list(request.survivors)}


def confirm_request_from_record(record: object) -> ConfirmRequest:
    """The inverse of ``confirm_request_to_record``: distinct ids in 1..MAX_SITES.

    Order and membership are left to ``SecAggSite.confirm``, which refuses a bad list.
    """
    return ConfirmRequest(survivors=tuple(record_ids(record, "survivors", "confirm request")))


def confirmation_to_record(signature: bytes) -> Record:
    """A survivor's confirmation (stage 3 reply) as ``signature`` (SIGNATURE_BYTES)."""
    return {"signature": signature}


def confirmation_from_record(record: object) -> bytes:
    """The inverse of ``confirmation_to_record``."""
    return record_bytes(record, "signature", "confirmation", SIGNATURE_BYTES)


def unmask_request_to_record(request: UnmaskRequest) -> Record:
    """An ``UnmaskRequest`` as ``survivors`` and ``dropped`` (list[int] each), and the
    confirmations as ``confirmation-ids`` (list[int]) and ``confirmation-signatures``
    (list[bytes] of SIGNATURE_BYTES, same order)."""
    ids = sorted(request.confirmations)
    return {
        "survivors": list(request.survivors),
        "dropped": list(request.dropped),
        "confirmation-ids": ids,
        "confirmation-signatures": [request.confirmations[site] for site in ids],
    }


def unmask_request_from_record(record: object) -> UnmaskRequest:
    """The inverse of ``unmask_request_to_record``: distinct ids in 1..MAX_SITES per list.

    Overlap between the lists is left to ``SecAggSite.unmask``, which refuses it.
    """
    what = "unmask request"
    ids = record_ids(record, "confirmation-ids", what)
    signatures = record_bytes_list(record, "confirmation-signatures", what, len(ids),
                                   SIGNATURE_BYTES)  # fmt: skip
    return UnmaskRequest(
        survivors=tuple(record_ids(record, "survivors", what)),
        dropped=tuple(record_ids(record, "dropped", what)),
        confirmations=dict(zip(ids, signatures, strict=True)),
    )


def unmask_reply_to_record(reply: UnmaskReply) -> Record:
    """An ``UnmaskReply`` as parallel lists.

    Keys: ``seed-share-ids``/``seed-shares`` and ``key-share-ids``/``key-shares``
    (list[int] of owner ids, list[bytes] of SHARE_BYTES shares in the same order).
    """
    seed_ids, key_ids = sorted(reply.seed_shares), sorted(reply.key_shares)
    return {
        "seed-share-ids": seed_ids,
        "seed-shares": [reply.seed_shares[site] for site in seed_ids],
        "key-share-ids": key_ids,
        "key-shares": [reply.key_shares[site] for site in key_ids],
    }


def unmask_reply_from_record(record: object) -> UnmaskReply:
    """The inverse of ``unmask_reply_to_record``; each share must be SHARE_BYTES."""
    what = "unmask reply"
    seed_ids = record_ids(record, "seed-share-ids", what)
    seeds = record_bytes_list(record, "seed-shares", what, len(seed_ids), SHARE_BYTES)
    key_ids = record_ids(record, "key-share-ids", what)
    keys = record_bytes_list(record, "key-shares", what, len(key_ids), SHARE_BYTES)
    return UnmaskReply(
        seed_shares=dict(zip(seed_ids, seeds, strict=True)),
        key_shares=dict(zip(key_ids, keys, strict=True)),
    )
