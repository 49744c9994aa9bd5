"""One site's runtime: its base model, adapter and data, and the two things it does per round.

``SiteRuntime.train`` turns a received global adapter into a *delta* (trained - received);
``SiteRuntime.evaluate`` measures the received global adapter on the site's held-out split.
No Flower and no crypto here; ``client.app`` is the glue that carries these over messages.
"""

from __future__ import annotations

import logging

import torch
from peft import PeftModel

from client.data import Kind, SiteData
from client.site_api import SiteUpdate as SiteUpdate
from client.tokens import encode_examples, eval_batches, iterate_batches
from client.train import (
    EvalResult,
    StepCallback,
    adapter_state,
    attach_adapter,
    evaluate,
    freeze_lora_a,
    load_adapter_state,
    lora_config,
    train_local,
)
from common.adapters import AdapterState, compute_delta
from common.config import ModelConfig, ModuleConfig, SitePlan
from common.dp import clip_delta
from common.errors import FingerprintMismatch
from common.models import LoadedBase, load_base
from common.rules import get_rule

logger = logging.getLogger(__name__)

# Eval batches are forward-only, so they can be larger than training batches.
EVAL_BATCH_SIZE = 16


class AdapterHost:
    """A frozen base model with one LoRA module attached; shared by sites in one process."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        module: ModuleConfig,
        num_labels: int | None,
        base: LoadedBase | None = None,
    ) -> None:
        # ``base``: one already loaded from ``model_cfg`` with ``num_labels`` (the site daemon's
        # start-up check), used instead of loading it again; LoRA is injected into it in place.
        self.base: LoadedBase = base or load_base(model_cfg, num_labels=num_labels)
        self.task = model_cfg.task
        self.module = module
        self.lora = lora_config(module, model_cfg.task)
        self.model: PeftModel = attach_adapter(self.base.model, self.lora, seed=model_cfg.seed)

    @property
    def pad_token_id(self) -> int:
        pad = self.base.tokenizer.pad_token_id
        return int(pad if pad is not None else self.base.tokenizer.eos_token_id)


def round_seed(seed: int, server_round: int, site_index: int) -> int:
    """A distinct, reproducible seed for each (run seed, round, site)."""
    return (seed * 1_000_003 + server_round * 1_009 + site_index) % (2**31 - 1)


class SiteRuntime:
    """A site's data plus the adapter host it trains on."""

    def __init__(
        self, host: AdapterHost, data: SiteData, kind: Kind, site_id: str, site_index: int
    ) -> None:
        self.host = host
        self.data = data
        self.kind = kind
        self.site_id = site_id
        self.site_index = site_index
        self._encoded: dict[tuple[str, int], list[dict[str, torch.Tensor]]] = {}

    @property
    def fingerprint(self) -> str:
        return self.host.base.fingerprint

    def check_fingerprint(self, expected: str) -> None:
        """Refuse to work for a coordinator whose base model differs from ours."""
        if expected != self.fingerprint:
            raise FingerprintMismatch(expected, self.fingerprint, where=self.site_id)

    def _items(self, split: str, max_length: int) -> list[dict[str, torch.Tensor]]:
        key = (split, max_length)
        if key not in self._encoded:
            examples = self.data.train if split == "train" else self.data.heldout
            self._encoded[key] = encode_examples(
                examples, self.kind, self.host.base.tokenizer, max_length
            )
        return self._encoded[key]

    def train(
        self,
        received: AdapterState,
        plan: SitePlan,
        server_round: int,
        on_step: StepCallback | None = None,
        private: AdapterState | None = None,
    ) -> SiteUpdate:
        """Train from ``received`` (+ this site's ``private`` tensors) and return the delta.

        The rule decides what trains and what leaves: ``ffa`` freezes A (identical at every
        site) and sends B; ``fedsa`` sends A and keeps B here; the others send everything.
        """
        start = {**received, **(private or {})}
        load_adapter_state(self.host.model, start)
        rule = get_rule(plan.rule)
        freeze_lora_a(self.host.model, frozen=plan.rule == "ffa")
        seed = round_seed(plan.train.seed, server_round, self.site_index)
        items = self._items("train", plan.train.max_length)
        batches = iterate_batches(items, plan.train.batch_size, seed, self.host.pad_token_id)
        result = train_local(self.host.model, batches, plan.train, seed, on_step)
        trained = adapter_state(self.host.model)
        delta = compute_delta(trained, start)
        sent_keys = set(rule.sent_keys(delta))
        sent = {k: v for k, v in delta.items() if k in sent_keys}
        scale = 1.0
        if plan.clip is not None:
            sent, scale = clip_delta(sent, plan.clip)
        kept = {k: v for k, v in trained.items() if k not in sent_keys and plan.rule == "fedsa"}
        return SiteUpdate(sent, kept, len(self.data.train), result, scale)

    def evaluate(
        self, received: AdapterState, plan: SitePlan, private: AdapterState | None = None
    ) -> EvalResult:
        """Evaluate ``received`` (+ this site's ``private`` tensors) on the held-out split."""
        load_adapter_state(self.host.model, {**received, **(private or {})})
        items = self._items("heldout", plan.train.max_length)
        batches = eval_batches(items, EVAL_BATCH_SIZE, self.host.pad_token_id)
        return evaluate(self.host.model, batches, self.host.task)
