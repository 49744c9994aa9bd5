"""A frozen base model with named LoRA modules attached: what both sides evaluate and train on.

Each module is a peft named adapter on one base, initialised from a seed and its name, so a
module starts the same at the coordinator and at every site. A site trains on its host
(``client.site``); the coordinator publishes its host's initialisation as version 0 and
evaluates the shared modules on it (``server.federation``). No Flower here.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from transformers import PreTrainedModel

from common.adapters import AdapterState
from common.config import ModelConfig, ModuleConfig, Task
from common.errors import ModelError, UpdateRejected
from common.models import LoadedBase, load_base


def lora_config(module: ModuleConfig, task: Task) -> LoraConfig:
    """The peft ``LoraConfig`` of one module, for a causal LM or a sequence classifier."""
    return LoraConfig(
        r=module.rank,
        lora_alpha=module.alpha,
        lora_dropout=module.dropout,
        target_modules=list(module.targets),
        task_type=TaskType.CAUSAL_LM if task == "causal-lm" else TaskType.SEQ_CLS,
        bias="none",
    )


def module_seed(seed: int, module: str) -> int:
    """The init seed of one module: the same wherever it is attached, whatever else is."""
    return (seed * 1_000_003 + zlib.crc32(module.encode())) % (2**31 - 1)


def attach_adapters(
    model: PreTrainedModel, configs: Mapping[str, LoraConfig], seed: int
) -> PeftModel:
    """Inject one named LoRA adapter per module into ``model`` (in place), all active.

    Each module's initialisation is seeded by (``seed``, its name), so a module starts the
    same at the coordinator and at every site, whichever other modules each one holds. The
    coordinator publishes its initialisation as version 0; sites overwrite it with the global
    weights they receive.
    """
    names = sorted(configs)
    peft_model: PeftModel | None = None
    for name in names:
        config = configs[name]
        missing = [m for m in config.target_modules or [] if not _has_module(model, m)]
        if missing:
            raise ModelError(f"modules.{name}.targets: no module named {missing} in the base model")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(module_seed(seed, name))
            if peft_model is None:
                peft_model = get_peft_model(model, config, adapter_name=name)
            else:
                peft_model.add_adapter(name, config)
    if peft_model is None:
        raise ModelError("no adapter module to attach")
    activate(peft_model, names)
    return peft_model


def activate(model: PeftModel, modules: list[str]) -> None:
    """Make ``modules`` the active (and trainable) adapters; the others are left out."""
    if len(modules) == 1:
        model.set_adapter(modules[0])
    else:  # peft's multi-adapter forward: the active adapters' products are summed
        tuner: Any = model.base_model  # peft's LoraModel; typed as a Module attribute
        tuner.set_adapter(list(modules))


def _has_module(model: torch.nn.Module, suffix: str) -> bool:
    return any(name.split(".")[-1] == suffix for name, _ in model.named_modules())


def adapter_state(model: PeftModel, module: str) -> AdapterState:
    """One module's trainable tensors (peft's saved key names), as float32 CPU copies."""
    state = get_peft_model_state_dict(model, adapter_name=module)
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in state.items()}


def load_adapter_state(model: PeftModel, state: AdapterState, module: str) -> None:
    """Overwrite one module with ``state``; its keys and shapes must match exactly."""
    current = get_peft_model_state_dict(model, adapter_name=module)
    if set(current) != set(state):
        missing = sorted(set(current) - set(state))[:3]
        extra = sorted(set(state) - set(current))[:3]
        raise UpdateRejected(
            f"module {module!r}: adapter keys differ: missing {missing}, unexpected {extra}"
        )
    for key, tensor in state.items():
        if tuple(current[key].shape) != tuple(tensor.shape):
            raise UpdateRejected(
                f"module {module!r}: adapter tensor {key}: expected shape "
                f"{tuple(current[key].shape)}, got {tuple(tensor.shape)}"
            )
    result = set_peft_model_state_dict(model, state, adapter_name=module)
    unexpected = list(getattr(result, "unexpected_keys", []))
    if unexpected:
        raise UpdateRejected(f"module {module!r}: peft did not accept keys {unexpected[:3]}")


class AdapterHost:
    """A frozen base model with named LoRA modules attached; shared by sites in one process."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        modules: Mapping[str, ModuleConfig],
        num_labels: int | None,
        base: LoadedBase | None = None,
    ) -> None:
        # ``base``: one already loaded from ``model_cfg`` with ``num_labels`` (the site daemon's
        # start-up check), used instead of loading it again; LoRA is injected into it in place.
        self.base: LoadedBase = base or load_base(model_cfg, num_labels=num_labels)
        self.task = model_cfg.task
        self.modules = {name: modules[name] for name in sorted(modules)}
        self.loras = {name: lora_config(m, model_cfg.task) for name, m in self.modules.items()}
        self.model: PeftModel = attach_adapters(self.base.model, self.loras, seed=model_cfg.seed)
        # Each module's seeded initialisation: where a private module starts at every site.
        self.initial = self.states()

    @property
    def pad_token_id(self) -> int:
        pad = self.base.tokenizer.pad_token_id
        return int(pad if pad is not None else self.base.tokenizer.eos_token_id)

    def states(self) -> dict[str, AdapterState]:
        """Every module's current tensors (float32 CPU copies)."""
        return {name: adapter_state(self.model, name) for name in self.modules}

    def load(self, states: Mapping[str, AdapterState], active: list[str] | None = None) -> None:
        """Overwrite the modules in ``states`` and make ``active`` (default: those) active."""
        for name, state in states.items():
            if name not in self.modules:
                raise UpdateRejected(f"module {name!r} is not attached here ({list(self.modules)})")
            load_adapter_state(self.model, state, name)
        activate(self.model, sorted(states) if active is None else active)
