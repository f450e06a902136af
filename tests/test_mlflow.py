"""Export to MLflow, read back with MLflow's own client from its local store: each evaluated round's figures
as series against the round, the options as parameters, the regime and guarantee as tags; one MLflow run
per run id however often it is exported; from finished results (`export`) and live from a run (`--log-to`)."""

import sys

import pytest
from support import assert_user_error, invoke, write_run

pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def client_of(uri: str) -> tuple[MlflowClient, dict]:
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("dpfl-bench")
    return client, {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}


def history(client: MlflowClient, run, name: str) -> list[tuple[int, float]]:
    return sorted((m.step, round(m.value, 6)) for m in client.get_metric_history(run.info.run_id, name))


def test_export_writes_series_parameters_and_tags_once_per_run(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    results = tmp_path / "results"
    private = write_run(results, method="dp-lora", seed=0, accuracies=[0.5, 0.6, 0.7], eps=1.0)
    authors = write_run(results, method="la-lora", seed=0, accuracies=[0.8], dp_level="authors", dp_sigma=0.2)
    for _ in range(2):  # exporting again adds nothing
        result = invoke("export", results, "--to", "mlflow", "--out", tmp_path / "runs")
        assert result.exit_code == 0, result.output
    assert "mlflow ui --backend-store-uri" in result.output
    client, runs = client_of(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    assert set(runs) == {private.stem, authors.stem}
    run = runs[private.stem]
    assert history(client, run, "test_accuracy") == [(1, 0.5), (2, 0.6), (3, 0.7)]
    assert [s for s, _ in history(client, run, "eps_spent")] == [1, 2, 3]
    assert run.data.params["local_steps"] and run.data.tags["guarantee"] == "an accounted (ε, δ) guarantee"
    assert run.info.status == "FINISHED"
    unaccounted = runs[authors.stem]
    assert unaccounted.data.tags["guarantee"] == "NO privacy guarantee"
    assert history(client, unaccounted, "eps_spent") == []  # NaN: no ε to plot


def test_a_run_logs_each_evaluated_round_where_mlflow_tracking_uri_says(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'server.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    result = invoke("run", "--task", "synthetic", "--rounds", "2", "--local-steps", "1", "--eps", "inf", "--log-to", "mlflow")
    assert result.exit_code == 0, result.output
    client, runs = client_of(uri)
    (run,) = runs.values()
    assert [s for s, _ in history(client, run, "val_accuracy")] == [1, 2]
    assert run.info.status == "FINISHED" and run.data.tags["method"] == "la-lora"  # the default method


def test_a_missing_mlflow_is_one_line(tmp_path, monkeypatch):
    write_run(tmp_path, method="dp-lora", seed=0, accuracies=[0.5], eps=1.0)
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow now raises ImportError
    assert_user_error(invoke("export", tmp_path, "--to", "mlflow"), "pip install mlflow")
    assert_user_error(invoke("run", "--task", "synthetic", "--log-to", "mlflow"), "pip install mlflow")
