import csv
import dataclasses
import hashlib
import json
import os
import re
import socket
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages import evaluate
from stages.common import paths
from stages.common.errors import StageError
from stages.common.params import parse_params
from stages.lib import tracking
from stages.lib.model import load_model
from stages.train import HISTORY_COLUMNS, save_model, train
from tests.conftest import (
    EPOCH_METRICS,
    REAL_PARAMS,
    SMALL,
    mlflow_as_a_stage,
    runs_that_trained,
    set_params,
    weights_equal,
    write_stage_inputs,
)
from tests.e2e import copy_repository


@pytest.fixture(scope="module")
def trained(small_data):
    return train(SMALL, *small_data)


def test_train_returns_one_row_per_epoch_and_learns(trained):
    model, history = trained
    assert float(model.optimizer.learning_rate) == pytest.approx(SMALL.learning_rate)
    assert model.steps_per_execution == 1  # saved for inference, not with training's 1000
    assert [row["epoch"] for row in history] == [1, 2]
    assert all(list(row) == list(HISTORY_COLUMNS) for row in history)
    assert all(0.0 <= row[name] <= 1.0 for row in history for name in ("accuracy", "val_accuracy"))
    assert history[1]["loss"] < history[0]["loss"]
    assert history[1]["val_accuracy"] > 0.5  # chance is 0.1: images and labels stay paired


def test_saved_model_file_is_the_same_bytes_at_another_time_and_loads_back(trained, tmp_path):
    import keras

    model, _ = trained
    save_model(model, tmp_path / "first.keras")
    time.sleep(2.1)  # zip entries store the time to 2 s, Keras' metadata to 1 s
    save_model(model, tmp_path / "second.keras")
    assert (tmp_path / "first.keras").read_bytes() == (tmp_path / "second.keras").read_bytes()
    # Keras numbers shared objects by memory address, which differs between processes.
    with zipfile.ZipFile(tmp_path / "first.keras") as saved:
        config = saved.read("config.json").decode()
    assert re.findall(r'"shared_object_id": (\d+)', config)[0] == "1"
    assert weights_equal(keras.models.load_model(tmp_path / "second.keras"), model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first.keras", "second.keras"]


def test_validation_metrics_are_those_of_the_final_model_on_the_validation_set(trained, small_data):
    model, history = trained
    results = evaluate.evaluate(model, small_data[1])
    assert results["test_loss"] == pytest.approx(history[-1]["val_loss"], rel=1e-5)
    assert results["test_accuracy"] == pytest.approx(history[-1]["val_accuracy"])


def test_same_seed_gives_identical_weights_and_another_seed_does_not(trained, small_data):
    again, history = train(SMALL, *small_data)
    assert weights_equal(again, trained[0])
    assert history == trained[1]
    other, _ = train(dataclasses.replace(SMALL, seed=2), *small_data)
    assert not weights_equal(other, trained[0])


def test_evaluate_accuracy_is_the_share_of_correct_argmax_predictions(trained, small_data):
    model, _ = trained
    validation = small_data[1]
    results = evaluate.evaluate(model, validation)
    expected = np.argmax(model.predict(validation.images, verbose=0), axis=1)
    np.testing.assert_array_equal(results["predictions"], expected)
    assert results["test_accuracy"] == pytest.approx(np.mean(expected == validation.labels))


def test_evaluate_computes_the_models_own_probabilities_and_keras_clipped_loss(trained, small_data):
    model, _ = trained
    validation = small_data[1]
    results = evaluate.evaluate(model, validation)
    # Keras' softmax differs from evaluate's only in its reciprocal's last bits (docs/determinism.md).
    np.testing.assert_allclose(results["probabilities"], model.predict(validation.images, verbose=0), rtol=1e-6)
    of_label = results["probabilities"][np.arange(len(validation.labels)), validation.labels]
    expected = -np.mean(
        np.log(np.clip(of_label.astype(np.float64), evaluate.KERAS_EPSILON, 1 - evaluate.KERAS_EPSILON))
    )
    assert results["test_loss"] == pytest.approx(expected, rel=1e-15)


def test_confusion_matrix_and_per_class_metrics_by_hand():
    labels = np.array([0, 0, 1, 2, 2, 2, 3])
    predictions = np.array([0, 1, 1, 2, 2, 0, 2])
    matrix = evaluate.confusion_matrix(labels, predictions)
    assert matrix.shape == (10, 10) and matrix.sum() == 7
    assert (matrix[0, 0], matrix[0, 1], matrix[1, 1], matrix[2, 2], matrix[2, 0], matrix[3, 2]) == (1, 1, 1, 2, 1, 1)
    metrics = evaluate.per_class_metrics(matrix)
    assert metrics["0"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert metrics["1"] == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1})
    assert metrics["2"] == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3})
    assert metrics["3"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}  # present, never predicted
    assert metrics["9"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}  # absent
    assert list(metrics) == [str(d) for d in range(10)]
    table = evaluate.per_class_table(metrics)
    assert table["columns"] == ["digit", "precision", "recall", "f1", "support"]
    assert table["data"][:2] == [[0, 0.5, 0.5, 0.5, 2], [1, 0.5, 1.0, 0.6667, 1]]  # rounded to 4 decimals
    assert [row[0] for row in table["data"]] == list(range(10))


def test_load_model_errors_name_the_file(tmp_path):
    with pytest.raises(StageError, match="file not found"):
        load_model(tmp_path / "absent.keras")
    broken = tmp_path / "broken.keras"
    broken.write_bytes(b"not a zip")
    with pytest.raises(StageError, match="not a loadable Keras model") as error:
        load_model(broken)
    assert str(broken) in str(error.value) and "\n" not in str(error.value)


# --- MLflow, in this process, on a temporary SQLite store of the test's own ---


@pytest.fixture(scope="module")
def new_store(tmp_path_factory):
    """A folder with a new MLflow store holding the experiment "tests": created once, as it takes seconds."""
    root = tmp_path_factory.mktemp("new-store")
    with mlflow_as_a_stage(root):
        tracking.open_experiment("tests")
    return root


@pytest.fixture
def mlflow_root(new_store, tmp_path):
    """This test's own copy of new_store, seen as a stage sees it."""
    root = copy_repository(new_store, tmp_path / "root")
    with mlflow_as_a_stage(root):
        yield root


@pytest.fixture
def experiment(mlflow_root):
    """Connect to mlflow_root/mlflow.db as a stage does; (experiment id, client)."""
    import mlflow

    return tracking.open_experiment("tests"), mlflow.MlflowClient(f"sqlite:///{mlflow_root}/mlflow.db")


def test_open_experiment_reuses_it_and_keeps_artifacts_beside_the_database(experiment, mlflow_root):
    experiment_id, client = experiment
    assert tracking.open_experiment("tests") == experiment_id
    assert client.get_experiment(experiment_id).name == "tests"
    assert client.get_experiment(experiment_id).artifact_location == (mlflow_root / "mlartifacts").as_uri()


def test_opening_a_broken_store_is_one_line(stage_root):
    (stage_root / "mlflow.db").write_text("not a database")
    with pytest.raises(StageError, match="unreachable or broken") as error:
        tracking.open_experiment("tests")
    assert "\n" not in str(error.value)


def test_a_new_run_has_its_params_name_source_and_owner_and_ends_with_its_block(experiment, monkeypatch):
    import mlflow

    experiment_id, client = experiment
    monkeypatch.setenv("DVC_EXP_NAME", "exp-b")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "3" * 40)
    started = tracking.start_run(params={"epochs": 2}, tags={"extra": "x"}, experiment_id=experiment_id)
    with pytest.raises(RuntimeError), started as run:
        raise RuntimeError("bug")
    assert mlflow.active_run() is None
    recorded = client.get_run(run.info.run_id)
    assert (recorded.info.run_name, recorded.info.status, recorded.data.params) == ("exp-b", "FAILED", {"epochs": "2"})
    tags = recorded.data.tags
    assert (tags["git.commit"], tags["dvc.experiment"], tags["extra"]) == ("3" * 40, "exp-b", "x")
    assert (tags["process.pid"], tags["process.host"]) == (str(os.getpid()), socket.gethostname())


def training_run(experiment_id, model_md5, evaluated=False, host=None):
    """A finished run tagged as having trained the model with `model_md5`; its id."""
    import mlflow

    with tracking.start_run(experiment_id=experiment_id, tags={tracking.MODEL_TAG: model_md5}) as run:
        if host:
            mlflow.set_tag("process.host", host)
        if evaluated:
            mlflow.log_metric("test_accuracy", 0.9)
    return run.info.run_id


def test_no_run_trained_an_unknown_model(experiment):
    experiment_id, _ = experiment
    training_run(experiment_id, "a" * 32)
    assert tracking.find_training_run(experiment_id, "b" * 32) is None


def test_after_a_forced_rerun_the_new_unevaluated_run_is_found(experiment):
    experiment_id, _ = experiment
    training_run(experiment_id, "c" * 32, evaluated=True)
    rerun = training_run(experiment_id, "c" * 32)
    assert tracking.find_training_run(experiment_id, "c" * 32).info.run_id == rerun


def test_of_two_unevaluated_identical_runs_this_hosts_is_found_before_a_newer_teammates(experiment):
    experiment_id, _ = experiment
    mine = training_run(experiment_id, "d" * 32)
    training_run(experiment_id, "d" * 32, host="teammates-laptop")
    assert tracking.find_training_run(experiment_id, "d" * 32).info.run_id == mine


def test_a_run_cache_restored_model_finds_the_newest_evaluated_run_and_never_a_deleted_one(experiment):
    experiment_id, client = experiment
    training_run(experiment_id, "e" * 32, evaluated=True)
    newest = training_run(experiment_id, "e" * 32, evaluated=True)
    deleted = training_run(experiment_id, "e" * 32)
    client.delete_run(deleted)
    assert tracking.find_training_run(experiment_id, "e" * 32).info.run_id == newest


def test_a_retrained_model_whose_evaluation_dvc_restored_shows_the_run_with_its_test_metrics(experiment):
    """train reran, evaluate came from DVC's run-cache: the new run has no test metrics, an older one has."""
    experiment_id, _ = experiment
    evaluated = training_run(experiment_id, "f" * 32, evaluated=True)
    retrained = training_run(experiment_id, "f" * 32)
    assert tracking.find_evaluated_run(experiment_id, "f" * 32).info.run_id == evaluated
    assert tracking.find_training_run(experiment_id, "f" * 32).info.run_id == retrained  # evaluate's choice


def test_the_run_shown_prefers_this_hosts_evaluated_run_then_the_newest_and_else_an_unevaluated_one(experiment):
    experiment_id, _ = experiment
    mine = training_run(experiment_id, "0" * 32, evaluated=True)
    training_run(experiment_id, "0" * 32, evaluated=True, host="teammates-laptop")
    assert tracking.find_evaluated_run(experiment_id, "0" * 32).info.run_id == mine
    newest = training_run(experiment_id, "0" * 32, evaluated=True)
    assert tracking.find_evaluated_run(experiment_id, "0" * 32).info.run_id == newest
    only = training_run(experiment_id, "1" * 32)
    assert tracking.find_evaluated_run(experiment_id, "1" * 32).info.run_id == only
    assert tracking.find_evaluated_run(experiment_id, "2" * 32) is None


def evaluated(model_md5, labels, predictions):
    """evaluate's MLflow side for the model with `model_md5`, with test_accuracy 0.5; the run's id."""
    import mlflow

    evaluate.start_evaluation_run(dataclasses.replace(SMALL, mlflow_experiment="tests"), model_md5)
    run_id = mlflow.active_run().info.run_id
    matrix = evaluate.confusion_matrix(np.array(labels), np.array(predictions))
    evaluate.log_evaluation({"test_accuracy": 0.5}, evaluate.per_class_metrics(matrix), matrix)
    tracking.end_run()
    return run_id


def test_evaluation_is_recorded_in_the_training_run(experiment):
    experiment_id, client = experiment
    trained = training_run(experiment_id, "f" * 32)
    assert evaluated("f" * 32, [1, 2], [1, 1]) == trained
    recorded = client.get_run(trained)
    assert recorded.data.metrics["test_accuracy"] == 0.5
    assert recorded.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(trained)] == ["confusion_matrix.png", "per_class.json"]


def test_evaluating_a_run_again_replaces_its_per_class_table_and_lists_it_once(experiment):
    # mlflow.log_table would append the second evaluation's rows to the first's.
    import mlflow

    experiment_id, client = experiment
    trained = training_run(experiment_id, "2" * 32)
    client.set_tag(trained, "mlflow.loggedArtifacts", json.dumps([{"path": "other.json", "type": "table"}]))
    for predictions in ([0, 0, 0], [0, 1, 2]):
        evaluated("2" * 32, [0, 1, 2], predictions)
    table = mlflow.artifacts.load_dict(f"runs:/{trained}/per_class.json")
    assert [row[0] for row in table["data"]] == list(range(10))
    assert [row[2] for row in table["data"][:3]] == [1.0, 1.0, 1.0]  # recall of the second evaluation
    listed = json.loads(client.get_run(trained).data.tags["mlflow.loggedArtifacts"])
    assert listed == [{"path": "other.json", "type": "table"}, {"path": "per_class.json", "type": "table"}]
    # As MLflow's own reader of logged tables sees it:
    loaded = client.load_table(experiment_id, "per_class.json", run_ids=[trained])
    assert loaded["digit"].tolist() == list(range(10))


def test_evaluation_of_a_model_no_run_here_trained_gets_its_own_run(experiment, monkeypatch):
    experiment_id, client = experiment
    monkeypatch.setenv("DVC_EXP_NAME", "exp-a")
    recorded = client.get_run(evaluated("9" * 32, [3], [3]))
    assert recorded.info.run_name == "exp-a-evaluate"
    assert recorded.data.tags[tracking.EVALUATED_MODEL_TAG] == "9" * 32
    assert tracking.MODEL_TAG not in recorded.data.tags  # so it is never taken for a training run
    assert recorded.data.params["epochs"] == str(SMALL.epochs)
    assert recorded.data.metrics["test_accuracy"] == 0.5


def test_connect_to_a_deleted_experiment_says_how_to_restore_it(experiment):
    experiment_id, client = experiment
    doomed = client.create_experiment("deleted-in-the-ui")
    client.delete_experiment(doomed)
    with pytest.raises(StageError, match=f"'deleted-in-the-ui' is deleted .* --experiment-id {doomed}"):
        tracking.open_experiment("deleted-in-the-ui")


# --- The train and evaluate stages end to end on synthetic records, with MLflow ---
# As subprocesses (`python -m stages.train`), as DVC runs them: this covers the entry point, run_stage,
# the MLflow location derived from DVC_ROOT, and keeps MLflow's process-wide state (tracking URI,
# active run, async logging threads) and TensorFlow's global seed out of this process.


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, make_examples, run_stage_in):
    root = tmp_path_factory.mktemp("repo")
    params = set_params(root, epochs=2, hidden_layer_size=8, shuffle_buffer=300)
    test = make_examples(120, seed=3)
    write_stage_inputs(root, make_examples(300, seed=1), make_examples(100, seed=2), test)
    results = {stage: run_stage_in(stage, root) for stage in ("train", "evaluate")}
    for stage, result in results.items():
        assert result.returncode == 0, f"{stage} failed:\n{result.stdout}\n{result.stderr}"
    return root, params, test, results


@pytest.fixture
def pipeline_mlflow(pipeline):
    """(root, params, test examples, client, training run) with this process pointed at the pipeline's store."""
    import mlflow

    root, params, test, _ = pipeline
    uri = f"sqlite:///{root}/mlflow.db"
    with mlflow_as_a_stage(root, uri):
        client = mlflow.MlflowClient(uri)
        [run] = runs_that_trained(client, root / paths.MODEL, params["mlflow_experiment"])
        yield root, params, test, client, run


def read_json(path):
    return json.loads(Path(path).read_text())


def read_csv(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def test_stages_write_their_outputs(pipeline):
    root, _, test, results = pipeline
    history = read_csv(root / paths.TRAIN_HISTORY)
    assert [row["epoch"] for row in history] == ["1", "2"]
    assert list(history[0]) == list(HISTORY_COLUMNS)
    last = {name: float(history[-1][name]) for name in HISTORY_COLUMNS[1:]}
    assert read_json(root / paths.TRAIN_METRICS) == {"epochs": 2, **last}
    # The confusion rows are the saved model's predictions, and every metric follows from them.
    confusion = read_csv(root / paths.CONFUSION)
    labels = np.array([int(row["actual"]) for row in confusion])
    predicted = np.array([int(row["predicted"]) for row in confusion])
    np.testing.assert_array_equal(labels, test.labels)
    np.testing.assert_array_equal(predicted, evaluate.evaluate(load_model(root / paths.MODEL), test)["predictions"])
    metrics = read_json(root / paths.EVALUATE_METRICS)
    assert metrics["test_accuracy"] == pytest.approx(np.mean(labels == predicted))
    matrix = evaluate.confusion_matrix(labels, predicted)
    assert read_json(root / paths.PER_CLASS_METRICS) == evaluate.per_class_metrics(matrix)
    notebook_line = f"Test loss: {metrics['test_loss']:.2f}. Test accuracy: {metrics['test_accuracy'] * 100:.2f}%"
    assert notebook_line in results["evaluate"].stdout.splitlines()
    assert not list(root.rglob(".*.tmp-*"))


def test_training_run_records_params_metrics_tags_and_artifacts(pipeline_mlflow):
    root, params, _, client, run = pipeline_mlflow
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == params["mlflow_experiment"]
    assert run.data.params == {key: str(value) for key, value in parse_params(params).as_dict().items()}

    history = read_csv(root / paths.TRAIN_HISTORY)
    for name in EPOCH_METRICS:
        logged = client.get_metric_history(run.info.run_id, name)
        assert [m.step for m in logged] == [1, 2]
        assert [m.value for m in logged] == pytest.approx([float(row[name]) for row in history])

    evaluation = read_json(root / paths.EVALUATE_METRICS)
    assert run.data.metrics["test_accuracy"] == pytest.approx(evaluation["test_accuracy"])
    assert run.data.metrics["test_loss"] == pytest.approx(evaluation["test_loss"])
    # Per-class results are one table (below), not 20 metrics the UI would draw as 20 charts.
    assert {name for name in run.data.metrics if name.startswith("test_")} == {"test_accuracy", "test_loss"}

    assert run.data.tags["git.commit"] == "unknown"  # the stages ran in a folder that is no git repository
    assert "dvc.experiment" not in run.data.tags  # run outside `dvc exp run`
    for tag, path in (("data.train.md5", paths.SPLIT_TRAIN), ("data.validation.md5", paths.SPLIT_VALIDATION)):
        assert run.data.tags[tag] == hashlib.md5((root / path).read_bytes()).hexdigest()
    assert run.data.tags[tracking.MODEL_TAG] == hashlib.md5((root / paths.MODEL).read_bytes()).hexdigest()

    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["confusion_matrix.png", "per_class.json"]
    # The default store keeps artifacts beside the database, not in ./mlruns of the working directory.
    assert run.info.artifact_uri == f"{(root / tracking.ARTIFACTS_DIR).as_uri()}/{run.info.run_id}/artifacts"
    [figure] = (root / tracking.ARTIFACTS_DIR).rglob("confusion_matrix.png")
    assert Image.open(figure).size == (600, 550)  # figsize (6, 5.5) at 100 dpi


def test_per_class_table_in_the_run_agrees_with_the_confusion_matrix(pipeline_mlflow):
    import mlflow

    root, _, _, _, run = pipeline_mlflow
    confusion = read_csv(root / paths.CONFUSION)
    matrix = evaluate.confusion_matrix(
        np.array([int(row["actual"]) for row in confusion]), np.array([int(row["predicted"]) for row in confusion])
    )
    table = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/per_class.json")
    assert table["columns"] == ["digit", "precision", "recall", "f1", "support"]
    digits, precision, recall, f1, support = (np.array(column) for column in zip(*table["data"], strict=True))
    np.testing.assert_array_equal(digits, np.arange(10))
    np.testing.assert_array_equal(support, matrix.sum(axis=1))
    present, predicted = support > 0, matrix.sum(axis=0) > 0
    rounded = {"rtol": 0, "atol": 5e-5}  # 4 decimals
    np.testing.assert_allclose(recall[present], np.diag(matrix)[present] / support[present], **rounded)
    correct_share = np.diag(matrix)[predicted] / matrix.sum(axis=0)[predicted]
    np.testing.assert_allclose(precision[predicted], correct_share, **rounded)
    np.testing.assert_array_equal(recall[~present], 0.0)
    scored = precision + recall > 0
    harmonic_mean = 2 * precision[scored] * recall[scored] / (precision + recall)[scored]
    np.testing.assert_allclose(f1[scored], harmonic_mean, rtol=0, atol=2e-4)  # of rounded numbers
    assert json.loads(run.data.tags["mlflow.loggedArtifacts"]) == [{"path": "per_class.json", "type": "table"}]
    # The DVC output holds the same numbers, unrounded, F1 included.
    columns = table["columns"][1:]
    dvc_rows = [[int(d), *(m[c] for c in columns)] for d, m in read_json(root / paths.PER_CLASS_METRICS).items()]
    assert table["data"] == [pytest.approx(row, abs=5e-5) for row in dvc_rows]


def test_logged_mlflow_model_predicts_like_the_saved_keras_model_and_quietly(pipeline_mlflow, capfd):
    import keras
    import mlflow

    root, _, test, _, run = pipeline_mlflow
    inputs = test.images[:20]
    logged = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    capfd.readouterr()
    predicted = np.asarray(logged.predict(inputs))
    assert capfd.readouterr().out == ""  # no Keras progress bar
    saved = keras.models.load_model(root / paths.MODEL)
    np.testing.assert_array_equal(predicted, saved.predict(inputs, verbose=0))


def test_logged_mlflow_model_takes_raw_pixels_and_refuses_floats_scaled_to_0_1(pipeline_mlflow):
    import mlflow

    _, _, test, _, run = pipeline_mlflow
    logged = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    raw = np.asarray(logged.predict(test.images[:3]))
    np.testing.assert_array_equal(logged.predict(test.images[:3].astype(np.float32)), raw)  # 7.0 is 7
    with pytest.raises(mlflow.exceptions.MlflowException, match=r"^pixels must be whole numbers from 0 to 255 \(raw"):
        logged.predict(test.images[:3].astype(np.float32) / 255)


def test_evaluate_without_a_model_fails_in_one_line_and_records_nothing(tmp_path, run_stage_in):
    (tmp_path / "params.yaml").write_text(REAL_PARAMS.read_text())
    result = run_stage_in("evaluate", tmp_path)
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line == "evaluate: error: models/model.keras: file not found (run `dvc repro train` to create it)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_stages_print_nothing_that_looks_like_a_problem(pipeline):
    """MLflow's warning about the input example left out on purpose, its artifact progress bars, its log of
    setting up a new mlflow.db."""
    _, _, _, results = pipeline
    for stage, result in results.items():
        assert "input example" not in result.stderr, stage
        assert "Downloading artifacts" not in result.stderr + result.stdout, stage
        assert "Warning" not in result.stderr, f"{stage}: {result.stderr}"
        assert "database tables" not in result.stderr, stage  # MLflow setting up the new mlflow.db
