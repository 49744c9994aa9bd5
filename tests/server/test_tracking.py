"""server/tracking.py without a tracking server: the metric and parameter mapping, the config
keys, the digest, and a tracker that cannot reach its server (the run must go on)."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import pytest

from common.config import config_to_dict, load_config
from common.errors import ConfigError
from server.checkpoint import config_digest
from server.tracking import (
    RUN_FILE,
    MlflowTracker,
    Tracker,
    config_params,
    open_tracker,
    round_metrics,
)
from tests.helpers.mlflow_server import free_port

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "examples" / "tiny.toml"
needs_mlflow = pytest.mark.skipif(
    importlib.util.find_spec("mlflow") is None, reason="pip install 'fedlora[mlflow]'"
)

# A metrics.jsonl line as server/metrics.py writes it (a sampling DP round, trimmed).
LINE: dict[str, Any] = {
    "round": 3,
    "version": 3,
    "train_loss": 2.5,
    "eval_loss": 2.0,
    "eval_perplexity": 7.38905609893065,
    "eval_accuracy": None,
    "bytes_up": 1200,
    "bytes_down": 3400,
    "seconds_train": 1.5,
    "seconds_eval": 0.25,
    "peak_memory_bytes": None,
    "cohort": ["site-0", "site-2"],
    "rejected": [{"site": "site-1", "reason": "bad signature"}],
    "sites": {
        "site-0": {"train": {"train_loss": 2.4, "num_examples": 10}, "evaluate": {}},
        "site-2": {"evaluate": {"eval_loss": 1.9, "eval_accuracy": 0.5}},
    },
    "sampled_train": ["site-0", "site-1", "site-2"],
    "available_sites": 4,
    "epsilon": 1.25,
    "dp_delta": 1e-05,
    "global_eval_loss": 2.1,
    "seconds": 2.0,
}


def test_round_metrics_maps_a_metrics_line() -> None:
    assert round_metrics(LINE) == {
        "round_failed": 0.0,
        "version": 3.0,
        "train_loss": 2.5,
        "eval_loss": 2.0,
        "eval_perplexity": 7.38905609893065,
        "bytes_up": 1200.0,
        "bytes_down": 3400.0,
        "seconds_train": 1.5,
        "seconds_eval": 0.25,
        "cohort_size": 2.0,
        "rejected_replies": 1.0,
        "sampled_train_count": 3.0,
        "available_sites": 4.0,
        "epsilon": 1.25,
        "dp_delta": 1e-05,
        "global_eval_loss": 2.1,
        "seconds": 2.0,
        "site/site-0/train/train_loss": 2.4,
        "site/site-0/train/num_examples": 10.0,
        "site/site-2/evaluate/eval_loss": 1.9,
        "site/site-2/evaluate/eval_accuracy": 0.5,
    }


def test_a_failed_round_is_flagged_and_its_reason_left_out() -> None:
    line = {"round": 2, "version": 1, "failed": "too few replies", "cohort": [], "rejected": []}
    assert round_metrics(line) == {
        "round_failed": 1.0,
        "version": 1.0,
        "cohort_size": 0.0,
        "rejected_replies": 0.0,
    }


def test_config_params_are_flat_kebab_keys() -> None:
    cfg = load_config(TINY, ["modules.shared.site-ranks={site-2 = 2}", "aggregation.rule='exact'"])
    params = config_params(config_to_dict(cfg))
    assert params["federation.rounds"] == "3"
    assert params["model.name"] == "tiny-llama"  # text as it is, not JSON-quoted
    assert params["train.lr"] == "0.003"
    assert params["modules.shared.targets"] == '["q_proj", "v_proj"]'
    assert params["modules.shared.site-ranks.site-2"] == "2"
    assert params["tracking.backend"] == "none"
    assert params["data.eval-path"] == "null"
    assert (
        config_params({"data": {"labels": ["x" * 5000, "y" * 5000]}})["data.labels"]
        == ('["' + "x" * 5000 + '", "' + "y" * 5000 + '"]')[:6000]
    )


def test_tracking_keys_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"tracking\.backend = 'mlflow'"):
        load_config(TINY, ["tracking.mlflow-uri='http://127.0.0.1:5000'"])
    with pytest.raises(ConfigError, match=r"MLflow 3 refuses file: stores"):
        load_config(TINY, ["tracking.backend='mlflow'", "tracking.mlflow-uri='file:///tmp/x'"])
    with pytest.raises(ConfigError, match=r"tracking\.mlflow-uri = 'localhost:5000'"):
        load_config(TINY, ["tracking.backend='mlflow'", "tracking.mlflow-uri='localhost:5000'"])
    with pytest.raises(ConfigError, match=r"tracking\.bogus"):
        load_config(TINY, ["tracking.bogus=1"])
    cfg = load_config(TINY, ["tracking.backend='mlflow'", "tracking.mlflow-uri='http://h:5000'"])
    assert cfg.tracking.experiment == "fedlora"


def test_tracking_keys_do_not_change_the_config_digest() -> None:
    """Another tracking server on resume is allowed; any other key still changes the digest."""
    plain = config_to_dict(load_config(TINY))
    tracked = config_to_dict(load_config(TINY, ["tracking.backend='mlflow'"]))
    other = config_to_dict(load_config(TINY, ["federation.rounds=4"]))
    assert config_digest(plain) == config_digest(tracked)
    assert config_digest(plain) != config_digest(other)


def test_no_tracker_unless_configured(tmp_path: Path) -> None:
    tracker = open_tracker(load_config(TINY), tmp_path, resume=False, fedlora_run_id="r")
    assert type(tracker) is Tracker
    assert not (tmp_path / RUN_FILE).exists() and not any(tmp_path.iterdir())


@needs_mlflow
def test_an_unreachable_server_warns_once_and_tracks_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cfg = load_config(TINY, ["tracking.backend='mlflow'", f"tracking.mlflow-uri='{uri}'"])
    with caplog.at_level(logging.WARNING, logger="server.tracking"):
        tracker = open_tracker(cfg, tmp_path, resume=False, fedlora_run_id="r")
    assert type(tracker) is Tracker  # tracks nothing; the federation goes on
    (record,) = caplog.records
    assert uri in record.getMessage() and "metrics.jsonl" in record.getMessage()
    assert not (tmp_path / RUN_FILE).exists()


class _FailingClient:
    """Stands in for an MlflowClient whose server went away mid-run."""

    def __init__(self) -> None:
        self.calls = 0

    def log_batch(self, *_: Any, **__: Any) -> None:
        self.calls += 1
        raise ConnectionError("connection refused")

    log_artifacts = log_artifact = set_terminated = log_batch


@needs_mlflow
def test_a_server_lost_mid_run_warns_once_then_is_left_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = _FailingClient()
    tracker = MlflowTracker(client, "run-1", "http://tracking:5000")
    with caplog.at_level(logging.WARNING, logger="server.tracking"):
        tracker.log_round(LINE)  # raises inside: caught, warned
        tracker.log_round({**LINE, "round": 4})
        tracker.finish("FINISHED", tmp_path / "summary.json")
    assert client.calls == 1  # no second try that could stall another round
    (record,) = caplog.records
    assert "logging round 3" in record.getMessage() and "ConnectionError" in record.getMessage()
