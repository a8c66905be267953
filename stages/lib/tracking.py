"""MLflow helpers: where runs are recorded, how a stage's run is opened and always closed, and which
run trained a given model file.

Default store: `mlflow.db` (SQLite) at the repository root, artifacts in `mlartifacts/`.
DVC sets DVC_ROOT to the parent repository also for `dvc exp run --queue/--temp`, whose
stages run in a temporary copy, so their runs land in the same database.
MLFLOW_TRACKING_URI, when set, wins (a team's tracking server).

Runs are linked to what they produced by content, not by ids in DVC's outputs: a training run is
tagged with the MD5 of the model file it wrote (`model.md5`, the hash DVC records in dvc.lock).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import logging
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stages.common.cli import Terminated, log
from stages.common.errors import StageError, first_line

if TYPE_CHECKING:
    import mlflow

DATABASE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
LOCK_FILE = "mlflow.db.lock"

# While connecting: fail within seconds, not minutes, when a tracking server is down. Later
# calls keep MLflow's retries, so a hiccup does not throw away a finished training run.
CONNECT_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}

# MLflow's own output that is noise in a stage's log: the progress bar of every artifact it copies, and,
# against a server, the "View run/experiment at" lines printed when a run ends, whose experiment link
# opens the UI's empty GenAI overview (stages print a working link instead: run_page). Set either to
# true to see them again.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

# Where `mlflow ui` serves by default, for a store that is not a server (our SQLite database).
LOCAL_UI = "http://127.0.0.1:5000"

MODEL_TAG = "model.md5"  # on the run that trained the model
EVALUATED_MODEL_TAG = "evaluated_model.md5"  # on a run that only evaluated it (no training run in the store)
PARENT_RUN_ENV = "MNIST_PARENT_RUN_ID"
# For a program that reads train's output (stages.tune): with this variable set, train prints one line per
# epoch, EPOCH_LINE_PREFIX then the epoch's row of metrics/train_history.csv as JSON.
EPOCH_JSON_ENV = "MNIST_EPOCH_JSON"
EPOCH_LINE_PREFIX = "train: epoch "


def repo_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def tracking_uri() -> str:
    # SQLite's busy timeout lets parallel experiments wait for the single writer instead of failing.
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / DATABASE}?timeout=60"


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def ui_address() -> str:
    """The MLflow UI of the store: the server itself, or where `mlflow ui` serves by default."""
    uri = tracking_uri()
    return uri.rstrip("/") if is_server(uri) else LOCAL_UI


def run_page(experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI: its params, metrics, curves (Model metrics) and artifacts; in the UI's
    model-training mode, whose links lead back to the runs table rather than to the GenAI overview."""
    return f"{ui_address()}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def log_run_page(stage: str, experiment_id: str, run_id: str) -> None:
    """Against a tracking server, where MLflow's own links are switched off (above): the run's page."""
    if is_server(tracking_uri()):
        log(stage, f"MLflow UI: {run_page(experiment_id, run_id)}")


def dvc_experiment() -> str | None:
    """The name of the DVC experiment running this stage (`dvc exp run`), if any."""
    return os.environ.get("DVC_EXP_NAME") or None


def run_name() -> str:
    """The DVC experiment's name when DVC runs one, else a readable time stamp."""
    return dvc_experiment() or f"repro-{datetime.datetime.now():%Y%m%d-%H%M%S}"


def source_tags() -> dict[str, str]:
    """Where a run came from: the git commit, the DVC experiment when there is one, and the parent run
    (a study's, which `python -m stages.tune` passes in PARENT_RUN_ENV) so that the UI groups them."""
    tags = {"git.commit": git_commit() or "unknown"}
    if dvc_experiment():
        tags["dvc.experiment"] = dvc_experiment()
    if os.environ.get(PARENT_RUN_ENV):
        tags["mlflow.parentRunId"] = os.environ[PARENT_RUN_ENV]
    return tags


def git_commit() -> str | None:
    """The commit the run's code came from; for a queued experiment, the commit it was queued on."""
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        return os.environ["DVC_EXP_BASELINE_REV"]
    result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_root(), capture_output=True, text=True, check=False)
    return result.stdout.strip() if result.returncode == 0 else None


def md5(path: Path) -> str:
    """The file's MD5, as DVC records it in dvc.lock, so a run can be matched to its data and model."""
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def open_experiment(experiment_name: str) -> str:
    """Point MLflow at the tracking store and return the experiment's id, creating it if needed."""
    import mlflow

    # "Creating initial MLflow database tables...", "Updating database tables": a new mlflow.db's setup.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    user_uri = os.environ.get("MLFLOW_TRACKING_URI") or None
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    if user_uri is None:
        # set_tracking_uri exports MLFLOW_TRACKING_URI; keep the variable meaning "the user's choice".
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    # Our default store keeps artifacts beside it; a server decides for itself.
    artifact_location = (repo_root() / ARTIFACTS_DIR).as_uri() if user_uri is None else None
    try:
        with _settings_unless_set(CONNECT_SETTINGS), _store_setup_lock(user_uri is None):
            client = mlflow.MlflowClient()
            experiment = client.get_experiment_by_name(experiment_name)
            if experiment is None:
                # Suppressed: on a server, another machine's stage may have created it first.
                with contextlib.suppress(mlflow.exceptions.MlflowException):
                    client.create_experiment(experiment_name, artifact_location=artifact_location)
                experiment = client.get_experiment_by_name(experiment_name)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
            user = os.environ.get("MLFLOW_TRACKING_USERNAME")
            who = f"user '{user}'" if user else "no user (MLFLOW_TRACKING_USERNAME is not set)"
            raise StageError(
                f"MLflow tracking server {uri} refused {who}: {exc.error_code.lower().replace('_', ' ')}; "
                "check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
            ) from exc
        raise StageError(f"MLflow tracking store {uri} is unreachable or broken: {first_line(exc)}") from exc
    except Exception as exc:
        raise StageError(f"MLflow tracking store {uri} is unreachable or broken: {first_line(exc)}") from exc
    if experiment.lifecycle_stage == "deleted":
        raise StageError(
            f"MLflow experiment '{experiment_name}' is deleted in {uri}: restore it "
            f"(mlflow experiments restore --experiment-id {experiment.experiment_id}) or change mlflow_experiment"
        )
    return experiment.experiment_id


@contextlib.contextmanager
def _store_setup_lock(default_store: bool) -> Iterator[None]:
    """For the default SQLite store, one process at a time creates or migrates its tables and the
    experiment: two queued experiments starting together on a new mlflow.db otherwise race in
    MLflow's schema migration and one fails. (A server serialises this itself.)"""
    if not default_store:
        yield
        return
    with open(repo_root() / LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        yield


@contextlib.contextmanager
def _settings_unless_set(settings: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the block, except those the user has set."""
    added = {name: value for name, value in settings.items() if name not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def find_training_run(experiment_id: str, model_md5: str) -> mlflow.entities.Run | None:
    """The run that evaluate records into: of the runs that trained the model file with this MD5
    (None if no run in the store did), a run not yet evaluated (no `test_accuracy`), then one whose
    stage ran on this host, then the newest.

    Several runs carry the same MD5 after a forced rerun or when a teammate trained the same
    params on the same data. A model restored from DVC's run-cache was trained by an earlier,
    already evaluated run: the newest of those.
    """
    host = socket.gethostname()
    return min(
        _runs_of_model(experiment_id, model_md5),
        key=lambda run: ("test_accuracy" in run.data.metrics, run.data.tags.get("process.host") != host),
        default=None,
    )


def find_evaluated_run(experiment_id: str, model_md5: str) -> mlflow.entities.Run | None:
    """The run to show for the model file with this MD5 (stages.runs, promote): one that holds its
    test metrics, then one whose stage ran on this host, then the newest; a run without test metrics
    only if no run of the model file has them.

    When train reruns but DVC restores evaluate from its run-cache (the same model file came out),
    the new training run gets no test metrics; an earlier run of the same file has them.
    """
    host = socket.gethostname()
    return min(
        _runs_of_model(experiment_id, model_md5),
        key=lambda run: ("test_accuracy" not in run.data.metrics, run.data.tags.get("process.host") != host),
        default=None,
    )


def _runs_of_model(experiment_id: str, model_md5: str) -> list[mlflow.entities.Run]:
    """The runs tagged as having trained the model file with this MD5, newest first."""
    import mlflow

    return mlflow.MlflowClient().search_runs(
        [experiment_id],
        filter_string=f"tags.`{MODEL_TAG}` = '{model_md5}'",
        order_by=["attributes.start_time DESC"],
    )


def _owner_tags() -> dict[str, str]:
    """Which process holds a run open, so a later stage can tell a SIGKILLed run from a live one."""
    return {"process.host": socket.gethostname(), "process.pid": str(os.getpid())}


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def close_orphaned_runs(experiment_id: str) -> list[str]:
    """Mark KILLED the runs left RUNNING by stages on this host whose process is gone (SIGKILL, power loss)."""
    import mlflow

    client = mlflow.MlflowClient()
    running = client.search_runs(
        [experiment_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`process.host` = '{socket.gethostname()}'",
    )
    orphans = [
        run.info.run_id
        for run in running
        if run.data.tags.get("process.pid", "").isdigit() and not _process_alive(int(run.data.tags["process.pid"]))
    ]
    for run_id in orphans:
        client.set_terminated(run_id, "KILLED")
    return orphans


def open_stage_experiment(stage: str, experiment_name: str) -> str:
    """For a stage: open the store and make the experiment the active one; mark KILLED the runs that killed
    stages on this host left RUNNING. Returns the experiment's id."""
    import mlflow

    experiment_id = open_experiment(experiment_name)
    mlflow.set_experiment(experiment_id=experiment_id)
    for run_id in close_orphaned_runs(experiment_id):
        log(stage, f"MLflow run {run_id} was left RUNNING by a killed stage; marked it KILLED")
    return experiment_id


def start_run(run_id: str | None = None, tags: dict[str, str] | None = None, **start_run_args: Any) -> mlflow.ActiveRun:
    """Start a run (or reopen `run_id`), tagged with the process that holds it open."""
    import mlflow

    try:
        if run_id is None:
            return mlflow.start_run(tags={**_owner_tags(), **(tags or {})}, **start_run_args)
        # Claim the run before it shows as RUNNING again, so close_orphaned_runs leaves it alone.
        for key, value in _owner_tags().items():
            mlflow.MlflowClient().set_tag(run_id, key, value)
        return mlflow.start_run(run_id=run_id)
    except mlflow.exceptions.MlflowException as exc:
        raise StageError(f"MLflow: cannot start a run in {tracking_uri()}: {first_line(exc)}") from exc


def log_epoch(epoch: int, metrics: dict[str, float]) -> None:
    import mlflow

    mlflow.log_metrics(metrics, step=epoch)


def end_run(status: str = "FINISHED") -> None:
    """End the active run, if there is one, with `status`."""
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.end_run(status)


@contextlib.contextmanager
def recorded_run(
    run_id: str | None = None, tags: dict[str, str] | None = None, **start_run_args: Any
) -> Iterator[mlflow.ActiveRun]:
    """A run (see start_run) that always ends: FINISHED, FAILED, or KILLED on SIGINT/SIGTERM."""
    run = start_run(run_id, tags, **start_run_args)
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    except (KeyboardInterrupt, Terminated):
        status = "KILLED"
        raise
    finally:
        end_run(status)
