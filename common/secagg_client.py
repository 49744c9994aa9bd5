"""The site's side of secure aggregation: one ``SecAggSite`` per site and round.

A site object holds its round's private keys and the shares it received, so it lives in memory
only and for one round only: a site that restarts mid-round simply counts as dropped, and the
coordinator recovers its masks from the shares (see ``common.secagg``). Each stage runs at most
once and only in order; a stage that raises ends the site's part in the round (nothing is ever
revealed twice, in particular never both shares of one peer).
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from common.fixedpoint import FixedPointError, Levels, quantize
from common.secagg import (
    CIPHERTEXT_BYTES,
    KEY_BYTES,
    NONCE_BYTES,
    SHARE_BYTES,
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

# Stages in order; ``_stage`` holds the next one allowed.
_ADVERTISE, _SHARE, _MASK, _UNMASK, _DONE = range(5)
_STAGE_NAMES = ("advertise", "share_keys", "masked_input", "unmask", "done")


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

    def _accept_adverts(self, adverts: Mapping[int, KeyAdvert]) -> None:
        """Keep the well-formed adverts of neighbours; at least t of them are needed."""
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
        if len(self._adverts) < self.params.threshold:
            raise SecAggError(
                f"site {self.site_id}: only {len(self._adverts)} of its neighbours advertised "
                f"keys, threshold is {self.params.threshold}"
            )

    def share_keys(self, adverts: Mapping[int, KeyAdvert]) -> dict[int, bytes]:
        """Stage 1: Shamir shares of s_sk and b, sealed to each advertised neighbour.

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
        self._accept_adverts(adverts)
        t, k = self.params.threshold, len(self.neighbours)
        # Share m goes to the m-th neighbour (sorted ids): the holder's Shamir index is public.
        seed_shares = split_secret(self._seed, t, k)
        key_shares = split_secret(self._s_sk.private_bytes_raw(), t, k)
        sealed: dict[int, bytes] = {}
        for m, peer in enumerate(self.neighbours):
            if peer not in self._adverts:
                continue
            secret = agree(self._c_sk, self._adverts[peer].encryption_key, f"site {peer}")
            aead = AESGCM(share_key(secret, self.context, self.site_id, peer))
            nonce = os.urandom(NONCE_BYTES)
            plaintext = seed_shares[m] + key_shares[m]
            aad = share_aad(self.context, self.site_id, peer)
            sealed[peer] = nonce + aead.encrypt(nonce, plaintext, aad)
        return sealed

    def _open_shares(self, ciphertexts: Mapping[int, bytes]) -> None:
        """Decrypt and keep the shares neighbours sent; at least t are needed."""
        if len(ciphertexts) < self.params.threshold:
            raise SecAggError(
                f"site {self.site_id}: shares from only {len(ciphertexts)} neighbours, "
                f"threshold is {self.params.threshold}"
            )
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

    def unmask(self, request: UnmaskRequest) -> UnmaskReply:
        """Stage 3: b-shares of surviving neighbours and s_sk-shares of dropped ones.

        Raises
        ------
        SecAggError
            If any peer is named as both survivor and dropped (that would reveal its input),
            or the two lists do not split exactly the neighbours whose shares this site holds.
        """
        self._enter(_UNMASK)
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
        return UnmaskReply(
            seed_shares={peer: self._held[peer][0] for peer in sorted(survivors)},
            key_shares={peer: self._held[peer][1] for peer in sorted(dropped)},
        )
