"""End to end on the full MNIST data, in a throwaway git copy of the repository, as a user runs it."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
import yaml

from stages.records import read_framed
from tests.e2e import clone_repository, run

pytestmark = pytest.mark.slow

METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return clone_repository(tmp_path_factory.mktemp("repo"))


def client(repo) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")


def train_run_id(repo) -> str:
    return json.loads((repo / "metrics/train.json").read_text())["mlflow_run_id"]


def set_param(repo, key, value):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params[key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_split_writes_the_records_and_a_second_repro_reruns_nothing(repo):
    run(["dvc", "repro", "split"], repo)
    counts = {
        path: len(read_framed(repo / path))
        for path in ("data/split/train.tfrecord", "data/split/validation.tfrecord", "data/prepared/test.tfrecord")
    }
    assert counts == {
        "data/split/train.tfrecord": 54_000,
        "data/split/validation.tfrecord": 6_000,
        "data/prepared/test.tfrecord": 10_000,
    }
    summary = json.loads((repo / "data/prepared/summary.json").read_text())
    assert summary["sha256"]["train-images-idx3-ubyte"].startswith("ba891046")

    again = run(["dvc", "repro", "split"], repo).stdout
    assert "Running stage" not in again
    assert "didn't change" in again


def test_changing_epochs_leaves_the_data_stages_unchanged(repo):
    original = (repo / "params.yaml").read_text()
    try:
        set_param(repo, "epochs", 7)
        status = run(["dvc", "status"], repo).stdout
        assert "train:" in status
        assert "prepare:" not in status and "split:" not in status
    finally:
        (repo / "params.yaml").write_text(original)


def test_repro_trains_evaluates_and_records_a_complete_mlflow_run(repo):
    result = run(["dvc", "repro"], repo)
    assert "Test accuracy:" in result.stdout
    evaluation = json.loads((repo / "metrics/evaluate.json").read_text())
    assert evaluation["test_accuracy"] >= 0.965

    run_ = client(repo).get_run(train_run_id(repo))
    assert run_.info.status == "FINISHED"
    assert run_.data.params["epochs"] == "5"
    assert run_.data.metrics["test_accuracy"] == pytest.approx(evaluation["test_accuracy"])
    for name in METRICS:
        history = client(repo).get_metric_history(run_.info.run_id, name)
        assert [m.step for m in history] == [1, 2, 3, 4, 5]
    assert (repo / "mlartifacts").is_dir()

    shown = json.loads(run(["dvc", "metrics", "show", "--json"], repo).stdout)
    assert json.dumps(shown).count(str(evaluation["test_accuracy"])) >= 1


def test_repro_again_reruns_nothing_and_forced_repro_gives_identical_results(repo):
    assert "Running stage" not in run(["dvc", "repro"], repo).stdout

    first_weights = (repo / "models/model.keras").read_bytes()
    first = {name: json.loads((repo / f"metrics/{name}.json").read_text()) for name in ("train", "evaluate")}
    run(["dvc", "repro", "-f", "train", "evaluate"], repo)
    second = {name: json.loads((repo / f"metrics/{name}.json").read_text()) for name in ("train", "evaluate")}
    assert second["train"]["mlflow_run_id"] != first["train"]["mlflow_run_id"]
    for metrics in (first["train"], second["train"]):
        metrics.pop("mlflow_run_id"), metrics.pop("mlflow_model_uri")
    assert first == second
    import keras

    # Weights compared as arrays: the .keras zip also stores a timestamp.
    (repo / "first.keras").write_bytes(first_weights)
    old, new = keras.models.load_model(repo / "first.keras"), keras.models.load_model(repo / "models/model.keras")
    assert all(np.array_equal(a, b) for a, b in zip(old.get_weights(), new.get_weights(), strict=True))
    (repo / "first.keras").unlink()


def test_experiment_reruns_only_training_and_leaves_a_run_named_after_it(repo):
    result = run(["dvc", "exp", "run", "-S", "epochs=2", "-n", "two-epochs"], repo)
    assert "Running stage 'prepare'" not in result.stdout and "Running stage 'split'" not in result.stdout
    assert "Running stage 'train'" in result.stdout

    run_ = client(repo).get_run(train_run_id(repo))
    assert run_.info.run_name == "two-epochs"
    assert run_.info.status == "FINISHED"
    assert len(client(repo).get_metric_history(run_.info.run_id, "val_accuracy")) == 2
    assert "test_accuracy" in run_.data.metrics

    shown = run(["dvc", "exp", "show", "--json"], repo).stdout
    assert "two-epochs" in shown and "test_accuracy" in shown


def test_queued_experiment_lands_in_the_repository_database(repo):
    before = {r.info.run_id for r in client(repo).search_runs(client(repo).search_experiments()[0].experiment_id)}
    run(["dvc", "exp", "run", "--queue", "-S", "epochs=1", "-S", "hidden_layer_size=20", "-n", "queued-one"], repo)
    run(["dvc", "exp", "run", "--run-all"], repo)
    experiment = client(repo).get_experiment_by_name("mnist-dnn")
    runs = [r for r in client(repo).search_runs(experiment.experiment_id) if r.info.run_id not in before]
    assert [r.info.run_name for r in runs] == ["queued-one"]
    assert runs[0].info.status == "FINISHED"
    assert runs[0].data.params["hidden_layer_size"] == "20"
    assert "test_accuracy" in runs[0].data.metrics
    assert client(repo).list_artifacts(runs[0].info.run_id), "the queued run's artifacts are missing"
