"""Whether a registered adapter fits a new base model: its targets exist, its shapes match.

A base update (a vendor point release, a security patch) changes the weights and so the
fingerprint; before an adapter is carried over, ``check_fit`` answers whether it can be applied
at all: every target module of its ``adapter_config.json`` exists in the new base, every saved
tensor belongs to a module of the new base with the shape that module needs (LoRA A is
``rank x in_features``, B is ``out_features x rank``; a saved head has its parameter's shape),
and the new base has no targeted layer the adapter holds no tensors for. Both fingerprints are
reported; a different fingerprint is what a base update is, not a misfit.

Reads only the adapter files' headers and the model's module tree: no forward pass, no peft.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import safe_open

from common.registry import Registry
from common.registry_format import ADAPTER_FILE, CONFIG_FILE, RegistryVersion

# peft's saved key names: ``base_model.model.<module path>.lora_A.weight`` for the factors,
# ``base_model.model.<module path>.<parameter>`` for a saved module (a classification head).
PEFT_PREFIX = "base_model.model."
_FACTOR = re.compile(r"(?P<module>.+)\.(?P<factor>lora_A|lora_B)\.weight")


@dataclass(frozen=True)
class ModuleFit:
    """One registered version checked against a new base."""

    module: str
    version: int
    recorded_fingerprint: str | None  # the base the version was trained on (its manifest)
    new_fingerprint: str
    targets: list[str]
    tensors: int
    misfits: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.module}/v{self.version:04d}"

    @property
    def fits(self) -> bool:
        return not self.misfits

    @property
    def same_base(self) -> bool:
        return self.recorded_fingerprint == self.new_fingerprint


def _targets(config: dict[str, Any]) -> list[str] | str:
    targets = config.get("target_modules") or []
    return targets if isinstance(targets, str) else sorted(str(t) for t in targets)


def _targeted(name: str, targets: list[str] | str) -> bool:
    """peft's rule: a regex must match the whole module name, a list entry its last parts."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith(f".{t}") for t in targets)


def _io_features(module: torch.nn.Module) -> tuple[int, int] | None:
    """(in, out) features of a layer LoRA can wrap: Linear, GPT-2's Conv1D, Embedding."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, torch.nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor):
        return int(weight.shape[0]), int(weight.shape[1])  # Conv1D stores (in, out)
    return None


def _factor_misfit(
    key: str, shape: tuple[int, ...], factor: str, module: torch.nn.Module
) -> str | None:
    features = _io_features(module)
    if features is None:
        return f"{key}: {type(module).__name__} in the new base is not a layer LoRA can wrap"
    rank = shape[0] if factor == "lora_A" else shape[-1]
    expected = (rank, features[0]) if factor == "lora_A" else (features[1], rank)
    if shape != expected:
        return f"{key}: shape {shape}, the new base's layer needs {expected}"
    return None


def _tensor_misfits(shapes: dict[str, tuple[int, ...]], model: torch.nn.Module) -> list[str]:
    """Each saved tensor against the module or parameter of the new base it belongs to."""
    modules = dict(model.named_modules())
    parameters = dict(model.named_parameters())
    misfits = []
    for key, shape in sorted(shapes.items()):
        path = key.removeprefix(PEFT_PREFIX)
        factor = _FACTOR.fullmatch(path)
        if factor is not None:
            module = modules.get(factor["module"])
            if module is None:
                misfits.append(f"{key}: the new base has no module {factor['module']!r}")
            elif (problem := _factor_misfit(key, shape, factor["factor"], module)) is not None:
                misfits.append(problem)
            continue
        parameter = parameters.get(path)
        if parameter is None:
            misfits.append(f"{key}: the new base has no parameter {path!r}")
        elif tuple(parameter.shape) != shape:
            misfits.append(f"{key}: shape {shape}, the new base's is {tuple(parameter.shape)}")
    return misfits


def _coverage_misfits(
    shapes: dict[str, tuple[int, ...]], model: torch.nn.Module, targets: list[str] | str
) -> list[str]:
    """Target names absent from the new base, and targeted layers the adapter lacks."""
    names = [name for name, _ in model.named_modules() if name]
    misfits = []
    if isinstance(targets, str):
        if not any(_targeted(n, targets) for n in names):
            misfits.append(f"target pattern {targets!r} matches no module of the new base")
    else:
        missing = [t for t in targets if not any(_targeted(n, [t]) for n in names)]
        misfits += [f"target module {t!r} does not exist in the new base" for t in missing]
    held = {m["module"] for k in shapes if (m := _FACTOR.fullmatch(k.removeprefix(PEFT_PREFIX)))}
    targeted = {
        name
        for name, module in model.named_modules()
        if name and _targeted(name, targets) and _io_features(module) is not None
    }
    lacking = sorted(targeted - held)
    if held and lacking:
        more = f" and {len(lacking) - 3} more" if len(lacking) > 3 else ""
        misfits.append(
            "the new base has targeted layers the adapter holds no factors for: "
            f"{', '.join(lacking[:3])}{more}"
        )
    return misfits


def check_fit(entry: RegistryVersion, model: torch.nn.Module, fingerprint: str) -> ModuleFit:
    """Check one registered version against ``model`` (a base without adapters)."""
    config = json.loads((entry.path / CONFIG_FILE).read_text(encoding="utf-8"))
    with safe_open(str(entry.path / ADAPTER_FILE), framework="pt") as handle:
        shapes = {
            key: tuple(int(n) for n in handle.get_slice(key).get_shape())
            for key in handle.keys()  # noqa: SIM118 - safe_open has no __iter__
        }
    targets = _targets(config)
    misfits = _coverage_misfits(shapes, model, targets) + _tensor_misfits(shapes, model)
    recorded = entry.manifest.get("base_fingerprint")
    return ModuleFit(
        module=entry.module,
        version=entry.version,
        recorded_fingerprint=recorded if isinstance(recorded, str) else None,
        new_fingerprint=fingerprint,
        targets=[targets] if isinstance(targets, str) else targets,
        tensors=len(shapes),
        misfits=misfits,
    )


def check_base(registry: Registry, model: torch.nn.Module, fingerprint: str) -> list[ModuleFit]:
    """Every module's latest version against the new base, in module order."""
    fits = []
    for module in registry.modules():
        latest = registry.latest(module)
        if latest is not None:
            fits.append(check_fit(latest, model, fingerprint))
    return fits
