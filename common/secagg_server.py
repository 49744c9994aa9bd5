"""The coordinator's side of secure aggregation: verify, route, sum masked inputs, unmask.

``SecAggServer`` keeps everything it knows in ``ServerState``, a dataclass of plain data only
(ints, bytes, tuples, dicts of those, one ``uint32`` array), so a checkpoint can store it with
JSON + numpy; no serializer is provided yet, and the object is in memory only. It never holds
an individual masked input: each is added to the running sum mod 2**32 on arrival.

Following Flower's strategies, a malformed or unverifiable message from one site is recorded
in ``state.rejected`` (site id -> reason) and that site is left out; ``SecAggError`` is raised
only when the round as a whole cannot produce a sum (too few sites or shares, a stage called
out of order, a reconstruction that contradicts a signed advert).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from common.fixedpoint import Levels, dequantize_sum
from common.secagg import (
    CIPHERTEXT_BYTES,
    SHARE_BYTES,
    SIGNATURE_BYTES,
    ConfirmRequest,
    KeyAdvert,
    SecAggError,
    SecAggParams,
    UnmaskReply,
    UnmaskRequest,
    agree,
    check_bytes,
    check_context,
    check_site_id,
    combine_secret,
    confirm_message,
    pair_mask_key,
    peer_graph,
    prg,
    seed_commitment,
    self_mask_key,
    verify_advert,
)

# Longest masked input accepted (coordinates): 2**28 uint32 = 1 GiB, far beyond any adapter.
MAX_LENGTH = 2**28
# Rejections an error message lists before summarising (it ends up in logs and metrics).
_MAX_NAMED = 5
_ADVERTS, _SHARES, _MASKED, _CONFIRM, _UNMASK, _DONE = range(6)
_STAGE_NAMES = (
    "collect_adverts",
    "route_shares",
    "collect_masked",
    "collect_confirmations",
    "unmask",
    "done",
)


@dataclass
class ServerState:
    """Everything the coordinator knows about one round, as plain data."""

    stage: int = _ADVERTS
    adverts: dict[int, KeyAdvert] = field(default_factory=dict)  # U1: verified adverts
    shared: tuple[int, ...] = ()  # U2: sites whose shares were routed
    survivors: tuple[int, ...] = ()  # U3: sites whose masked input is in the sum
    masked_sum: Levels | None = None  # sum of U3's masked inputs mod 2**32
    confirmed: dict[int, bytes] = field(default_factory=dict)  # U4: signatures over U3
    requests: dict[int, UnmaskRequest] = field(default_factory=dict)
    rejected: dict[int, str] = field(default_factory=dict)  # site id -> why it was left out


@dataclass(frozen=True)
class SecAggResult:
    """The unmasked outcome of a round.

    Attributes
    ----------
    weighted_sum
        float64 ``sum_i w_i * clip(x_i)`` over the survivors, length L; divide by
        ``total_weight`` for the weighted mean.
    total_weight
        ``sum_i w_i`` over the survivors (error ``max_abs_weight_error``).
    survivors, dropped
        Site ids summed, and ids that shared keys but sent no usable masked input.
    rejected
        Site id -> reason for every site left out of the round.
    """

    weighted_sum: npt.NDArray[np.float64]
    total_weight: float
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    rejected: dict[int, str]


class SecAggServer:
    """The coordinator of one secure-aggregation round.

    Parameters
    ----------
    params
        The round's public parameters.
    context
        The same public round context the sites use (also the peer-graph seed).
    site_keys
        Enrolled Ed25519 identity keys, ``{site id: public key}``.
    length
        L, the number of delta coordinates (masked inputs have L + 1: the weight is last).
    """

    def __init__(
        self,
        params: SecAggParams,
        context: bytes,
        site_keys: Mapping[int, Ed25519PublicKey],
        length: int,
    ) -> None:
        check_context(context)
        for site in site_keys:
            check_site_id(params, site, "enrolled site id")
        if not 1 <= length <= MAX_LENGTH:
            raise SecAggError(f"length {length} outside 1..{MAX_LENGTH}")
        self.params = params
        self.context = context
        self.length = length
        self.graph = peer_graph(params, context)
        self._site_keys = dict(site_keys)
        self.state = ServerState()

    def _enter(self, stage: int) -> None:
        if self.state.stage != stage:
            raise SecAggError(
                f"coordinator stage {_STAGE_NAMES[stage]} called, "
                f"expected {_STAGE_NAMES[self.state.stage]}"
            )
        self.state.stage = stage + 1

    def _reject(self, site: int, reason: str) -> None:
        self.state.rejected.setdefault(site, reason)

    def _prune(self, members: set[int], what: str) -> set[int]:
        """Drop members with fewer than t - 1 neighbours among members, until none is left.

        Such a site's self mask could never be removed (its own share and t - 1 of its
        neighbours' are needed).
        """
        t = self.params.threshold
        while True:
            weak = {s for s in members if len(set(self.graph[s]) & members) + 1 < t}
            if not weak:
                return members
            for site in weak:
                self._reject(site, f"fewer than threshold {t} - 1 of its neighbours {what}")
            members -= weak

    def _require(self, members: Collection[int], what: str) -> None:
        if len(members) < self.params.min_survivors:
            rejected = sorted(self.state.rejected.items())
            shown = "; ".join(f"site {site}: {why}" for site, why in rejected[:_MAX_NAMED])
            more = f" (+{len(rejected) - _MAX_NAMED} more)" if len(rejected) > _MAX_NAMED else ""
            raise SecAggError(
                f"only {len(members)} sites {what}, at least min_survivors = "
                f"{self.params.min_survivors} are needed; rejected: {shown or 'none'}{more}"
            )

    def collect_adverts(self, adverts: Mapping[int, KeyAdvert]) -> dict[int, KeyAdvert]:
        """Stage 0: verify the adverts; return the set to broadcast to every accepted site.

        Parameters
        ----------
        adverts
            ``{sender site id: advert}``; the sender is the site the transport authenticated.
        """
        self._enter(_ADVERTS)
        accepted: dict[int, KeyAdvert] = {}
        for site, advert in adverts.items():
            try:
                check_site_id(self.params, site, "sender")
                if advert.site_id != site:
                    raise SecAggError(f"advert from site {site} claims site {advert.site_id!r}")
                if site not in self._site_keys:
                    raise SecAggError(f"site {site} is not enrolled")
                verify_advert(advert, self._site_keys[site], self.context)
            except SecAggError as err:
                self._reject(site, str(err))
                continue
            accepted[site] = advert
        members = self._prune(set(accepted), "advertised keys")
        self._require(members, "advertised keys")
        self.state.adverts = {site: accepted[site] for site in sorted(members)}
        return dict(self.state.adverts)

    def _valid_packet(self, site: int, packet: Mapping[int, bytes]) -> bool:
        """Whether a site sealed shares to exactly its advertised neighbours, well-sized."""
        expected = {peer for peer in self.graph[site] if peer in self.state.adverts}
        # Compared as sets, never echoed: a hostile packet may hold any number of any keys.
        if len(packet) != len(expected) or set(packet) != expected:
            self._reject(
                site,
                f"sent shares to {len(packet)} sites, expected exactly its advertised "
                f"neighbours {sorted(expected)}",
            )
            return False
        for peer, ciphertext in packet.items():
            try:
                check_bytes(ciphertext, CIPHERTEXT_BYTES, f"shares for site {peer}")
            except SecAggError as err:
                self._reject(site, str(err))
                return False
        return True

    def route_shares(
        self, packets: Mapping[int, Mapping[int, bytes]]
    ) -> dict[int, dict[int, bytes]]:
        """Stage 1: check each site's sealed shares and route them to their recipients.

        Parameters
        ----------
        packets
            ``{sender id: {recipient id: ciphertext}}`` (each site's ``share_keys`` output).

        Returns
        -------
        dict
            ``{recipient id: {sender id: ciphertext}}`` for every site still in the round;
            send each its own dict for ``masked_input``.
        """
        self._enter(_SHARES)
        members: set[int] = set()
        for site, packet in packets.items():
            if site not in self.state.adverts:
                self._reject(site, f"site {site!r} sent shares without an accepted advert")
            elif self._valid_packet(site, packet):
                members.add(site)
        members = self._prune(members, "shared keys")
        self._require(members, "shared keys")
        self.state.shared = tuple(sorted(members))
        return {
            site: {peer: packets[peer][site] for peer in self.graph[site] if peer in members}
            for site in self.state.shared
        }

    def collect_masked(
        self, masked: Mapping[int, npt.NDArray[np.uint32]]
    ) -> dict[int, ConfirmRequest]:
        """Stage 2: add the masked inputs to the running sum; ask survivors to confirm U3.

        Parameters
        ----------
        masked
            ``{site id: uint32 array of length L + 1}``.

        Returns
        -------
        dict
            ``{surviving site id: ConfirmRequest}``, the same survivor list U3 for each.
        """
        self._enter(_MASKED)
        total = np.zeros(self.length + 1, dtype=np.uint32)
        survivors: list[int] = []
        for site, vector in masked.items():
            if site not in self.state.shared:
                self._reject(site, f"site {site!r} sent a masked input without sharing keys")
            elif not isinstance(vector, np.ndarray) or vector.dtype != np.uint32:
                self._reject(site, "masked input is not a uint32 array")
            elif vector.shape != (self.length + 1,):
                self._reject(site, f"masked input shape {vector.shape}, expected {total.shape}")
            else:
                total += vector  # wraps mod 2**32
                survivors.append(site)
        self._require(survivors, "sent a masked input")
        self.state.survivors = tuple(sorted(survivors))
        self.state.masked_sum = total
        request = ConfirmRequest(self.state.survivors)
        return {site: request for site in self.state.survivors}

    def collect_confirmations(self, signatures: Mapping[int, bytes]) -> dict[int, UnmaskRequest]:
        """Stage 3: keep the survivors' valid signatures over U3; ask those sites to unmask.

        Parameters
        ----------
        signatures
            ``{site id: Ed25519 signature over confirm_message(context, U3)}``.

        Returns
        -------
        dict
            ``{confirmed site id: UnmaskRequest}``: its neighbours in U3 and those that shared
            keys but are not in U3, with every valid confirmation (each site checks them).
        """
        self._enter(_CONFIRM)
        message = confirm_message(self.context, self.state.survivors)
        for site, signature in signatures.items():
            if site not in self.state.survivors:
                self._reject(site, f"site {site!r} confirmed without a masked input in the sum")
                continue
            try:
                if not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
                    raise InvalidSignature
                self._site_keys[site].verify(signature, message)
            except InvalidSignature:
                self._reject(site, "confirmation signature does not verify over the survivors")
                continue
            self.state.confirmed[site] = signature
        self._require(self.state.confirmed, "confirmed the survivor list")
        alive = set(self.state.survivors)
        for site in sorted(self.state.confirmed):
            peers = [peer for peer in self.graph[site] if peer in self.state.shared]
            self.state.requests[site] = UnmaskRequest(
                survivors=tuple(p for p in peers if p in alive),
                dropped=tuple(p for p in peers if p not in alive),
                confirmations=dict(self.state.confirmed),
            )
        return dict(self.state.requests)

    def _valid_reply(self, site: int, reply: UnmaskReply) -> bool:
        """Whether a reply holds exactly the requested shares (and its own seed share)."""
        request = self.state.requests.get(site)
        if request is None:
            self._reject(site, f"site {site!r} sent shares without being asked")
            return False
        for shares, wanted, kind in (
            (reply.seed_shares, tuple(sorted((*request.survivors, site))), "seed"),
            (reply.key_shares, request.dropped, "key"),
        ):
            if len(shares) != len(wanted) or set(shares) != set(wanted):
                self._reject(site, f"{len(shares)} {kind} shares, expected for {list(wanted)}")
                return False
            if not all(isinstance(s, bytes) and len(s) == SHARE_BYTES for s in shares.values()):
                self._reject(site, f"{kind} shares must each be {SHARE_BYTES} bytes")
                return False
        return True

    def _reconstruct(self, owner: int, shares: Mapping[int, bytes], kind: str) -> bytes:
        """Recombine a site's 32-byte secret from exactly t of its holders' shares."""
        t = self.params.threshold
        if len(shares) < t:
            raise SecAggError(
                f"only {len(shares)} {kind} shares of site {owner} were returned, threshold "
                f"is {t}: too many sites dropped to unmask the sum"
            )
        order = sorted((*self.graph[owner], owner))  # common.secagg.holders, graph cached
        chosen = {order.index(holder) + 1: shares[holder] for holder in self._used(shares)}
        return combine_secret(chosen)

    def _used(self, shares: Mapping[int, bytes]) -> list[int]:
        """The holders whose shares ``_reconstruct`` combines (the first t by id)."""
        return sorted(shares)[: self.params.threshold]

    def _self_mask(self, site: int, replies: Mapping[int, UnmaskReply]) -> Levels:
        """The self mask PRG(b) of a survivor, its seed checked against its commitment."""
        shares = {h: r.seed_shares[site] for h, r in replies.items() if site in r.seed_shares}
        seed = self._reconstruct(site, shares, "seed")
        if seed_commitment(self.context, site, seed) != self.state.adverts[site].seed_commitment:
            raise SecAggError(
                f"reconstructed self-mask seed of site {site} contradicts the seed commitment in "
                f"its signed advert: one of the shares from sites {self._used(shares)} is corrupted"
            )
        return prg(self_mask_key(seed, self.context, site), self.length + 1)

    def _remove_pair_masks(
        self, total: Levels, site: int, replies: Mapping[int, UnmaskReply]
    ) -> None:
        """Remove a dropped site's pairwise masks from the survivors' inputs in ``total``."""
        shares = {h: r.key_shares[site] for h, r in replies.items() if site in r.key_shares}
        private = X25519PrivateKey.from_private_bytes(self._reconstruct(site, shares, "key"))
        if private.public_key().public_bytes_raw() != self.state.adverts[site].mask_key:
            raise SecAggError(
                f"reconstructed pairwise mask key of site {site} contradicts the mask key in its "
                f"signed advert: one of the shares from sites {self._used(shares)} is corrupted"
            )
        for peer in self.graph[site]:
            if peer not in self.state.survivors:
                continue
            secret = agree(private, self.state.adverts[peer].mask_key, f"site {peer}")
            mask = prg(pair_mask_key(secret, self.context, site, peer), self.length + 1)
            # The survivor added the mask if site > peer and subtracted it otherwise.
            if site > peer:
                total -= mask
            else:
                total += mask

    def unmask(self, replies: Mapping[int, UnmaskReply]) -> SecAggResult:
        """Stage 4: reconstruct the secrets, remove every mask and decode the sum.

        Raises
        ------
        SecAggError
            If fewer than t shares of some secret came back, or a reconstruction contradicts
            the owner's signed advert.
        """
        self._enter(_UNMASK)
        valid = {site: reply for site, reply in replies.items() if self._valid_reply(site, reply)}
        if self.state.masked_sum is None:
            raise SecAggError("no masked sum in the coordinator state")
        total = self.state.masked_sum.copy()
        for site in self.state.survivors:
            total -= self._self_mask(site, valid)
        dropped = tuple(s for s in self.state.shared if s not in self.state.survivors)
        for site in dropped:
            self._remove_pair_masks(total, site, valid)
        return SecAggResult(
            weighted_sum=dequantize_sum(total[: self.length], self.params.scale),
            total_weight=float(dequantize_sum(total[self.length :], self.params.weight_scale)[0]),
            survivors=self.state.survivors,
            dropped=dropped,
            rejected=dict(self.state.rejected),
        )
