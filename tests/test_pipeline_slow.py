"""End to end on the full MNIST data, in a throwaway git copy of the repository, as a user runs it.

The tests share one copy and run in order, as one user's session would: each starts from the
state the previous ones left.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request

import mlflow
import numpy as np
import pytest
import yaml

from stages.records import read_framed
from tests.e2e import clone_repository, run, user_env

pytestmark = pytest.mark.slow

METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return clone_repository(tmp_path_factory.mktemp("repo"))


def client(repo) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")


def train_run_id(repo) -> str:
    return json.loads((repo / "metrics/train.json").read_text())["mlflow_run_id"]


def experiments_shown(repo) -> dict:
    """`dvc exp show`'s experiments by name: their metrics files as DVC reports them."""
    rows = json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout)
    return {
        experiment["name"]: experiment["revs"][0]["data"]["metrics"]
        for row in rows
        for experiment in row.get("experiments") or []
    }


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
    assert shown[""]["data"]["metrics/evaluate.json"]["data"] == evaluation


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
    assert run_.data.tags["dvc.experiment"] == "two-epochs"
    assert run_.info.status == "FINISHED"
    assert len(client(repo).get_metric_history(run_.info.run_id, "val_accuracy")) == 2
    assert "test_accuracy" in run_.data.metrics

    shown = experiments_shown(repo)
    assert shown["two-epochs"]["metrics/evaluate.json"]["data"]["test_accuracy"] == run_.data.metrics["test_accuracy"]


def logged_model_of(repo, run_id):
    experiment = client(repo).get_experiment_by_name("mnist-dnn")
    models = client(repo).search_logged_models([experiment.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    return models[0] if models else None


@pytest.mark.parametrize("round_", [1, 2])
def test_parallel_queued_experiments_all_land_complete_in_the_repository_database(repo, round_):
    experiment = client(repo).get_experiment_by_name("mnist-dnn")
    before = {r.info.run_id for r in client(repo).search_runs([experiment.experiment_id])}
    # Different sizes each round: the same params again would be restored from the run-cache, untrained.
    names = [f"parallel-{round_}-{size + round_}" for size in (16, 24, 32, 40)]
    for name in names:
        size = name.rsplit("-", 1)[1]
        run(["dvc", "exp", "run", "--queue", "-S", "epochs=2", "-S", f"hidden_layer_size={size}", "-n", name], repo)
    run(["dvc", "exp", "run", "--run-all", "-j", "4"], repo)

    shown = experiments_shown(repo)
    runs = [r for r in client(repo).search_runs([experiment.experiment_id]) if r.info.run_id not in before]
    assert sorted(r.info.run_name for r in runs) == sorted(names)
    for run_ in runs:
        assert run_.info.status == "FINISHED", run_.info.run_name
        assert run_.data.params["hidden_layer_size"] == run_.info.run_name.rsplit("-", 1)[1]
        assert set(run_.data.params) == set(yaml.safe_load((repo / "params.yaml").read_text()))
        for name in METRICS:
            assert [m.step for m in client(repo).get_metric_history(run_.info.run_id, name)] == [1, 2]
        assert "test_accuracy" in run_.data.metrics
        assert (
            shown[run_.info.run_name]["metrics/evaluate.json"]["data"]["test_accuracy"]
            == (run_.data.metrics["test_accuracy"])
        )
        assert logged_model_of(repo, run_.info.run_id) is not None, run_.info.run_name
        assert [a.path for a in client(repo).list_artifacts(run_.info.run_id)] == ["confusion_matrix.png"]


def test_evaluate_rerun_on_a_run_cached_model_records_into_the_run_that_trained_it(repo):
    run(["dvc", "exp", "run", "-S", "epochs=3", "-n", "three-epochs"], repo)
    three_epochs_run = train_run_id(repo)
    run(["dvc", "exp", "run", "-S", "epochs=2", "-n", "back-to-two"], repo)
    # Same params as before: DVC restores train from its run-cache. Changing evaluate's code
    # makes evaluate itself rerun on that restored model.
    with (repo / "stages/evaluate.py").open("a") as file:
        file.write("# changed\n")
    result = run(["dvc", "exp", "run", "-S", "epochs=3", "-n", "three-again"], repo)
    assert "Running stage 'train'" not in result.stdout
    assert "Running stage 'evaluate'" in result.stdout
    assert train_run_id(repo) == three_epochs_run
    history = client(repo).get_metric_history(three_epochs_run, "test_accuracy")
    assert len(history) == 2 and history[0].value == history[1].value
    run(["git", "checkout", "stages/evaluate.py"], repo)


@pytest.fixture
def tracking_server(tmp_path):
    """A real `mlflow server` on 127.0.0.1 with its own SQLite store and artifact root."""
    port = free_port()
    server = subprocess.Popen(
        [
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            (tmp_path / "server-artifacts").as_uri(),
            "--workers",
            "1",
        ],
        env=user_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
                time.sleep(0.5)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_repro_records_a_complete_run_on_a_tracking_server(repo, tracking_server):
    run(["dvc", "repro", "-f", "train", "evaluate"], repo, env=user_env(MLFLOW_TRACKING_URI=tracking_server))
    remote = mlflow.MlflowClient(tracking_uri=tracking_server)
    run_ = remote.get_run(train_run_id(repo))
    assert run_.info.status == "FINISHED"
    assert run_.data.params["epochs"] == str(yaml.safe_load((repo / "params.yaml").read_text())["epochs"])
    assert "test_accuracy" in run_.data.metrics
    assert [a.path for a in remote.list_artifacts(run_.info.run_id)] == ["confusion_matrix.png"]
    mlflow.set_tracking_uri(tracking_server)
    model_uri = json.loads((repo / "metrics/train.json").read_text())["mlflow_model_uri"]
    predictions = mlflow.pyfunc.load_model(model_uri).predict(np.zeros((2, 28, 28, 1), np.float32))
    assert predictions.shape == (2, 10)


def test_a_tracking_server_that_is_down_fails_fast_in_one_line_and_leaves_no_output(repo):
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = run(["dvc", "repro", "-f", "train"], repo, env=user_env(MLFLOW_TRACKING_URI=uri), check=False)
    assert result.returncode != 0
    assert time.monotonic() - started < 30
    errors = [line for line in result.stderr.splitlines() if line.startswith("train: error:")]
    assert len(errors) == 1 and uri in errors[0]
    assert not (repo / "models/model.keras").exists()
    assert not (repo / "metrics/train.json").exists()
