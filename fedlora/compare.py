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
Each arm is kept in ``DIR/arms/`` once measured: a compare stopped by Ctrl-C goes on with
``--resume`` (``fedlora.compare_progress``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from common.adapters import AdapterState
from common.atomic import write_bytes_atomic, write_json_atomic
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
from fedlora.compare_progress import ArmLedger, Measured, compare_settings
from fedlora.compare_tables import curve_table, markdown_table, site_table
from fedlora.comparison import LATENCY_REPEATS, Comparison
from fedlora.interrupt import RunInterrupted
from server.metrics import read_metrics
from server.rundir import holds_run

REACH_FRACTIONS = (0.9, 0.95)


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
    resume: bool = False,
) -> dict[str, Any]:
    """Run the arms ``arms_wanted`` (default: every arm) on ``cfg``'s split and seed; write
    compare.json and compare.md in ``out``.

    ``full_lr``: the centralized-full arm's learning rate (default: the centralized arm's).
    ``personalized`` needs ``federated`` (it starts from the federated adapter). ``resume``:
    go on with an interrupted compare in ``out`` (``fedlora.compare_progress``). The first
    SIGINT or SIGTERM (under ``stop_on_signals``) raises ``CompareInterrupted``.
    """
    check_arms(arms_wanted)
    ledger = ArmLedger(out)
    ledger.check(compare_settings(cfg, curve_points, personalize_steps, reference, full_lr), resume)
    try:
        return _compare(cfg, ledger, curve_points, personalize_steps, reference, full_lr,
                        arms_wanted)  # fmt: skip
    except RunInterrupted as stop:
        raise ledger.interrupted(stop) from None


def _federated(comparison: Comparison, out: Path, classification: bool) -> Measured:
    arm, _ = comparison.federated(out, resume=holds_run(out))
    return Measured(arm, federated_curve(read_metrics(out), classification))


def _full(comparison: Comparison, lr: float | None) -> Measured:
    result = centralized_full(comparison, lr)
    return Measured(result.arm, result.curve, result.details)


def _measure_arms(
    comparison: Comparison, ledger: ArmLedger, wanted: set[str], personalize_steps: int
) -> tuple[dict[str, Measured], AdapterState | None]:
    """The wanted arms but centralized-full, each measured or taken from disk (``ledger``), in
    the order they run, and the federated adapter where that arm is wanted."""
    classification = comparison.dataset.kind == "classification"
    measured: dict[str, Measured] = {}
    federated_state: AdapterState | None = None
    if "federated" in wanted:
        print_rule("fedlora compare: federated run")
        run_dir = ledger.out / "federated"
        measured["federated"] = ledger.measure(
            "federated", lambda: _federated(comparison, run_dir, classification)
        )
        federated_state = comparison.federated_state(run_dir)
    print_rule("fedlora compare: the in-process arms")
    runs: dict[str, Callable[[], Measured]] = {
        "base": lambda: Measured(comparison.base()),
        "local-only": lambda: Measured(*comparison.local_only()),
        "centralized": lambda: Measured(*comparison.centralized()),
        "centralized-equal-steps": lambda: Measured(*comparison.centralized(equal_steps=True)),
    }
    if federated_state is not None:  # personalized starts from it (check_arms)
        start = federated_state
        runs["personalized"] = lambda: Measured(comparison.personalized(start, personalize_steps))
    for name in ARMS:  # base, local-only, personalized, centralized, centralized-equal-steps
        if name in wanted and name in runs:
            measured[name] = ledger.measure(name, runs[name])
    return measured, federated_state


def _compare(
    cfg: RunConfig,
    ledger: ArmLedger,
    curve_points: int,
    personalize_steps: int | None,
    reference: TrainConfig | None,
    full_lr: float | None,
    arms_wanted: Sequence[str],
) -> dict[str, Any]:
    out, wanted = ledger.out, set(arms_wanted)
    comparison_started = time.perf_counter()
    comparison = Comparison(cfg, curve_points, reference)
    ledger.record()
    classification = comparison.dataset.kind == "classification"
    steps = personalize_steps or cfg.train.local_steps
    measured, federated_state = _measure_arms(comparison, ledger, wanted, steps)
    arms = {name: m.arm for name in ARMS if (m := measured.get(name)) and m.arm is not None}
    curves: Curves = {name: m.curve for name, m in measured.items() if m.curve is not None}
    reach = (
        _rounds_to_reach(curves["federated"], curves["centralized"], classification)
        if "federated" in curves and "centralized" in curves
        else {}
    )
    # After the other arms: its fresh full model must not inflate their peak RSS.
    if FULL_ARM in wanted:
        m = ledger.measure(FULL_ARM, lambda: _full(comparison, full_lr))
        full = FullResult(m.arm, m.curve or [], m.details)
    else:
        full = FullResult(None, [], {"skipped": "not among --arms"})
    if full.arm is not None:
        arms[FULL_ARM] = full.arm
        curves[FULL_ARM] = full.curve
    ledger.phase = "while measuring latency and writing the tables"
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
        "arms_wanted": list(arms_wanted),
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
        curve_table(curves, classification),
    ]
    markdown = "\n\n".join(section for section in sections if section)
    write_bytes_atomic(out / "compare.md", (markdown + "\n").encode())
    print(f"\n{table}\n\n{per_site}\n\n{latency_line}")
    for line in lines:
        print(f"- {line}")
    print(f"\nwrote {out / 'compare.json'} and {out / 'compare.md'}")
    return result
