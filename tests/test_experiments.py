"""From DVC experiments to MLflow runs on small data: stages/lib/experiments.py (`dvc exp show` rows),
`python -m stages.runs` and `python -m stages.promote`, in a tiny git + DVC repository whose pipeline
writes a few bytes instead of training. The slow tests do the same on the real pipeline."""

import hashlib
import urllib.parse

import pytest

from stages.common import paths
from stages.common.errors import StageError
from stages.lib import tracking
from stages.lib.experiments import list_experiments
from tests.conftest import REAL_PARAMS, answering_model, mlflow_as_a_stage
from tests.e2e import copy_repository, run

# A pipeline of the real one's shape: train writes the model and val_accuracy, evaluate reads the
# model and the test data and writes test_accuracy. Its numbers follow `epochs`, so each experiment differs.
# (No space after a colon in the JSON: YAML would read one as a mapping.)
DVC_YAML = """\
stages:
  train:
    cmd: mkdir -p models metrics && echo "model of ${epochs} epochs" > models/model.keras
      && echo '{"val_accuracy":0.9${epochs}}' > metrics/train.json
    params: [epochs]
    outs: [models/model.keras]
    metrics: [{metrics/train.json: {cache: false}}]
  evaluate:
    cmd: echo '{"test_accuracy":0.8${epochs}}' > metrics/evaluate.json
    deps: [models/model.keras, data/prepared/test.tfrecord]
    metrics: [{metrics/evaluate.json: {cache: false}}]
"""


def model_md5(epochs: int) -> str:
    return hashlib.md5(f"model of {epochs} epochs\n".encode()).hexdigest()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(root, {name: MLflow run id}): the pipeline committed on `main` with 5 epochs, experiments `seven`
    and `two` run beside it (--temp: the workspace keeps main's outputs); an MLflow store in which runs
    trained main's and seven's models and logged a model each, and no run trained two's."""
    root = tmp_path_factory.mktemp("experiments")
    (root / "params.yaml").write_text(REAL_PARAMS.read_text())  # epochs: 5
    (root / "dvc.yaml").write_text(DVC_YAML)
    (root / paths.PREPARED_TEST).parent.mkdir(parents=True)
    (root / paths.PREPARED_TEST).write_bytes(b"test records")
    (root / ".gitignore").write_text("mlflow.db*\nmlartifacts/\n")
    run(["git", "init", "-q", "-b", "main"], root)
    run(["git", "config", "user.name", "test"], root)
    run(["git", "config", "user.email", "test@example.com"], root)
    run(["dvc", "init", "-q"], root)
    run(["dvc", "repro", "-q"], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "pipeline"], root)
    for name, epochs in (("seven", 7), ("two", 2)):
        run(["dvc", "exp", "run", "--temp", "-S", f"epochs={epochs}", "-n", name], root)

    import mlflow

    runs = {}
    with mlflow_as_a_stage(root):
        experiment_id = tracking.open_experiment("mnist-dnn")
        for name, epochs in (("main", 5), ("seven", 7)):
            with tracking.start_run(experiment_id=experiment_id, tags={tracking.MODEL_TAG: model_md5(epochs)}) as r:
                mlflow.pyfunc.log_model(name="model", python_model=answering_model(name), pip_requirements=["mlflow"])
            runs[name] = r.info.run_id
    return root, runs, experiment_id


@pytest.fixture
def experiments(built, tmp_path):
    """(root, runs, experiment id): this test's own copy of the built repository and its MLflow store."""
    root, runs, experiment_id = built
    return copy_repository(root, tmp_path / "repo"), runs, experiment_id


def test_list_experiments_gives_each_rows_params_metrics_and_model_and_test_data_hashes(experiments):
    root, _, _ = experiments
    rows = {row.name: row for row in list_experiments(root)}
    assert list(rows)[:2] == ["workspace", "main"] and sorted(rows) == ["main", "seven", "two", "workspace"]
    assert rows["main"].rev == run(["git", "rev-parse", "HEAD"], root).stdout.strip()
    assert rows["workspace"].rev == "workspace"
    for name, epochs in (("workspace", 5), ("main", 5), ("seven", 7), ("two", 2)):
        row = rows[name]
        assert row.params["epochs"] == epochs, name
        assert row.metrics == {"val_accuracy": float(f"0.9{epochs}"), "test_accuracy": float(f"0.8{epochs}")}, name
        assert row.model_md5 == model_md5(epochs), name
        assert row.test_data_md5 == tracking.md5(root / paths.PREPARED_TEST), name


def test_list_experiments_outside_a_dvc_repository_is_one_line(tmp_path):
    with pytest.raises(StageError, match=r"^`dvc exp show --json` failed: ") as error:
        list_experiments(tmp_path)
    assert "\n" not in str(error.value)


def test_runs_names_the_training_run_of_each_experiments_model(experiments, run_stage_in):
    root, runs, experiment_id = experiments
    result = run_stage_in("runs", root)
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"MLflow runs in sqlite:///{root}/mlflow.db?timeout=60, experiment id {experiment_id}"
    rows = {line.split()[0]: line.split()[1:5] for line in lines[2:-1]}
    assert (
        rows
        == {
            "workspace": [model_md5(5)[:8], runs["main"], "FINISHED", "-"],  # not evaluated: no test_accuracy
            "main": [model_md5(5)[:8], runs["main"], "FINISHED", "-"],
            "seven": [model_md5(7)[:8], runs["seven"], "FINISHED", "-"],
            "two": [model_md5(2)[:8], "(no", "run", "in"],
        }
    )
    page, query = lines[-1].split("?", 1)
    assert page == f"MLflow UI: http://127.0.0.1:5000/#/experiments/{experiment_id}/runs"
    query = dict(urllib.parse.parse_qsl(query))
    assert query.pop("searchFilter") in {
        f"attributes.run_id IN ('{first}', '{second}')"
        for first, second in ((runs["main"], runs["seven"]), (runs["seven"], runs["main"]))
    }
    assert query == {"workflowType": "machine_learning", "compareRunsMode": "CHART"}

    unknown = run_stage_in("runs", root, "seven", "nine")
    assert (unknown.returncode, unknown.stderr) == (1, "runs: error: no such experiment: nine (see `dvc exp show`)\n")


def test_promote_registers_the_best_validation_experiments_model_as_champion(experiments, run_stage_in):
    import mlflow

    root, runs, _ = experiments
    result = run_stage_in("promote", root)
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    assert result.stdout == (
        f"promote: registered mnist-dnn version 1 (experiment seven, run {runs['seven']}, val_accuracy 0.9700, "
        "test_accuracy 0.8700) and moved alias champion to it\n"
    )
    with mlflow_as_a_stage(root, f"sqlite:///{root}/mlflow.db"):
        assert mlflow.pyfunc.load_model("models:/mnist-dnn@champion").predict([0]) == ["seven"]
        version = mlflow.MlflowClient().get_model_version_by_alias("mnist-dnn", "champion")
    assert (version.tags["dvc.experiment"], version.tags[tracking.MODEL_TAG]) == ("seven", model_md5(7))

    # two has no training run in the store: named, it is refused in one line, and nothing changes.
    refused = run_stage_in("promote", root, "two")
    assert refused.returncode == 1
    assert refused.stderr.startswith("promote: error: no MLflow run in ") and refused.stderr.count("\n") == 1


def test_a_copy_of_the_repository_records_into_its_own_mlflow_artifacts(experiments, built):
    import mlflow

    root, runs, experiment_id = experiments
    own = (root / "mlartifacts").as_uri()
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    assert client.get_experiment(experiment_id).artifact_location == own
    for run_id in runs.values():
        assert client.get_run(run_id).info.artifact_uri.startswith(f"{own}/")
        [logged] = client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'")
        assert logged.artifact_location.startswith(f"{own}/")
    with mlflow_as_a_stage(root):
        assert tracking.open_experiment("mnist-dnn") == experiment_id
        with tracking.start_run(experiment_id=experiment_id) as new:
            mlflow.log_text("written in the copy", "note.txt")
    assert list((root / "mlartifacts").rglob("note.txt"))
    assert not list((built[0] / "mlartifacts").rglob("note.txt"))
    assert new.info.artifact_uri.startswith(f"{own}/")
