"""SCAFFOLD's drift correction at one site (Karimireddy et al. 2020): control variates.

Under label skew every site's gradient points toward its own labels, so a few local steps
drift away from where the pooled data would take the model ("client drift"). SCAFFOLD keeps
two estimates of the gradient: the site's own ``c_i`` (kept at the site, never sent) and the
federation's ``c`` (the coordinator's weighted mean of the ``c_i``, sent with each train
instruction). Every local step uses ``g_i(y) - c_i + c`` instead of ``g_i(y)``: the site's
bias is replaced by the federation's, while the step still follows the site's own curvature.

After the round the site's new estimate is the mean of the raw gradients it saw in its
steps, which is the paper's option II, ``c_i - c + (x - y) / (K lr)``, for plain SGD, and
stays an unbiased estimate with momentum, schedules, accumulation or clipping. The site sends
``c_i(new) - c_i`` (a sum, like the delta: secure-sum compatible) and keeps ``c_i(new)``.

Keys are the delta's ``<module>/<key>``; peft's key for each trained tensor is found by
identity of storage, so no name rewriting is guessed here.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from peft import PeftModel, get_peft_model_state_dict

from common.adapters import AdapterState
from common.errors import UpdateRejected
from common.modules import SEPARATOR

# Where a site keeps its own control variate between rounds: beside its kept tensors, under
# this prefix, which no module name can take (common.scopes.MODULE_NAME has no ':').
KEPT_PREFIX = "scaffold:"


def trained_parameters(model: PeftModel, modules: list[str]) -> dict[str, torch.nn.Parameter]:
    """``<module>/<key>`` -> the parameter it names, for every trainable tensor of ``modules``."""
    by_storage = {(p.data_ptr(), tuple(p.shape)): p for p in model.parameters() if p.requires_grad}
    out: dict[str, torch.nn.Parameter] = {}
    for module in modules:
        for key, tensor in get_peft_model_state_dict(model, adapter_name=module).items():
            param = by_storage.get((tensor.data_ptr(), tuple(tensor.shape)))
            if param is not None:
                out[f"{module}{SEPARATOR}{key}"] = param
    return out


class DriftCorrection:
    """The correction ``c - c_i`` on a site's trained tensors, and the mean of its gradients.

    ``params``: ``<module>/<key>`` -> parameter (``trained_parameters``), the tensors the
    coordinator aggregates. ``glob`` (``c``) and ``own`` (``c_i``) hold the same keys; a key
    missing from either is zero there (the first round, or a new module).
    """

    def __init__(
        self,
        params: Mapping[str, torch.nn.Parameter],
        glob: Mapping[str, torch.Tensor],
        own: Mapping[str, torch.Tensor],
    ) -> None:
        unknown = sorted(set(glob) - set(params))
        if unknown:
            raise UpdateRejected(
                f"the coordinator's control variate names tensors this site does not train: "
                f"{unknown[:3]}"
            )
        self.params = dict(params)
        self.own = {k: own[k].float() for k in self.params if k in own}
        self._correction: dict[str, torch.Tensor] = {}
        for key, param in self.params.items():
            c = glob.get(key)
            c_i = own.get(key)
            for name, tensor in (("control variate", c), ("own control variate", c_i)):
                if tensor is not None and tuple(tensor.shape) != tuple(param.shape):
                    raise UpdateRejected(
                        f"{name} {key}: expected shape {tuple(param.shape)}, "
                        f"got {tuple(tensor.shape)}"
                    )
            diff = torch.zeros(param.shape, dtype=torch.float32)
            if c is not None:
                diff += c.float()
            if c_i is not None:
                diff -= c_i.float()
            self._correction[key] = diff.to(param.device, param.dtype)
        self._grad_sum = {k: torch.zeros(p.shape, dtype=torch.float32) for k, p in params.items()}
        self.steps = 0

    def record_and_correct(self) -> None:
        """After the data loss's backward: add the raw gradients to the mean, then correct."""
        for key, param in self.params.items():
            if param.grad is None:
                continue
            self._grad_sum[key] += param.grad.detach().float().cpu()
            param.grad.add_(self._correction[key])
        self.steps += 1

    def new_own(self) -> AdapterState:
        """``c_i(new)``: the mean raw gradient over this round's steps."""
        if self.steps == 0:
            raise ValueError("no training step was recorded")
        return {k: v / self.steps for k, v in self._grad_sum.items()}

    def sent(self, new_own: Mapping[str, torch.Tensor]) -> AdapterState:
        """``c_i(new) - c_i``: what the site sends (the coordinator sums these)."""
        return {k: v - self.own[k] if k in self.own else v.clone() for k, v in new_own.items()}


def split_kept(kept: Mapping[str, torch.Tensor]) -> tuple[AdapterState, AdapterState]:
    """Kept tensors -> (the modules' kept tensors, this site's control variate ``c_i``)."""
    own = {k[len(KEPT_PREFIX) :]: v for k, v in kept.items() if k.startswith(KEPT_PREFIX)}
    rest = {k: v for k, v in kept.items() if not k.startswith(KEPT_PREFIX)}
    return rest, own


def join_kept(kept: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> AdapterState:
    """The inverse of ``split_kept``."""
    return {**kept, **{f"{KEPT_PREFIX}{k}": v for k, v in own.items()}}
