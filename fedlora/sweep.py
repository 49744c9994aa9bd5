"""``fedlora sweep CONFIG --vary KEY=V1,V2 --out DIR``: ``fedlora compare``'s arms once per
setting, one table, a recommendation and a picture.

Several ``--vary`` make a grid (every combination). Each setting's run is a plain ``compare``
in its own folder ``DIR/KEY=VALUE[,KEY=VALUE]`` (its compare.json, compare.md, curves and
federated run), so that nothing is mixed up. Only the arms whose result depends on the varied
keys are offered: ``base`` (the untrained adapter) and ``centralized-full`` (no adapter) are
the same for every rank, so they are run once with ``fedlora compare``, not here.

Writes ``DIR/sweep.json``, ``DIR/sweep.md`` and ``DIR/sweep.png`` (federated quality against
bytes per round, one labelled point per setting, the recommended one marked).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from common.atomic import write_json_atomic
from common.config import RunConfig, load_config, parse_override
from common.errors import ConfigError
from common.progress import print_rule
from fedlora.compare_progress import SETTINGS_FILE
from fedlora.sweep_rule import Candidate, default_tolerance, recommend

# A value is also a folder name: nothing that would leave DIR or hide the folder.
_BAD_IN_VALUE = ("/", "\\", "\0")
SWEEP_FILES = ("sweep.json", "sweep.md", "sweep.png")
NO_PICK = "none: no setting's federated quality is a finite number (every run diverged)."


def _leaf_keys(node: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for name, value in node.items():
        key = f"{prefix}{name}"
        keys.extend(_leaf_keys(value, f"{key}.") if isinstance(value, Mapping) else [key])
    return keys


def _unknown_key(key: str, known: Sequence[str]) -> ConfigError:
    """An error naming ``key`` and the keys that exist beside it (or the sections)."""
    section = key.rsplit(".", 1)[0] if "." in key else ""
    beside = [k for k in known if k.rsplit(".", 1)[0] == section]
    if beside:
        what = f"{section} has {', '.join(k.rsplit('.', 1)[1] for k in beside)}"
    else:
        what = f"the sections are {', '.join(sorted({k.split('.', 2)[0] for k in known}))}"
        if section.startswith("modules."):
            modules = sorted({k.split(".")[1] for k in known if k.startswith("modules.")})
            what = f"the config's modules are {', '.join(modules)}"
    return ConfigError(f"--vary {key}: no such config key; {what}")


def parse_vary(texts: Sequence[str], cfg: RunConfig) -> list[tuple[str, list[str]]]:
    """``KEY=V1,V2`` per ``--vary``: the key, checked against ``cfg``, and its raw values.

    Each value is read as ``--set`` reads it (a TOML scalar, else a string); an empty list,
    a value given twice (``4,4.0`` too) or a key varied twice is a ``ConfigError``.
    """
    known = _leaf_keys(cfg.model_dump(mode="json", by_alias=True))
    varied: list[tuple[str, list[str]]] = []
    for text in texts:
        if "=" not in text:
            raise ConfigError(f"--vary {text!r}: expected KEY=V1,V2,...")
        key, listed = (part.strip() for part in text.split("=", 1))
        if key not in known:
            raise _unknown_key(key, known)
        if key in (k for k, _ in varied):
            raise ConfigError(f"--vary {key}: varied twice; give its values in one --vary")
        raws = [raw.strip() for raw in listed.split(",") if raw.strip()]
        if not raws:
            raise ConfigError(f"--vary {key}: no values; expected {key}=V1,V2,...")
        values: list[Any] = []
        for raw in raws:
            if any(bad in raw for bad in _BAD_IN_VALUE):
                raise ConfigError(f"--vary {key}: value {raw!r} cannot name a folder")
            value = parse_override(f"{key}={raw}")[1]
            if value in values:
                raise ConfigError(f"--vary {key}: value {raw!r} is given twice")
            values.append(value)
        varied.append((key, raws))
    if not varied:
        raise ConfigError("fedlora sweep: give at least one --vary KEY=V1,V2,...")
    return varied


def grid(varied: Sequence[tuple[str, list[str]]]) -> list[list[str]]:
    """Every combination as ``KEY=VALUE`` overrides, the first key varying slowest."""
    keys = [key for key, _ in varied]
    return [
        [f"{key}={raw}" for key, raw in zip(keys, combo, strict=True)]
        for combo in itertools.product(*(raws for _, raws in varied))
    ]


def _figures(arm: Mapping[str, Any] | None, classification: bool) -> tuple[Any, Any]:
    if arm is None:
        return None, None
    quality = arm["quality"]
    if classification:
        return quality["global_accuracy"], quality["site_accuracy"]
    return quality["global_perplexity"], quality["site_perplexity"]


def sweep_row(label: str, setting: list[str], result: Mapping[str, Any]) -> dict[str, Any]:
    """One setting's row from its compare.json."""
    classification = result["task"] == "classification"
    federated = result["arms"]["federated"]
    central = result["arms"].get("centralized")
    quality, own = _figures(federated, classification)
    latency = result.get("latency") or {}
    return {
        "setting": label,
        "overrides": setting,
        "federated_quality": quality,
        "federated_own_quality": own,
        "centralized_quality": _figures(central, classification)[0],
        "centralized_own_quality": _figures(central, classification)[1],
        "trainable_parameters": federated["trainable_parameters"],
        # Up + down over all sites, averaged over the rounds (metrics.jsonl of the run).
        "bytes_per_round": federated["bytes_moved"] / result["rounds"],
        "peak_memory_bytes": federated["peak_rss_bytes"],
        "federated_seconds": federated["seconds"],
        "centralized_seconds": None if central is None else central["seconds"],
        "latency_unmerged_ms": latency.get("adapter_unmerged_ms"),
        "latency_merged_ms": latency.get("adapter_merged_ms"),
    }


def _cell(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(rows: Sequence[Mapping[str, Any]], classification: bool, reason: str) -> str:
    q = "accuracy %" if classification else "perplexity"
    scale, qspec = (100, ".1f") if classification else (1, ".3f")

    def shown(value: float | None) -> str:
        return "-" if value is None else format(scale * value, qspec)

    head = ["setting", f"federated {q}", f"own held-out {q}", f"centralized {q}",
            "trainable params", "bytes per round", "peak RSS GiB", "federated s",
            "centralized s", "latency unmerged ms", "latency merged ms"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        rss = row["peak_memory_bytes"]
        cells = [
            row["setting"],
            shown(row["federated_quality"]),
            shown(row["federated_own_quality"]),
            shown(row["centralized_quality"]),
            f"{row['trainable_parameters']:,}",
            f"{row['bytes_per_round']:,.0f}",
            "-" if rss is None else f"{rss / 2**30:.2f}",
            _cell(row["federated_seconds"], ".1f"),
            _cell(row["centralized_seconds"], ".1f"),
            _cell(row["latency_unmerged_ms"], ".1f"),
            _cell(row["latency_merged_ms"], ".1f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\n**Recommended**: {reason}\n"


def plot_sweep(
    rows: Sequence[Mapping[str, Any]], recommended: int | None, classification: bool, path: Path
) -> None:
    """Federated quality against bytes per round, one labelled point per setting (a diverged
    one, whose quality is not finite, is left out of the picture; the table still has it)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.0, 4.5), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    scale = 100 if classification else 1
    for index, row in enumerate(rows):
        if not math.isfinite(row["federated_quality"]):
            continue
        x, y = row["bytes_per_round"], scale * row["federated_quality"]
        axes.scatter([x], [y], color="C0")
        axes.annotate(row["setting"], (x, y), textcoords="offset points", xytext=(4, 4),
                      fontsize=7)  # fmt: skip
        if index == recommended:
            axes.scatter([x], [y], s=160, facecolors="none", edgecolors="C3", linewidths=2,
                         label="recommended")  # fmt: skip
    axes.set_xlabel("bytes per round (up + down, all sites)")
    axes.set_ylabel(f"federated {'accuracy %' if classification else 'perplexity'}")
    axes.grid(True, alpha=0.3)
    if recommended is not None:
        axes.legend(fontsize=7)
    figure.suptitle("fedlora sweep: quality against bytes per round")
    figure.tight_layout()
    figure.savefig(path, format="png")


def _finished(folder: Path, arms: Sequence[str]) -> dict[str, Any] | None:
    """The compare.json of a setting whose compare finished these ``arms``, else None."""
    if not (folder / "compare.md").is_file():  # written last
        return None
    result: dict[str, Any] = json.loads((folder / "compare.json").read_text(encoding="utf-8"))
    return result if result.get("arms_wanted") == list(arms) else None


def sweep(
    config: Path,
    overrides: Sequence[str],
    vary: Sequence[str],
    out: Path,
    arms: Sequence[str],
    reference: Sequence[str] = (),
    tolerance: float | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Run ``compare``'s ``arms`` once per setting of the ``vary`` grid; write the sweep files.

    Every setting's config is loaded and checked before anything is written. ``resume``: go
    on with a sweep stopped in ``out``: a finished setting's compare.json is taken as it is,
    a stopped one resumes (``compare --resume``), the others run.
    """
    from fedlora.compare import compare, reference_train

    if resume and not (out.is_dir() and any(out.iterdir())):
        what = "does not exist" if not out.exists() else "is empty"
        raise ConfigError(f"--out {out} {what}, so there is nothing to resume; drop --resume")
    if not resume and out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} is not empty; sweep writes a fresh folder (--resume goes "
                          "on with a sweep stopped there)")  # fmt: skip
    varied = parse_vary(vary, load_config(config, list(overrides)))
    settings = grid(varied)
    configs = [load_config(config, [*overrides, *setting]) for setting in settings]
    references = [reference_train(cfg, reference) for cfg in configs]
    classification = configs[0].model.task == "classification"
    rows = []
    for setting, cfg, ref in zip(settings, configs, references, strict=True):
        label = ",".join(setting)
        print_rule(f"fedlora sweep: {label}")
        folder = out / label
        result = _finished(folder, arms) or compare(
            cfg, folder, reference=ref, arms_wanted=arms, resume=(folder / SETTINGS_FILE).is_file()
        )
        rows.append(sweep_row(label, setting, result))
    tol = default_tolerance(classification) if tolerance is None else tolerance
    candidates = [
        Candidate(r["setting"], r["federated_quality"], r["bytes_per_round"],
                  r["trainable_parameters"])
        for r in rows
    ]  # fmt: skip
    chosen = recommend(candidates, classification, tol)
    reason = NO_PICK if chosen is None else chosen.reason
    result = {
        "config": str(config),
        "set": list(overrides),
        "vary": {key: raws for key, raws in varied},
        "arms": list(arms),
        "quality": "accuracy" if classification else "perplexity",
        "tolerance": tol,
        "tolerance_unit": "accuracy points" if classification else "percent of best perplexity",
        "rows": rows,
        "recommended": None
        if chosen is None
        else {"setting": chosen.label, "index": chosen.index, "reason": chosen.reason},
    }
    write_json_atomic(out / "sweep.json", result)
    table = markdown(rows, classification, reason)
    title = f"# fedlora sweep: {config.name}, {' x '.join(k for k, _ in varied)}"
    (out / "sweep.md").write_text(f"{title}\n\n{table}\n![sweep](sweep.png)\n", encoding="utf-8")
    plot_sweep(rows, None if chosen is None else chosen.index, classification, out / "sweep.png")
    print(f"\n{table}\nwrote {', '.join(str(out / name) for name in SWEEP_FILES)}")
    return result
