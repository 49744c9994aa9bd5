"""Site-level differential privacy for adapter deltas: clipping, Gaussian noise, RDP accounting.

The protected unit is one site's whole contribution in one round (site-level DP, the
user-level DP of DP-FedAvg, McMahan et al. 2018, "Learning Differentially Private Recurrent
Language Models"). Each round, every site clips its delta (all LoRA factors and saved modules
together) to global L2 norm ``C``; the SUM of clipped deltas then changes by at most ``C`` in
L2 when one site is added or removed, and Gaussian noise of std ``sigma * C`` on that sum makes
the round an ``(alpha, alpha / (2 sigma**2))``-RDP Gaussian mechanism. Rounds compose; with
Poisson sampling of sites at rate ``q < 1`` the RDP accountant also credits amplification.
Clipping and noise act on the transmitted factors, not on ``B @ A``; anything computed from the
noisy aggregate (the product, the next global adapter) is post-processing.

Two noise placements (``site_noise_std`` / ``coordinator_noise_std`` say who adds what):

``"central"``
    Sites add nothing; the coordinator adds N(0, (sigma C)^2) once per coordinate to the sum of
    clipped deltas. Trust assumption: the coordinator sees the un-noised sum (secure-sum) or
    every individual delta (sealed) and is trusted to add the noise and keep the raw values in
    memory only. The guarantee protects sites against everyone who sees the aggregate or the
    models built from it, not against the coordinator.
``"distributed"``
    For ``secure-sum``: each site adds N(0, (sigma C)^2 / m) with ``m = min_sites``, so the sum
    of ``m`` or more survivors carries variance >= (sigma C)^2 and the coordinator, which learns
    only that sum, is itself held to the guarantee. Caveat: if fewer than ``m`` sites survive,
    the sum carries less noise than the target; choose ``m`` equal to the secure-sum
    reconstruction threshold, below which the round fails anyway. Every survivor beyond ``m``
    adds noise beyond the target (utility cost, never a privacy cost). The guarantee also
    assumes at least ``m`` honest sites really add their noise. Secure-sum encodes noisy deltas
    in fixed point mod 2^32: its range must cover ``C + 6 * site_std`` per coordinate (or wrap
    with tiny probability), and the analysis treats quantization as negligible next to the
    noise; a rigorous discrete treatment is the distributed discrete Gaussian (Kairouz, Liu and
    Steinke 2021), not implemented here.

Weights: an example-weighted mean ``sum(n_i x_i) / sum(n_i)`` has a sensitivity that depends
on the weights and a denominator that leaks the cohort. DP-FedAvg instead sums clipped deltas
with weights in [0, 1] (uniform weight 1 here, so each site moves the sum by at most ``C``) and
divides by a FIXED denominator, the expected cohort size (``dp_aggregate_mean``); the mean then
has sensitivity ``C / denominator`` under add/remove-one-site.

Sampling: amplification (``q < 1``) holds only if the coordinator selects each site
independently with probability ``q`` (Poisson sampling, as in DP-FedAvg). A fixed-size cohort
drawn without replacement is not what ``PoissonSampledDpEvent`` models; use ``q = 1`` for it
to stay conservative. ``federation.fraction-train`` draws such a fixed-size cohort, and the
coordinator draws it and knows it, so there is no amplification against the coordinator at
all: the run's accountant keeps ``q = 1`` (``server.aggregate``), and the noise and the fixed
denominator follow the cohort (``common.config.fewest_survivors``, ``expected_train_cohort``).

Config section proposed for ``common/config.py`` (not added here)::

    class DpConfig(Section):
        # [privacy.dp]
        enabled: bool = False
        clip: Annotated[float, Field(gt=0)] = 1.0             # C: L2 bound on a site's delta
        noise_multiplier: Annotated[float, Field(gt=0)] = 1.0  # sigma: sum noise std = sigma*C
        delta: Annotated[float, Field(gt=0, lt=1)] = 1e-5      # keep well below 1 / total sites
        epsilon_budget: Annotated[float, Field(gt=0)] | None = None  # stop before exceeding it
        placement: Literal["central", "distributed"] = "central"
        # distributed only: survivors the noise is sized for; None = the secure-sum threshold
        min_sites: PositiveInt | None = None

with a validator refusing ``placement = "distributed"`` unless ``privacy.mode = "secure-sum"``
(in sealed mode the coordinator sees each delta with only ``1/sqrt(m)`` of the noise).
The sampling rate is not a key: it is cohort size / total sites from ``[federation]``.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from functools import lru_cache
from typing import Any, Literal

import dp_accounting
import torch
from dp_accounting import rdp

from common.adapters import AdapterState, check_values, delta_norm
from common.errors import ConfigError, FedloraError

NoisePlacement = Literal["central", "distributed"]

# Version tag of ``PrivacyAccountant.state()``: resuming with another accountant kind would
# silently change epsilon, so a state from a different one is refused.
_ACCOUNTANT_KIND = "rdp"
# Relative tolerance on sigma in ``noise_multiplier_for``; epsilon moves about as much.
_SIGMA_RTOL = 1e-4
# Bracket for sigma in ``noise_multiplier_for``: below 1e-3 epsilon is astronomically large,
# above 1e6 it is ~0 for any realistic number of rounds.
_SIGMA_MIN, _SIGMA_MAX = 1e-3, 1e6


class PrivacyBudgetExceeded(FedloraError):
    """Running one more round would spend more than the configured epsilon budget."""

    def __init__(self, spent: float, next_epsilon: float, budget: float, rounds: int) -> None:
        super().__init__(
            f"privacy budget: {rounds} rounds have spent epsilon={spent:.4g}; one more round "
            f"would reach epsilon={next_epsilon:.4g}, above privacy.dp.epsilon-budget="
            f"{budget:.4g}; stopping before that round (raise the budget or noise-multiplier "
            "to train longer)"
        )
        self.spent = spent
        self.next_epsilon = next_epsilon
        self.budget = budget
        self.rounds = rounds


def _check_positive(name: str, value: float) -> None:
    """Raise ``ConfigError`` naming ``name`` unless ``value`` is a finite number > 0."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} is {value!r}, expected a finite number > 0")


def _check_rounds(rounds: int) -> None:
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ConfigError(f"rounds is {rounds!r}, expected an integer >= 0")


def _check_sampling_rate(sampling_rate: float) -> None:
    if not (math.isfinite(sampling_rate) and 0 < sampling_rate <= 1):
        raise ConfigError(
            f"sampling rate (cohort / total sites) is {sampling_rate!r}, expected 0 < q <= 1"
        )


def _check_delta(delta: float) -> None:
    if not (math.isfinite(delta) and 0 < delta < 1):
        raise ConfigError(f"privacy.dp.delta is {delta!r}, expected 0 < delta < 1")


def clip_delta(delta: Mapping[str, torch.Tensor], max_norm: float) -> tuple[AdapterState, float]:
    """Scale a delta so that its global L2 norm (over all tensors) is at most ``max_norm``.

    Parameters
    ----------
    delta
        One site's delta, floating point and finite.
    max_norm
        The clip bound ``C`` (``privacy.dp.clip``), > 0.

    Returns
    -------
    tuple[AdapterState, float]
        Float32 copies scaled by ``min(1, C / norm)``, and that factor (1.0 when the norm is
        already <= C, which includes the zero delta). The direction is unchanged. The scaled
        norm is C up to float32 rounding (about 1e-7 relative).

    Raises
    ------
    ConfigError
        ``max_norm`` is not a finite number > 0.
    UpdateRejected
        A tensor is not floating point or holds NaN/Inf (its norm would be meaningless).
    """
    _check_positive("privacy.dp.clip", max_norm)
    check_values(delta)
    norm = delta_norm(delta)
    # Scale computed in float64; applied in float32, the dtype deltas travel in.
    scale = 1.0 if norm <= max_norm else max_norm / norm
    clipped = {key: tensor.detach().to(torch.float32) * scale for key, tensor in delta.items()}
    return clipped, scale


def secure_generator(device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator seeded with 64 bits from the OS CSPRNG (``secrets``/``os.urandom``).

    Production noise must come from here: a guessable seed (0, a run seed, a timestamp) lets
    anyone regenerate the noise and subtract it. Torch's generators are not cryptographic
    (MT19937 on CPU, Philox on CUDA); that is acceptable because their outputs are never
    published, only added to the delta, so the secret that matters is the seed.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(secrets.randbits(64))
    return generator


def add_gaussian_noise(
    delta: Mapping[str, torch.Tensor], std: float, generator: torch.Generator
) -> AdapterState:
    """Add independent N(0, std^2) noise to every coordinate of a delta.

    Parameters
    ----------
    delta
        The (clipped) delta or sum of clipped deltas.
    std
        Noise standard deviation per coordinate, in delta units (e.g. ``sigma * C``); >= 0.
    generator
        Source of the noise. Tests pass a fixed seed; production passes
        ``secure_generator()``. Tensors are drawn in sorted key order, so that the noise a
        key gets does not depend on the mapping's order: a resumed run rebuilds its state
        from a checkpoint that stores keys sorted, and must draw what the first run drew.

    Returns
    -------
    AdapterState
        New float32 tensors on ``delta``'s devices; ``delta`` is left unchanged.

    Raises
    ------
    ConfigError
        ``std`` is negative or not finite.
    """
    if not (math.isfinite(std) and std >= 0):
        raise ConfigError(f"noise std is {std!r}, expected a finite number >= 0")
    noisy: AdapterState = {}
    for key in sorted(delta):
        base = delta[key].detach().to(torch.float32)
        noise = torch.randn(
            base.shape, generator=generator, dtype=torch.float32, device=generator.device
        )
        noisy[key] = base + noise.to(base.device) * std
    return {key: noisy[key] for key in delta}


def central_noise_std(noise_multiplier: float, clip: float) -> float:
    """Std of the noise on the sum of clipped deltas, ``sigma * C`` (delta units)."""
    _check_positive("privacy.dp.noise-multiplier", noise_multiplier)
    _check_positive("privacy.dp.clip", clip)
    return noise_multiplier * clip


def distributed_noise_std(noise_multiplier: float, clip: float, min_sites: int) -> float:
    """Std each site adds so that the sum of ``min_sites`` sites has std ``sigma * C``.

    Independent variances add: ``m`` sites with std ``sigma C / sqrt(m)`` sum to variance
    ``(sigma C)^2``. More survivors add more noise (never less privacy); fewer add less than
    the target, which is why ``m`` should be the smallest cohort the round may complete with.

    Raises
    ------
    ConfigError
        A parameter is not positive, or ``min_sites`` is not an integer >= 1.
    """
    if isinstance(min_sites, bool) or not isinstance(min_sites, int) or min_sites < 1:
        raise ConfigError(f"privacy.dp.min-sites is {min_sites!r}, expected an integer >= 1")
    return central_noise_std(noise_multiplier, clip) / math.sqrt(min_sites)


def site_noise_std(
    noise_multiplier: float, clip: float, placement: NoisePlacement, min_sites: int
) -> float:
    """Std of the noise one site adds to its own clipped delta: 0 in central placement."""
    if placement == "central":
        central_noise_std(noise_multiplier, clip)  # validates the parameters
        return 0.0
    if placement == "distributed":
        return distributed_noise_std(noise_multiplier, clip, min_sites)
    raise ConfigError(f"privacy.dp.placement is {placement!r}, expected 'central' or 'distributed'")


def coordinator_noise_std(noise_multiplier: float, clip: float, placement: NoisePlacement) -> float:
    """Std of the noise the coordinator adds to the sum: ``sigma * C`` central, 0 distributed."""
    if placement == "central":
        return central_noise_std(noise_multiplier, clip)
    if placement == "distributed":
        central_noise_std(noise_multiplier, clip)  # validates the parameters
        return 0.0
    raise ConfigError(f"privacy.dp.placement is {placement!r}, expected 'central' or 'distributed'")


def dp_aggregate_mean(
    sum_of_clipped: Mapping[str, torch.Tensor],
    noise_std: float,
    num_sites_expected: float,
    generator: torch.Generator | None = None,
) -> AdapterState:
    """Noisy mean of clipped deltas with a fixed denominator (DP-FedAvg).

    Parameters
    ----------
    sum_of_clipped
        Sum over the round's sites of their clipped deltas, each with weight 1 (or a weight
        in [0, 1]); in distributed placement it already holds the sites' noise.
    noise_std
        Std the coordinator adds per coordinate: ``coordinator_noise_std(...)``.
    num_sites_expected
        The fixed denominator: the expected cohort size (``q * total sites``), or the expected
        total weight with weights in [0, 1]. Not the actual count, which would make the
        sensitivity depend on who took part.
    generator
        Noise source; ``None`` draws a ``secure_generator()``. Unused when ``noise_std`` is 0.

    Returns
    -------
    AdapterState
        Float32 ``(sum + noise) / num_sites_expected``.

    Raises
    ------
    ConfigError
        ``num_sites_expected`` is not > 0 or ``noise_std`` is negative.
    """
    _check_positive("expected cohort size", num_sites_expected)
    if noise_std > 0 and generator is None:
        generator = secure_generator()
    if generator is None:  # noise_std == 0: nothing to draw
        noisy = {key: tensor.detach().to(torch.float32) for key, tensor in sum_of_clipped.items()}
    else:
        noisy = add_gaussian_noise(sum_of_clipped, noise_std, generator)
    return {key: tensor / num_sites_expected for key, tensor in noisy.items()}


@lru_cache(maxsize=4096)
def rdp_epsilon(noise_multiplier: float, sampling_rate: float, delta: float, rounds: int) -> float:
    """Epsilon at ``delta`` after ``rounds`` rounds of the (Poisson-sampled) Gaussian mechanism.

    Uses dp_accounting's ``RdpAccountant`` with add/remove-one-site neighbours. Cached: the
    budget check and ``noise_multiplier_for`` ask for the same values repeatedly.
    """
    _check_positive("privacy.dp.noise-multiplier", noise_multiplier)
    _check_sampling_rate(sampling_rate)
    _check_delta(delta)
    _check_rounds(rounds)
    if rounds == 0:
        return 0.0
    event: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sampling_rate < 1.0:
        # Amplification by sampling only applies when sites are Poisson-sampled.
        event = dp_accounting.PoissonSampledDpEvent(sampling_rate, event)
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    return float(accountant.get_epsilon(delta))


def composed_epsilon(releases: tuple[tuple[float, int], ...], delta: float) -> float:
    """Epsilon at ``delta`` after every ``(noise multiplier, rounds)`` Gaussian release.

    RDP composes by adding the orders' curves, so runs at different multipliers add up; a
    single release is ``rdp_epsilon(multiplier, 1.0, delta, rounds)``.
    """
    _check_delta(delta)
    accountant = rdp.RdpAccountant()
    for noise_multiplier, rounds in releases:
        _check_positive("privacy.dp.noise-multiplier", noise_multiplier)
        _check_rounds(rounds)
        event = dp_accounting.GaussianDpEvent(noise_multiplier)
        accountant.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    return float(accountant.get_epsilon(delta))


class PrivacyAccountant:
    """Epsilon spent by a run: the Gaussian mechanism composed over rounds, RDP accounting.

    Parameters
    ----------
    noise_multiplier
        ``sigma``: noise std on the sum divided by the clip bound ``C``.
    sampling_rate
        ``q`` = expected cohort / total sites; 1.0 when every site joins every round (no
        amplification). Values below 1 assume Poisson sampling of sites.
    delta
        The delta epsilon is reported at.
    rounds
        Rounds already composed (for resuming); normally 0.
    """

    def __init__(
        self, noise_multiplier: float, sampling_rate: float, delta: float, rounds: int = 0
    ) -> None:
        _check_positive("privacy.dp.noise-multiplier", noise_multiplier)
        _check_sampling_rate(sampling_rate)
        _check_delta(delta)
        _check_rounds(rounds)
        self.noise_multiplier = float(noise_multiplier)
        self.sampling_rate = float(sampling_rate)
        self.delta = float(delta)
        self._rounds = rounds

    @property
    def rounds(self) -> int:
        """Rounds composed so far."""
        return self._rounds

    def step(self, rounds: int = 1) -> None:
        """Record ``rounds`` more rounds in which noisy sums were computed."""
        _check_rounds(rounds)
        self._rounds += rounds

    def epsilon(self) -> float:
        """Epsilon spent so far, at the configured delta (0.0 before the first round)."""
        return self.epsilon_after(self._rounds)

    def epsilon_after(self, rounds: int) -> float:
        """Epsilon after ``rounds`` rounds in total, without changing this accountant."""
        return rdp_epsilon(self.noise_multiplier, self.sampling_rate, self.delta, rounds)

    def state(self) -> dict[str, Any]:
        """JSON-serialisable parameters and round count, for checkpoints; epsilon is recomputed."""
        return {
            "accountant": _ACCOUNTANT_KIND,
            "noise_multiplier": self.noise_multiplier,
            "sampling_rate": self.sampling_rate,
            "delta": self.delta,
            "rounds": self._rounds,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> PrivacyAccountant:
        """Rebuild an accountant from ``state()``.

        Raises
        ------
        ConfigError
            The state is from another accountant kind, lacks a key, or holds a bad value.
        """
        kind = state.get("accountant")
        if kind != _ACCOUNTANT_KIND:
            raise ConfigError(
                f"privacy accountant state has accountant={kind!r}, expected {_ACCOUNTANT_KIND!r}"
            )
        missing = {"noise_multiplier", "sampling_rate", "delta", "rounds"} - set(state)
        if missing:
            raise ConfigError(f"privacy accountant state lacks {sorted(missing)}")
        return cls(
            noise_multiplier=state["noise_multiplier"],
            sampling_rate=state["sampling_rate"],
            delta=state["delta"],
            rounds=state["rounds"],
        )

    def __repr__(self) -> str:
        return (
            f"PrivacyAccountant(noise_multiplier={self.noise_multiplier}, sampling_rate="
            f"{self.sampling_rate}, delta={self.delta}, rounds={self._rounds})"
        )


def check_budget(accountant: PrivacyAccountant, epsilon_budget: float | None) -> None:
    """Refuse to start a round that would take epsilon above the budget.

    Call it BEFORE a round; call ``accountant.step()`` once the round has started (sites
    uploaded), so that the run stops cleanly before the round that exceeds the budget.

    Parameters
    ----------
    accountant
        The run's accountant.
    epsilon_budget
        ``privacy.dp.epsilon-budget``; ``None`` means no budget (never raises).

    Raises
    ------
    PrivacyBudgetExceeded
        ``accountant.epsilon_after(accountant.rounds + 1) > epsilon_budget``.
    ConfigError
        The budget is not a finite number > 0.
    """
    if epsilon_budget is None:
        return
    _check_positive("privacy.dp.epsilon-budget", epsilon_budget)
    next_epsilon = accountant.epsilon_after(accountant.rounds + 1)
    if next_epsilon > epsilon_budget:
        raise PrivacyBudgetExceeded(
            accountant.epsilon(), next_epsilon, epsilon_budget, accountant.rounds
        )


def noise_multiplier_for(
    epsilon: float, delta: float, rounds: int, sampling_rate: float = 1.0
) -> float:
    """Smallest noise multiplier whose epsilon after ``rounds`` rounds is <= ``epsilon``.

    Bisection on log(sigma) (epsilon decreases monotonically in sigma) to a relative
    tolerance of 1e-4; returns the upper end so that the budget is met, not just approached.

    Raises
    ------
    ConfigError
        A parameter is out of range, ``rounds`` is 0, or no sigma in [1e-3, 1e6] reaches the
        target (``epsilon`` absurdly small).
    """
    _check_positive("target epsilon", epsilon)
    _check_rounds(rounds)
    if rounds == 0:
        raise ConfigError("rounds is 0: any noise multiplier meets the budget")

    def eps_at(sigma: float) -> float:
        return rdp_epsilon(sigma, sampling_rate, delta, rounds)

    low, high = _SIGMA_MIN, _SIGMA_MAX
    if eps_at(high) > epsilon:
        raise ConfigError(
            f"no noise multiplier <= {_SIGMA_MAX:g} reaches epsilon={epsilon} at delta={delta} "
            f"after {rounds} rounds"
        )
    if eps_at(low) <= epsilon:
        return low
    while high / low > 1 + _SIGMA_RTOL:
        middle = math.sqrt(low * high)  # geometric midpoint: sigma spans nine decades
        if eps_at(middle) <= epsilon:
            high = middle
        else:
            low = middle
    return high
