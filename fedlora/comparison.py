"""The arms of ``fedlora compare`` measured in process: one ``Comparison`` holds the run's
data, sites and adapter host, trains each in-process arm and evaluates every state the same
way (the global set and each site's held-out split). ``fedlora.compare`` runs the arms and
writes the tables; ``fedlora.compare_full`` adds the full fine-tuning arm.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

from client.site import SiteRuntime
from common.adapter_host import AdapterHost, load_adapter_state
from common.adapters import AdapterState, apply_delta, num_parameters
from common.config import (
    RunConfig,
    SitePlan,
    TrainConfig,
    site_plan,
)
from common.data import Dataset, SiteData, load_dataset
from common.errors import ConfigError
from common.evaluation import EVAL_BATCH_SIZE
from common.modules import join_modules, split_modules
from common.partition import eval_sample, site_data
from common.progress import print_message, round_progress
from common.registry import Registry
from common.rules import all_sent_keys, ffa_sent_keys
from common.server_opt import scheduled_train
from common.tokens import encode_examples, eval_batches
from fedlora.compare_arms import DEFAULT_CURVE_POINTS
from fedlora.compare_curves import (
    CurvePoint,
    curve_rounds,
)
from fedlora.compare_measures import Arm, PeakRSS, Quality, data_bytes, mean_quality, quality_of
from server.metrics import read_metrics

LATENCY_REPEATS = 5


# ---------------------------------------------------------------------------- the arms


class Comparison:
    """The shared split, model and evaluation sets of one ``compare`` run."""

    def __init__(
        self,
        cfg: RunConfig,
        curve_points: int = DEFAULT_CURVE_POINTS,
        reference: TrainConfig | None = None,
    ) -> None:
        if cfg.aggregation.rule == "fedsa":
            raise ConfigError(
                "fedlora compare: aggregation.rule = 'fedsa' keeps every site's B factors at the "
                "site, so the global adapter alone is not a model to evaluate; compare with "
                "fedavg, ffa or exact"
            )
        if cfg.data.path is None:
            raise ConfigError("data.path: compare needs the examples it splits among sites")
        if len(cfg.modules) != 1:
            raise ConfigError(
                f"fedlora compare: modules {sorted(cfg.modules)}: compare runs one module (the "
                "arms train the same adapter); compare a run of several modules per module"
            )
        (self.module,) = cfg.modules
        self.cfg = cfg
        self.dataset: Dataset = load_dataset(cfg.data, label_names=cfg.data.labels)
        labels = self.dataset.label_names
        sites = cfg.federation.sites
        self.splits = [site_data(self.dataset, i, sites, cfg.data) for i in range(sites)]
        modules = {self.module: cfg.modules[self.module].for_site("")}
        self.host = AdapterHost(cfg.model, modules, len(labels) if labels else None)
        self.initial: AdapterState = self.host.initial[self.module]
        self.plan: SitePlan = site_plan(cfg, labels)
        # Local-only, centralized and personalisation train every adapter tensor (head
        # included) on the plain objective, with no privacy mechanism: a site alone, or the
        # pooled data, has no label skew to correct. ``reference``: their own train settings
        # (compare --reference), e.g. AdamW where the federation's sites run SGD.
        plain_train = (reference or self.plan.train).model_copy(
            update={"classifier_loss": "plain", "proximal_mu": 0.0}
        )
        self.plain = self.plan.model_copy(
            update={"rule": "fedavg", "clip": None, "train": plain_train}
        )
        self.curve_rounds = curve_rounds(cfg.federation.rounds, curve_points)
        kind = self.dataset.kind
        self.sites = [
            SiteRuntime(self.host, split, kind, f"site-{i}", i)
            for i, split in enumerate(self.splits)
        ]
        if cfg.data.eval_path is not None:
            evaluation = load_dataset(cfg.data, cfg.data.eval_path, label_names=labels)
            global_examples = eval_sample(
                evaluation.examples, cfg.data.max_eval_examples, cfg.data.seed
            )
        else:
            global_examples = [e for split in self.splits for e in split.heldout]
        self.global_examples = global_examples
        self.global_site = SiteRuntime(self.host, SiteData([], global_examples), kind, "global", 0)

    def groups(self) -> dict[str, str]:
        """Each site's most common ``group`` (data.by value or label) and its example count."""
        described = {}
        for runtime in self.sites:
            examples = runtime.data.train + runtime.data.heldout
            names = Counter(e.group for e in examples if e.group is not None)
            top = f"mostly {names.most_common(1)[0][0]}, " if names else ""
            described[runtime.site_id] = f"{top}{len(examples)} examples"
        return described

    def evaluate(self, state: AdapterState, site: int | None = None) -> Quality:
        """``state`` on the global set and on every site's (or only ``site``'s) held-out."""
        own = self.sites if site is None else [self.sites[site]]
        flat = join_modules({self.module: state})
        global_result = self.global_site.evaluate(flat, self.plain, 0)
        return quality_of(global_result, {s.site_id: s.evaluate(flat, self.plain, 0) for s in own})

    def train(
        self,
        runtime: SiteRuntime,
        plan: SitePlan,
        on_round: Callable[[int, AdapterState], None] | None = None,
        start: AdapterState | None = None,
        rounds: int | None = None,
        label: str | None = None,
    ) -> AdapterState:
        """``runtime`` alone for ``rounds`` (default ``federation.rounds``) rounds.

        From ``start`` (default: the initial adapter); ``on_round(round, state)`` is called
        after each of ``self.curve_rounds``, and with a ``label`` a progress line is printed
        there (``centralized: round 5/50, elapsed 2m10s, ETA 19m30s``).
        """
        state = {k: v.clone() for k, v in (start or self.initial).items()}
        total = rounds or self.cfg.federation.rounds
        began = time.monotonic()
        agg = self.cfg.aggregation
        for server_round in range(1, total + 1):
            flat = join_modules({self.module: state})
            # The federation's lr schedule over rounds (aggregation.server-lr-schedule) decays
            # these arms' own lr alike, so that the comparison stays like for like.
            train = scheduled_train(plan.train, agg, total, server_round)
            scheduled = plan.model_copy(update={"train": train})
            update = runtime.train(flat, scheduled, server_round, server_round - 1)
            state = apply_delta(state, split_modules(update.delta)[self.module])
            if on_round is not None and server_round in self.curve_rounds:
                on_round(server_round, state)
                if label is not None:
                    elapsed = time.monotonic() - began
                    mean = elapsed / server_round
                    print_message(f"{label}: {round_progress(server_round, total, elapsed, mean)}")
        return state

    def _plain_plan(self, steps: int) -> SitePlan:
        """The in-process arms' plan with ``steps`` local steps a round."""
        train = self.plain.train.model_copy(update={"local_steps": steps})
        return self.plain.model_copy(update={"train": train})

    def _figures(self, quality: Quality) -> tuple[float | None, float | None]:
        """(global, own held-out) figure of ``quality``: accuracy, or perplexity (causal LM)."""
        if self.dataset.kind == "classification":
            return quality.global_accuracy, quality.site_accuracy
        return quality.global_perplexity, quality.site_perplexity

    def base(self) -> Arm:
        start = time.perf_counter()
        with PeakRSS() as rss:
            quality = self.evaluate(self.initial)
        return Arm("base", quality, 0, 0, time.perf_counter() - start, rss.peak)

    def local_only(self) -> tuple[Arm, list[CurvePoint]]:
        """Each site alone; its curve is the mean over sites of each round's figures."""
        start, per_site = time.perf_counter(), []
        by_round: dict[int, list[Quality]] = {}

        def record(index: int) -> Callable[[int, AdapterState], None]:
            def on_round(server_round: int, state: AdapterState) -> None:
                by_round.setdefault(server_round, []).append(self.evaluate(state, site=index))

            return on_round

        with PeakRSS() as rss:
            for index, runtime in enumerate(self.sites):
                print_message(f"local-only: site-{index} trains alone")
                self.train(
                    runtime, self.plain, on_round=record(index), label=f"local-only site-{index}"
                )
                per_site.append(by_round[self.cfg.federation.rounds][index])
        curve = [
            CurvePoint(r, *self._figures(mean_quality(q))) for r, q in sorted(by_round.items())
        ]
        arm = Arm(
            "local-only",
            mean_quality(per_site),
            num_parameters(self.initial),
            0,
            time.perf_counter() - start,
            rss.peak,
        )
        return arm, curve

    def personalized(self, federated_state: AdapterState, steps: int) -> Arm:
        """Each site fine-tunes the federated adapter for ``steps`` steps on its own data.

        The plain objective, so the site's own label prior is learned: the model a site
        would deploy for itself. Own held-out = each site's model on its own split; global =
        the mean over the sites' models.
        """
        plan = self._plain_plan(steps)
        start, per_site = time.perf_counter(), []
        with PeakRSS() as rss:
            for index, runtime in enumerate(self.sites):
                print_message(f"personalized: site-{index} fine-tunes the federated adapter")
                state = self.train(runtime, plan, start=federated_state, rounds=1)
                per_site.append(self.evaluate(state, site=index))
        return Arm(
            "personalized",
            mean_quality(per_site),
            num_parameters(self.initial),
            0,
            time.perf_counter() - start,
            rss.peak,
        )

    def centralized(self, equal_steps: bool = False) -> tuple[Arm, list[CurvePoint]]:
        """Pooled data; ``equal_steps``: only a federation's sequential steps per round.

        Plain: local steps x sites per round, the federation's examples budget. With
        ``equal_steps``: local steps per round, as many optimizer steps one after the other as
        the federation takes (FedAvg averages the sites' steps rather than chaining them), so
        the difference to ``federated`` is what the data split costs, not the parallelism.
        """
        pooled = [e for split in self.splits for e in split.train]
        runtime = SiteRuntime(self.host, SiteData(pooled, []), self.dataset.kind, "pooled", 0)
        steps = self.plan.train.local_steps * (1 if equal_steps else len(self.sites))
        plan = self._plain_plan(steps)
        name = "centralized-equal-steps" if equal_steps else "centralized"
        print_message(f"{name}: {len(pooled)} pooled examples, {steps} steps per round")
        moved = data_bytes(pooled)
        by_round: dict[int, Quality] = {}

        def on_round(server_round: int, state: AdapterState) -> None:
            by_round[server_round] = self.evaluate(state)

        start = time.perf_counter()
        with PeakRSS() as rss:
            self.train(runtime, plan, on_round=on_round, label=name)
        curve = [CurvePoint(r, *self._figures(q), moved) for r, q in sorted(by_round.items())]
        arm = Arm(
            name,
            by_round[self.cfg.federation.rounds],  # the last round is always a curve round
            num_parameters(self.initial),
            moved,
            time.perf_counter() - start,
            rss.peak,
        )
        return arm, curve

    def federated_state(self, out: Path) -> AdapterState:
        """The last version the federated run in ``out`` published."""
        registry = Registry(out / "registry")
        latest = registry.latest(self.module)
        if latest is None:
            raise ConfigError(f"{out}: the federated run published no adapter version")
        return registry.load(self.module, latest.version)

    def federated(self, out: Path, resume: bool = False) -> tuple[Arm, AdapterState]:
        """``fedlora simulate`` into ``out`` (``resume``: from its last checkpoint there; the
        arm's seconds are then the resumed part's)."""
        from fedlora.simulate import simulate  # starts Ray: only when this arm runs

        start = time.perf_counter()
        simulate(self.cfg, out, resume=resume)
        seconds = time.perf_counter() - start
        state = self.federated_state(out)
        rounds = read_metrics(out)
        moved = sum(int(r.get("bytes_up", 0)) + int(r.get("bytes_down", 0)) for r in rounds)
        peaks = [r["peak_memory_bytes"] for r in rounds if r.get("peak_memory_bytes")]
        sent = ffa_sent_keys if self.cfg.aggregation.rule == "ffa" else all_sent_keys
        trainable = num_parameters({k: self.initial[k] for k in sent(self.initial)})
        arm = Arm(
            "federated",
            self.evaluate(state),
            trainable,
            moved,
            seconds,
            max(peaks) if peaks else None,
        )
        return arm, state

    def latency(self, adapter: AdapterState) -> dict[str, float]:
        """Median milliseconds of one forward pass on a batch of the global set."""
        items = encode_examples(
            self.global_examples[:EVAL_BATCH_SIZE],
            self.dataset.kind,
            self.host.base.tokenizer,
            self.cfg.train.max_length,
        )
        batch = next(eval_batches(items, EVAL_BATCH_SIZE, self.host.pad_token_id))
        device = next(self.host.model.parameters()).device
        inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        model = self.host.model
        load_adapter_state(model, adapter, self.module)
        merged = copy.deepcopy(model).merge_and_unload()

        def timed(forward: Callable[[], object]) -> float:
            forward()  # warm-up
            times = []
            for _ in range(LATENCY_REPEATS):
                start = time.perf_counter()
                forward()
                times.append(time.perf_counter() - start)
            return 1000 * statistics.median(times)

        with torch.no_grad():

            def base_forward() -> object:
                with model.disable_adapter():
                    return model(**inputs)

            result = {
                "base_ms": timed(base_forward),
                "adapter_unmerged_ms": timed(lambda: model(**inputs)),
                "adapter_merged_ms": timed(lambda: merged(**inputs)),
            }
        result["batch_examples"] = float(len(items))
        return result


# ---------------------------------------------------------------------------- the table
