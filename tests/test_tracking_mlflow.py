"""A run logs to a real MLflow tracking server, and its resume continues the same MLflow run.

``mlflow server`` runs on 127.0.0.1 with an SQLite store in a temp folder. The federation is
examples/tiny.toml with one round, the real coordinator and the real site glue over
``InProcessGrid`` (no Ray: the server's start already costs 20-50 s on 2 cores). The
coordinator is killed before round 1's training and resumed; the test then reads back through
the MLflow client: one run, the config as parameters, metrics for rounds 0 and 1, and every
published version's folder with its manifest among the artifacts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from client.app import make_client_app
from common.config import config_to_dict, load_config
from common.registry import Registry
from fedlora.simulate import provision_keys
from server.federation import prepare, run_federation
from server.tracking import RUN_FILE, config_params
from tests.helpers.in_process import Crash, InProcessGrid, flower_task_identity
from tests.helpers.mlflow_server import mlflow_server

pytestmark = pytest.mark.slow
mlflow = pytest.importorskip("mlflow")

REPO = Path(__file__).resolve().parent.parent
TINY = [
    "federation.rounds=1",
    "train.local-steps=1",
    "privacy.mode='none'",
    "tracking.backend='mlflow'",
    "tracking.experiment='tiny-tracked'",
]

task_identity = pytest.fixture(scope="module", autouse=True)(flower_task_identity)


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("tracked")
    with mlflow_server(work / "mlflow") as server:
        cfg = load_config(
            REPO / "examples" / "tiny.toml", [*TINY, f"tracking.mlflow-uri='{server.uri}'"]
        )
        out = work / "run"
        sealing, keys = provision_keys(cfg, out)
        coordinator = prepare(cfg, out, sealing)  # loads the model while the server starts
        server.wait_ready()
        with pytest.raises(Crash):  # killed after round 0 (v0000 published), before round 1
            app = make_client_app(cfg, keys, out / "sites")
            grid = InProcessGrid(app, cfg.federation.sites, crash_before=(1, "train"))
            run_federation(grid, coordinator)
        first = json.loads((out / RUN_FILE).read_text())
        app = make_client_app(cfg, keys, out / "sites")
        run_federation(InProcessGrid(app, cfg.federation.sites), prepare(cfg, out, sealing), True)
        client = mlflow.MlflowClient(tracking_uri=server.uri)
        experiment = client.get_experiment_by_name("tiny-tracked")
        yield {
            "cfg": cfg,
            "out": out,
            "client": client,
            "first": first,
            "runs": client.search_runs([experiment.experiment_id]),
        }


def test_a_resumed_run_continues_the_same_mlflow_run(tracked: dict[str, Any]) -> None:
    (run,) = tracked["runs"]
    assert run.info.run_id == tracked["first"]["run_id"]
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "run"  # the run folder's name


def test_the_config_is_logged_as_parameters(tracked: dict[str, Any]) -> None:
    (run,) = tracked["runs"]
    expected = config_params(config_to_dict(tracked["cfg"]))
    assert run.data.params == expected
    assert run.data.params["federation.rounds"] == "1"
    assert run.data.params["model.name"] == "tiny-llama"
    assert run.data.params["modules.shared.targets"] == '["q_proj", "v_proj"]'


def test_every_round_has_its_metrics(tracked: dict[str, Any]) -> None:
    (run,) = tracked["runs"]
    client = tracked["client"]
    lines = [json.loads(x) for x in (tracked["out"] / "metrics.jsonl").read_text().splitlines()]
    for name in ("eval_loss", "bytes_down", "seconds_eval", "cohort_size", "rejected_replies"):
        history = client.get_metric_history(run.info.run_id, name)
        assert sorted(m.step for m in history) == [0, 1], name
    for line in lines:  # the values are metrics.jsonl's, round by round
        history = client.get_metric_history(run.info.run_id, "eval_loss")
        (logged,) = [m.value for m in history if m.step == line["round"]]
        assert logged == pytest.approx(line["eval_loss"])
    (bytes_up,) = [m for m in client.get_metric_history(run.info.run_id, "bytes_up") if m.step]
    assert bytes_up.value == lines[1]["bytes_up"] > 0
    per_site = client.get_metric_history(run.info.run_id, "site/site-0/train/train_loss")
    assert [m.step for m in per_site] == [1]


def test_every_published_version_is_an_artifact_with_its_manifest(
    tracked: dict[str, Any], tmp_path: Path
) -> None:
    (run,) = tracked["runs"]
    client = tracked["client"]
    registry = Registry(tracked["out"] / "registry")
    for version in registry.versions("shared"):
        folder = f"registry/shared/v{version.version:04d}"
        names = {Path(f.path).name for f in client.list_artifacts(run.info.run_id, folder)}
        assert {"manifest.json", "adapter_model.safetensors", "adapter_config.json"} <= names
        local = client.download_artifacts(run.info.run_id, f"{folder}/manifest.json", tmp_path)
        assert json.loads(Path(local).read_text()) == version.manifest
    assert [v.version for v in registry.versions("shared")] == [0, 1]
    top = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "summary.json", "registry"} <= top
