"""Server optimizers: how the coordinator moves the global adapter by the aggregated delta.

The aggregated delta Delta (a rule's output) is a descent direction; its negative is the
pseudo-gradient of Reddi et al. 2021, "Adaptive Federated Optimization". Every optimizer here
computes in float32 with element-wise operations only, so a step is deterministic, and its
state (moments, step count, hyperparameters) round-trips through ``state_dict`` /
``load_state_dict`` so that a resumed run continues bit-identically.

- ``sgd``:     x <- x + lr * Delta                       (lr = 1 is plain FedAvg)
- ``fedavgm``: m <- momentum * m + Delta;  x <- x + lr * m      (Hsu et al. 2019)
- ``fedadam``: m <- b1 m + (1 - b1) Delta;  v <- b2 v + (1 - b2) Delta^2;
               x <- x + lr * m / (sqrt(v) + tau)                (Reddi et al. 2021, Alg. 2)

``fedadam`` has no bias correction, as in the paper; m and v start at zero as in Flower's
``FedAdam`` (the paper allows any v_{-1} >= tau^2; tau bounds the denominator either way).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import ClassVar

import torch

from common.adapters import AdapterState, apply_delta, check_delta, check_shapes, state_shapes
from common.config import AggregationConfig, TrainConfig
from common.errors import ConfigError

StateDict = dict[str, torch.Tensor | float | int]

# Config key of each hyperparameter, for error messages (``[aggregation]`` in the run TOML).
_CONFIG_KEYS = {
    "lr": "aggregation.server-lr",
    "lr_final": "aggregation.server-lr-final",
    "schedule_rounds": "federation.rounds",
    "momentum": "aggregation.server-momentum",
    "beta1": "aggregation.server-beta1",
    "beta2": "aggregation.server-beta2",
    "tau": "aggregation.server-tau",
}


def _check_hyperparameter(
    name: str, value: float, low: float, high: float | None = None, *, open_low: bool = False
) -> float:
    """``value`` as a float if finite and within its range, else a ConfigError naming its key."""
    above = value > low if open_low else value >= low
    if not (math.isfinite(value) and above and (high is None or value < high)):
        bound = f"{'>' if open_low else '>='} {low:g}" + (
            f" and < {high:g}" if high is not None else ""
        )
        raise ConfigError(f"{_CONFIG_KEYS[name]} = {value!r}, expected a number {bound}")
    return float(value)


# ``wsd`` decays over the last fifth of the rounds (warmup-stable-decay without the warm-up).
WSD_DECAY_FRACTION = 0.2


def lr_factor(schedule: str, final: float, rounds: int, step: int) -> float:
    """The learning-rate multiplier of step ``step`` (0-based) of ``rounds``.

    ``constant``: 1. ``cosine``: from 1 at the first step to ``final`` at the last
    (``final + (1 - final) * (1 + cos(pi * step / (rounds - 1))) / 2``), ``final`` after it.
    ``wsd`` (stable, then decay): 1 until the last ``d = max(1, round(0.2 * rounds))`` steps,
    then a linear decay that reaches ``final`` at the last step (``final`` after it).
    """
    if schedule not in ("constant", "cosine", "wsd"):
        raise ConfigError(
            f"aggregation.server-lr-schedule = {schedule!r}, expected 'constant', 'cosine' or 'wsd'"
        )
    if schedule == "constant" or rounds <= 1:
        return 1.0
    if schedule == "wsd":
        decay = max(1, round(WSD_DECAY_FRACTION * rounds))
        into = min(step, rounds - 1) - (rounds - decay) + 1  # 1..decay inside the decay
        return 1.0 if into <= 0 else 1.0 - (1.0 - final) * into / decay
    progress = min(step, rounds - 1) / (rounds - 1)
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def scheduled_train(
    train: TrainConfig, agg: AggregationConfig, rounds: int, server_round: int
) -> TrainConfig:
    """``train`` with its lr decayed by the run's schedule for ``server_round`` (1-based) of
    ``rounds``: what ``fedlora compare``'s in-process arms use in place of a server lr."""
    factor = lr_factor(agg.server_lr_schedule, agg.server_lr_final, rounds, server_round - 1)
    return train if factor == 1.0 else train.model_copy(update={"lr": train.lr * factor})


class ServerOptimizer(ABC):
    """Moves a global adapter state by an aggregated delta and keeps its own state.

    Subclasses name their per-tensor slots (``slot_names``) and compute the step direction
    from the delta (``_direction``); this class validates, counts steps, applies
    ``x + lr * direction`` (``apply_delta``) and checkpoints.

    Parameters
    ----------
    lr
        Server learning rate, > 0.
    """

    name: ClassVar[str]
    slot_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, lr: float) -> None:
        self.lr = _check_hyperparameter("lr", lr, 0.0, open_low=True)
        self.steps = 0
        self.slots: dict[str, AdapterState] = {slot: {} for slot in self.slot_names}
        self.schedule = "constant"
        self.lr_final = 1.0
        self.schedule_rounds = 1

    def set_schedule(self, schedule: str, final: float, rounds: int) -> None:
        """Decay ``lr`` over ``rounds`` steps (``lr_factor``); ``constant`` leaves it."""
        lr_factor(schedule, final, rounds, 0)  # validates the name
        self.schedule = schedule
        if schedule != "constant":
            if not (math.isfinite(final) and 0.0 < final <= 1.0):
                raise ConfigError(f"{_CONFIG_KEYS['lr_final']} = {final!r}, expected (0, 1]")
            self.lr_final = float(final)
            self.schedule_rounds = int(rounds)

    def current_lr(self) -> float:
        """The learning rate of the next step."""
        return self.lr * lr_factor(self.schedule, self.lr_final, self.schedule_rounds, self.steps)

    def hyperparameters(self) -> dict[str, float]:
        """The settings a checkpoint must agree with, by hyperparameter name."""
        if self.schedule == "constant":
            return {"lr": self.lr}
        return {"lr": self.lr, "lr_final": self.lr_final,
                "schedule_rounds": float(self.schedule_rounds)}  # fmt: skip

    @abstractmethod
    def _direction(self, delta: AdapterState) -> AdapterState:
        """Update the slots with ``delta`` (float32) and return the step direction."""

    def step(
        self, global_state: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]
    ) -> AdapterState:
        """One server step: the new global state ``x + lr * direction(delta)``.

        Parameters
        ----------
        global_state
            The current global state (left unchanged); keys are the keys the rule aggregated.
        delta
            The aggregated delta, same keys and shapes as ``global_state``.

        Returns
        -------
        AdapterState
            The new state in ``global_state``'s dtypes, computed in float32.

        Raises
        ------
        UpdateRejected
            If ``delta`` does not match ``global_state`` or the optimizer's slots, or holds
            non-finite values; the optimizer's state is then left unchanged.
        """
        check_delta(delta, global_state)
        for slot in self.slots.values():
            if slot:
                check_shapes(state_shapes(delta), state_shapes(slot), what="delta (vs. moments)")
        delta32 = {
            key: tensor.detach().to(device=global_state[key].device, dtype=torch.float32)
            for key, tensor in delta.items()
        }
        for slot in self.slots.values():
            if not slot:
                slot.update({key: torch.zeros_like(t) for key, t in delta32.items()})
        direction = self._direction(delta32)
        lr = self.current_lr()
        self.steps += 1
        return apply_delta(global_state, direction, lr)

    def state_dict(self) -> StateDict:
        """A copy of the optimizer state: ``steps``, hyperparameters and ``<slot>/<key>`` tensors.

        Every value is a tensor, float or int, so ``torch.save`` / ``torch.load(...,
        weights_only=True)`` round-trips it exactly.
        """
        state: StateDict = {"steps": self.steps, **self.hyperparameters()}
        for slot_name, slot in self.slots.items():
            state.update({f"{slot_name}/{key}": t.detach().clone() for key, t in slot.items()})
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor | float | int]) -> None:
        """Restore ``state_dict()``'s result; the next ``step`` matches an uninterrupted run.

        Raises
        ------
        ConfigError
            If the checkpoint was written by another optimizer or with other hyperparameters
            (naming the config key and both values), or is malformed.
        """
        hyper = self.hyperparameters()
        expected = {"steps", *hyper}
        scalars = {key for key in state if "/" not in key}
        if scalars != expected:
            raise ConfigError(
                f"server optimizer checkpoint holds {sorted(scalars)}, but "
                f"aggregation.server-optimizer = {self.name!r} expects {sorted(expected)}"
            )
        for name, value in hyper.items():
            if not isinstance(state[name], float) or state[name] != value:
                raise ConfigError(
                    f"{_CONFIG_KEYS[name]} = {value!r}, but the checkpoint was written with "
                    f"{state[name]!r}; resume with the same setting"
                )
        steps = state["steps"]
        if not isinstance(steps, int) or steps < 0:
            raise ConfigError(f"server optimizer checkpoint: steps is {steps!r}")
        self.slots = self._load_slots(state)
        self.steps = steps

    def _load_slots(
        self, state: Mapping[str, torch.Tensor | float | int]
    ) -> dict[str, AdapterState]:
        """Split ``<slot>/<key>`` entries into slots, checking names, types and shapes."""
        slots: dict[str, AdapterState] = {slot: {} for slot in self.slot_names}
        for name, value in state.items():
            if "/" not in name:
                continue
            slot_name, key = name.split("/", 1)
            if slot_name not in slots or not isinstance(value, torch.Tensor):
                raise ConfigError(
                    f"server optimizer checkpoint entry {name!r} is not a tensor slot of "
                    f"aggregation.server-optimizer = {self.name!r} (slots {self.slot_names})"
                )
            slots[slot_name][key] = value.detach().to(torch.float32).clone()
        shapes = [state_shapes(slot) for slot in slots.values()]
        if any(shape != shapes[0] for shape in shapes):
            raise ConfigError("server optimizer checkpoint: its slots hold different tensors")
        return slots


class ServerSGD(ServerOptimizer):
    """``x <- x + lr * Delta``; lr = 1 applies the aggregate as it is (FedAvg). Stateless."""

    name = "sgd"

    def _direction(self, delta: AdapterState) -> AdapterState:
        return delta


class ServerMomentum(ServerOptimizer):
    """FedAvgM: ``m <- momentum * m + Delta``, ``x <- x + lr * m`` (heavy ball, no dampening).

    Parameters
    ----------
    lr
        Server learning rate, > 0.
    momentum
        Decay of the momentum buffer, in [0, 1); 0 is ``sgd``.
    """

    name = "fedavgm"
    slot_names = ("m",)

    def __init__(self, lr: float, momentum: float) -> None:
        super().__init__(lr)
        self.momentum = _check_hyperparameter("momentum", momentum, 0.0, 1.0)

    def hyperparameters(self) -> dict[str, float]:
        return {**super().hyperparameters(), "momentum": self.momentum}

    def _direction(self, delta: AdapterState) -> AdapterState:
        buffer = self.slots["m"]
        for key, tensor in delta.items():
            buffer[key].mul_(self.momentum).add_(tensor)
        return buffer


class ServerAdam(ServerOptimizer):
    """FedAdam (Reddi et al. 2021, Algorithm 2), without bias correction.

    ``m <- beta1 m + (1 - beta1) Delta``, ``v <- beta2 v + (1 - beta2) Delta^2``,
    ``x <- x + lr * m / (sqrt(v) + tau)``. Each coordinate moves by about ``lr`` per step
    whatever the scale of Delta, so ``lr`` must be far below sgd's 1.0 (the paper tunes it
    over 10^-3 ... 10^0 in its grid; adapters usually want 10^-3 to 10^-2).

    Parameters
    ----------
    lr
        Server learning rate (eta), > 0.
    beta1, beta2
        Decays of the first and second moments, in [0, 1).
    tau
        Adaptivity floor added to sqrt(v), > 0; 1e-3 in the paper.
    """

    name = "fedadam"
    slot_names = ("m", "v")

    def __init__(self, lr: float, beta1: float, beta2: float, tau: float) -> None:
        super().__init__(lr)
        self.beta1 = _check_hyperparameter("beta1", beta1, 0.0, 1.0)
        self.beta2 = _check_hyperparameter("beta2", beta2, 0.0, 1.0)
        self.tau = _check_hyperparameter("tau", tau, 0.0, open_low=True)

    def hyperparameters(self) -> dict[str, float]:
        extra = {"beta1": self.beta1, "beta2": self.beta2, "tau": self.tau}
        return {**super().hyperparameters(), **extra}

    def _direction(self, delta: AdapterState) -> AdapterState:
        first, second = self.slots["m"], self.slots["v"]
        direction: AdapterState = {}
        for key, tensor in delta.items():
            first[key].mul_(self.beta1).add_(tensor, alpha=1.0 - self.beta1)
            second[key].mul_(self.beta2).addcmul_(tensor, tensor, value=1.0 - self.beta2)
            direction[key] = first[key] / (second[key].sqrt() + self.tau)
        return direction


SERVER_OPTIMIZERS = ("sgd", "fedavgm", "fedadam")


def make_server_optimizer(
    name: str,
    lr: float = 1.0,
    momentum: float = 0.9,
    beta1: float = 0.9,
    beta2: float = 0.99,
    tau: float = 1e-3,
) -> ServerOptimizer:
    """The server optimizer ``aggregation.server-optimizer = name`` with its settings.

    Settings an optimizer does not use are ignored (``momentum`` for ``fedadam``, ...).

    Raises
    ------
    ConfigError
        For an unknown name (naming ``aggregation.server-optimizer`` and the known names) or
        a hyperparameter out of range (naming its key).
    """
    if name == "sgd":
        return ServerSGD(lr)
    if name == "fedavgm":
        return ServerMomentum(lr, momentum)
    if name == "fedadam":
        return ServerAdam(lr, beta1, beta2, tau)
    known = ", ".join(repr(known) for known in SERVER_OPTIMIZERS)
    raise ConfigError(
        f"aggregation.server-optimizer = {name!r} is not a known server optimizer; "
        f"expected one of {known}"
    )


def server_optimizer_for(agg: AggregationConfig, rounds: int = 1) -> ServerOptimizer:
    """The server optimizer a run's ``[aggregation]`` section configures, its lr scheduled over
    ``rounds`` (``federation.rounds``)."""
    optimizer = make_server_optimizer(
        agg.server_optimizer,
        agg.server_lr,
        agg.server_momentum,
        agg.server_beta1,
        agg.server_beta2,
        agg.server_tau,
    )
    optimizer.set_schedule(agg.server_lr_schedule, agg.server_lr_final, rounds)
    return optimizer
