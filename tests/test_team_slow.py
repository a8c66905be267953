"""The pipeline on a team's shared infrastructure, with real servers started by team/stack.py on
127.0.0.1 (PostgreSQL, `rclone serve s3`, `mlflow server` with basic auth): machines are clones in
separate folders that share a bare git repository as `origin`, the S3 remote and the MLflow server.
"""

from __future__ import annotations

import shutil
import subprocess

import mlflow
import numpy as np
import pytest

from stages.lib.tracking import MODEL_TAG, md5
from team import stack as team_stack
from tests.e2e import changed_stages, experiments_shown, run, stages_run, user_env

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
    first = shutil.copytree(baseline, tmp_path_factory.mktemp("first") / "repo", symlinks=True)
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


def server(stack) -> mlflow.MlflowClient:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_USERNAME", stack.mlflow_username)
        patch.setenv("MLFLOW_TRACKING_PASSWORD", stack.mlflow_password)
        return mlflow.MlflowClient(tracking_uri=stack.tracking_uri)


def all_runs(client) -> list[str]:
    return [r.info.run_id for r in client.search_runs([e.experiment_id for e in client.search_experiments()])]


def test_the_documented_remote_setup_writes_no_secret_to_a_tracked_file(baseline, stack, tmp_path):
    repo = shutil.copytree(baseline, tmp_path / "repo", symlinks=True)
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


def test_two_machines_share_experiments_outputs_and_runs_with_a_third(origin, stack, tmp_path):
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
    assert all(0 < shown[name]["metrics/evaluate.json"]["data"]["test_accuracy"] < 1 for name in experiments)

    client = server(stack)
    experiment_id = client.get_experiment_by_name("mnist-dnn").experiment_id
    for name in experiments:
        run(["dvc", "exp", "apply", name], c, team_env(stack))
        run(["dvc", "pull"], c, team_env(stack))
        assert stages_run(run(["dvc", "repro"], c, team_env(stack))) == []  # no retraining

        [row] = run(["python", "-m", "stages.runs", name], c, team_env(stack)).stdout.splitlines()[2:]
        [found] = client.search_runs([experiment_id], f"tags.`{MODEL_TAG}` = '{md5(c / 'models/model.keras')}'")
        assert row.split()[2] == found.info.run_id and found.info.run_name == name
        assert found.info.status == "FINISHED"
        assert found.data.params["epochs"] == "2"
        for metric in ("loss", "accuracy", "val_loss", "val_accuracy"):
            assert [m.step for m in client.get_metric_history(found.info.run_id, metric)] == [1, 2]
        assert found.data.metrics["test_accuracy"] == shown[name]["metrics/evaluate.json"]["data"]["test_accuracy"]

        import keras

        images = np.random.default_rng(0).random((8, 28, 28, 1)).astype(np.float32)
        with pytest.MonkeyPatch.context() as patch:
            for key, value in team_env(stack).items():
                if key.startswith("MLFLOW_"):
                    patch.setenv(key, value)
            served = mlflow.pyfunc.load_model(f"runs:/{found.info.run_id}/model")
            np.testing.assert_array_equal(
                served.predict(images), keras.models.load_model(c / "models/model.keras").predict(images, verbose=0)
            )
        run(["git", "checkout", "--", "."], c)


def test_a_wrong_password_stops_training_before_anything_is_written_or_recorded(origin, stack, tmp_path):
    clone = machine(origin, stack, tmp_path / "clone")
    client = server(stack)
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
