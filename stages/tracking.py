"""MLflow helpers: where runs are recorded, how a stage's run is opened and always closed.

Default store: `mlflow.db` (SQLite) at the repository root, artifacts in `mlartifacts/`.
DVC sets DVC_ROOT to the parent repository also for `dvc exp run --queue/--temp`, whose
stages run in a temporary copy, so their runs land in the same database.
MLFLOW_TRACKING_URI, when set, wins (a team's tracking server).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stages.cli import StageError, Terminated

if TYPE_CHECKING:
    import mlflow

DATABASE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"

# Fail within seconds, not minutes, when a tracking server is down (users may override).
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def repo_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def tracking_uri() -> str:
    # SQLite's busy timeout lets parallel experiments wait for the single writer instead of failing.
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / DATABASE}?timeout=60"


def dvc_experiment() -> str | None:
    """The name of the DVC experiment running this stage (`dvc exp run`), if any."""
    return os.environ.get("DVC_EXP_NAME") or None


def run_name() -> str:
    """The DVC experiment's name when DVC runs one, else a readable time stamp."""
    return dvc_experiment() or f"repro-{datetime.datetime.now():%Y%m%d-%H%M%S}"


def source_tags() -> dict[str, str]:
    """Where a run came from: the git commit, and the DVC experiment when there is one."""
    tags = {"git.commit": git_commit() or "unknown"}
    if dvc_experiment():
        tags["dvc.experiment"] = dvc_experiment()
    return tags


def git_commit() -> str | None:
    result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_root(), capture_output=True, text=True, check=False)
    return result.stdout.strip() if result.returncode == 0 else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def connect(experiment_name: str) -> str:
    """Point MLflow at the tracking store and return the experiment's id, creating it if needed."""
    import mlflow

    user_uri = os.environ.get("MLFLOW_TRACKING_URI")
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    if user_uri is None:
        # set_tracking_uri exports MLFLOW_TRACKING_URI; keep the variable meaning "the user's choice".
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    # Our default store keeps artifacts beside it; a server decides for itself.
    artifact_location = (repo_root() / ARTIFACTS_DIR).as_uri() if user_uri is None else None
    try:
        client = mlflow.MlflowClient()
        experiment = client.get_experiment_by_name(experiment_name)
        if experiment is None:
            # Suppressed: a parallel experiment may have created it first.
            with contextlib.suppress(mlflow.exceptions.MlflowException):
                client.create_experiment(experiment_name, artifact_location=artifact_location)
            experiment = client.get_experiment_by_name(experiment_name)
        for run_id in close_orphaned_runs(experiment.experiment_id):
            print(f"MLflow run {run_id} was left RUNNING by a killed stage; marked it KILLED", flush=True)
        return experiment.experiment_id
    except Exception as exc:
        raise StageError(f"MLflow tracking store {uri} is unreachable or broken: {_first_line(exc)}") from exc


def run_exists(run_id: str) -> bool:
    import mlflow

    try:
        mlflow.MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return False
    return True


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


@contextlib.contextmanager
def recorded_run(run_id: str | None = None, **start_run_args: Any) -> Iterator[mlflow.ActiveRun]:
    """Start a run (or reopen `run_id`) that always ends: FINISHED, FAILED, or KILLED on SIGINT/SIGTERM."""
    import mlflow

    if run_id is None:
        run = mlflow.start_run(tags=_owner_tags(), **start_run_args)
    else:
        # Claim the run before it shows as RUNNING again, so close_orphaned_runs leaves it alone.
        for key, value in _owner_tags().items():
            mlflow.MlflowClient().set_tag(run_id, key, value)
        run = mlflow.start_run(run_id=run_id)
    status = "FAILED"
    try:
        yield run
        mlflow.flush_async_logging()
        status = "FINISHED"
    except (KeyboardInterrupt, Terminated):
        status = "KILLED"
        raise
    finally:
        mlflow.end_run(status)
