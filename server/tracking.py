"""Mirroring a run to an experiment tracker: MLflow, when ``tracking.backend = "mlflow"``.

The coordinator feeds a ``Tracker`` from the two places where a run leaves its record: each
round's ``metrics.jsonl`` line (``server.metrics.record_round``) and each published registry
version (``server.federation``). The default tracker does nothing; the MLflow one logs the
config as parameters (and ``config.json``), every round's figures as metrics at step = round,
and every published version's folder (PEFT files, model card, manifest) as an artifact.

The tracker is a copy, never the record: a tracking server that cannot be reached, or that
fails mid-run, is logged once as a warning and tracking stops for that run while the
federation goes on (``metrics.jsonl`` and the registry hold everything). The MLflow run's id is
kept in ``<run-dir>/mlflow-run.json``, so that a resumed run continues the same MLflow run.
mlflow is an optional extra (``pip install 'fedlora[mlflow]'``), imported only when configured.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from common.atomic import write_json_atomic
from common.config import RunConfig, TrackingConfig, config_to_dict
from common.errors import ConfigError
from common.registry_format import RegistryVersion

logger = logging.getLogger(__name__)

RUN_FILE = "mlflow-run.json"  # in the run folder: which MLflow run a resume continues
LOCAL_STORE = "mlflow"  # <run-dir>/mlflow: mlflow.db and artifacts/ when no URI is configured
CONFIG_ARTIFACT = "config.json"
SUMMARY_ARTIFACT = "summary.json"
# MLflow's own limits (mlflow.utils.validation): longer parameter values are refused.
MAX_PARAM_CHARS = 6000
# A tracking server is asked for /health before the run starts, for this long (seconds).
PROBE_SECONDS = 5.0
# MLflow retries a failed HTTP request 7 times with exponential backoff (about 4 minutes) and
# waits 120 s for an answer; a round should not stall that long for a copy of its metrics.
# Set only where the environment does not already say (MLFLOW_HTTP_REQUEST_*).
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}

RunEnd = Literal["FINISHED", "FAILED", "KILLED"]


class Tracker:
    """Where a run is mirrored. This one tracks nothing (``tracking.backend = "none"``)."""

    def log_round(self, line: dict[str, Any]) -> None:
        """One round's ``metrics.jsonl`` line."""

    def log_version(self, version: RegistryVersion) -> None:
        """A version just published to the registry."""

    def finish(self, status: RunEnd, summary: Path | None = None) -> None:
        """The run ended (``summary``: its ``summary.json``, when it completed)."""


def round_metrics(line: dict[str, Any]) -> dict[str, float]:
    """A ``metrics.jsonl`` line as flat metric names and values (step = its round).

    Numbers keep their key (``eval_loss``, ``bytes_up``, ``seconds_train``, ``epsilon``);
    ``cohort`` and ``rejected`` become ``cohort_size`` and ``rejected_replies``, other lists
    (``sampled_train``) ``<key>_count``; ``failed`` becomes ``round_failed`` (0 or 1, every
    round); per-site figures become ``site/<site>/<stage>/<key>``. Missing values (None),
    booleans and text are left out.
    """
    out: dict[str, float] = {"round_failed": 1.0 if "failed" in line else 0.0}
    renamed = {"cohort": "cohort_size", "rejected": "rejected_replies"}
    for key, value in line.items():
        if key in ("round", "failed", "sites"):
            continue
        if isinstance(value, list):
            out[renamed.get(key, f"{key}_count")] = float(len(value))
        elif _is_number(value):
            out[key] = float(value)
    for site, stages in line.get("sites", {}).items():
        for stage, figures in stages.items():
            for key, value in figures.items():
                if _is_number(value):
                    out[f"site/{site}/{stage}/{key}"] = float(value)
    return out


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def config_params(config_json: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """The config as flat ``section.key`` parameters (kebab-case keys, as in the TOML).

    Text stays as it is; other values are JSON (``true``, ``null``, ``["q_proj", "v_proj"]``),
    cut to MLflow's limit of 6000 characters (``config.json`` is logged whole beside them).
    """
    params: dict[str, str] = {}
    for key, value in config_json.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            params.update(config_params(value, f"{name}."))
            continue
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        params[name] = text[:MAX_PARAM_CHARS]
    return params


def check_backend(tracking: TrackingConfig) -> None:
    """A ConfigError now, before anything is written, when the backend is not installed."""
    if tracking.backend == "mlflow" and importlib.util.find_spec("mlflow") is None:
        raise ConfigError(
            "tracking.backend = 'mlflow' needs the mlflow package, which is not installed: "
            "pip install 'fedlora[mlflow]' (or set tracking.backend = 'none')"
        )


def open_tracker(cfg: RunConfig, run_dir: Path, resume: bool, fedlora_run_id: str) -> Tracker:
    """The run's tracker; with ``resume``, the MLflow run that ``mlflow-run.json`` names.

    A tracking server that cannot be reached gives a warning and the do-nothing tracker.
    """
    tracking = cfg.tracking
    if tracking.backend == "none":
        return Tracker()
    check_backend(tracking)
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    uri, artifacts = _store(tracking, run_dir)
    try:
        _probe(uri)
        tracker = MlflowTracker.open(cfg, run_dir, uri, artifacts, resume, fedlora_run_id)
    except Exception as exc:  # any tracker failure (HTTP, database, disk): the run goes on
        _warn_off(uri, "opening the run", exc)
        return Tracker()
    logger.info("tracking run %s in MLflow at %s", tracker.run_id, uri)
    return tracker


def _store(tracking: TrackingConfig, run_dir: Path) -> tuple[str, str | None]:
    """The tracking URI and, for the local store, the experiment's artifact folder."""
    if tracking.mlflow_uri is not None:
        return tracking.mlflow_uri, None
    local = (run_dir / LOCAL_STORE).resolve()
    local.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{local / 'mlflow.db'}", (local / "artifacts").as_uri()


def _probe(uri: str) -> None:
    """A tracking server answers ``/health`` within seconds, or this raises (OSError)."""
    if not uri.startswith(("http://", "https://")):
        return
    with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=PROBE_SECONDS) as answer:
        if answer.status != 200:
            raise urllib.error.URLError(f"/health answered {answer.status}")


def _warn_off(uri: str, doing: str, exc: BaseException) -> None:
    logger.warning(
        "MLflow tracking at %s failed while %s (%s: %s); tracking is off for the rest of this "
        "run, which goes on: metrics.jsonl and the registry keep everything",
        uri,
        doing,
        type(exc).__name__,
        str(exc)[:300],
    )


class MlflowTracker(Tracker):
    """Logs to one MLflow run; after its first failure it warns once and logs nothing more."""

    def __init__(self, client: Any, run_id: str, uri: str) -> None:
        self.client = client  # mlflow.MlflowClient
        self.run_id = run_id
        self.uri = uri
        self.broken = False

    @classmethod
    def open(
        cls,
        cfg: RunConfig,
        run_dir: Path,
        uri: str,
        artifacts: str | None,
        resume: bool,
        fedlora_run_id: str,
    ) -> MlflowTracker:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        run_id = _continued_run(client, cfg.tracking, run_dir) if resume else None
        if run_id is None:
            run_id = _new_run(client, cfg, run_dir, artifacts, fedlora_run_id)
        return cls(client, run_id, uri)

    def _guarded(self, doing: str, call: Callable[[], object]) -> None:
        if self.broken:
            return
        try:
            call()
        except Exception as exc:  # any tracker failure (HTTP, database, disk): the run goes on
            self.broken = True
            _warn_off(self.uri, doing, exc)

    def log_round(self, line: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        step, stamp = int(line["round"]), int(time.time() * 1000)  # MLflow wants milliseconds
        metrics = [Metric(k, v, stamp, step) for k, v in sorted(round_metrics(line).items())]
        self._guarded(
            f"logging round {step}", lambda: self.client.log_batch(self.run_id, metrics=metrics)
        )

    def log_version(self, version: RegistryVersion) -> None:
        self._guarded(
            f"logging {version.name}",
            lambda: self.client.log_artifacts(
                self.run_id, str(version.path), version_artifact_path(version)
            ),
        )

    def finish(self, status: RunEnd, summary: Path | None = None) -> None:
        if summary is not None:
            self._guarded(
                "logging the summary", lambda: self.client.log_artifact(self.run_id, str(summary))
            )
        self._guarded(
            "closing the run", lambda: self.client.set_terminated(self.run_id, status=status)
        )


def version_artifact_path(version: RegistryVersion) -> str:
    """Where a version's folder goes among the run's artifacts: ``registry/<module>/vNNNN``."""
    return f"registry/{version.module}/v{version.version:04d}"


def _continued_run(client: Any, tracking: TrackingConfig, run_dir: Path) -> str | None:
    """The MLflow run this run folder logged to, set running again; None when there is none
    for this store and experiment (the run's first start logged nowhere, or elsewhere)."""
    path = run_dir / RUN_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    where = {"mlflow_uri": tracking.mlflow_uri, "experiment": tracking.experiment}
    if {k: record.get(k) for k in where} != where:
        logger.info("MLflow: %s names another store or experiment; a new MLflow run", path)
        return None
    run_id = str(record["run_id"])
    client.update_run(run_id, status="RUNNING")
    return run_id


def _new_run(
    client: Any, cfg: RunConfig, run_dir: Path, artifacts: str | None, fedlora_run_id: str
) -> str:
    """A new MLflow run with the config as parameters; its id written to ``mlflow-run.json``."""
    from mlflow.entities import Param

    tracking = cfg.tracking
    experiment = client.get_experiment_by_name(tracking.experiment)
    experiment_id = (
        client.create_experiment(tracking.experiment, artifact_location=artifacts)
        if experiment is None
        else experiment.experiment_id
    )
    run = client.create_run(
        experiment_id, run_name=run_dir.name, tags={"fedlora.run-id": fedlora_run_id}
    )
    run_id = str(run.info.run_id)
    params = config_params(config_to_dict(cfg))
    client.log_batch(run_id, params=[Param(k, v) for k, v in sorted(params.items())])
    if (run_dir / CONFIG_ARTIFACT).is_file():
        client.log_artifact(run_id, str(run_dir / CONFIG_ARTIFACT))
    write_json_atomic(
        run_dir / RUN_FILE,
        {
            "mlflow_uri": tracking.mlflow_uri,
            "experiment": tracking.experiment,
            "experiment_id": str(experiment_id),
            "run_id": run_id,
        },
    )
    return run_id
