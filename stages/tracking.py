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


def run_name() -> str:
    """The DVC experiment's name when DVC runs one, else a readable time stamp."""
    return os.environ.get("DVC_EXP_NAME") or f"repro-{datetime.datetime.now():%Y%m%d-%H%M%S}"


def git_commit() -> str | None:
    result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_root(), capture_output=True, text=True, check=False)
    return result.stdout.strip() if result.returncode == 0 else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def connect(experiment_name: str) -> str:
    """Point MLflow at the tracking store and return the experiment's id, creating it if needed."""
    import mlflow

    # Our default store keeps artifacts beside it; a server decides for itself. Checked before
    # set_tracking_uri, which exports MLFLOW_TRACKING_URI.
    artifact_location = None if "MLFLOW_TRACKING_URI" in os.environ else (repo_root() / ARTIFACTS_DIR).as_uri()
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    try:
        experiment = client.get_experiment_by_name(experiment_name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return client.create_experiment(experiment_name, artifact_location=artifact_location)
        except mlflow.exceptions.MlflowException:
            # A parallel experiment created it first.
            experiment = client.get_experiment_by_name(experiment_name)
            if experiment is None:
                raise
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


@contextlib.contextmanager
def recorded_run(**start_run_args: Any) -> Iterator[mlflow.ActiveRun]:
    """`mlflow.start_run`, but the run always ends: FINISHED, FAILED, or KILLED on SIGINT/SIGTERM."""
    import mlflow

    run = mlflow.start_run(**start_run_args)
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
