"""The site's side of secure aggregation: one ``SecAggSite`` per site and round.

A site object holds its round's private keys and the shares it received, so it lives in memory
only and for one round only: a site that restarts mid-round simply counts as dropped, and the
coordinator recovers its masks from the shares (see ``common.secagg``). Each stage runs at most
once and only in order; a stage that raises ends the site's part in the round (nothing is ever
revealed twice, in particular never both shares of one peer).

Where the stages of a round run in different processes (Flower's Message API keeps only the
node's ``context.state`` between messages), ``SecAggSite.to_state`` packs the site into a flat
``ConfigRecord``-compatible dict and ``SecAggSite.from_state`` rebuilds it; that state holds
the site's secrets and stays in the node (see ``to_state``).
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from common.fixedpoint import FixedPointError, Levels, quantize
from common.secagg import (
    CIPHERTEXT_BYTES,
    KEY_BYTES,
    MAX_CONTEXT_BYTES,
    NONCE_BYTES,
    SHARE_BYTES,
    SIGNATURE_BYTES,
    ConfirmRequest,
    KeyAdvert,
    SecAggError,
    SecAggParams,
    UnmaskReply,
    UnmaskRequest,
    advert_message,
    agree,
    check_bytes,
    check_context,
    check_site_id,
    confirm_message,
    holders,
    neighbours,
    pair_mask_key,
    prg,
    seed_commitment,
    self_mask_key,
    share_aad,
    share_key,
    split_secret,
    verify_advert,
)
from common.secagg_records import (
    Record,
    adverts_from_record,
    adverts_to_record,
    params_from_record,
    params_to_record,
    record_bytes,
    record_bytes_list,
    record_ids,
    record_int,
    record_value,
)

# Stages in order; ``_stage`` holds the next one allowed.
_ADVERTISE, _SHARE, _MASK, _CONFIRM, _UNMASK, _DONE = range(6)
_STAGE_NAMES = ("advertise", "share_keys", "masked_input", "confirm", "unmask", "done")
# Layout version of ``SecAggSite.to_state``.
STATE_VERSION = 3
_STATE_KEYS = frozenset(
    {
        "state-version",
        "num-sites",
        "threshold",
        "degree",
        "min-survivors",
        "clip-range",
        "max-weight",
        "scale",
        "weight-scale",
        "rounding",
        "site-id",
        "context",
        "stage",
        "encryption-private-key",
        "mask-private-key",
        "seed",
        "advert-ids",
        "advert-encryption-keys",
        "advert-mask-keys",
        "advert-seed-commitments",
        "advert-signatures",
        "held-ids",
        "held-seed-shares",
        "held-key-shares",
        "own-seed-share",
        "confirmed-survivors",
    }
)


class SecAggSite:
    """One site in one secure-aggregation round.

    Parameters
    ----------
    params
        The round's public parameters (identical at every site and the coordinator).
    site_id
        This site's id, 1..N.
    context
        Public bytes naming the round (run, round, module, version); bound into every
        signature, key derivation and AEAD, and the seed of the peer graph.
    signing_key
        The site's Ed25519 identity key; it signs the advert.
    peer_keys
        Enrolled identity keys of the other sites; if given, the site checks its neighbours'
        advert signatures itself instead of trusting the coordinator's check.
    rng
        Generator for stochastic rounding (tests); ``None`` for an OS-seeded one.
    """

    def __init__(
        self,
        params: SecAggParams,
        site_id: int,
        context: bytes,
        signing_key: Ed25519PrivateKey,
        peer_keys: Mapping[int, Ed25519PublicKey] | None = None,
        rng: np.random.Generator | None = None,
    ) -> None:
        check_site_id(params, site_id)
        check_context(context)
        self.params = params
        self.site_id = site_id
        self.context = context
        self.neighbours = neighbours(params, site_id, context)
        self._signing_key = signing_key
        self._peer_keys = peer_keys
        self._rng = rng
        self._c_sk = X25519PrivateKey.generate()
        self._s_sk = X25519PrivateKey.generate()
        self._seed = os.urandom(KEY_BYTES)
        self._stage = _ADVERTISE
        self._adverts: dict[int, KeyAdvert] = {}
        # {owner id: (share of owner's b, share of owner's s_sk)}, filled in masked_input.
        self._held: dict[int, tuple[bytes, bytes]] = {}
        # This site's own share of b (Shamir index: its place among ``holders``), set in
        # share_keys and revealed in unmask.
        self._own_seed_share: bytes | None = None
        # The survivor list U this site signed in confirm; unmask answers only for it.
        self._confirmed: tuple[int, ...] | None = None

    def _enter(self, stage: int) -> None:
        """Consume ``stage``: each runs once, in order, even if it then fails."""
        if self._stage != stage:
            raise SecAggError(
                f"site {self.site_id}: stage {_STAGE_NAMES[stage]} called, "
                f"expected {_STAGE_NAMES[self._stage]}"
            )
        self._stage = stage + 1

    def advertise(self) -> KeyAdvert:
        """Stage 0: the site's signed public keys and seed commitment."""
        self._enter(_ADVERTISE)
        c_pk = self._c_sk.public_key().public_bytes_raw()
        s_pk = self._s_sk.public_key().public_bytes_raw()
        commit = seed_commitment(self.context, self.site_id, self._seed)
        message = advert_message(self.context, self.site_id, c_pk, s_pk, commit)
        return KeyAdvert(self.site_id, c_pk, s_pk, commit, self._signing_key.sign(message))

    def _enough(self, count: int, what: str) -> None:
        """At least t holders (``count`` neighbours plus the site itself) are needed."""
        if count + 1 < self.params.threshold:
            raise SecAggError(
                f"site {self.site_id}: {what} from only {count} of its neighbours; with its own "
                f"share that is below threshold {self.params.threshold}"
            )

    def _accept_adverts(self, adverts: Mapping[int, KeyAdvert]) -> None:
        """Keep the well-formed adverts of neighbours; at least t - 1 of them are needed."""
        for peer in self.neighbours:
            advert = adverts.get(peer)
            if advert is None:
                continue
            if advert.site_id != peer:
                raise SecAggError(f"advert under id {peer} claims site {advert.site_id}")
            if self._peer_keys is not None:
                if peer not in self._peer_keys:
                    raise SecAggError(f"no enrolled identity key for neighbour {peer}")
                verify_advert(advert, self._peer_keys[peer], self.context)
            check_bytes(advert.encryption_key, KEY_BYTES, f"advert of site {peer}: encryption key")
            check_bytes(advert.mask_key, KEY_BYTES, f"advert of site {peer}: mask key")
            self._adverts[peer] = advert
        self._enough(len(self._adverts), "adverts")

    def share_keys(self, adverts: Mapping[int, KeyAdvert]) -> dict[int, bytes]:
        """Stage 1: Shamir shares of s_sk and b, sealed to each advertised neighbour.

        The site keeps its own share of b; its own share of s_sk is discarded.

        Parameters
        ----------
        adverts
            The coordinator's broadcast ``{site id: advert}`` (other sites' are ignored).

        Returns
        -------
        dict
            ``{neighbour id: ciphertext}``, each ``CIPHERTEXT_BYTES`` (92) bytes:
            12-byte nonce || AES-GCM(b share || s_sk share) with its 16-byte tag.
        """
        self._enter(_SHARE)
        order = holders(self.params, self.site_id, self.context)
        t = self.params.threshold
        # Share m goes to the m-th holder (sorted ids): the holder's Shamir index is public.
        seed_shares = split_secret(self._seed, t, len(order))
        key_shares = split_secret(self._s_sk.private_bytes_raw(), t, len(order))
        self._own_seed_share = seed_shares[order.index(self.site_id)]
        self._accept_adverts(adverts)
        sealed: dict[int, bytes] = {}
        for m, peer in enumerate(order):
            if peer == self.site_id or peer not in self._adverts:
                continue
            secret = agree(self._c_sk, self._adverts[peer].encryption_key, f"site {peer}")
            aead = AESGCM(share_key(secret, self.context, self.site_id, peer))
            nonce = os.urandom(NONCE_BYTES)
            plaintext = seed_shares[m] + key_shares[m]
            aad = share_aad(self.context, self.site_id, peer)
            sealed[peer] = nonce + aead.encrypt(nonce, plaintext, aad)
        return sealed

    def _open_shares(self, ciphertexts: Mapping[int, bytes]) -> None:
        """Decrypt and keep the shares neighbours sent; at least t - 1 are needed."""
        self._enough(len(ciphertexts), "shares")
        for owner, ciphertext in ciphertexts.items():
            if owner not in self._adverts:
                raise SecAggError(f"site {self.site_id}: shares from non-neighbour {owner!r}")
            blob = check_bytes(ciphertext, CIPHERTEXT_BYTES, f"shares from site {owner}")
            secret = agree(self._c_sk, self._adverts[owner].encryption_key, f"site {owner}")
            aead = AESGCM(share_key(secret, self.context, owner, self.site_id))
            aad = share_aad(self.context, owner, self.site_id)
            try:
                plain = aead.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
            except InvalidTag:
                raise SecAggError(f"shares from site {owner} fail to decrypt") from None
            self._held[owner] = (plain[:SHARE_BYTES], plain[SHARE_BYTES:])

    def _encode(self, delta: npt.NDArray[np.floating], weight: float) -> Levels:
        """Fixed-point levels of ``weight * clip(delta)`` followed by the weight's level."""
        p = self.params
        # NaN fails both comparisons; bool is an int but never a weight.
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
            raise SecAggError(f"example weight must be a real number, got {type(weight).__name__}")
        if not 0 <= weight <= p.max_weight:
            raise SecAggError(f"example weight {weight!r} outside [0, max_weight = {p.max_weight}]")
        weight = float(weight)
        if not isinstance(delta, np.ndarray) or delta.ndim != 1:
            raise SecAggError("delta must be a 1-D numpy array (see common.fixedpoint.flatten)")
        if not np.issubdtype(delta.dtype, np.floating):
            raise SecAggError(f"delta has dtype {delta.dtype}, expected floating point")
        # Checked before clipping, which would silently turn Inf into ±c.
        if not bool(np.isfinite(delta).all()):
            raise SecAggError(f"delta holds {int((~np.isfinite(delta)).sum())} NaN/Inf values")
        try:
            weighted = np.clip(delta.astype(np.float64), -p.clip_range, p.clip_range) * weight
            levels = quantize(weighted, p.scale, p.level_bound, p.rounding, self._rng)
            weight_level = quantize(np.array([weight], np.float64), p.weight_scale, p.weight_bound)
        except FixedPointError as err:
            raise SecAggError(f"site {self.site_id}: cannot encode its delta: {err}") from err
        return np.concatenate([levels, weight_level])

    def masked_input(
        self, ciphertexts: Mapping[int, bytes], delta: npt.NDArray[np.floating], weight: float
    ) -> Levels:
        """Stage 2: the masked fixed-point input.

        Parameters
        ----------
        ciphertexts
            ``{owner id: ciphertext}`` routed by the coordinator: shares from every neighbour
            still in the round; exactly these neighbours get pairwise masks.
        delta
            The flattened float delta (length L); coordinates are clipped to the clip range.
        weight
            Example weight w in [0, max_weight], folded into the input.

        Returns
        -------
        numpy.ndarray
            ``uint32`` of length L + 1 (the last coordinate carries w), uniformly masked.
        """
        self._enter(_MASK)
        self._open_shares(ciphertexts)
        masked = self._encode(delta, weight)
        length = masked.shape[0]
        # uint32 arrays add and subtract mod 2**32 (numpy wraps silently for arrays).
        masked += prg(self_mask_key(self._seed, self.context, self.site_id), length)
        for peer in sorted(self._held):
            secret = agree(self._s_sk, self._adverts[peer].mask_key, f"site {peer}")
            mask = prg(pair_mask_key(secret, self.context, self.site_id, peer), length)
            if peer > self.site_id:
                masked += mask
            else:
                masked -= mask
        return masked

    def _floor(self) -> int:
        """Fewest survivors among its neighbours and itself this site unmasks for."""
        floor = self.params.threshold
        if len(self.neighbours) == self.params.num_sites - 1:  # full graph: it sees everyone
            floor = max(floor, self.params.min_survivors)
        return floor

    def confirm(self, request: ConfirmRequest) -> bytes:
        """Stage 3: sign the one survivor list U of this round (the consistency check).

        Returns
        -------
        bytes
            The 64-byte Ed25519 signature over ``confirm_message(context, U)``.

        Raises
        ------
        SecAggError
            If U is not a sorted list of distinct site ids that holds this site, or names
            fewer of its neighbours (plus itself) than the round's floor: told that too few
            survived, a site would later reveal the mask keys of peers whose inputs are summed.
        """
        self._enter(_CONFIRM)
        survivors = tuple(request.survivors)
        if list(survivors) != sorted(set(survivors)) or not all(
            type(i) is int and 1 <= i <= self.params.num_sites for i in survivors
        ):
            raise SecAggError(
                f"site {self.site_id} refuses to confirm: the survivor list must be distinct "
                f"site ids 1..{self.params.num_sites} in ascending order"
            )
        if self.site_id not in survivors:
            raise SecAggError(
                f"site {self.site_id} refuses to confirm: the survivor list does not name it, "
                "although it sent a masked input"
            )
        alive = len(set(survivors) & set(self._held)) + 1
        if alive < self._floor():
            raise SecAggError(
                f"site {self.site_id} refuses to confirm: the list names {alive} survivors "
                f"among its neighbours and itself, below the round's floor of {self._floor()}"
            )
        self._confirmed = survivors
        return self._signing_key.sign(confirm_message(self.context, survivors))

    def _check_confirmations(self, confirmations: Mapping[int, bytes]) -> None:
        """At least t of its neighbours in U (or itself) signed this site's own list U."""
        assert self._confirmed is not None
        survivors = self._confirmed
        message = confirm_message(self.context, survivors)
        group = (set(self.neighbours) | {self.site_id}) & set(survivors)
        valid = set()
        for signer, signature in confirmations.items():
            if signer not in group:
                continue  # a signature of a site outside U or outside its neighbourhood
            check_bytes(signature, SIGNATURE_BYTES, f"confirmation of site {signer}")
            if signer == self.site_id:
                key = self._signing_key.public_key()
            elif self._peer_keys is None:
                valid.add(signer)  # no enrolled keys given: the coordinator's check is trusted
                continue
            elif signer not in self._peer_keys:
                raise SecAggError(f"no enrolled identity key for site {signer}")
            else:
                key = self._peer_keys[signer]
            try:
                key.verify(signature, message)
            except InvalidSignature:
                raise SecAggError(
                    f"site {self.site_id} refuses to unmask: the confirmation of site {signer} "
                    "does not verify over the survivor list this site confirmed (a different "
                    "list, or a forged signature)"
                ) from None
            valid.add(signer)
        if len(valid) < self.params.threshold:
            raise SecAggError(
                f"site {self.site_id} refuses to unmask: {len(valid)} of its neighbourhood "
                f"confirmed the survivor list it confirmed, below threshold "
                f"{self.params.threshold}"
            )

    def unmask(self, request: UnmaskRequest) -> UnmaskReply:
        """Stage 4: b-shares of surviving neighbours and its own, s_sk-shares of dropped ones.

        Raises
        ------
        SecAggError
            If confirm did not run, the request's survivors and dropped do not split this
            site's peers exactly as the list U it confirmed does, or fewer than t sites of its
            neighbourhood (itself included) confirmed that same U with a valid signature.
        """
        self._enter(_UNMASK)
        if self._confirmed is None:
            raise SecAggError(f"site {self.site_id} refuses to unmask: it confirmed no survivors")
        survivors, dropped = set(request.survivors), set(request.dropped)
        held = set(self._held)
        both = survivors & dropped & held
        if both:
            raise SecAggError(
                f"site {self.site_id} refuses to unmask: peers {sorted(both)} are named as both "
                "survivor and dropped, which would reveal their inputs"
            )
        count = len(request.survivors) + len(request.dropped)
        if count != len(held) or survivors | dropped != held:
            raise SecAggError(
                f"site {self.site_id} refuses to unmask: survivors and dropped must split its "
                f"peers {sorted(held)} exactly, got {count} ids"
            )
        confirmed = set(self._confirmed)
        if survivors != held & confirmed:
            raise SecAggError(
                f"site {self.site_id} refuses to unmask: the request names survivors "
                f"{sorted(survivors)}, but the list it confirmed names {sorted(held & confirmed)} "
                "of its peers"
            )
        self._check_confirmations(request.confirmations)
        if self._own_seed_share is None:
            raise SecAggError(f"site {self.site_id}: no own seed share (share_keys never ran)")
        seed_shares = {peer: self._held[peer][0] for peer in sorted(survivors)}
        seed_shares[self.site_id] = self._own_seed_share
        return UnmaskReply(
            seed_shares=dict(sorted(seed_shares.items())),
            key_shares={peer: self._held[peer][1] for peer in sorted(dropped)},
        )

    def to_state(self) -> Record:
        """Everything this site knows about the round, as a flat Flower-``ConfigRecord`` dict.

        For a site whose stages run in different processes: store the result in the node's
        own ``context.state`` after each stage and rebuild the site with ``from_state`` before
        the next. Keys (all kebab-case):

        - ``state-version`` (int, STATE_VERSION), ``stage`` (int, the next stage allowed:
          0 advertise, 1 share_keys, 2 masked_input, 3 confirm, 4 unmask, 5 done);
        - the parameters: ``num-sites``, ``threshold``, ``degree``, ``min-survivors`` (int),
          ``clip-range``, ``max-weight``, ``scale``, ``weight-scale`` (float), ``rounding``
          (str) (``common.secagg_records.params_to_record``);
        - ``site-id`` (int), ``context`` (bytes);
        - ``encryption-private-key`` (c_sk) and ``mask-private-key`` (s_sk): raw 32-byte
          X25519 private keys; ``seed``: the 32-byte self-mask seed b;
        - the accepted neighbour adverts as ``advert-ids``, ``advert-encryption-keys``,
          ``advert-mask-keys``, ``advert-seed-commitments``, ``advert-signatures``
          (``common.secagg_records.adverts_to_record``);
        - the shares held for neighbours as ``held-ids`` (list[int]), ``held-seed-shares``
          and ``held-key-shares`` (list[bytes], 32 bytes each, same order);
        - ``own-seed-share``: the site's own share of b as a list of one 32-byte value once
          share_keys has run, an empty list before;
        - ``confirmed-survivors``: the survivor list U it signed in confirm (list[int]), an
          empty list before.

        The Ed25519 signing key, ``peer_keys`` and ``rng`` are not included: pass them to
        ``from_state``.

        Security
        --------
        The state holds the site's secrets (both X25519 private keys, the self-mask seed and
        its neighbours' shares): anyone holding it can unmask this site's input. Keep it in
        the site's own process or node state (Flower ``context.state``); never put it in a
        message, a log or a metric. Never rebuild a site from an older state than the latest
        one: each stage must run once, and a rolled-back site could answer two different
        unmask requests and reveal both shares of one peer. Store the new state (with its
        advanced ``stage``) no later than the stage's reply leaves, and drop it when the
        round ends.
        """
        return {
            "state-version": STATE_VERSION,
            **params_to_record(self.params),
            "site-id": self.site_id,
            "context": self.context,
            "stage": self._stage,
            "encryption-private-key": self._c_sk.private_bytes_raw(),
            "mask-private-key": self._s_sk.private_bytes_raw(),
            "seed": self._seed,
            **adverts_to_record(self._adverts),
            "held-ids": sorted(self._held),
            "held-seed-shares": [self._held[peer][0] for peer in sorted(self._held)],
            "held-key-shares": [self._held[peer][1] for peer in sorted(self._held)],
            "own-seed-share": [] if self._own_seed_share is None else [self._own_seed_share],
            "confirmed-survivors": list(self._confirmed or ()),
        }

    @classmethod
    def from_state(
        cls,
        state: Mapping[str, object],
        signing_key: Ed25519PrivateKey,
        peer_keys: Mapping[int, Ed25519PublicKey] | None = None,
        rng: np.random.Generator | None = None,
    ) -> SecAggSite:
        """Rebuild a site from ``to_state``'s mapping (e.g. a Flower ``ConfigRecord``).

        Parameters
        ----------
        state
            Exactly the keys ``to_state`` writes (see there; it holds secrets).
        signing_key, peer_keys, rng
            As for the constructor; the signing key is reloaded from the site's key file.

        Raises
        ------
        SecAggError
            If any field is missing, unknown, of the wrong type or size, out of range, or
            inconsistent with the others (ids outside the site's neighbours, shares held for
            a site without an advert, adverts or shares present before their stage).
        """
        what = "secure aggregation site state"
        if not isinstance(state, Mapping):
            raise SecAggError(f"{what} must be a mapping, got {type(state).__name__}")
        if len(state) != len(_STATE_KEYS) or set(state) != _STATE_KEYS:
            missing = sorted(k for k in _STATE_KEYS if k not in state)
            extra = len([k for k in state if k not in _STATE_KEYS])
            raise SecAggError(f"{what}: missing fields {missing}, {extra} unknown fields")
        record_int(state, "state-version", what, STATE_VERSION, STATE_VERSION)
        params = params_from_record(state)
        site_id = record_int(state, "site-id", what, 1, params.num_sites)
        context = record_value(state, "context", what)
        if not isinstance(context, bytes) or not 1 <= len(context) <= MAX_CONTEXT_BYTES:
            raise SecAggError(f"{what}: context must be 1..{MAX_CONTEXT_BYTES} bytes")
        stage = record_int(state, "stage", what, _ADVERTISE, _DONE)
        c_sk = record_bytes(state, "encryption-private-key", what, KEY_BYTES)
        s_sk = record_bytes(state, "mask-private-key", what, KEY_BYTES)
        seed = record_bytes(state, "seed", what, KEY_BYTES)
        adverts = adverts_from_record(state)
        held_ids = record_ids(state, "held-ids", what, params.num_sites)
        seed_shares = record_bytes_list(state, "held-seed-shares", what, len(held_ids), SHARE_BYTES)
        key_shares = record_bytes_list(state, "held-key-shares", what, len(held_ids), SHARE_BYTES)
        # share_keys (after which stage >= _MASK) sets the own share even if it then fails.
        own = record_bytes_list(state, "own-seed-share", what, int(stage >= _MASK), SHARE_BYTES)
        confirmed = record_ids(state, "confirmed-survivors", what, params.num_sites)

        site = cls.__new__(cls)
        site.params = params
        site.site_id = site_id
        site.context = context
        site.neighbours = neighbours(params, site_id, context)
        if not set(adverts) <= set(site.neighbours):
            raise SecAggError(f"{what}: adverts of sites that are not neighbours of {site_id}")
        if not set(held_ids) <= set(adverts):
            raise SecAggError(f"{what}: shares held for sites without an accepted advert")
        # Adverts are kept in share_keys (stage becomes 2), shares in masked_input (3), the
        # survivor list in confirm (4).
        if (adverts and stage < _MASK) or (held_ids and stage < _CONFIRM):
            raise SecAggError(f"{what}: adverts or shares present before their stage")
        if confirmed and (stage < _UNMASK or site_id not in confirmed):
            raise SecAggError(
                f"{what}: a confirmed survivor list before confirm, or without {site_id}"
            )
        site._signing_key = signing_key
        site._peer_keys = peer_keys
        site._rng = rng
        site._c_sk = X25519PrivateKey.from_private_bytes(c_sk)
        site._s_sk = X25519PrivateKey.from_private_bytes(s_sk)
        site._seed = seed
        site._stage = stage
        site._adverts = adverts
        site._held = {peer: (seed_shares[m], key_shares[m]) for m, peer in enumerate(held_ids)}
        site._own_seed_share = own[0] if own else None
        site._confirmed = tuple(confirmed) if confirmed else None
        return site
