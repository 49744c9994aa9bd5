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

import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from common.adapters import AdapterState
from common.atomic import write_json_atomic
from common.config import (
    RunConfig,
    TrainConfig,
    parse_override,
    validate_config,
)
from common.errors import ConfigError
from common.progress import print_rule
from fedlora.compare_arms import ARMS, DEFAULT_CURVE_POINTS, check_arms
from fedlora.compare_curves import (
    CurvePoint,
    Curves,
    best_point,
    curves_json,
    federated_curve,
    plot_curves,
    rounds_to_reach,
)
from fedlora.compare_full import NAME as FULL_ARM
from fedlora.compare_full import FullResult, centralized_full, full_lines, skipped_row
from fedlora.compare_measures import Arm, Quality
from fedlora.comparison import LATENCY_REPEATS, Comparison
from server.metrics import read_metrics

REACH_FRACTIONS = (0.9, 0.95)


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
