"""stages/promote.py: from an experiment to a registered model version with the alias `champion`.

Fast tests: synthetic experiment rows (as `dvc exp show` would list them) and MLflow runs with a tiny logged
model in a temporary SQLite store; each test registers under its own model name. The slow one promotes the
real trained model in a repository copy and serves it with `mlflow models serve`.
"""

import json
import os
import signal
import subprocess
import urllib.request

import numpy as np
import pytest

from stages import predict, promote
from stages.common import paths
from stages.common.errors import StageError
from stages.lib import tracking
from stages.lib.experiments import Experiment
from stages.lib.mnist_sources import load_idx
from tests.conftest import RAW_MNIST, answering_model, mlflow_as_a_stage, runs_that_trained
from tests.e2e import free_port, run, user_env, wait_until_answering

# name: (validation accuracy, test accuracy). "wide" is best on validation, "deep" on test.
ACCURACIES = {"main": (0.95, 0.96), "wide": (0.97, 0.94), "deep": (0.96, 0.97)}


def row(name: str, rev: str, model_md5: str | None = None, **metrics: float) -> Experiment:
    return Experiment(name, rev, {}, metrics, model_md5, "e" * 32)


def test_the_default_candidate_is_the_best_by_validation_accuracy_not_test_accuracy():
    rows = [
        row("workspace", "workspace", "1" * 32, val_accuracy=0.95, test_accuracy=0.96),
        row("main", "a" * 40, "1" * 32, val_accuracy=0.95, test_accuracy=0.96),
        row("wide", "b" * 40, "2" * 32, val_accuracy=0.97, test_accuracy=0.94),
        row("deep", "c" * 40, "3" * 32, val_accuracy=0.96, test_accuracy=0.97),
        row("failed", "d" * 40),  # no model, no metrics
        row("unevaluated", "f" * 40, "4" * 32, val_accuracy=0.99),
    ]
    assert promote.best_by_validation_accuracy(rows).name == "wide"
    # Equal validation accuracy: the committed row, which has a git commit, before the workspace.
    assert promote.best_by_validation_accuracy(rows[:2]).name == "main"
    assert promote.best_by_validation_accuracy(rows[1::-1]).name == "main"
    with pytest.raises(StageError, match="no experiment has a model with val_accuracy and test_accuracy"):
        promote.best_by_validation_accuracy(rows[4:])


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(experiment id, client, rows, {name: run id}): one training run with a logged model per model in ACCURACIES,
    in a temporary SQLite store that MLflow is pointed at as a stage points it; the workspace is main's model."""
    import mlflow

    root = tmp_path_factory.mktemp("promote")
    with mlflow_as_a_stage(root):
        experiment_id = tracking.open_experiment("tests")
        rows, runs = [], {}
        for i, (name, (validation, test)) in enumerate(ACCURACIES.items(), start=1):
            model_md5 = str(i) * 32
            tags = {tracking.MODEL_TAG: model_md5, "data.train.md5": "a" * 32, "data.validation.md5": "b" * 32}
            with tracking.start_run(experiment_id=experiment_id, tags=tags) as run_:
                mlflow.pyfunc.log_model(name="model", python_model=answering_model(name), pip_requirements=["mlflow"])
            runs[name] = run_.info.run_id
            rows.append(row(name, f"{i}" * 40, model_md5, val_accuracy=validation, test_accuracy=test))
        rows.insert(0, rows[0]._replace(name="workspace", rev="workspace"))
        yield experiment_id, mlflow.MlflowClient(), rows, runs


def versions(client, name: str) -> list[str]:
    """Its version numbers (MLflow gives them as int or str, by store)."""
    return sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))


def champion(client, name: str) -> int:
    return int(client.get_model_version_by_alias(name, "champion").version)


def test_promoting_registers_a_tagged_version_of_the_best_validation_model_and_moves_the_alias(store):
    import mlflow

    experiment_id, client, rows, runs = store
    message = promote.promote(rows, experiment_id, None, "first", force=False)
    assert message == (
        f"registered first version 1 (experiment wide, run {runs['wide']}, val_accuracy 0.9700, "
        "test_accuracy 0.9400) and moved alias champion to it"
    )
    version = client.get_model_version_by_alias("first", "champion")
    assert (int(version.version), version.run_id) == (1, runs["wide"])
    assert version.tags == {
        "dvc.experiment": "wide",
        "git.commit": "2" * 40,
        "data.train.md5": "a" * 32,
        "data.validation.md5": "b" * 32,
        "data.test.md5": "e" * 32,
        "val_accuracy": "0.97",
        "test_accuracy": "0.94",
        tracking.MODEL_TAG: "2" * 32,
    }
    assert mlflow.pyfunc.load_model("models:/first@champion").predict([0]) == ["wide"]


def test_a_candidate_testing_worse_than_the_champion_is_refused_unless_forced(store):
    experiment_id, client, rows, runs = store
    promote.promote(rows, experiment_id, "deep", "second", force=False)
    with pytest.raises(StageError) as error:
        promote.promote(rows, experiment_id, None, "second", force=False)  # wide: better validation, worse test
    assert str(error.value) == (
        "wide has test_accuracy 0.9400, below the champion's 0.9700 (second version 1); "
        "add --force to promote it anyway"
    )
    assert versions(client, "second") == [1]
    assert champion(client, "second") == 1

    message = promote.promote(rows, experiment_id, None, "second", force=True)
    assert message.startswith("registered second version 2 (experiment wide, ")
    assert versions(client, "second") == [1, 2]
    assert champion(client, "second") == 2


def test_a_better_candidate_needs_no_force_and_can_be_named_by_run_id(store):
    experiment_id, client, rows, runs = store
    promote.promote(rows, experiment_id, "main", "third", force=False)
    message = promote.promote(rows, experiment_id, runs["deep"], "third", force=False)
    assert message.startswith(f"registered third version 2 (experiment deep, run {runs['deep']}, ")
    assert client.get_model_version_by_alias("third", "champion").tags["dvc.experiment"] == "deep"


def test_a_run_id_of_a_model_in_the_workspace_and_a_commit_is_tagged_with_the_commit(store):
    experiment_id, client, rows, runs = store
    promote.promote(rows, experiment_id, runs["main"], "fourth", force=False)
    tags = client.get_model_version_by_alias("fourth", "champion").tags
    assert (tags["dvc.experiment"], tags["git.commit"]) == ("main", "1" * 40)


def test_promoting_the_champion_again_does_nothing(store):
    experiment_id, client, rows, runs = store
    promote.promote(rows, experiment_id, "main", "fifth", force=False)
    for again in ("main", "workspace", runs["main"]):  # the same model file, however named
        message = promote.promote(rows, experiment_id, again, "fifth", force=True)
        assert message.startswith("fifth version 1 (champion) is already this model (experiment ")
        assert message.endswith("); nothing to do")
    assert versions(client, "fifth") == [1]


@pytest.mark.parametrize("wanted", ["no-such-experiment", "0123456789abcdef0123456789abcdef"])
def test_an_unknown_experiment_or_run_is_one_line_and_registers_nothing(store, wanted):
    experiment_id, client, rows, _ = store
    with pytest.raises(StageError) as error:
        promote.promote(rows, experiment_id, wanted, "sixth", force=False)
    assert str(error.value) == (
        f"no such experiment or MLflow run: {wanted} (see `dvc exp show` and `python -m stages.runs`)"
    )
    assert "sixth" not in {m.name for m in client.search_registered_models()}


def test_an_experiment_whose_model_no_run_in_the_store_trained_is_one_line(store):
    experiment_id, client, rows, _ = store
    elsewhere = row("elsewhere", "9" * 40, "9" * 32, val_accuracy=0.99, test_accuracy=0.99)
    with pytest.raises(StageError, match=r"no MLflow run in .* trained the model of elsewhere \(md5 9{32}\)") as error:
        promote.promote([*rows, elsewhere], experiment_id, None, "seventh", force=False)
    assert "\n" not in str(error.value)
    assert "seventh" not in {m.name for m in client.search_registered_models()}


# --- Slow: the real model, promoted in a repository copy and served over HTTP ---


@pytest.mark.slow
def test_the_promoted_champion_is_served_by_mlflow_models_serve_and_predicts_like_the_keras_model(repo):
    import keras
    import mlflow

    uri = f"sqlite:///{repo / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    [training] = runs_that_trained(client, repo / paths.MODEL)
    # By run id: right whether or not `dvc repro` reproduced the committed model (then `main` is named).
    result = run(["python", "-m", "stages.promote", training.info.run_id], repo)
    [line] = result.stdout.splitlines()
    metrics = training.data.metrics
    assert line.startswith("promote: registered mnist-dnn version 1 (experiment ")
    assert line.endswith(
        f", run {training.info.run_id}, val_accuracy {metrics['val_accuracy']:.4f}, "
        f"test_accuracy {metrics['test_accuracy']:.4f}) and moved alias champion to it"
    )
    champion = client.get_model_version_by_alias("mnist-dnn", "champion")
    assert champion.tags[tracking.MODEL_TAG] == tracking.md5(repo / paths.MODEL)
    assert champion.tags["data.test.md5"] == tracking.md5(repo / paths.PREPARED_TEST)

    # The input as predict builds it (tests/test_serving.py: every route, and what is refused).
    inputs = predict.model_input(load_idx(RAW_MNIST).test.images[:50, :, :, 0])

    port = free_port()
    server = subprocess.Popen(
        ["mlflow", "models", "serve", "-m", "models:/mnist-dnn@champion", "--env-manager", "local"]
        + ["--host", "127.0.0.1", "--port", str(port)],
        cwd=repo,
        env=user_env(MLFLOW_TRACKING_URI=uri),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_until_answering(f"http://127.0.0.1:{port}/ping", server, 180, "mlflow models serve")
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps({"instances": inputs.tolist()}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            served = np.asarray(json.load(response)["predictions"])
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)

    expected = keras.models.load_model(repo / paths.MODEL).predict(inputs, verbose=0)
    assert served.shape == (50, 10)
    np.testing.assert_array_equal(np.argmax(served, axis=1), np.argmax(expected, axis=1))


def test_of_two_runs_of_one_model_file_the_one_with_its_test_metrics_is_promoted(store):
    """train reran and DVC restored evaluate from its run-cache: the newer run has no test metrics."""
    import mlflow

    experiment_id, client, rows, _ = store
    tags = {tracking.MODEL_TAG: "9" * 32}
    with tracking.start_run(experiment_id=experiment_id, tags=tags) as evaluated:
        mlflow.log_metric("test_accuracy", 0.9)
    with tracking.start_run(experiment_id=experiment_id, tags=tags):
        pass
    retrained = row("retrained", "9" * 40, "9" * 32, val_accuracy=0.9, test_accuracy=0.9)
    assert promote.candidate([*rows, retrained], experiment_id, "retrained")[1].info.run_id == evaluated.info.run_id
