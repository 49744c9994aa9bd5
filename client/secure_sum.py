"""A site's side of secure-sum mode: the four stages of one round, over Flower messages.

Each stage may run in a different process (a Ray worker in simulation, a fresh ClientApp
process under a SuperNode), so the protocol state between stages lives in the node's own
``context.state``: it holds this round's X25519 private keys, self-mask seed and the
flattened delta, never leaves the site, and is deleted after the unmask stage.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from client.site_api import SiteUpdate
from common import protocol as P
from common.dp import add_gaussian_noise, secure_generator
from common.fixedpoint import flatten
from common.roster import parse_roster
from common.secagg import SecAggError, SecAggParams
from common.secagg_client import SecAggSite
from common.secagg_records import (
    adverts_from_record,
    adverts_to_record,
    confirm_request_from_record,
    confirmation_to_record,
    shares_from_record,
    shares_to_record,
    unmask_reply_to_record,
    unmask_request_from_record,
)

STATE_RECORD = "fedlora-secagg"  # the site's protocol state (secrets: stays in the node)
DELTA_RECORD = "fedlora-secagg-delta"  # the flattened delta between stages 1 and 3


def _config(values: dict[str, Any]) -> ConfigRecord:
    return ConfigRecord(values)


def _number(header: ConfigRecord, site_id: str) -> int:
    numbers = json.loads(str(header[P.KEY_SITE_NUMBERS]))
    if site_id not in numbers:
        raise SecAggError(f"{site_id} is not in this round's secure-sum numbering")
    return int(numbers[site_id])


def peer_keys(header: ConfigRecord, enroll_key: Ed25519PublicKey) -> dict[int, Ed25519PublicKey]:
    """Every numbered site's identity key, from the roster the enrollment authority signed.

    The coordinator numbers the sites; the keys come only from the signed roster, so a
    coordinator that substitutes a neighbour's advert is caught by the site itself.
    """
    roster = parse_roster(header.get(P.KEY_ROSTER), enroll_key)  # type: ignore[arg-type]
    numbers = json.loads(str(header[P.KEY_SITE_NUMBERS]))
    if len(set(numbers.values())) != len(numbers):
        raise SecAggError("the round's secure-sum numbering gives two sites one number")
    missing = sorted(site for site in numbers if site not in roster)
    if missing:
        raise SecAggError(f"sites {missing} of this round are not in the signed roster")
    return {int(number): roster[site] for site, number in numbers.items()}


def _params(header: ConfigRecord) -> SecAggParams:
    return SecAggParams(**json.loads(str(header[P.KEY_SECAGG_PARAMS])))


def start_round(
    context: Context,
    header: ConfigRecord,
    site_id: str,
    signing_key: Ed25519PrivateKey,
    update: SiteUpdate,
    noise_std: float,
    peer_keys: Mapping[int, Ed25519PublicKey],
) -> RecordDict:
    """Stage 1 (after local training): keep the delta here, reply with a signed key advert."""
    delta = update.delta
    if noise_std > 0:  # distributed DP: this site's share of the noise on the sum
        delta = add_gaussian_noise(delta, noise_std, secure_generator())
    if update.control is not None:  # SCAFFOLD: c_i's change is summed with the delta
        delta = {**delta, **{P.CONTROL_FLAT_PREFIX + k: v for k, v in update.control.items()}}
    vector, _ = flatten(delta)
    params = _params(header)
    # Under DP every site weighs 1 (clipped deltas, fixed denominator); else its examples.
    weight = 1.0 if noise_std > 0 or params.max_weight == 1.0 else float(update.examples)
    weight = min(weight, params.max_weight)
    number = _number(header, site_id)
    protocol_context = P.secure_sum_context(header)
    site = SecAggSite(params, number, protocol_context, signing_key, peer_keys)
    advert = site.advertise()
    context.state.config_records[STATE_RECORD] = _config({**site.to_state(), "weight": weight})
    context.state.array_records[DELTA_RECORD] = ArrayRecord([vector.astype(np.float32)])
    return RecordDict({P.SECAGG_RECORD: _config(dict(adverts_to_record({number: advert})))})


def _restore(
    context: Context, signing_key: Ed25519PrivateKey, peer_keys: Mapping[int, Ed25519PublicKey]
) -> tuple[SecAggSite, float]:
    record = context.state.config_records.get(STATE_RECORD)
    if record is None:
        raise SecAggError("no secure-sum round in progress at this site")
    state = dict(record)
    weight = float(state.pop("weight"))  # type: ignore[arg-type]
    return SecAggSite.from_state(state, signing_key, peer_keys), weight


def _save(context: Context, site: SecAggSite, weight: float) -> None:
    context.state.config_records[STATE_RECORD] = _config({**site.to_state(), "weight": weight})


def continue_round(
    context: Context,
    stage: str,
    payload: ConfigRecord,
    signing_key: Ed25519PrivateKey,
    peer_keys: Mapping[int, Ed25519PublicKey],
) -> RecordDict:
    """Stages 2-5: share keys, masked input, confirm, unmask; the reply for the coordinator.

    The state is saved even when a stage fails: a stage counts as used once entered, so a
    coordinator can never replay one (e.g. ask twice for unmask shares) against old state.
    """
    site, weight = _restore(context, signing_key, peer_keys)
    try:
        return _run_stage(context, site, weight, stage, payload)
    finally:
        if stage == P.STAGE_UNMASK:  # the round is over for this site, whatever happened
            context.state.config_records.pop(STATE_RECORD, None)
            context.state.array_records.pop(DELTA_RECORD, None)
        else:
            _save(context, site, weight)


def _run_stage(
    context: Context, site: SecAggSite, weight: float, stage: str, payload: ConfigRecord
) -> RecordDict:
    if stage == P.STAGE_SHARE:
        sealed = site.share_keys(adverts_from_record(dict(payload)))
        return RecordDict({P.SECAGG_RECORD: _config(dict(shares_to_record(sealed)))})
    if stage == P.STAGE_MASK:
        delta = context.state.array_records.pop(DELTA_RECORD, None)
        if delta is None:
            raise SecAggError("this site's delta for the round is missing")
        shares = shares_from_record(dict(payload))
        masked = site.masked_input(shares, delta.to_numpy_ndarrays()[0], weight)
        return RecordDict({P.SECAGG_RECORD: ArrayRecord([masked])})
    if stage == P.STAGE_CONFIRM:
        signature = site.confirm(confirm_request_from_record(dict(payload)))
        return RecordDict({P.SECAGG_RECORD: _config(dict(confirmation_to_record(signature)))})
    if stage == P.STAGE_UNMASK:
        reply = site.unmask(unmask_request_from_record(dict(payload)))
        return RecordDict({P.SECAGG_RECORD: _config(dict(unmask_reply_to_record(reply)))})
    raise SecAggError(f"unknown secure-sum stage {stage!r}")
