"""MLflow helpers: where runs are recorded, how a stage's run starts and ends, which run trained a model file.

Default store: `mlflow.db` (SQLite) at the repository root, artifacts in `mlartifacts/`; DVC sets DVC_ROOT to
the parent repository also for `dvc exp run --queue/--temp`, so their runs land there too. MLFLOW_TRACKING_URI,
when set, wins (a team's tracking server). A training run is tagged with the MD5 of the model file it wrote
(`model.md5`, the hash DVC records in dvc.lock): runs are found by content, not by ids kept in outputs.
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

import psutil

from stages.common.cli import log
from stages.common.errors import StageError, first_line

if TYPE_CHECKING:
    import mlflow

DATABASE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
LOCK_FILE = "mlflow.db.lock"
LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves our SQLite store by default

# While connecting: fail within seconds, not minutes, when a tracking server is down. Later calls keep
# MLflow's retries (bounded by stages/lib/tracking_process.py), so a hiccup costs no finished training.
CONNECT_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
# Noise in a stage's log: a progress bar per artifact, and the "View run at" lines whose experiment link
# opens the UI's empty GenAI overview (stages print a working link: log_run_page). Set to true to see them.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

MODEL_TAG = "model.md5"  # on the run that trained the model
EVALUATED_MODEL_TAG = "evaluated_model.md5"  # on a run that only evaluated it (no training run in the store)
PARENT_RUN_ENV = "MNIST_PARENT_RUN_ID"  # a study's run, which its trials' runs name as their parent
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


def log_run_page(stage: str, experiment_id: str, run_id: str) -> None:
    """Against a tracking server, whose own links MLflow no longer prints (above): the run's page in the UI,
    in its model-training mode (whose links lead back to the runs table, not to the GenAI overview)."""
    if is_server(tracking_uri()):
        page = f"{ui_address()}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
        log(stage, f"MLflow UI: {page}")


def run_name() -> str:
    """The DVC experiment's name when `dvc exp run` runs the stage, else a readable time stamp."""
    return os.environ.get("DVC_EXP_NAME") or f"repro-{datetime.datetime.now():%Y%m%d-%H%M%S}"


def source_tags() -> dict[str, str]:
    """Where a run came from: the git commit (for a queued experiment, the one it was queued on), the DVC
    experiment if any, the parent run if any (a study's)."""
    commit = os.environ.get("DVC_EXP_BASELINE_REV")
    if not commit:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_root(), capture_output=True, text=True)
        commit = head.stdout.strip() if head.returncode == 0 else "unknown"
    tags = {"git.commit": commit}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.experiment"] = os.environ["DVC_EXP_NAME"]
    if os.environ.get(PARENT_RUN_ENV):
        tags["mlflow.parentRunId"] = os.environ[PARENT_RUN_ENV]
    return tags


def md5(path: Path) -> str:
    """The file's MD5, as DVC records it in dvc.lock."""
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def open_experiment(experiment_name: str) -> str:
    """Point MLflow at the tracking store and return the experiment's id, creating it if needed."""
    import mlflow

    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # a new mlflow.db's "Creating tables"
    default_store = not os.environ.get("MLFLOW_TRACKING_URI")
    uri = tracking_uri()
    # Removed again after connecting: the settings apply while connecting, and MLFLOW_TRACKING_URI, which
    # set_tracking_uri exports, keeps meaning "the user's choice".
    added = [name for name in (*CONNECT_SETTINGS, "MLFLOW_TRACKING_URI") if name not in os.environ]
    os.environ.update({name: CONNECT_SETTINGS[name] for name in added if name in CONNECT_SETTINGS})
    try:
        with _store_setup_lock(default_store):
            mlflow.set_tracking_uri(uri)
            client = mlflow.MlflowClient()
            experiment = client.get_experiment_by_name(experiment_name)
            if experiment is None:
                # Our default store keeps artifacts beside it; a server decides for itself.
                location = (repo_root() / ARTIFACTS_DIR).as_uri() if default_store else None
                with contextlib.suppress(mlflow.exceptions.MlflowException):  # another machine created it first
                    client.create_experiment(experiment_name, artifact_location=location)
                experiment = client.get_experiment_by_name(experiment_name)
    except Exception as exc:
        code = getattr(exc, "error_code", None)
        if code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
            user = os.environ.get("MLFLOW_TRACKING_USERNAME")
            who = f"user '{user}'" if user else "no user (MLFLOW_TRACKING_USERNAME is not set)"
            raise StageError(
                f"MLflow tracking server {uri} refused {who}: {code.lower().replace('_', ' ')}; "
                "check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
            ) from exc
        raise StageError(f"MLflow tracking store {uri} is unreachable or broken: {first_line(exc)}") from exc
    finally:
        for name in added:
            os.environ.pop(name, None)
    if experiment.lifecycle_stage == "deleted":
        raise StageError(
            f"MLflow experiment '{experiment_name}' is deleted in {uri}: restore it "
            f"(mlflow experiments restore --experiment-id {experiment.experiment_id}) or change mlflow_experiment"
        )
    return experiment.experiment_id


@contextlib.contextmanager
def _store_setup_lock(default_store: bool) -> Iterator[None]:
    """For the default SQLite store, one process at a time creates or migrates its tables: two queued
    experiments starting on a new mlflow.db otherwise race in MLflow's migration. (A server serialises it.)
    A new store is created under another name, then renamed into place: its migrations take seconds, and a
    stage that fails meanwhile ends its MLflow process; cut off half-way, they would leave a store that no
    later run can open."""
    import mlflow

    if not default_store:
        yield
        return
    with open(repo_root() / LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        database = repo_root() / DATABASE
        if not database.exists():
            partial = database.with_name(f".{database.name}.partial")  # a cut-off creation's, if it exists
            partial.unlink(missing_ok=True)
            mlflow.MlflowClient(f"sqlite:///{partial}").search_experiments(max_results=1)
            partial.rename(database)
        yield


def find_training_run(experiment_id: str, model_md5: str, evaluated: bool = False) -> mlflow.entities.Run | None:
    """Of the runs that trained the model file with this MD5: the run evaluate records into, one not yet
    evaluated (a forced rerun's); with `evaluated`, the run to show (runs, promote), one with test metrics (train
    reran but DVC restored evaluate: the new run has none). Then this host's, then the newest (a model DVC
    restored from its run-cache)."""
    import mlflow

    runs = mlflow.MlflowClient().search_runs(
        [experiment_id], filter_string=f"tags.`{MODEL_TAG}` = '{model_md5}'", order_by=["attributes.start_time DESC"]
    )
    host = socket.gethostname()
    return min(
        runs,
        key=lambda run: (("test_accuracy" in run.data.metrics) != evaluated, run.data.tags.get("process.host") != host),
        default=None,
    )


def find_evaluated_run(experiment_id: str, model_md5: str) -> mlflow.entities.Run | None:
    return find_training_run(experiment_id, model_md5, evaluated=True)


def open_stage_experiment(stage: str, experiment_name: str) -> str:
    """For a stage: open the store and make the experiment the active one; mark KILLED the runs left RUNNING
    by stages on this host whose process is gone (SIGKILL, power loss). Returns the experiment's id."""
    import mlflow

    experiment_id = open_experiment(experiment_name)
    mlflow.set_experiment(experiment_id=experiment_id)
    client = mlflow.MlflowClient()
    running = client.search_runs(
        [experiment_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`process.host` = '{socket.gethostname()}'",
    )
    for run in running:
        pid = run.data.tags.get("process.pid", "")
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            client.set_terminated(run.info.run_id, "KILLED")
            log(stage, f"MLflow run {run.info.run_id} was left RUNNING by a killed stage; marked it KILLED")
    return experiment_id


def start_run(
    run_id: str | None = None, params: dict[str, Any] | None = None, tags: dict[str, str] | None = None, **args: Any
) -> mlflow.ActiveRun:
    """Start a run with `params`, tagged with where it came from, `tags`, and the host and pid that hold it open
    (open_stage_experiment), named run_name() unless `args` (mlflow.start_run's) name it; or reopen `run_id`.
    Leaving the returned run as a `with` block ends it FINISHED, or FAILED on an exception."""
    import mlflow

    owner = {"process.host": socket.gethostname(), "process.pid": str(os.getpid())}
    try:
        if run_id is not None:
            for key, value in owner.items():  # claimed before it shows as RUNNING again
                mlflow.MlflowClient().set_tag(run_id, key, value)
            return mlflow.start_run(run_id=run_id)
        run = mlflow.start_run(**{"run_name": run_name(), **args}, tags={**owner, **source_tags(), **(tags or {})})
    except mlflow.exceptions.MlflowException as exc:
        raise StageError(f"MLflow: cannot start a run in {tracking_uri()}: {first_line(exc)}") from exc
    if params:
        mlflow.log_params(params)
    return run


def log_epoch(epoch: int, metrics: dict[str, float]) -> None:
    import mlflow

    mlflow.log_metrics(metrics, step=epoch)


def end_run(status: str = "FINISHED") -> None:
    import mlflow

    mlflow.end_run(status)  # the active run, if there is one
