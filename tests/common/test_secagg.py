"""The secure-aggregation protocol run in-process: sums, dropouts, forgeries, refusals, bounds."""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.errors import ConfigError
from common.fixedpoint import Levels, quantize
from common.secagg import (
    CIPHERTEXT_BYTES,
    MAX_SITES,
    ConfirmRequest,
    SecAggError,
    SecAggParams,
    UnmaskReply,
    UnmaskRequest,
    combine_secret,
    max_abs_error_per_coordinate,
    max_abs_weight_error,
    neighbours,
    pair_mask_key,
    params_for,
    peer_graph,
    prg,
    share_key,
    split_secret,
)
from common.secagg_client import SecAggSite
from common.secagg_records import (
    advert_from_record,
    advert_to_record,
    adverts_from_record,
    adverts_to_record,
    confirm_request_from_record,
    confirm_request_to_record,
    confirmation_from_record,
    confirmation_to_record,
    shares_from_record,
    shares_to_record,
    unmask_reply_from_record,
    unmask_reply_to_record,
    unmask_request_from_record,
    unmask_request_to_record,
)
from common.secagg_server import SecAggResult, SecAggServer
from tests.helpers.fixed_point_bound import sum_error_bound

CONTEXT = b"fedlora/1|run-test|round-1|module-default|version-0"
NORM_BOUND = 1.0  # L2 bound C, so coordinates are clipped to [-1, 1]
MAX_WEIGHT = 1000.0  # W, examples
LENGTH = 3000  # coordinates per delta in the fast tests


@dataclass
class Round:
    """N simulated sites and one coordinator, with each site's plain input kept for checks."""

    params: SecAggParams
    sites: dict[int, SecAggSite]
    server: SecAggServer
    deltas: dict[int, np.ndarray]
    weights: dict[int, float]
    identity: dict[int, Ed25519PrivateKey]
    masked: dict[int, Levels] = field(default_factory=dict)

    def expected(self, survivors: Collection[int]) -> tuple[np.ndarray, float]:
        """float64 sum of w_i * clip(x_i) and of w_i over ``survivors``."""
        c = self.params.clip_range
        total = sum(
            self.weights[i] * np.clip(self.deltas[i].astype(np.float64), -c, c) for i in survivors
        )
        return np.asarray(total), sum(self.weights[i] for i in survivors)


def make_round(
    params: SecAggParams, length: int = LENGTH, seed: int = 0, peer_check: bool = False
) -> Round:
    rng = np.random.default_rng(seed)
    ids = range(1, params.num_sites + 1)
    identity = {i: Ed25519PrivateKey.generate() for i in ids}
    public = {i: key.public_key() for i, key in identity.items()}
    peer_keys = public if peer_check else None
    sites = {i: SecAggSite(params, i, CONTEXT, identity[i], peer_keys) for i in ids}
    return Round(
        params=params,
        sites=sites,
        server=SecAggServer(params, CONTEXT, public, length),
        deltas={i: (rng.standard_normal(length) * 0.05).astype(np.float32) for i in ids},
        weights={i: float(rng.integers(1, int(params.max_weight) + 1)) for i in ids},
        identity=identity,
    )


def run(
    rnd: Round,
    skip_share: Collection[int] = (),
    drop_after_share: Collection[int] = (),
    silent_unmask: Collection[int] = (),
    silent_confirm: Collection[int] = (),
) -> SecAggResult:
    """All five stages; sites in each collection stop answering at that stage."""
    adverts = rnd.server.collect_adverts({i: s.advertise() for i, s in rnd.sites.items()})
    packets = {i: rnd.sites[i].share_keys(adverts) for i in adverts if i not in skip_share}
    routed = rnd.server.route_shares(packets)
    for i, ciphertexts in routed.items():
        if i not in drop_after_share:
            rnd.masked[i] = rnd.sites[i].masked_input(ciphertexts, rnd.deltas[i], rnd.weights[i])
    requests = confirmed(rnd, rnd.server.collect_masked(rnd.masked), silent_confirm)
    replies = {i: rnd.sites[i].unmask(r) for i, r in requests.items() if i not in silent_unmask}
    return rnd.server.unmask(replies)


def confirmed(
    rnd: Round, requests: Mapping[int, ConfirmRequest], silent: Collection[int] = ()
) -> dict[int, UnmaskRequest]:
    """Stage 3: every asked site (but ``silent`` ones) signs the survivor list; the
    coordinator's unmask requests."""
    signatures = {i: rnd.sites[i].confirm(r) for i, r in requests.items() if i not in silent}
    return rnd.server.collect_confirmations(signatures)


def assert_close(rnd: Round, result: SecAggResult, survivors: Collection[int]) -> None:
    weighted, weight = rnd.expected(survivors)
    assert set(result.survivors) == set(survivors)
    p = rnd.params
    bound = sum_error_bound(
        p.num_sites, p.max_weight, p.clip_range, len(survivors), p.rounding == "stochastic"
    )
    assert np.abs(result.weighted_sum - weighted).max() <= bound
    assert abs(result.total_weight - weight) <= max_abs_weight_error(rnd.params, len(survivors))


@pytest.mark.parametrize("num_sites", [3, 5, 10])
def test_sum_equals_weighted_sum_within_bound(num_sites: int) -> None:
    rnd = make_round(params_for(num_sites, NORM_BOUND, MAX_WEIGHT))
    result = run(rnd)
    assert_close(rnd, result, rnd.sites)
    assert result.dropped == () and result.rejected == {}


def test_stochastic_rounding_within_bound() -> None:
    rnd = make_round(params_for(5, NORM_BOUND, MAX_WEIGHT, rounding="stochastic"))
    assert_close(rnd, run(rnd), rnd.sites)


@pytest.mark.parametrize(
    ("num_sites", "dropped"),
    # Each survivor holds a share of its own b: 2 of 5 (k = 4, t = 3) leave a survivor its own
    # share and 2 neighbours'; 4 of 10 (k = 9, t = 6) leave exactly t holders of every secret.
    [(5, {2}), (5, {1, 4}), (10, {7}), (10, {1, 4, 6, 9})],
    ids=["5-drop-1", "5-drop-2", "10-drop-1", "10-drop-4-at-threshold"],
)
def test_dropouts_after_sharing_are_recovered(num_sites: int, dropped: set[int]) -> None:
    rnd = make_round(params_for(num_sites, NORM_BOUND, MAX_WEIGHT))
    result = run(rnd, drop_after_share=dropped)
    assert set(result.dropped) == dropped
    assert_close(rnd, result, set(rnd.sites) - dropped)


def test_silent_site_at_unmask_stays_in_the_sum() -> None:
    rnd = make_round(params_for(10, NORM_BOUND, MAX_WEIGHT))
    result = run(rnd, drop_after_share={2}, silent_unmask={5})
    assert_close(rnd, result, set(rnd.sites) - {2})


def test_site_that_never_shares_is_left_out() -> None:
    rnd = make_round(params_for(5, NORM_BOUND, MAX_WEIGHT))
    result = run(rnd, skip_share={3})
    assert result.dropped == ()
    assert_close(rnd, result, {1, 2, 4, 5})


@pytest.mark.parametrize(
    ("num_sites", "dropped"), [(5, {1, 2, 3}), (10, {1, 2, 3, 4, 5})], ids=["5-drop-3", "10-drop-5"]
)
def test_too_many_dropouts_fail_below_threshold(num_sites: int, dropped: set[int]) -> None:
    # A dropped site's s_sk has no own share: t of its neighbours must survive. The survivors
    # refuse to confirm so short a list, and without their confirmations the coordinator
    # asks nobody to unmask.
    rnd = make_round(params_for(num_sites, NORM_BOUND, MAX_WEIGHT, min_survivors=2))
    with pytest.raises(SecAggError, match="below the round's floor"):
        run(rnd, drop_after_share=dropped)
    rnd = make_round(params_for(num_sites, NORM_BOUND, MAX_WEIGHT, min_survivors=2))
    with pytest.raises(SecAggError, match="only 0 sites confirmed the survivor list"):
        run(rnd, drop_after_share=dropped, silent_confirm=set(rnd.sites))


@pytest.mark.parametrize("num_sites", [3, 5, 10])
def test_site_refuses_to_confirm_when_told_too_few_survived(num_sites: int) -> None:
    # A lying coordinator tells site 1 that all but t - 2 of its peers dropped, to get their
    # mask keys while their masked inputs are in the sum (Bonawitz et al. 2017, section 6).
    rnd, routed = _routed(num_sites)
    for i in routed:
        rnd.masked[i] = rnd.sites[i].masked_input(routed[i], rnd.deltas[i], rnd.weights[i])
    peers = sorted(rnd.sites[1].neighbours)
    keep = peers[: rnd.params.threshold - 2]
    with pytest.raises(SecAggError, match="below the round's floor"):
        rnd.sites[1].confirm(ConfirmRequest(tuple(sorted({1, *keep}))))

    rnd, routed = _routed(num_sites)  # exactly at the floor: confirmed
    rnd.sites[1].masked_input(routed[1], rnd.deltas[1], rnd.weights[1])
    keep = peers[: rnd.params.threshold - 1]
    signature = rnd.sites[1].confirm(ConfirmRequest(tuple(sorted({1, *keep}))))
    assert len(signature) == 64


def test_site_refuses_to_unmask_for_another_list_than_it_confirmed() -> None:
    rnd, requests = _site_after_masking(5)
    peers = requests[1].survivors
    # Told at unmask that peer 2 dropped, although the list it signed names 2.
    lie = dataclasses.replace(requests[1], survivors=peers[1:], dropped=peers[:1])
    with pytest.raises(SecAggError, match="the list it confirmed names"):
        rnd.sites[1].unmask(lie)


@pytest.mark.parametrize("peer_check", [True, False])
def test_site_refuses_to_unmask_without_t_confirmations_of_its_list(peer_check: bool) -> None:
    rnd = make_round(params_for(5, NORM_BOUND, MAX_WEIGHT), peer_check=peer_check)
    adverts = rnd.server.collect_adverts({i: s.advertise() for i, s in rnd.sites.items()})
    routed = rnd.server.route_shares({i: rnd.sites[i].share_keys(adverts) for i in adverts})
    for i in routed:
        rnd.masked[i] = rnd.sites[i].masked_input(routed[i], rnd.deltas[i], rnd.weights[i])
    requests = confirmed(rnd, rnd.server.collect_masked(rnd.masked))
    t = rnd.params.threshold
    signatures = requests[1].confirmations
    too_few = {i: signatures[i] for i in sorted(signatures)[: t - 1]}
    with pytest.raises(SecAggError, match=f"below threshold {t}"):
        rnd.sites[1].unmask(dataclasses.replace(requests[1], confirmations=too_few))
    if peer_check:  # a forged signature is named (the coordinator cannot sign for a site)
        forged = {**signatures, 2: bytes(64)}
        with pytest.raises(SecAggError, match="confirmation of site 2 does not verify"):
            rnd.sites[3].unmask(dataclasses.replace(requests[3], confirmations=forged))


def test_inconsistent_dropout_story_reveals_no_mask_key_of_the_victim() -> None:
    """The coordinator tells sites 2, 3 (and the victim, 1) that the victim survived and
    sites 4, 5 that it dropped, to collect t shares of the victim's self-mask seed from the
    first group and t shares of its mask key from the second. Honest sites each sign one
    list, so the second list has 2 < t = 3 signatures: sites 4 and 5 refuse to unmask."""
    rnd, routed = _routed(5, peer_check=True)
    for i in routed:
        rnd.masked[i] = rnd.sites[i].masked_input(routed[i], rnd.deltas[i], rnd.weights[i])
    told = {1: (1, 2, 3, 4, 5), 2: (1, 2, 3, 4, 5), 3: (1, 2, 3, 4, 5), 4: (2, 3, 4, 5),
            5: (2, 3, 4, 5)}  # fmt: skip
    signatures = {i: rnd.sites[i].confirm(ConfirmRequest(u)) for i, u in told.items()}
    key_shares_of_victim = 0
    for i, survivors in told.items():
        peers = sorted(rnd.sites[i].neighbours)
        request = UnmaskRequest(
            survivors=tuple(p for p in peers if p in survivors),
            dropped=tuple(p for p in peers if p not in survivors),
            # The best the coordinator can do: the signatures over the list this site signed.
            confirmations={j: sig for j, sig in signatures.items() if told[j] == survivors},
        )
        if i in (4, 5):
            with pytest.raises(SecAggError, match="2 of its neighbourhood confirmed"):
                rnd.sites[i].unmask(request)
            continue
        reply = rnd.sites[i].unmask(request)
        assert 1 in reply.seed_shares
        key_shares_of_victim += 1 in reply.key_shares
    # Signatures over the other list are named, not counted.
    rnd, routed = _routed(5, peer_check=True)
    for i in routed:
        rnd.sites[i].masked_input(routed[i], rnd.deltas[i], rnd.weights[i])
    signatures = {i: rnd.sites[i].confirm(ConfirmRequest(u)) for i, u in told.items()}
    peers = sorted(rnd.sites[4].neighbours)
    mixed = UnmaskRequest(tuple(p for p in peers if p != 1), (1,), signatures)
    with pytest.raises(SecAggError, match="confirmation of site 2 does not verify"):
        rnd.sites[4].unmask(mixed)
    assert key_shares_of_victim == 0 < rnd.params.threshold  # s_sk of site 1 stays secret


def test_fewer_survivors_than_minimum_fail() -> None:
    rnd = make_round(params_for(5, NORM_BOUND, MAX_WEIGHT, min_survivors=5))
    with pytest.raises(SecAggError, match="min_survivors"):
        run(rnd, drop_after_share={4})


def test_k_regular_graph_matches_full_graph() -> None:
    full = make_round(params_for(10, NORM_BOUND, MAX_WEIGHT), seed=3)
    sparse = make_round(params_for(10, NORM_BOUND, MAX_WEIGHT, degree=4, threshold=3), seed=3)
    assert sparse.params.scale == full.params.scale
    # Nearest rounding is deterministic and masks cancel exactly: identical sums.
    np.testing.assert_array_equal(run(sparse).weighted_sum, run(full).weighted_sum)


def test_k_regular_graph_recovers_dropout() -> None:
    rnd = make_round(params_for(10, NORM_BOUND, MAX_WEIGHT, degree=4, threshold=3))
    assert_close(rnd, run(rnd, drop_after_share={6}), set(rnd.sites) - {6})


@pytest.mark.parametrize(("num_sites", "degree"), [(10, 4), (10, 3), (10, 9), (7, 6), (7, 2)])
def test_peer_graph_is_k_regular_and_symmetric(num_sites: int, degree: int) -> None:
    params = params_for(num_sites, NORM_BOUND, MAX_WEIGHT, degree=degree)
    graph = peer_graph(params, CONTEXT)
    assert sorted(graph) == list(range(1, num_sites + 1))
    for site, peers in graph.items():
        assert len(set(peers)) == degree and site not in peers
        assert all(site in graph[peer] for peer in peers)
    assert neighbours(params, 1, CONTEXT) == graph[1]
    assert peer_graph(params, b"another round") != graph or degree == num_sites - 1


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["plus-c", "minus-c"])
def test_extreme_inputs_do_not_wrap(sign: float) -> None:
    params = params_for(10, NORM_BOUND, MAX_WEIGHT)
    rnd = make_round(params, length=64)
    for i in rnd.sites:
        rnd.deltas[i] = np.full(64, sign * 5.0, dtype=np.float32)  # clipped to ±c
        rnd.weights[i] = MAX_WEIGHT
    result = run(rnd)
    assert_close(rnd, result, rnd.sites)
    assert np.all(np.sign(result.weighted_sum) == sign)
    assert result.total_weight == 10 * MAX_WEIGHT


def test_masked_input_looks_uniform() -> None:
    params = params_for(5, NORM_BOUND, MAX_WEIGHT)
    rnd = make_round(params, length=20_000)
    run(rnd)
    c = params.clip_range
    for i, masked in rnd.masked.items():
        weighted = np.clip(rnd.deltas[i].astype(np.float64), -c, c) * rnd.weights[i]
        plain = quantize(weighted, params.scale, params.level_bound)
        unit = masked.astype(np.float64) / 2**32
        # Uniform on [0, 1): mean 1/2 (sd 0.002 here), variance 1/12.
        assert abs(unit.mean() - 0.5) < 0.01
        assert abs(unit.var() - 1 / 12) < 0.005
        assert np.mean(masked[:-1] != plain) > 0.99


def test_forged_advert_signature_is_rejected() -> None:
    rnd = make_round(params_for(5, NORM_BOUND, MAX_WEIGHT))
    adverts = {i: s.advertise() for i, s in rnd.sites.items()}
    forged = Ed25519PrivateKey.generate().sign(b"anything")
    adverts[2] = dataclasses.replace(adverts[2], signature=forged)
    accepted = rnd.server.collect_adverts(adverts)
    assert 2 not in accepted
    assert "signature does not verify" in rnd.server.state.rejected[2]


@pytest.mark.parametrize("field_name", ["encryption_key", "mask_key", "seed_commitment"])
def test_advert_with_swapped_key_is_rejected(field_name: str) -> None:
    rnd = make_round(params_for(5, NORM_BOUND, MAX_WEIGHT))
    adverts = {i: s.advertise() for i, s in rnd.sites.items()}
    adverts[1] = dataclasses.replace(adverts[1], **{field_name: getattr(adverts[3], field_name)})
    assert 1 not in rnd.server.collect_adverts(adverts)


def test_advert_claiming_another_site_or_unenrolled_is_rejected() -> None:
    params = params_for(10, NORM_BOUND, MAX_WEIGHT)
    rnd = make_round(params)
    public = {i: k.public_key() for i, k in rnd.identity.items() if i != 10}
    server = SecAggServer(params, CONTEXT, public, LENGTH)
    adverts = {i: s.advertise() for i, s in rnd.sites.items()}
    adverts[4] = adverts[3]
    accepted = server.collect_adverts(adverts)
    assert set(accepted) == set(range(1, 10)) - {4}
    assert "claims site 3" in server.state.rejected[4]
    assert "not enrolled" in server.state.rejected[10]


def test_too_many_forged_adverts_fail_the_round() -> None:
    rnd = make_round(params_for(3, NORM_BOUND, MAX_WEIGHT))
    adverts = {i: s.advertise() for i, s in rnd.sites.items()}
    for forged in (1, 2):  # one honest site left: below min_survivors = 2
        adverts[forged] = dataclasses.replace(adverts[forged], signature=bytes(64))
    with pytest.raises(SecAggError, match="advertised keys"):
        rnd.server.collect_adverts(adverts)


def test_site_checks_neighbour_signatures_itself() -> None:
    rnd = make_round(params_for(3, NORM_BOUND, MAX_WEIGHT), peer_check=True)
    adverts = {i: s.advertise() for i, s in rnd.sites.items()}
    adverts[2] = dataclasses.replace(adverts[2], signature=bytes(64))
    with pytest.raises(SecAggError, match="signature"):
        rnd.sites[1].share_keys(adverts)  # a dishonest coordinator forwarded a forgery


def _routed(
    num_sites: int = 5, peer_check: bool = False
) -> tuple[Round, dict[int, dict[int, bytes]]]:
    """A round after stage 1: every site holds its routed ciphertexts."""
    rnd = make_round(params_for(num_sites, NORM_BOUND, MAX_WEIGHT), peer_check=peer_check)
    adverts = rnd.server.collect_adverts({i: s.advertise() for i, s in rnd.sites.items()})
    return rnd, rnd.server.route_shares({i: s.share_keys(adverts) for i, s in rnd.sites.items()})


def _site_after_masking(
    num_sites: int = 5, dropped: Collection[int] = ()
) -> tuple[Round, dict[int, UnmaskRequest]]:
    """A round after stage 2 (sites in ``dropped`` send no masked input): the coordinator's
    unmask requests."""
    rnd, routed = _routed(num_sites)
    masked = {
        i: rnd.sites[i].masked_input(routed[i], rnd.deltas[i], rnd.weights[i])
        for i in routed
        if i not in dropped
    }
    return rnd, confirmed(rnd, rnd.server.collect_masked(masked))


def test_site_refuses_seed_and_key_shares_of_the_same_peer() -> None:
    rnd, requests = _site_after_masking()
    peers = requests[1].survivors
    greedy = dataclasses.replace(requests[1], dropped=peers[:1])
    with pytest.raises(SecAggError, match="both survivor and dropped"):
        rnd.sites[1].unmask(greedy)


def test_site_answers_only_one_unmask_request() -> None:
    rnd, requests = _site_after_masking()
    rnd.sites[1].unmask(requests[1])
    flipped = dataclasses.replace(requests[1], survivors=(), dropped=requests[1].survivors)
    with pytest.raises(SecAggError, match="expected done"):
        rnd.sites[1].unmask(flipped)


def test_site_refuses_request_that_does_not_split_its_peers() -> None:
    rnd, requests = _site_after_masking()
    partial = dataclasses.replace(requests[1], survivors=requests[1].survivors[1:], dropped=())
    with pytest.raises(SecAggError, match="split its peers"):
        rnd.sites[1].unmask(partial)


def test_stages_run_in_order_only() -> None:
    rnd = make_round(params_for(3, NORM_BOUND, MAX_WEIGHT))
    with pytest.raises(SecAggError, match="expected advertise"):
        rnd.sites[1].share_keys({})
    with pytest.raises(SecAggError, match="expected collect_adverts"):
        rnd.server.unmask({})


def test_tampered_or_misrouted_shares_fail_to_decrypt() -> None:
    rnd, routed = _routed(3)
    flipped = bytearray(routed[1][2])
    flipped[-1] ^= 1
    with pytest.raises(SecAggError, match="from site 2 fail to decrypt"):
        rnd.sites[1].masked_input({2: bytes(flipped), 3: routed[1][3]}, rnd.deltas[1], 1.0)
    # Shares 3 -> 2 presented to site 2 as coming from 3 -> 2 is fine; as 1 -> 2 it is not.
    with pytest.raises(SecAggError, match="from site 1 fail to decrypt"):
        rnd.sites[2].masked_input({1: routed[2][3], 3: routed[2][3]}, rnd.deltas[2], 1.0)


def test_malformed_share_packet_leaves_the_site_out() -> None:
    rnd = make_round(params_for(5, NORM_BOUND, MAX_WEIGHT))
    adverts = rnd.server.collect_adverts({i: s.advertise() for i, s in rnd.sites.items()})
    packets = {i: s.share_keys(adverts) for i, s in rnd.sites.items()}
    packets[4] = {peer: ct[:-1] for peer, ct in packets[4].items()}
    routed = rnd.server.route_shares(packets)
    assert 4 not in routed and all(4 not in cts for cts in routed.values())
    assert f"{CIPHERTEXT_BYTES} bytes" in rnd.server.state.rejected[4]


def test_messages_from_sites_out_of_the_round_are_rejected() -> None:
    rnd = make_round(params_for(10, NORM_BOUND, MAX_WEIGHT))
    adverts = {i: s.advertise() for i, s in rnd.sites.items() if i != 8}
    accepted = rnd.server.collect_adverts(adverts)
    packets = {i: rnd.sites[i].share_keys(accepted) for i in accepted}
    packets[8] = {}
    routed = rnd.server.route_shares(packets)
    masked = {
        i: rnd.sites[i].masked_input(routed[i], rnd.deltas[i], rnd.weights[i]) for i in routed
    }
    masked[8] = masked[1]
    requests = confirmed(rnd, rnd.server.collect_masked(masked))
    assert "without an accepted advert" in rnd.server.state.rejected[8]
    result = rnd.server.unmask({i: rnd.sites[i].unmask(r) for i, r in requests.items()})
    assert_close(rnd, result, set(range(1, 11)) - {8})


def test_malformed_masked_input_counts_as_dropped() -> None:
    rnd, routed = _routed()
    masked = {
        i: rnd.sites[i].masked_input(routed[i], rnd.deltas[i], rnd.weights[i]) for i in routed
    }
    masked[5] = masked[5][:-1]
    requests = confirmed(rnd, rnd.server.collect_masked(masked))
    result = rnd.server.unmask({i: rnd.sites[i].unmask(r) for i, r in requests.items()})
    assert result.dropped == (5,) and "shape" in result.rejected[5]
    assert_close(rnd, result, {1, 2, 3, 4})


# The two halves of what the coordinator reconstructs at unmask: a survivor's self-mask seed b
# (its share in ``seed_shares``) and a dropped site's pairwise mask key s_sk (``key_shares``).
HALVES = {"seed": ("seed_shares", "self-mask seed"), "key": ("key_shares", "pairwise mask key")}
DROPPED = 5  # of 5 sites: sends no masked input, so its mask key is reconstructed


def _unmask_with_one_corrupted_share(half: str, owner: int, holder: int) -> SecAggResult:
    """A 5-site round where site 5 drops after sharing; ``holder``'s share of ``owner``'s
    secret (the ``half`` one) has one byte flipped before the coordinator unmasks."""
    rnd, requests = _site_after_masking(5, dropped={DROPPED})
    replies = {i: rnd.sites[i].unmask(r) for i, r in requests.items()}
    field_name = HALVES[half][0]
    shares = dict(getattr(replies[holder], field_name))
    # Byte 8, all bits: X25519 clamps bits of bytes 0 and 31, so a flip there may be harmless.
    share = bytearray(shares[owner])
    share[8] ^= 0xFF
    shares[owner] = bytes(share)
    replies[holder] = dataclasses.replace(replies[holder], **{field_name: shares})
    result = rnd.server.unmask(replies)
    assert_close(rnd, result, set(rnd.sites) - {DROPPED})  # a share the coordinator did not use
    return result


@pytest.mark.parametrize(("half", "owner"), [("seed", 3), ("key", DROPPED)])
def test_a_corrupted_share_of_either_half_is_detected_and_named(half: str, owner: int) -> None:
    """Whichever holder's share is corrupted, the sum is exact or the unmask fails naming the
    half, the site and the holders whose shares were combined (the corrupt one among them);
    and the lowest holder's share, which is always used, does make it fail.

    Without the check of a rebuilt secret against the signed advert, a corrupted share of
    either half gives a wrong sum silently (about 5e3 off, against a bound of 1e-5).
    """
    holders = sorted(set(neighbours(params_for(5, NORM_BOUND, MAX_WEIGHT), owner, CONTEXT)))
    holders = [h for h in holders if h != DROPPED]  # only survivors answer the unmask request
    named = rf"reconstructed {HALVES[half][1]} of site {owner} contradicts"
    detected = []
    for holder in holders:
        try:
            _unmask_with_one_corrupted_share(half, owner, holder)
        except SecAggError as err:
            assert re.search(named, str(err)), str(err)
            listed = re.search(r"shares from sites \[([0-9, ]+)\]", str(err))
            assert listed and holder in {int(x) for x in listed.group(1).split(",")}, str(err)
            detected.append(holder)
    assert holders[0] in detected, (holders, detected)  # the first t holders' shares are used


def test_reply_with_unrequested_shares_is_ignored() -> None:
    rnd, requests = _site_after_masking(10)
    replies = {i: rnd.sites[i].unmask(r) for i, r in requests.items()}
    replies[2] = UnmaskReply(seed_shares={}, key_shares={7: bytes(32)})
    result = rnd.server.unmask(replies)
    assert "seed shares" in result.rejected[2]
    assert_close(rnd, result, rnd.sites)


@pytest.mark.parametrize("weight", [-1.0, MAX_WEIGHT + 1, float("nan"), True])
def test_site_rejects_weight_out_of_range(weight: float) -> None:
    rnd, routed = _routed()
    with pytest.raises(SecAggError, match="weight"):
        rnd.sites[1].masked_input(routed[1], rnd.deltas[1], weight)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_site_rejects_non_finite_delta(bad: float) -> None:
    rnd, routed = _routed()
    delta = rnd.deltas[1].copy()
    delta[7] = bad
    with pytest.raises(SecAggError, match="NaN/Inf"):
        rnd.sites[1].masked_input(routed[1], delta, 1.0)


def test_site_rejects_integer_delta() -> None:
    rnd, routed = _routed()
    with pytest.raises(SecAggError, match="floating point"):
        rnd.sites[1].masked_input(routed[1], np.zeros(LENGTH, dtype=np.int32), 1.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"degree": 3},  # odd degree with odd N: no 3-regular graph on 5 vertices
        {"threshold": 2},  # not above (degree + 1) / 2 holders
        {"threshold": 5},  # above degree
        {"min_survivors": 1},
        {"degree": 5},
        {"threshold": 3.0},
    ],
)
def test_impossible_parameters_are_config_errors(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="secure aggregation parameter"):
        params_for(5, NORM_BOUND, MAX_WEIGHT, **kwargs)


@pytest.mark.parametrize(("degree", "threshold"), [(3, 2), (1, 1)])
def test_threshold_must_exceed_half_of_the_holders(degree: int, threshold: int) -> None:
    # With the own share a secret has k + 1 holders: t = 2 of 4 would let two disjoint pairs
    # of holders reveal one site's b and s_sk.
    with pytest.raises(ConfigError, match="secure aggregation parameter"):
        params_for(10, NORM_BOUND, MAX_WEIGHT, degree=degree, threshold=threshold)


def test_unmask_reply_carries_the_sites_own_seed_share() -> None:
    rnd, requests = _site_after_masking()
    reply = rnd.sites[1].unmask(requests[1])
    assert set(reply.seed_shares) == {1, *requests[1].survivors}
    assert set(reply.key_shares) == set(requests[1].dropped)


@pytest.mark.parametrize(
    ("norm_bound", "max_weight"),
    [(0.0, 1.0), (1.0, -1.0), (float("inf"), 1.0), (1.0, float("nan"))],
)
def test_params_for_refuses_bad_bounds(norm_bound: float, max_weight: float) -> None:
    with pytest.raises(ConfigError, match="expected a finite number > 0"):
        params_for(5, norm_bound, max_weight)


def test_hand_made_scale_that_could_wrap_is_refused() -> None:
    params = params_for(10, NORM_BOUND, MAX_WEIGHT)
    with pytest.raises(ConfigError, match="2\\*\\*31"):
        dataclasses.replace(params, scale=params.scale * 1.01)


def test_params_for_scale_uses_the_whole_int32_range() -> None:
    params = params_for(10, NORM_BOUND, MAX_WEIGHT)
    assert 10 * params.level_bound <= 2**31 - 1 < 10 * (params.level_bound + 2)
    assert params.weight_scale == 2**17  # largest power of two with 10 * 1000 * 2**k < 2**31


@pytest.mark.parametrize(("sites", "weight", "clip"), [(3, 1.0, 1.0), (10, 1000.0, 0.5)])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_reported_error_bound_matches_the_fixed_point_design(
    sites: int, weight: float, clip: float, rounding: str
) -> None:
    """What the code reports as its error bound (runs log it) is the design's, not larger."""
    params = params_for(sites, clip, weight, rounding=rounding)  # type: ignore[arg-type]
    for summed in (1, sites):
        design = sum_error_bound(sites, weight, clip, summed, rounding == "stochastic")
        assert max_abs_error_per_coordinate(params, summed) == pytest.approx(design, rel=1e-5)


def test_params_for_refuses_error_above_target() -> None:
    with pytest.raises(ConfigError, match="max_error"):
        params_for(10, NORM_BOUND, 1e6, max_error=1e-6)


def test_prg_is_the_chacha20_keystream() -> None:
    # RFC 8439 appendix A.1, test vector 1: zero key, zero nonce, block counter 0.
    expected = bytes.fromhex("76b8e0ada0f13d90405d6ae55386bd28")
    assert prg(bytes(32), 4).tobytes() == expected
    assert prg(b"\x01" * 32, 4).tobytes() != expected


def test_prg_rejects_short_key() -> None:
    with pytest.raises(SecAggError, match="PRG key must be 32 bytes"):
        prg(bytes(16), 4)


def test_key_derivation_binds_direction_and_pair() -> None:
    secret = bytes(range(32))
    assert pair_mask_key(secret, CONTEXT, 2, 5) == pair_mask_key(secret, CONTEXT, 5, 2)
    assert pair_mask_key(secret, CONTEXT, 2, 5) != pair_mask_key(secret, b"other", 2, 5)
    assert share_key(secret, CONTEXT, 2, 5) != share_key(secret, CONTEXT, 5, 2)


def test_shamir_any_t_shares_reconstruct_fewer_do_not() -> None:
    secret = bytes(range(32))
    shares = split_secret(secret, 3, 5)
    assert all(len(share) == 32 for share in shares)
    for subset in ((1, 2, 3), (2, 4, 5), (5, 3, 1)):
        assert combine_secret({i: shares[i - 1] for i in subset}) == secret
    assert combine_secret({1: shares[0], 2: shares[1]}) != secret


def test_full_adapter_size_timing(capsys: pytest.CaptureFixture[str]) -> None:
    """N = 10, L = 460 800 (SmolLM2-135M r=8 on q and v): correctness plus timings."""
    length = 460_800
    rnd = make_round(params_for(10, NORM_BOUND, MAX_WEIGHT), length=length)
    clock = time.perf_counter
    start = clock()
    adverts = rnd.server.collect_adverts({i: s.advertise() for i, s in rnd.sites.items()})
    packets = {i: rnd.sites[i].share_keys(adverts) for i in adverts}
    t_share = clock()
    routed = rnd.server.route_shares(packets)
    masked = {
        i: rnd.sites[i].masked_input(routed[i], rnd.deltas[i], rnd.weights[i])
        for i in routed
        if i != 10
    }
    t_mask = clock()
    requests = confirmed(rnd, rnd.server.collect_masked(masked))
    replies = {i: rnd.sites[i].unmask(r) for i, r in requests.items()}
    t_collect = clock()
    result = rnd.server.unmask(replies)
    t_end = clock()
    assert_close(rnd, result, set(range(1, 10)))
    with capsys.disabled():
        print(
            f"\nsecagg N=10 L={length} 1 dropout: setup+share {t_share - start:.3f} s (all sites),"
            f" masked_input {(t_mask - t_share) / 9:.3f} s/site,"
            f" collect {t_collect - t_mask:.3f} s, unmask {t_end - t_collect:.3f} s (server)"
        )


# --- Flat records and site state across processes ----------------------------------------


def wire(record: Mapping[str, Any]) -> dict[str, Any]:
    """A record as Flower would carry or persist it: ConfigRecord -> protobuf -> ConfigRecord."""
    try:
        from flwr.common import ConfigRecord
        from flwr.common.serde import config_record_from_proto, config_record_to_proto
    except ImportError:  # Flower is optional here: fall back to a shallow copy
        return {key: list(v) if isinstance(v, list) else v for key, v in record.items()}
    proto = config_record_to_proto(ConfigRecord(dict(record)))
    return dict(config_record_from_proto(proto))


def run_serialized(rnd: Round, drop_after_share: Collection[int] = ()) -> SecAggResult:
    """All five stages with every site rebuilt from its persisted state before each stage and
    every message packed into a record and back, as in Flower with one process per stage."""
    peer_keys = {i: key.public_key() for i, key in rnd.identity.items()}
    states = {i: wire(site.to_state()) for i, site in rnd.sites.items()}

    def stage(i: int) -> SecAggSite:
        return SecAggSite.from_state(states[i], rnd.identity[i], peer_keys)

    def save(i: int, site: SecAggSite) -> None:
        states[i] = wire(site.to_state())

    advert_records = {}
    for i in states:
        site = stage(i)
        advert_records[i] = wire(advert_to_record(site.advertise()))
        save(i, site)
    adverts = rnd.server.collect_adverts(
        {i: advert_from_record(rec) for i, rec in advert_records.items()}
    )
    broadcast = wire(adverts_to_record(adverts))

    share_records = {}
    for i in adverts:
        site = stage(i)
        share_records[i] = wire(shares_to_record(site.share_keys(adverts_from_record(broadcast))))
        save(i, site)
    routed = rnd.server.route_shares(
        {i: shares_from_record(rec) for i, rec in share_records.items()}
    )

    for i, ciphertexts in routed.items():
        if i in drop_after_share:
            continue
        site = stage(i)
        received = shares_from_record(wire(shares_to_record(ciphertexts)))
        rnd.masked[i] = site.masked_input(received, rnd.deltas[i], rnd.weights[i])
        save(i, site)
    confirm_records = {}
    for i, request in rnd.server.collect_masked(rnd.masked).items():
        site = stage(i)
        unpacked_list = confirm_request_from_record(wire(confirm_request_to_record(request)))
        confirm_records[i] = wire(confirmation_to_record(site.confirm(unpacked_list)))
        save(i, site)
    requests = rnd.server.collect_confirmations(
        {i: confirmation_from_record(r) for i, r in confirm_records.items()}
    )

    reply_records = {}
    for i, request in requests.items():
        site = stage(i)
        unpacked = unmask_request_from_record(wire(unmask_request_to_record(request)))
        reply_records[i] = wire(unmask_reply_to_record(site.unmask(unpacked)))
        save(i, site)
    return rnd.server.unmask({i: unmask_reply_from_record(r) for i, r in reply_records.items()})


def test_round_with_site_state_persisted_between_every_stage() -> None:
    params = params_for(5, NORM_BOUND, MAX_WEIGHT)
    serialized, in_memory = make_round(params, seed=7), make_round(params, seed=7)
    result = run_serialized(serialized, drop_after_share={2})
    plain = run(in_memory, drop_after_share={2})
    assert result.dropped == plain.dropped == (2,)
    assert_close(serialized, result, {1, 3, 4, 5})
    assert_close(in_memory, plain, {1, 3, 4, 5})
    # Same inputs, different keys: nearest rounding is deterministic and masks cancel exactly.
    np.testing.assert_array_equal(result.weighted_sum, plain.weighted_sum)
    assert result.total_weight == plain.total_weight


def _state_after_masking() -> tuple[Round, dict[str, Any]]:
    """Site 1's state after masked_input: it holds adverts and shares."""
    rnd, routed = _routed()
    rnd.sites[1].masked_input(routed[1], rnd.deltas[1], rnd.weights[1])
    return rnd, rnd.sites[1].to_state()


def test_site_state_round_trips_and_keeps_its_stage() -> None:
    rnd, state = _state_after_masking()
    restored = SecAggSite.from_state(wire(state), rnd.identity[1])
    assert restored.to_state() == state
    assert restored.neighbours == rnd.sites[1].neighbours
    with pytest.raises(SecAggError, match="expected confirm"):
        restored.masked_input({}, rnd.deltas[1], 1.0)
    everyone = ConfirmRequest(tuple(sorted(rnd.sites)))
    signature = restored.confirm(everyone)
    assert signature == rnd.sites[1].confirm(everyone)  # Ed25519 is deterministic
    confirmed_state = restored.to_state()
    assert confirmed_state["confirmed-survivors"] == list(everyone.survivors)
    restored = SecAggSite.from_state(wire(confirmed_state), rnd.identity[1])
    # Without peer keys only its own signature is checked; the others count as relayed.
    signatures = {i: signature if i == 1 else bytes(64) for i in rnd.sites}
    request = UnmaskRequest(restored.neighbours, (), signatures)
    assert restored.unmask(request) == rnd.sites[1].unmask(request)
    done = SecAggSite.from_state(restored.to_state(), rnd.identity[1])
    with pytest.raises(SecAggError, match="expected done"):
        done.unmask(request)


def test_fresh_site_state_round_trips() -> None:
    rnd = make_round(params_for(3, NORM_BOUND, MAX_WEIGHT))
    state = rnd.sites[2].to_state()
    assert state["stage"] == 0 and state["advert-ids"] == [] and state["held-ids"] == []
    restored = SecAggSite.from_state(wire(state), rnd.identity[2])
    assert restored.advertise() == rnd.sites[2].advertise()  # same keys and seed: same advert


TOO_MANY = list(range(1, MAX_SITES + 2))


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("state-version", 1),  # before the own seed share
        ("state-version", 2),  # before the confirmed survivor list
        ("state-version", 4),
        ("stage", 6),
        ("stage", -1),
        ("stage", True),
        ("stage", "2"),
        ("site-id", 0),
        ("site-id", 6),
        ("site-id", 1.0),
        ("context", b""),
        ("context", "round-1"),
        ("context", bytes(2000)),
        ("num-sites", 1),
        ("num-sites", 2**40),
        ("threshold", 9),
        ("clip-range", float("nan")),
        ("clip-range", True),
        ("scale", "big"),
        ("rounding", "up"),
        ("encryption-private-key", bytes(31)),
        ("mask-private-key", "key"),
        ("seed", None),
        ("advert-ids", "1234"),
        ("advert-ids", [2, 2, 3, 4]),
        ("advert-ids", [2, 3, 4, 1]),  # itself: not a neighbour
        ("advert-ids", [2, 3, 4, True]),
        ("advert-ids", TOO_MANY),
        ("advert-signatures", [bytes(64)] * 3),
        ("advert-mask-keys", [bytes(32)] * 3 + [bytes(33)]),
        ("held-ids", [2, 3, 4, 9]),
        ("held-ids", TOO_MANY),
        ("held-seed-shares", [bytes(32)] * 5),
        ("held-key-shares", [b"short"] * 4),
        ("own-seed-share", []),  # stage 3 without the share made in share_keys
        ("own-seed-share", [bytes(32)] * 2),
        ("own-seed-share", [bytes(31)]),
    ],
)
def test_malformed_site_state_is_refused(key: str, value: object) -> None:
    rnd, state = _state_after_masking()
    assert state["advert-ids"] == [2, 3, 4, 5] and state["held-ids"] == [2, 3, 4, 5]
    with pytest.raises(SecAggError):
        SecAggSite.from_state({**state, key: value}, rnd.identity[1])


def test_inconsistent_or_incomplete_site_state_is_refused() -> None:
    rnd, state = _state_after_masking()
    identity = rnd.identity[1]
    with pytest.raises(SecAggError, match="before their stage"):
        SecAggSite.from_state({**state, "stage": 2}, identity)  # shares held before masking
    adverts = adverts_from_record(state)
    fewer = adverts_to_record({i: a for i, a in adverts.items() if i != 2})  # holds 2's shares
    with pytest.raises(SecAggError, match="without an accepted advert"):
        SecAggSite.from_state({**state, **fewer}, identity)
    with pytest.raises(SecAggError, match="missing fields \\['seed'\\]"):
        SecAggSite.from_state({k: v for k, v in state.items() if k != "seed"}, identity)
    with pytest.raises(SecAggError, match="1 unknown fields"):
        SecAggSite.from_state({**state, "signing-key": b"x"}, identity)
    with pytest.raises(SecAggError, match="must be a mapping"):
        SecAggSite.from_state([("seed", b"")], identity)  # type: ignore[arg-type]


def _valid_records() -> dict[str, tuple[Callable[[Any], object], dict[str, Any]]]:
    rnd, requests = _site_after_masking()
    reply = rnd.sites[1].unmask(requests[1])
    advert = rnd.server.state.adverts[1]
    shares = {2: bytes(CIPHERTEXT_BYTES), 3: bytes(CIPHERTEXT_BYTES)}
    split = UnmaskRequest(
        survivors=(2, 3), dropped=(4,), confirmations={2: bytes(64), 5: b"s" * 64}
    )
    two_way = UnmaskReply(seed_shares=dict(reply.seed_shares), key_shares={4: bytes(32)})
    return {
        "advert": (advert_from_record, advert_to_record(advert)),
        "adverts": (adverts_from_record, adverts_to_record(rnd.server.state.adverts)),
        "shares": (shares_from_record, shares_to_record(shares)),
        "request": (unmask_request_from_record, unmask_request_to_record(split)),
        "reply": (unmask_reply_from_record, unmask_reply_to_record(two_way)),
    }


def test_message_records_round_trip() -> None:
    for name, (unpack, record) in _valid_records().items():
        message = unpack(wire(record))
        repack = {
            "advert": advert_to_record,
            "adverts": adverts_to_record,
            "shares": shares_to_record,
            "request": unmask_request_to_record,
            "reply": unmask_reply_to_record,
        }[name]
        assert repack(message) == record  # type: ignore[operator]


@pytest.mark.parametrize(
    ("message", "key", "value"),
    [
        ("advert", "site-id", 0),
        ("advert", "site-id", MAX_SITES + 1),
        ("advert", "site-id", True),
        ("advert", "site-id", "1"),
        ("advert", "encryption-key", bytes(31)),
        ("advert", "mask-key", "key"),
        ("advert", "seed-commitment", [bytes(32)]),
        ("advert", "signature", bytes(63)),
        ("adverts", "advert-ids", [1, 2, 3, 4]),  # lists of 5
        ("adverts", "advert-ids", [1, 2, 3, 4, 4]),
        ("adverts", "advert-ids", [1, 2, 3, 4, 5.0]),
        ("adverts", "advert-ids", b"\x01\x02\x03\x04\x05"),
        ("adverts", "advert-ids", TOO_MANY),
        ("adverts", "advert-signatures", [bytes(64)] * 6),
        ("adverts", "advert-encryption-keys", [bytes(32)] * 4 + [None]),
        ("adverts", "advert-seed-commitments", 5),
        ("shares", "share-ids", [2]),
        ("shares", "share-ids", [2, -3]),
        ("shares", "share-ciphertexts", [bytes(CIPHERTEXT_BYTES), bytes(32)]),
        ("shares", "share-ciphertexts", [bytes(CIPHERTEXT_BYTES)] * MAX_SITES * 2),
        ("request", "survivors", (2, "3")),
        ("request", "survivors", [2, 2]),
        ("request", "dropped", 4),
        ("request", "dropped", TOO_MANY),
        ("reply", "seed-shares", [bytes(32)]),
        ("reply", "key-shares", [bytes(31)]),
        ("reply", "key-share-ids", [4, 5]),
        ("reply", "seed-share-ids", None),
    ],
)
def test_malformed_message_records_are_refused(message: str, key: str, value: object) -> None:
    unpack, record = _valid_records()[message]
    with pytest.raises(SecAggError):
        unpack({**record, key: value})
    with pytest.raises(SecAggError, match="no field"):
        unpack({k: v for k, v in record.items() if k != key})
    with pytest.raises(SecAggError, match="must be a mapping"):
        unpack(list(record.items()))


def test_misfiled_advert_cannot_be_packed() -> None:
    rnd = make_round(params_for(3, NORM_BOUND, MAX_WEIGHT))
    with pytest.raises(SecAggError, match="claims site 1"):
        adverts_to_record({2: rnd.sites[1].advertise()})
