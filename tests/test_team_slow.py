"""The pipeline on a team's shared infrastructure, with real servers started by team/stack.py on
127.0.0.1 (PostgreSQL, `rclone serve s3`, `mlflow server` with basic auth): machines are clones in
separate folders that share a bare git repository as `origin`, the S3 remote and the MLflow server,
and for `python -m stages.tune` the study's database in PostgreSQL.
"""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import optuna
import psycopg
import pytest
import yaml

from stages import tune
from stages.common import paths
from stages.common.errors import StageError
from stages.lib.experiments import list_experiments
from stages.lib.input_pipeline import load_examples
from stages.lib.tracking import MODEL_TAG, md5
from team import stack as team_stack
from tests.conftest import EPOCH_METRICS, mlflow_as_a_stage, runs_that_trained
from tests.e2e import (
    REPO,
    VENV_BIN,
    changed_stages,
    clone_repository,
    copy_repository,
    experiments_shown,
    run,
    run_queues,
    stages_run,
    started,
    user_env,
)

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
    """docs/team.md's commands for a team's own S3 store (here the stack's): the remote in .dvc/config, the
    credentials in the git-ignored config.local."""
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


def readme_team_block(machine: str) -> str:
    """The lines of the README's "As a team" block that `machine` runs: those tagged `# machine <it>`, and the
    untagged ones, which every machine runs."""
    section = (REPO / "README.md").read_text().split("\n## As a team\n", 1)[1]
    lines = section.split("```bash\n", 1)[1].split("\n```", 1)[0].splitlines()
    assert any(line.endswith(f"# machine {machine}") for line in lines), f"no line for machine {machine}"
    return "\n".join(line for line in lines if "# machine " not in line or line.endswith(f"# machine {machine}"))


def test_the_readme_team_block_as_written_takes_an_experiment_from_one_fresh_clone_to_another(stack, client, tmp_path):
    """Machines A and B: fresh clones of one bare `origin` (no DVC remote configured, no DVC cache, no outputs),
    each running its lines of the README's block with bash; the one stack of this machine is this test's."""
    source = clone_repository(tmp_path / "source")
    run(["git", "clone", "-q", "--bare", str(source), str(tmp_path / "team.git")], tmp_path)
    for name in ("A", "B"):
        clone = tmp_path / name
        run(["git", "clone", "-q", str(tmp_path / "team.git"), str(clone)], tmp_path)
        run(["git", "config", "user.name", f"machine {name}"], clone)  # DVC commits experiments
        run(["git", "config", "user.email", f"{name}@example.com"], clone)
        # `make setup` done: this venv, and a lock older than its .installed, so that make installs nothing.
        (clone / ".venv").symlink_to(VENV_BIN.parent)
        os.utime(clone / "requirements.lock", (0, 0))
        result = run(["bash", "-e", "-c", readme_team_block(name)], clone, user_env(TEAM_STACK_DIR=str(stack.folder)))
        assert "DVC remote `team`" in result.stdout
        assert "team" in (clone / ".dvc/config.local").read_text() and "team" not in (clone / ".dvc/config").read_text()
    a, b = tmp_path / "A", tmp_path / "B"

    assert yaml.safe_load((b / "params.yaml").read_text())["epochs"] == 10
    model_md5 = md5(b / paths.MODEL)
    assert model_md5 == md5(a / paths.MODEL)
    assert (stack.folder / "s3" / stack.dvc_bucket / "files/md5" / model_md5[:2] / model_md5[2:]).is_file()
    [found] = runs_that_trained(client, b / paths.MODEL)
    assert (found.info.run_name, found.info.status, found.data.params["epochs"]) == ("ten-epochs", "FINISHED", "10")
    for metric in EPOCH_METRICS:
        assert [m.step for m in client.get_metric_history(found.info.run_id, metric)] == list(range(1, 11))


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


RERUN = "run the stage again once it answers"
OUTAGE_WAIT = 20  # MNIST_TRACKING_WAIT below: the stage's limit on waiting for a tracking server whose database is down


def test_postgresql_down_mid_training_stops_the_stage_in_one_line_writing_nothing_and_its_run_is_closed_later(
    origin, stack, client, tmp_path
):
    # PostgreSQL, behind the tracking server, stopped at epoch 3 of 8 and kept down: the server is up but cannot
    # store anything, so MLflow's client retries; the stage's limit on that wait (shortened here) ends it.
    clone = machine(origin, stack, tmp_path / "clone")
    env = team_env(stack, MNIST_TRACKING_WAIT=str(OUTAGE_WAIT), PYTHONUNBUFFERED="1")
    before = set(all_runs(client))
    with started(["dvc", "exp", "run", "-S", "epochs=8"], clone, env) as training:
        training.wait_for_line("Epoch 3/")
        team_stack.stop(stack.folder, services=["postgres"])
        try:
            stopped = time.monotonic()
            output = training.finish(timeout=OUTAGE_WAIT + 600)
            seconds = time.monotonic() - stopped
        finally:
            team_stack.start(stack.folder, services=["postgres"])
    assert training.process.returncode != 0
    lines = output.splitlines()
    assert "Epoch 8/8" in output, "the stage stopped before the end of its training"
    limit = f"did not answer within {OUTAGE_WAIT} s (set MNIST_TRACKING_WAIT to wait longer)"
    [error] = [line for line in lines if line.startswith("train: error:")]
    assert error == f"train: error: MLflow tracking store {stack.tracking_uri} {limit}; {RERUN}"
    assert "Traceback" not in output and "Retrying" not in output
    assert seconds < OUTAGE_WAIT + 300  # the five epochs left, then the limit: not MLflow's retries, for minutes

    # Nothing half-written: no model, no metrics, and dvc.lock still describes the previous outputs.
    assert not (clone / paths.MODEL).exists() and not (clone / paths.TRAIN_METRICS).exists()
    committed = yaml.safe_load(run(["git", "show", "HEAD:dvc.lock"], clone).stdout)["stages"]
    assert yaml.safe_load((clone / "dvc.lock").read_text())["stages"]["train"] == committed["train"]
    [hint] = [line for line in lines if "to restore them: " in line]
    run(["bash", "-c", hint.split("to restore them: ", 1)[1]], clone)
    run(["git", "checkout", "--", "params.yaml", "dvc.lock"], clone)  # what `dvc exp run -S` had changed
    assert changed_stages(clone) == set()

    # PostgreSQL back: the run the stage could not end is RUNNING until the next stage on this host marks it KILLED.
    [outage] = [client.get_run(run_id) for run_id in set(all_runs(client)) - before]
    assert outage.info.status == "RUNNING"
    again = run(["dvc", "exp", "run", "-S", "epochs=1"], clone, env)
    assert f"MLflow run {outage.info.run_id} was left RUNNING by a killed stage; marked it KILLED" in again.stdout
    assert client.get_run(outage.info.run_id).info.status == "KILLED"
    assert sorted(client.get_run(r).info.status for r in set(all_runs(client)) - before) == ["FINISHED", "KILLED"]


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


# ---------------------------------------------------------------- studies (python -m stages.tune) on the team stack


def study_env(stack) -> dict[str, str]:
    """A teammate's shell after `eval "$(make -s team-env)"`: the tracking server and the study database."""
    return team_env(stack, OPTUNA_STORAGE=stack.database_uri("optuna"), PYTHONUNBUFFERED="1")


def tune_command(space: str, study: str) -> list[str]:
    return [sys.executable, "-m", "stages.tune", "--space", space, "--study", study]


def commit_file(repo: Path, name: str, text: str) -> None:
    (repo / name).write_text(text)
    run(["git", "add", name], repo)
    run(["git", "-c", "user.name=teammate", "-c", "user.email=teammate@example.com", "commit", "-qm", name], repo)


def wait_for_text(path: Path, text: str, child, seconds: float = 300, count: int = 1) -> None:
    """Until `path` holds `text` `count` times (a trial's log, written while it trains), while `child` runs."""
    deadline = time.monotonic() + seconds
    while not (path.exists() and path.read_text(errors="replace").count(text) >= count):
        assert child.process.poll() is None, f"exited before {path.name} had {text!r}:\n{child.output[-3000:]}"
        assert time.monotonic() < deadline, f"{path.name}: no {text!r} within {seconds} s"
        time.sleep(0.1)


def wait_for_output(child, text: str, seconds: float) -> None:
    """Until `child`'s output holds `text`, anywhere: tune's threads may write into each other's lines."""
    deadline = time.monotonic() + seconds
    while text not in child.output:
        assert child.process.poll() is None, f"exited without {text!r}:\n{child.output[-3000:]}"
        assert time.monotonic() < deadline, f"no {text!r} within {seconds} s:\n{child.output[-3000:]}"
        time.sleep(0.2)


def next_trial_started(child, after: int = 0) -> tuple[int, int]:
    """The index of the next "tune: trial N (...) started" line of `child`'s output from `after` on, and N."""
    while True:
        after = child.wait_for_line("tune: trial ", after)
        found = re.match(r"tune: trial (\d+) \(\S+\) started: ", child.lines[after])
        if found:
            return after, int(found.group(1))
        after += 1


def trials_started(output: str) -> list[int]:
    return [int(n) for n in re.findall(r"^tune: trial (\d+) \(\S+\) started: ", output, re.MULTILINE)]


def study_runs(client, study: str) -> tuple[list, list]:
    """The study's parent runs in MLflow, and their children."""
    experiment_id = client.get_experiment_by_name("mnist-dnn").experiment_id
    parents = client.search_runs(
        [experiment_id], f"tags.`tune.study` = '{study}' and attributes.run_name = 'study-{study}'"
    )
    children = [
        child
        for parent in parents
        for child in client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    ]
    return parents, children


def tune_retried(trial) -> int | None:
    """The number of the trial that `trial` runs again (a killed worker's), None if it is no retry."""
    return optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)


DUO_SPACE = """
seed: 11
budget: {trials: 5}
pruner: {warmup_epochs: 1, startup_trials: 2}
parameters:
  hidden_layer_size: {min: 16, max: 64, log: true}
  learning_rate: {min: 0.0005, max: 0.005, log: true}
fixed:
  epochs: 3
"""


def test_two_machines_run_one_study_and_a_worker_killed_mid_trial_costs_only_that_trial(
    origin, stack, client, tmp_path
):
    # This test's own git server: a copy of the team's with the search space committed, seen by no other test.
    own = tmp_path / "origin.git"
    run(["git", "clone", "-q", "--bare", str(origin), str(own)], tmp_path)
    committer = tmp_path / "committer"
    run(["git", "clone", "-q", str(own), str(committer)], tmp_path)
    commit_file(committer, "duo.yaml", DUO_SPACE)
    run(["git", "push", "-q", "origin", "HEAD"], committer)
    a, b = machine(own, stack, tmp_path / "a"), machine(own, stack, tmp_path / "b")
    command, env = tune_command("duo.yaml", "duo"), study_env(stack)

    with started(command, a, env) as on_a:
        on_a.wait_for_line("tune: study duo: 0 trials done of 5; MLflow parent run ")  # B joins A's parent run
        with started(command, b, env) as on_b:
            index, _ = next_trial_started(on_b)
            _, killed = next_trial_started(on_b, index + 1)
            # SIGKILL in the first of three epochs: the trial (under its supervisor) stops at that epoch's end.
            wait_for_text(b / tune.TRIAL_LOGS / f"duo-{killed}.log", "Epoch 1/", on_b)
            on_b.process.kill()
            b_output = on_b.finish(timeout=60)
        a_output = on_a.finish(timeout=600)
    assert on_a.process.returncode == 0, a_output[-3000:]
    ran = {"a": trials_started(a_output), "b": trials_started(b_output)}

    # While A ran on, B's trial went without heartbeat; once that is GRACE_SECONDS old, any worker fails it.
    # Meanwhile: each machine shares its complete trials, and a third one clones the repository.
    storage = stack.database_uri("optuna")
    study = optuna.load_study(study_name="duo", storage=storage)
    for label, repo in (("a", a), ("b", b)):
        names = [f"duo-{t.number}" for t in study.trials if t.number in ran[label] and t.state.name == "COMPLETE"]
        if names:
            run(["dvc", "exp", "push", "origin", *names], repo, team_env(stack))
    c = machine(own, stack, tmp_path / "c")
    deadline = time.monotonic() + tune.GRACE_SECONDS + 2 * tune.HEARTBEAT_SECONDS + 30
    watcher = tune.open_storage(storage)  # tune's own heartbeat settings
    study_id = watcher.get_study_id_from_name("duo")
    killed_id = watcher.get_trial_id_from_study_id_trial_number(study_id, killed)
    while watcher.get_trial(killed_id).state.name == "RUNNING" and killed_id not in watcher._get_stale_trial_ids(
        study_id
    ):
        assert time.monotonic() < deadline, f"trial {killed}'s heartbeat never went stale"
        time.sleep(1)

    # B again, as after a restart: if A has not failed the trial, B does, and runs its point again.
    b_again = run(command, b, env).stdout
    again = trials_started(b_again)
    ran["b"] += again

    study = optuna.load_study(study_name="duo", storage=storage)
    states = {t.number: t.state.name for t in study.trials}
    started_once = collections.Counter(ran["a"] + ran["b"])
    assert sorted(started_once) == sorted(states) and set(started_once.values()) == {1}, ran  # no trial rerun
    assert states[killed] == "FAIL"
    [retry] = [t for t in study.trials if tune_retried(t) == killed]
    assert retry.params == study.trials[killed].params and retry.state.name in ("COMPLETE", "PRUNED")
    counts = collections.Counter(states.values())
    assert counts["COMPLETE"] + counts["PRUNED"] == 5 and counts["FAIL"] == 1 and len(states) == 6, states
    # Each machine reads the other's trials in the one study its sampler and pruner work from: A's summary
    # counts B's trials, B's restart A's. (No more is claimed: TPE suggests at random for its first 10 trials.)
    assert int(re.search(r"^tune: study duo: (\d+) trials: ", a_output, re.MULTILINE)[1]) > len(ran["a"])
    done = int(re.search(r"^tune: study duo: (\d+) trials done of 5", b_again, re.MULTILINE)[1])
    assert done > len([n for n in ran["b"] if n not in again and states[n] in ("COMPLETE", "PRUNED")])

    complete = {n: f"duo-{n}" for n, state in states.items() if state == "COMPLETE"}
    for label, repo in (("a", a), ("b", b)):  # one experiment per complete trial, on the machine that ran it
        assert set(experiments_shown(repo)) == {complete[n] for n in ran[label] if n in complete}, label
    if retry.number in again and retry.state.name == "COMPLETE":
        run(["dvc", "exp", "push", "origin", complete[retry.number]], b, team_env(stack))
    run(["dvc", "exp", "pull", "origin", *complete.values()], c, team_env(stack))
    shown = experiments_shown(c)
    assert set(shown) == set(complete.values())
    for n, name in complete.items():
        assert shown[name]["metrics/train.json"]["data"]["val_accuracy"] == study.trials[n].value

    # MLflow: one parent run; one child per trial that started; the complete ones FINISHED with their value,
    # the pruned ones KILLED. The killed worker's trial ended too: at its first epoch's end, by the
    # supervisor's SIGINT (KILLED) or by its output meeting the dead worker's pipe (FAILED).
    parents, children = study_runs(client, "duo")
    assert len(parents) == 1
    by_name = collections.Counter(child.info.run_name for child in children)
    assert by_name == collections.Counter(f"duo-{n}" for n in states), by_name
    for child in children:
        n = int(child.info.run_name.rsplit("-", 1)[1])
        if states[n] == "COMPLETE":
            assert child.info.status == "FINISHED" and child.data.tags["tune.trial"] == str(n)
            assert child.data.metrics["val_accuracy"] == pytest.approx(study.trials[n].value)
        elif states[n] == "PRUNED":
            assert child.info.status == "KILLED" and child.data.tags[tune.PRUNED_TAG] == "true"
        else:
            assert n == killed and child.info.status in ("KILLED", "FAILED"), (n, child.info.status)


def reported_steps(stack, trial_id: int) -> list[int]:
    """The epochs of the trial as its database received them, in that order."""
    with psycopg.connect(stack.database_uri("optuna"), autocommit=True) as database:
        rows = database.execute(
            "SELECT step FROM trial_intermediate_values WHERE trial_id = %s ORDER BY trial_intermediate_value_id",
            (trial_id,),
        ).fetchall()
    return [int(step) for (step,) in rows]


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
@pytest.mark.parametrize("back", [True, False], ids=["back-before-the-end", "down-at-the-end"])
def test_epochs_the_study_database_missed_reach_it_in_order_or_the_trial_fails_naming_them(
    stack, monkeypatch, capsys, back
):
    # A real PostgreSQL stopped at epoch 2 and started again: epochs 2 and 3 are reported with epoch 4, or, if it
    # is still down at the trial's end, after a wait (shortened here) the trial fails in one line naming them.
    monkeypatch.setattr(tune, "REPORT_WAIT_SECONDS", 3)
    study = optuna.create_study(
        study_name=f"reports-{back}", storage=tune.open_storage(stack.database_uri("optuna")), direction="maximize"
    )
    reports = tune.EpochReports(study.ask(), "reports-0", epochs=5)
    assert not reports.on_epoch({"epoch": 1, "val_accuracy": 0.5})
    team_stack.stop(stack.folder, services=["postgres"])
    try:
        for epoch in (2, 3):
            assert not reports.on_epoch({"epoch": epoch, "val_accuracy": 0.5 + epoch / 100})
        if back:
            team_stack.start(stack.folder, services=["postgres"])
        assert not reports.on_epoch({"epoch": 4, "val_accuracy": 0.54})
        if back:
            reports.report_the_rest()
        else:
            with pytest.raises(tune.TrialFailed) as failed:
                reports.report_the_rest()
    finally:
        team_stack.start(stack.folder, services=["postgres"])
    out = capsys.readouterr().out
    for epoch in (2, 3):
        assert f"tune: reports-0: epoch {epoch} kept to report later (" in out
    trial_id = reports.trial._trial_id
    if back:
        assert reported_steps(stack, trial_id) == [1, 2, 3, 4]
        assert study.trials[0].intermediate_values == {1: 0.5, 2: 0.52, 3: 0.53, 4: 0.54}
    else:
        assert reported_steps(stack, trial_id) == [1]
        assert str(failed.value).startswith("reports-0: epochs 2, 3, 4 never reached the study's database (")
        [line] = [line for line in out.splitlines() if "never reached" in line]
        assert line.endswith(" within 3 s; the trial fails") and "\n" not in str(failed.value)


def test_a_study_database_that_accepts_no_connection_is_one_line_within_the_connect_limit(stack):
    # PostgreSQL's postmaster stopped (SIGSTOP): connections queue, unanswered; psycopg alone waits 130 s.
    pid = team_stack.status(stack.folder)["postgres"]
    os.kill(pid, signal.SIGSTOP)
    try:
        began = time.monotonic()
        with pytest.raises(StageError) as failed:
            tune.open_storage(stack.database_uri("optuna"))
        seconds = time.monotonic() - began
    finally:
        os.kill(pid, signal.SIGCONT)
    where = f"{team_stack.HOST}:{stack.ports['postgres']}/optuna"
    assert str(failed.value).startswith(f"study storage {where} is unreachable or broken: ")
    assert "connection timeout expired" in str(failed.value) and "\n" not in str(failed.value)
    assert seconds < tune.CONNECT_SECONDS + 30  # the limit promised, not psycopg's 130 s


OUTAGE_SPACE = """
seed: 5
budget: {trials: 2}
pruner: {warmup_epochs: 1, startup_trials: 2}
parameters:
  hidden_layer_size: {min: 16, max: 32, log: true}
  learning_rate: {min: 0.001, max: 0.005, log: true}
fixed:
  epochs: 50
"""

HEARTBEAT = """
SELECT h.heartbeat, t.state FROM trial_heartbeats h JOIN trials t ON t.trial_id = h.trial_id
JOIN studies s ON s.study_id = t.study_id WHERE s.study_name = %s AND t.number = %s
"""


def test_a_study_loses_no_completed_trial_to_the_database_or_the_tracking_server_down_mid_trial(
    origin, stack, client, tmp_path
):
    # Trial 0 trains through PostgreSQL down (the study's database, and the tracking server's) for as long as
    # it takes to miss a heartbeat, and beats again; trial 1 through the tracking server down for two epochs.
    # 50 epochs of a small network: a trial trains for 40 s, time for a heartbeat missed and one recorded.
    repo = machine(origin, stack, tmp_path / "clone")
    commit_file(repo, "outage.yaml", OUTAGE_SPACE)
    logs = repo / tune.TRIAL_LOGS
    with started(tune_command("outage.yaml", "outage"), repo, study_env(stack)) as tuning:
        wait_for_text(logs / "outage-0.log", "Epoch 1/", tuning)
        team_stack.stop(stack.folder, services=["postgres"])
        try:
            wait_for_output(tuning, "tune: heartbeat not recorded (", 2 * tune.HEARTBEAT_SECONDS + 10)
        finally:
            team_stack.start(stack.folder, services=["postgres"])
        assert "(outage-0): " not in tuning.output, "trial 0 ended while the database was down"
        # The trial's heartbeat goes on: no other worker will take it for a killed one's.
        with psycopg.connect(stack.database_uri("optuna"), autocommit=True) as database:
            before, _ = database.execute(HEARTBEAT, ("outage", 0)).fetchone()
            deadline = time.monotonic() + 2 * tune.HEARTBEAT_SECONDS + 10
            while (now := database.execute(HEARTBEAT, ("outage", 0)).fetchone())[0] == before:
                assert now[1] == "RUNNING" and time.monotonic() < deadline, f"no heartbeat since the restart: {now}"
                time.sleep(0.5)

        wait_for_text(logs / "outage-1.log", "Epoch 2/", tuning)
        team_stack.stop(stack.folder, services=["mlflow"])
        try:
            begun = (logs / "outage-1.log").read_text().count("Epoch ")
            wait_for_text(logs / "outage-1.log", "Epoch ", tuning, count=begun + 2)  # two more epochs begun
        finally:
            team_stack.start(stack.folder, services=["mlflow"])
        output = tuning.finish(timeout=600)
    assert tuning.process.returncode == 0, output[-3000:]
    assert "Exception in thread" not in output
    assert "tune: study outage: 2 trials: 2 complete, 0 pruned, 0 failed, 0 running" in output

    study = optuna.load_study(study_name="outage", storage=stack.database_uri("optuna"))
    shown = experiments_shown(repo)
    assert set(shown) == {"outage-0", "outage-1"}
    for trial in study.trials:
        assert trial.state.name == "COMPLETE"
        assert trial.value == shown[f"outage-{trial.number}"]["metrics/train.json"]["data"]["val_accuracy"]
        assert sorted(trial.intermediate_values) == list(range(1, 51))  # none lost to the outage

    [parent], children = study_runs(client, "outage")
    assert parent.info.status == "FINISHED" and parent.data.metrics["best_val_accuracy"] == study.best_value
    assert sorted(child.info.run_name for child in children) == ["outage-0", "outage-1"]
    for child in children:
        assert child.info.status == "FINISHED" and child.data.tags["tune.study"] == "outage"
        for metric in EPOCH_METRICS:
            assert [m.step for m in client.get_metric_history(child.info.run_id, metric)] == list(range(1, 51))
        assert "test_accuracy" in child.data.metrics
