"""``fedlora compare CONFIG --out DIR``: the pilot's ROI table on one data split and seed.

Five arms, each evaluated on the same global set (``data.eval-path``, else every site's held-out
examples pooled) and on every site's own held-out split:

``base``
    The base model untouched (LoRA B = 0, so its outputs are the base model's; a classification
    run's newly initialised head included).
``local-only``
    Each site trains alone: the same rounds x local steps as in the federation, from the same
    initial adapter, on its own training split; no bytes travel. Own held-out = each site's
    adapter on its own split; global = the mean over the sites' adapters.
``federated``
    ``fedlora simulate`` of the config (its rule and privacy mode, real Flower), the last
    registry version evaluated here.
``personalized``
    Each site fine-tunes the federated adapter on its own data for ``--personalize-steps``
    steps (default: one round's local steps) with the plain objective: the model a site
    deploys for itself. Own held-out and global as for ``local-only``.
``centralized``
    All sites' training splits pooled at one place, trained for rounds x (local steps x sites)
    steps: the same examples budget as the federation. Its "bytes" are the training data that
    had to move there.
``centralized-equal-steps``
    The same pooled data trained for only rounds x local steps: as many sequential optimizer
    steps as the federation (whose averaging of the sites' steps does not chain them). Against
    it, ``federated`` shows what the split of the data costs; against ``centralized``, what
    the parallel steps cost too.

Per arm: loss, perplexity (causal LM) or accuracy (classification), trainable parameters, bytes
moved, wall seconds and peak resident memory of the training process (for ``federated``: the
largest site process). Inference latency is measured on one batch of the global set for the
base model, base + the federated adapter unmerged, and merged into the weights.

Curves: every arm's global and own held-out figure against rounds and against bytes moved
(``curves-round.png``, ``curves-bytes.png``, and in ``compare.json``), and the round at which
the federation reaches 90 % and 95 % of centralized at its best evaluated round (not its last:
a centralized run that diverges late is no reference). The federated arm is evaluated every
round; the in-process arms about ``--curve-points`` times.

``centralized-full``
    The ``centralized`` arm's data, steps and settings on a fresh copy of the base model with
    every parameter trainable (``fedlora.compare_full``): the reference LoRA is measured
    against. Skipped, with the reason in the table, where it would not fit the device's memory.

Writes ``DIR/compare.json``, ``DIR/compare.md`` and the federated run under ``DIR/federated``.
"""

from __future__ import annotations

import copy
import math
import os
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from client.data import Dataset, Example, SiteData, eval_sample, load_dataset, site_data
from client.site import EVAL_BATCH_SIZE, AdapterHost, SiteRuntime
from client.tokens import encode_examples, eval_batches
from client.train import EvalResult, load_adapter_state
from common.adapters import AdapterState, apply_delta, num_parameters
from common.atomic import write_json_atomic
from common.config import (
    RunConfig,
    SitePlan,
    TrainConfig,
    parse_override,
    site_plan,
    validate_config,
)
from common.errors import ConfigError
from common.modules import join_modules, split_modules
from common.progress import print_message, print_rule
from common.registry import Registry
from common.rules import all_sent_keys, ffa_sent_keys
from common.server_opt import scheduled_train
from fedlora.compare_arms import ARMS, check_arms
from fedlora.compare_curves import (
    CurvePoint,
    Curves,
    best_point,
    curve_rounds,
    curves_json,
    federated_curve,
    plot_curves,
    rounds_to_reach,
)
from fedlora.compare_full import NAME as FULL_ARM
from fedlora.compare_full import FullResult, centralized_full, full_lines, skipped_row
from server.metrics import read_metrics

LATENCY_REPEATS = 5
# In-process arms are evaluated about this many times over the rounds (compare --curve-points).
DEFAULT_CURVE_POINTS = 10
REACH_FRACTIONS = (0.9, 0.95)


@dataclass(frozen=True)
class Quality:
    """Evaluation of one adapter state: global set and the mean over the sites' held-out."""

    global_loss: float
    global_perplexity: float
    global_accuracy: float | None
    site_loss: float
    site_perplexity: float
    site_accuracy: float | None
    # Each site's own held-out figures: site id -> {"loss", "perplexity", "accuracy"}.
    sites: dict[str, dict[str, float | None]] = field(default_factory=dict)


@dataclass(frozen=True)
class Arm:
    name: str
    quality: Quality
    trainable_parameters: int
    bytes_moved: int
    seconds: float
    peak_rss_bytes: int | None


# ---------------------------------------------------------------------------- measuring


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Sample this process's resident memory every 50 ms while in the ``with`` block.

    ``peak`` is the largest sample in bytes, or None where /proc is missing (not Linux): no
    figure rather than a wrong one.
    """

    def __init__(self) -> None:
        self.peak: int | None = None
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._done.wait(0.05):
            self.peak = max(self.peak or 0, _rss_bytes())

    def __enter__(self) -> PeakRSS:
        if Path("/proc/self/statm").is_file():
            self.peak = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()
            self.peak = max(self.peak or 0, _rss_bytes())


def _mean(results: Sequence[EvalResult], weight: Callable[[EvalResult], float]) -> float:
    total = sum(weight(r) for r in results)
    return sum(r.loss * weight(r) for r in results) / total if total else float("nan")


def _quality(global_result: EvalResult, own: dict[str, EvalResult]) -> Quality:
    """Global figures, and the sites' held-out figures weighted by tokens (loss) / examples."""
    site_loss = _mean(list(own.values()), lambda r: r.tokens)
    accuracies = [(r.accuracy, r.examples) for r in own.values() if r.accuracy is not None]
    examples = sum(n for _, n in accuracies)
    return Quality(
        global_loss=global_result.loss,
        global_perplexity=global_result.perplexity,
        global_accuracy=global_result.accuracy,
        site_loss=site_loss,
        site_perplexity=math.exp(min(site_loss, 50.0)),
        site_accuracy=sum(a * n for a, n in accuracies) / examples if accuracies else None,
        sites={
            name: {"loss": r.loss, "perplexity": r.perplexity, "accuracy": r.accuracy}
            for name, r in own.items()
        },
    )


def _mean_quality(per_site: Sequence[Quality]) -> Quality:
    """Local-only: the mean of each site's figures (its own adapter on global and own data)."""

    def avg(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return statistics.fmean(known) if known else None

    global_loss = statistics.fmean(q.global_loss for q in per_site)
    site_loss = statistics.fmean(q.site_loss for q in per_site)
    return Quality(
        global_loss=global_loss,
        global_perplexity=statistics.fmean(q.global_perplexity for q in per_site),
        global_accuracy=avg([q.global_accuracy for q in per_site]),
        site_loss=site_loss,
        site_perplexity=statistics.fmean(q.site_perplexity for q in per_site),
        site_accuracy=avg([q.site_accuracy for q in per_site]),
        sites={name: figures for q in per_site for name, figures in q.sites.items()},
    )


def _data_bytes(examples: Sequence[Example]) -> int:
    """UTF-8 bytes of the examples' text, response and label: what pooling must move."""
    return sum(
        len(e.text.encode()) + len((e.response or "").encode()) + (8 if e.label is not None else 0)
        for e in examples
    )


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
        return _quality(global_result, {s.site_id: s.evaluate(flat, self.plain, 0) for s in own})

    def train(
        self,
        runtime: SiteRuntime,
        plan: SitePlan,
        on_round: Callable[[int, AdapterState], None] | None = None,
        start: AdapterState | None = None,
        rounds: int | None = None,
    ) -> AdapterState:
        """``runtime`` alone for ``rounds`` (default ``federation.rounds``) rounds.

        From ``start`` (default: the initial adapter); ``on_round(round, state)`` is called
        after each of ``self.curve_rounds``.
        """
        state = {k: v.clone() for k, v in (start or self.initial).items()}
        total = rounds or self.cfg.federation.rounds
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
                self.train(runtime, self.plain, on_round=record(index))
                per_site.append(by_round[self.cfg.federation.rounds][index])
        curve = [
            CurvePoint(r, *self._figures(_mean_quality(q))) for r, q in sorted(by_round.items())
        ]
        arm = Arm(
            "local-only",
            _mean_quality(per_site),
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
            _mean_quality(per_site),
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
        moved = _data_bytes(pooled)
        by_round: dict[int, Quality] = {}

        def on_round(server_round: int, state: AdapterState) -> None:
            by_round[server_round] = self.evaluate(state)

        start = time.perf_counter()
        with PeakRSS() as rss:
            self.train(runtime, plan, on_round=on_round)
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

    def federated(self, out: Path) -> tuple[Arm, AdapterState]:
        from fedlora.simulate import simulate  # starts Ray: only when this arm runs

        start = time.perf_counter()
        simulate(self.cfg, out)
        seconds = time.perf_counter() - start
        registry = Registry(out / "registry")
        latest = registry.latest(self.module)
        if latest is None:
            raise ConfigError(f"{out}: the federated run published no adapter version")
        state = registry.load(self.module, latest.version)
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


def _quality_cells(q: Quality, classification: bool) -> list[str]:
    if classification:
        return [
            f"{100 * (q.global_accuracy or 0):.1f}",
            f"{100 * (q.site_accuracy or 0):.1f}",
            f"{q.global_loss:.4f}",
        ]
    return [f"{q.global_perplexity:.3f}", f"{q.site_perplexity:.3f}", f"{q.global_loss:.4f}"]


def markdown_table(arms: Sequence[Arm], classification: bool) -> str:
    metric = "accuracy %" if classification else "perplexity"
    head = [
        "arm",
        f"global {metric}",
        f"own held-out {metric}",
        "global loss",
        "trainable params",
        "bytes moved",
        "wall s",
        "peak RSS GiB",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm in arms:
        rss = "-" if arm.peak_rss_bytes is None else f"{arm.peak_rss_bytes / 2**30:.2f}"
        cells = [
            arm.name,
            *_quality_cells(arm.quality, classification),
            f"{arm.trainable_parameters:,}",
            f"{arm.bytes_moved:,}",
            f"{arm.seconds:.1f}",
            rss,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def site_table(arms: Sequence[Arm], groups: dict[str, str], classification: bool) -> str:
    """Each site's own held-out accuracy (%) or perplexity, per arm (local-only: its own)."""
    key = "accuracy" if classification else "perplexity"
    head = ["site", "data", *(arm.name for arm in arms)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for site, group in groups.items():
        cells = [site, group]
        for arm in arms:
            value = arm.quality.sites.get(site, {}).get(key)
            scale = 100 if classification else 1
            cells.append(
                "-" if value is None else f"{scale * value:.{1 if classification else 3}f}"
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdicts(
    arms: dict[str, Arm], classification: bool, central_best: float | None = None
) -> list[str]:
    """The ROI lines: federated against centralized and against local-only.

    ``central_best``: centralized's best evaluated global figure, the fairer reference where
    its last round is worse than an earlier one. A line whose arms were not run is left out.
    """

    def quality(name: str) -> Quality | None:
        arm = arms.get(name)
        return arm.quality if arm is not None else None

    fed, central = quality("federated"), quality("centralized")
    local, personal = quality("local-only"), quality("personalized")
    lines: list[str] = []
    if classification:
        if fed is not None and central is not None:
            f, c = fed.global_accuracy or 0, central.global_accuracy or 0
            best = central_best or c
            if c:
                lines.append(f"federated global accuracy is {100 * f / c:.1f}% of centralized's "
                             "last round")  # fmt: skip
            if best:
                lines.append(f"federated global accuracy is {100 * f / best:.1f}% of "
                             "centralized's best round")  # fmt: skip
        if fed is not None and local is not None:
            f, lo = fed.global_accuracy or 0, local.global_accuracy or 0
            lines.append(f"federated - local-only: {100 * (f - lo):+.1f} points (global)")
        if personal is not None and local is not None:
            p_own, lo_own = personal.site_accuracy or 0, local.site_accuracy or 0
            lines.append(f"personalized - local-only: {100 * (p_own - lo_own):+.1f} points "
                         "(own held-out)")  # fmt: skip
        return lines
    if fed is not None and central is not None:
        ratio = fed.global_perplexity / central.global_perplexity
        lines.append(
            f"federated global perplexity {fed.global_perplexity:.3f} vs centralized "
            f"{central.global_perplexity:.3f} ({ratio:.3f}x)"
        )
    if fed is not None and local is not None:
        lines.append(
            f"federated vs local-only global perplexity: {fed.global_perplexity:.3f} vs "
            f"{local.global_perplexity:.3f}"
        )
    if personal is not None and local is not None:
        lines.append(
            f"personalized vs local-only own held-out perplexity: {personal.site_perplexity:.3f}"
            f" vs {local.site_perplexity:.3f}"
        )
    return lines


def _rounds_to_reach(
    federated: list[CurvePoint], central: list[CurvePoint], classification: bool
) -> dict[str, Any]:
    """The first round at which the federation is at 90 % and 95 % of centralized.

    The reference is centralized at its best evaluated round, not its last: a centralized
    run that overfits or diverges late must not make the federation look better than it is.
    """
    best = best_point(central, classification)
    if best is None or best.global_value is None:
        return {}
    rounds = {
        f"{round(100 * f)}%": rounds_to_reach(federated, best.global_value, f, classification)
        for f in REACH_FRACTIONS
    }
    return {"centralized_best": best.global_value, "centralized_best_round": best.round, **rounds}


def _reach_lines(reach: dict[str, Any], rounds: int, classification: bool) -> str:
    if not reach:
        return ""
    scale = 100 if classification else 1
    lines = [
        f"- centralized at its best evaluated round ({reach['centralized_best_round']}): "
        f"{scale * reach['centralized_best']:.{1 if classification else 3}f}; the reference of:"
    ]
    for share in (f"{round(100 * f)}%" for f in REACH_FRACTIONS):
        at = reach[share]
        when = f"at round {at}" if at is not None else f"in none of the {rounds} rounds"
        lines.append(f"- federated reaches {share} of it {when}")
    return "\n".join(lines)


def _curve_table(curves: Curves, classification: bool) -> str:
    """Global figure per arm at each round any arm was evaluated (``-``: not evaluated)."""
    scale, digits = (100, 1) if classification else (1, 3)
    rounds = sorted({p.round for points in curves.values() for p in points if p.round > 0})
    at = {arm: {p.round: p.global_value for p in points} for arm, points in curves.items()}
    head = ["round", *curves]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rounds:
        cells = [str(r)]
        for arm in curves:
            value = at[arm].get(r)
            cells.append("-" if value is None else f"{scale * value:.{digits}f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def reference_train(cfg: RunConfig, overrides: Sequence[str]) -> TrainConfig | None:
    """The in-process arms' train settings: ``cfg.train`` with ``train.KEY=VALUE`` overrides."""
    if not overrides:
        return None
    raw = cfg.train.model_dump(mode="json", by_alias=True)
    for text in overrides:
        path, value = parse_override(text)
        if len(path) != 2 or path[0] != "train":
            raise ConfigError(f"--reference {text!r}: expected train.KEY=VALUE")
        raw[path[1]] = value
    return validate_config(TrainConfig, raw, "--reference")


def compare(
    cfg: RunConfig,
    out: Path,
    curve_points: int = DEFAULT_CURVE_POINTS,
    personalize_steps: int | None = None,
    reference: TrainConfig | None = None,
    full_lr: float | None = None,
    arms_wanted: Sequence[str] = ARMS,
) -> dict[str, Any]:
    """Run the arms ``arms_wanted`` (default: every arm) on ``cfg``'s split and seed; write
    compare.json and compare.md in ``out``.

    ``full_lr``: the centralized-full arm's learning rate (default: the centralized arm's).
    ``personalized`` needs ``federated`` (it starts from the federated adapter).
    """
    check_arms(arms_wanted)
    wanted = set(arms_wanted)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} is not empty; compare writes a fresh folder")
    out.mkdir(parents=True, exist_ok=True)
    comparison_started = time.perf_counter()
    comparison = Comparison(cfg, curve_points, reference)
    classification = comparison.dataset.kind == "classification"
    arms: dict[str, Arm] = {}
    curves: Curves = {}
    federated_state: AdapterState | None = None
    if "federated" in wanted:
        print_rule("fedlora compare: federated run")
        arms["federated"], federated_state = comparison.federated(out / "federated")
        curves["federated"] = federated_curve(read_metrics(out / "federated"), classification)
    print_rule("fedlora compare: the in-process arms")
    if "base" in wanted:
        arms["base"] = comparison.base()
    if "local-only" in wanted:
        arms["local-only"], curves["local-only"] = comparison.local_only()
    steps = personalize_steps or cfg.train.local_steps
    if federated_state is not None and "personalized" in wanted:
        arms["personalized"] = comparison.personalized(federated_state, steps)
    if "centralized" in wanted:
        arms["centralized"], curves["centralized"] = comparison.centralized()
    if "centralized-equal-steps" in wanted:
        equal = comparison.centralized(equal_steps=True)
        arms["centralized-equal-steps"], curves["centralized-equal-steps"] = equal
    arms = {name: arms[name] for name in ARMS if name in arms}  # the table's fixed order
    reach = (
        _rounds_to_reach(curves["federated"], curves["centralized"], classification)
        if "federated" in curves and "centralized" in curves
        else {}
    )
    # After the other arms: its fresh full model must not inflate their peak RSS.
    full = (
        centralized_full(comparison, full_lr)
        if FULL_ARM in wanted
        else FullResult(None, [], {"skipped": "not among --arms"})
    )
    if full.arm is not None:
        arms[FULL_ARM] = full.arm
        curves[FULL_ARM] = full.curve
    plots = plot_curves(curves, out, classification)
    latency = comparison.latency(federated_state) if federated_state is not None else {}
    table = markdown_table(list(arms.values()), classification)
    if full.arm is None and FULL_ARM in wanted:
        table += "\n" + skipped_row(full, table.splitlines()[0].count("|") - 1)
    per_site = site_table(list(arms.values()), comparison.groups(), classification)
    lines = verdicts(arms, classification, reach.get("centralized_best"))
    base_parameters = sum(p.numel() for p in comparison.host.base.model.parameters())
    result: dict[str, Any] = {
        "config": cfg.model_dump(mode="json", by_alias=True),
        "task": cfg.model.task,
        "sites": cfg.federation.sites,
        "rounds": cfg.federation.rounds,
        "global_set": "data.eval-path" if cfg.data.eval_path else "pooled site held-out",
        "global_examples": len(comparison.global_examples),
        "base_parameters_incl_adapter": base_parameters,
        "arms": {name: asdict(arm) for name, arm in arms.items()},
        "centralized_full": full.details,
        "latency": latency,
        "verdicts": lines,
        "personalize_steps": steps,
        "reference_train": comparison.plain.train.model_dump(mode="json", by_alias=True),
        "curves": curves_json(curves),
        "rounds_to_reach_centralized": reach,
        "seconds": time.perf_counter() - comparison_started,
    }
    write_json_atomic(out / "compare.json", result)
    latency_line = (
        ""
        if not latency
        else f"Inference latency, one batch of {int(latency['batch_examples'])} global examples "
        f"(median of {LATENCY_REPEATS}): base {latency['base_ms']:.1f} ms, base + adapter "
        f"unmerged {latency['adapter_unmerged_ms']:.1f} ms, "
        f"merged {latency['adapter_merged_ms']:.1f} ms."
    )
    sections = [
        f"# fedlora compare: {cfg.model.name}, {cfg.federation.sites} sites, "
        f"{cfg.federation.rounds} rounds, rule {cfg.aggregation.rule}, "
        f"privacy {cfg.privacy.mode}",
        f"Global set: {result['global_set']} ({result['global_examples']} examples).",
        table,
        f"Own held-out {'accuracy %' if classification else 'perplexity'} per site:",
        per_site,
        latency_line,
        "\n".join(f"- {line}" for line in lines),
        "\n".join(full_lines(full, arms["federated"], cfg.federation, classification))
        if "federated" in arms and FULL_ARM in wanted
        else "",
        _reach_lines(reach, cfg.federation.rounds, classification),
        "Curves (federated: every round; the other arms: every "
        f"{comparison.curve_rounds[0]} rounds):",
        "\n".join(f"![{x}]({path.name})" for x, path in plots.items()),
        _curve_table(curves, classification),
    ]
    markdown = "\n\n".join(section for section in sections if section)
    (out / "compare.md").write_text(markdown + "\n", encoding="utf-8")
    print(f"\n{table}\n\n{per_site}\n\n{latency_line}")
    for line in lines:
        print(f"- {line}")
    print(f"\nwrote {out / 'compare.json'} and {out / 'compare.md'}")
    return result
