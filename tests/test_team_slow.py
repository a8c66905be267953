"""The pipeline on a team's shared infrastructure, with real servers started by team/stack.py on
127.0.0.1 (PostgreSQL, `rclone serve s3`, `mlflow server` with basic auth): machines are clones in
separate folders that share a bare git repository as `origin`, the S3 remote and the MLflow server.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import pytest

from stages.common import paths
from stages.lib.experiments import list_experiments
from stages.lib.input_pipeline import load_examples
from stages.lib.tracking import MODEL_TAG, md5
from team import stack as team_stack
from tests.conftest import EPOCH_METRICS, mlflow_as_a_stage, runs_that_trained
from tests.e2e import changed_stages, copy_repository, experiments_shown, run, run_queues, stages_run, started, user_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    folder = tmp_path_factory.mktemp("team-stack")
    try:
        yield team_stack.start(folder, free_ports=True)
    finally:
        team_stack.stop(folder)


def team_env(stack, **changes: str) -> dict[str, str]:
    """A teammate's shell after the README's setup: the server's address and credentials exported."""
    env = user_env(
        MLFLOW_TRACKING_URI=stack.tracking_uri,
        MLFLOW_TRACKING_USERNAME=stack.mlflow_username,
        MLFLOW_TRACKING_PASSWORD=stack.mlflow_password,
        AWS_EC2_METADATA_DISABLED="true",  # never ask a cloud's metadata address for credentials
    )
    return {**env, **changes}


def add_team_remote(repo, stack) -> None:
    """The README's commands: the remote in .dvc/config, the credentials in the git-ignored config.local."""
    run(["dvc", "remote", "add", "-d", "team", f"s3://{stack.dvc_bucket}"], repo)
    run(["dvc", "remote", "modify", "team", "endpointurl", stack.s3_endpoint_url], repo)
    run(["dvc", "remote", "modify", "--local", "team", "access_key_id", stack.aws_access_key_id], repo)
    run(["dvc", "remote", "modify", "--local", "team", "secret_access_key", stack.aws_secret_access_key], repo)


@pytest.fixture(scope="module")
def origin(baseline, stack, tmp_path_factory):
    """The team's git server (a bare repository) and S3 remote, holding the baseline and its outputs."""
    first = copy_repository(baseline, tmp_path_factory.mktemp("first") / "repo")
    add_team_remote(first, stack)
    run(["git", "commit", "-qam", "team remote"], first)
    run(["dvc", "push"], first, team_env(stack))
    bare = tmp_path_factory.mktemp("origin") / "mnist.git"
    run(["git", "clone", "-q", "--bare", str(first), str(bare)], first)
    return bare


def machine(origin, stack, folder):
    """A teammate's machine: `git clone`, credentials, `dvc pull` of the baseline's outputs."""
    run(["git", "clone", "-q", str(origin), str(folder)], origin.parent)
    run(["git", "config", "user.name", "teammate"], folder)
    run(["git", "config", "user.email", "teammate@example.com"], folder)
    run(["dvc", "remote", "modify", "--local", "team", "access_key_id", stack.aws_access_key_id], folder)
    run(["dvc", "remote", "modify", "--local", "team", "secret_access_key", stack.aws_secret_access_key], folder)
    run(["dvc", "pull"], folder, team_env(stack))
    return folder


@pytest.fixture(scope="module")
def client(stack):
    """A client of the team's server; it reads the credentials from the environment at each request."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_USERNAME", stack.mlflow_username)
        patch.setenv("MLFLOW_TRACKING_PASSWORD", stack.mlflow_password)
        yield mlflow.MlflowClient(tracking_uri=stack.tracking_uri)


def test_every_server_of_the_stack_listens_on_loopback_only(stack):
    listening = subprocess.run(["ss", "-Hltn"], capture_output=True, text=True, check=True).stdout.splitlines()
    for service, port in stack.ports.items():
        addresses = [line.split()[3] for line in listening if line.split()[3].endswith(f":{port}")]
        assert addresses and all(address.startswith("127.0.0.1:") for address in addresses), (service, addresses)


def all_runs(client) -> list[str]:
    return [r.info.run_id for r in client.search_runs([e.experiment_id for e in client.search_experiments()])]


def logged_model_md5(client, run_, folder: Path) -> str:
    """The MD5 of the .keras file inside the MLflow model that `run_` logged, as the server stores it
    (downloaded into `folder`)."""
    [logged] = client.search_logged_models(
        [run_.info.experiment_id], filter_string=f"source_run_id = '{run_.info.run_id}'"
    )
    uri, destination = f"models:/{logged.model_id}", str(folder / run_.info.run_id)
    with mlflow_as_a_stage(folder, client.tracking_uri):  # models:/ resolves through the process-wide URI
        downloaded = Path(mlflow.artifacts.download_artifacts(uri, dst_path=destination))
    [keras_file] = downloaded.rglob("*.keras")
    return md5(keras_file)


def test_the_documented_remote_setup_writes_no_secret_to_a_tracked_file(baseline, stack, tmp_path):
    repo = copy_repository(baseline, tmp_path / "repo")
    add_team_remote(repo, stack)
    assert run(["git", "status", "--porcelain"], repo).stdout == " M .dvc/config\n"
    tracked = run(["git", "diff"], repo).stdout + (repo / ".dvc/config").read_text()
    assert stack.aws_secret_access_key not in tracked and stack.aws_access_key_id not in tracked
    assert stack.aws_secret_access_key in (repo / ".dvc/config.local").read_text()


def test_a_fresh_clone_gets_the_baseline_from_the_remote_without_recomputing(origin, stack, tmp_path):
    clone = machine(origin, stack, tmp_path / "clone")
    assert changed_stages(clone) == set()
    assert stages_run(run(["dvc", "repro"], clone, team_env(stack))) == []
    assert run(["git", "status", "--porcelain"], clone).stdout == ""


def test_two_machines_share_experiments_outputs_and_runs_with_a_third(origin, stack, client, tmp_path):
    a, b = machine(origin, stack, tmp_path / "a"), machine(origin, stack, tmp_path / "b")
    experiments = {"exp-a": (a, ["-S", "epochs=2"]), "exp-b": (b, ["-S", "epochs=2", "-S", "hidden_layer_size=64"])}
    running = {
        name: subprocess.Popen(
            ["dvc", "exp", "run", *args, "-n", name],
            cwd=repo,
            env=team_env(stack),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, (repo, args) in experiments.items()
    }
    for name, process in running.items():  # at the same time, on the same server
        output, _ = process.communicate(timeout=900)
        assert process.returncode == 0, f"{name}:\n{output[-3000:]}"
    for name, (repo, _) in experiments.items():
        run(["dvc", "push"], repo, team_env(stack))
        run(["dvc", "exp", "push", "origin", name], repo, team_env(stack))

    c = machine(origin, stack, tmp_path / "c")
    for name in experiments:
        run(["dvc", "exp", "pull", "origin", name], c, team_env(stack))
    shown = experiments_shown(c, team_env(stack))
    assert set(shown) == set(experiments)

    for name in experiments:
        run(["dvc", "exp", "apply", name], c, team_env(stack))
        run(["dvc", "pull"], c, team_env(stack))
        assert stages_run(run(["dvc", "repro"], c, team_env(stack))) == []  # no retraining

        [row] = run(["python", "-m", "stages.runs", name], c, team_env(stack)).stdout.splitlines()[2:-1]
        [found] = runs_that_trained(client, c / paths.MODEL)
        assert row.split()[2] == found.info.run_id and found.info.run_name == name
        assert found.info.status == "FINISHED"
        assert found.data.params["epochs"] == "2"
        for metric in EPOCH_METRICS:
            assert [m.step for m in client.get_metric_history(found.info.run_id, metric)] == [1, 2]
        evaluation = json.loads((c / paths.EVALUATE_METRICS).read_text())
        assert evaluation == shown[name]["metrics/evaluate.json"]["data"]
        assert {key: found.data.metrics[key] for key in evaluation} == pytest.approx(evaluation)

        import keras

        images = load_examples(c / paths.PREPARED_TEST).images[:200]  # real digits, raw uint8 pixels
        with pytest.MonkeyPatch.context() as patch:
            for key, value in team_env(stack).items():
                if key.startswith("MLFLOW_"):
                    patch.setenv(key, value)
            served = mlflow.pyfunc.load_model(f"runs:/{found.info.run_id}/model")
            np.testing.assert_array_equal(
                served.predict(images), keras.models.load_model(c / "models/model.keras").predict(images, verbose=0)
            )
        run(["git", "checkout", "--", "."], c)


def test_a_wrong_password_stops_training_before_anything_is_written_or_recorded(origin, stack, client, tmp_path):
    clone = machine(origin, stack, tmp_path / "clone")
    before = all_runs(client)
    result = run(
        ["dvc", "repro", "-f", "train"], clone, team_env(stack, MLFLOW_TRACKING_PASSWORD="wrong-password"), check=False
    )
    assert result.returncode != 0
    [line] = [line for line in result.stderr.splitlines() if line.startswith("train: error:")]
    assert line == (
        f"train: error: MLflow tracking server {stack.tracking_uri} refused user '{stack.mlflow_username}': "
        "unauthenticated; check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
    )
    assert "Epoch 1/" not in result.stdout
    assert not (clone / "models/model.keras").exists()
    assert all_runs(client) == before


def test_eight_queued_experiments_from_two_machines_all_land_complete_on_the_postgresql_server(
    origin, stack, client, tmp_path
):
    before = set(all_runs(client))
    machines = {"a": machine(origin, stack, tmp_path / "a"), "b": machine(origin, stack, tmp_path / "b")}
    names = {}
    for label, repo in machines.items():
        for size in (20, 28, 36, 44):
            name = f"load-{label}-{size + (label == 'b')}"
            size_param = f"hidden_layer_size={size + (label == 'b')}"
            run(["dvc", "exp", "run", "--queue", "-S", "epochs=1", "-S", size_param, "-n", name], repo)
            names[name] = repo
    for status in run_queues(list(machines.values()), jobs=2, env=team_env(stack)):
        assert status.split().count("Success") == 4, status

    new = [client.get_run(run_id) for run_id in set(all_runs(client)) - before]
    assert sorted(r.info.run_name for r in new) == sorted(names)
    shown = {name: row for repo in machines.values() for name, row in experiments_shown(repo).items()}
    models = {e.name: e.model_md5 for repo in machines.values() for e in list_experiments(repo)}
    for found in new:
        name = found.info.run_name
        assert found.info.status == "FINISHED", name
        assert found.data.params["hidden_layer_size"] == name.rsplit("-", 1)[1]
        for metric in EPOCH_METRICS:
            assert [m.step for m in client.get_metric_history(found.info.run_id, metric)] == [1]
        evaluation = shown[name]["metrics/evaluate.json"]["data"]
        assert {key: found.data.metrics[key] for key in evaluation} == pytest.approx(evaluation), name
        # The run trained the model file DVC recorded for the experiment, and logged that very file.
        assert found.data.tags[MODEL_TAG] == models[name] == logged_model_md5(client, found, tmp_path), name


def test_a_tracking_server_stopped_for_two_epochs_mid_training_still_gets_the_complete_run(
    origin, stack, client, tmp_path
):
    # The outage follows the training's own progress, not a clock: the server is down from the start
    # of epoch 2 until two more epochs have begun after it stopped, whatever the CPU's speed.
    clone = machine(origin, stack, tmp_path / "clone")
    command = ["dvc", "exp", "run", "-S", "epochs=20", "-n", "outage"]
    with started(command, clone, team_env(stack, PYTHONUNBUFFERED="1")) as training:
        training.wait_for_line("Epoch 2/")
        team_stack.stop(stack.folder, services=["mlflow"])
        stopped = len(training.lines)
        assert training.process.poll() is None, "training ended before the server stopped"
        training.wait_for_line("Epoch ", training.wait_for_line("Epoch ", stopped) + 1)
        team_stack.start(stack.folder, services=["mlflow"])
        output = training.finish(timeout=1200)
    assert training.process.returncode == 0, output[-3000:]

    [found] = runs_that_trained(client, clone / paths.MODEL)
    assert found.info.status == "FINISHED"
    for metric in EPOCH_METRICS:
        assert [m.step for m in client.get_metric_history(found.info.run_id, metric)] == list(range(1, 21))
    evaluation = json.loads((clone / paths.EVALUATE_METRICS).read_text())
    assert {key: found.data.metrics[key] for key in evaluation} == pytest.approx(evaluation)


def test_the_s3_store_down_during_dvc_push_is_a_clear_error_and_a_second_push_completes(origin, stack, tmp_path):
    clone = machine(origin, stack, tmp_path / "clone")
    run(["dvc", "exp", "run", "-S", "epochs=1", "-S", "hidden_layer_size=12"], clone, team_env(stack))
    team_stack.stop(stack.folder, services=["s3"])
    try:
        failed = run(["dvc", "push"], clone, team_env(stack), check=False)
    finally:
        team_stack.start(stack.folder, services=["s3"])
    assert failed.returncode != 0
    assert f'Could not connect to the endpoint URL: "{stack.s3_endpoint_url}/' in failed.stderr
    assert changed_stages(clone) == set()  # nothing lost locally
    run(["dvc", "push"], clone, team_env(stack))
    assert json.loads(run(["dvc", "status", "--cloud", "--json"], clone, team_env(stack)).stdout) == {}
