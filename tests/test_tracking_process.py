"""stages/lib/tracking_process.py: a stage's MLflow run recorded by a process of its own. The functions below
stand in for train's and evaluate's (which the stage tests run for real): each notes what it did."""

import contextlib
import json
import os
import signal
import sqlite3
import sys
import time
from pathlib import Path

import mlflow
import pytest

from stages.common.cli import Terminated
from stages.common.errors import StageError
from stages.lib import tracking
from stages.lib.tracking_process import WAIT_ENV, TrackingClient
from tests.e2e import started


def note(log: str, *what) -> int:
    with open(log, "a") as file:
        file.write(json.dumps([str(item) for item in what]) + "\n")
    return os.getpid()


def notes(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def double(number: int) -> int:
    return number * 2


def refuse(message: str) -> None:
    raise StageError(message)


def divide_by_zero() -> float:
    return 1 / 0


def run_status(root: Path, run_id: str) -> str:
    return mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db").get_run(run_id).info.status


def test_functions_run_there_in_order_and_start_run_does_not_wait(stage_root):
    log = stage_root / "log"
    with TrackingClient("test", "tests") as mlflow_run:
        mlflow_run.start_run(note, str(log), "first")
        mlflow_run.start_run(note, str(log), "second")
        pid = mlflow_run.log(note, str(log), "third")
        assert mlflow_run.log(double, 21) == 42
    assert pid != os.getpid()
    assert notes(log) == [["first"], ["second"], ["third"]]


def test_the_run_started_there_gets_its_epochs_and_ends_finished(stage_root):
    with TrackingClient("test", "tests") as mlflow_run:
        mlflow_run.start_run(tracking.start_run)
        experiment_id, run_id = mlflow_run.run_ids()
        mlflow_run.log_epoch(1, {"loss": 0.5})
        mlflow_run.log_epoch(2, {"loss": 0.25})
    client = mlflow.MlflowClient(f"sqlite:///{stage_root}/mlflow.db")
    assert client.get_experiment(experiment_id).name == "tests"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(1, 0.5), (2, 0.25)]
    assert run_status(stage_root, run_id) == "FINISHED"


def test_an_error_that_did_not_wait_reaches_the_next_wait_and_nothing_else_runs_after_it(stage_root):
    log = stage_root / "log"
    with (
        pytest.raises(StageError, match="^MLflow tracking store x is unreachable$"),
        TrackingClient("test", "tests") as mlflow_run,
    ):
        mlflow_run.start_run(refuse, "MLflow tracking store x is unreachable")
        mlflow_run.start_run(note, str(log), "after the error")
        mlflow_run.log(double, 1)
    assert notes(log) == []


def test_a_bug_there_is_one_line_here_and_its_traceback_there(stage_root, capfd):
    with pytest.raises(StageError) as error, TrackingClient("test", "tests") as mlflow_run:
        mlflow_run.log(divide_by_zero)
    assert str(error.value).endswith(": division by zero")
    assert "\n" not in str(error.value)
    assert "Traceback" in capfd.readouterr().err


@pytest.mark.parametrize("exception, status", [(KeyboardInterrupt(), "KILLED"), (ValueError("bad"), "FAILED")])
def test_the_stages_exception_ends_the_run_and_the_stage_keeps_its_own(stage_root, exception, status):
    with pytest.raises(type(exception)), TrackingClient("test", "tests") as mlflow_run:
        mlflow_run.start_run(tracking.start_run)
        _, run_id = mlflow_run.run_ids()
        raise exception
    assert run_status(stage_root, run_id) == status


def test_a_call_unanswered_within_the_wait_fails_in_one_line_naming_the_store(stage_root, monkeypatch):
    monkeypatch.setenv(WAIT_ENV, "1")
    began = time.monotonic()
    with pytest.raises(StageError) as error, TrackingClient("test", "tests") as mlflow_run:
        mlflow_run.log(time.sleep, 60)
    assert time.monotonic() - began < 20
    assert str(error.value) == (
        f"MLflow tracking store {tracking.tracking_uri()} did not answer within 1 s "
        f"(set {WAIT_ENV} to wait longer); run the stage again once it answers"
    )


def test_a_bad_wait_setting_is_one_line(monkeypatch):
    monkeypatch.setenv(WAIT_ENV, "soon")
    with pytest.raises(StageError, match=f"^{WAIT_ENV} must be a number of seconds > 0, got 'soon'$"):
        TrackingClient("test", "tests")


STAGE = """
import sys, time
from stages.common.cli import run_stage
from stages.lib.tracking import start_run
from stages.lib.tracking_process import TrackingClient

def main():
    with TrackingClient("demo", "tests") as mlflow_run:
        mlflow_run.start_run(start_run)
        _, run_id = mlflow_run.run_ids()
        pid = mlflow_run.log(__import__("os").getpid)
        print("run", run_id, "process", pid, flush=True)
        mlflow_run.log(time.sleep, 600)  # a store that hangs

run_stage("demo", "", main, [])
"""


def test_a_signal_during_a_wait_stops_the_stage_at_once_and_the_process_ignores_signals(stage_root, stage_env):
    with started([sys.executable, "-c", STAGE], stage_root, stage_env(stage_root)) as stage:
        words = stage.lines[stage.wait_for_line("run ")].split()
        run_id, pid = words[1], int(words[3])
        os.kill(pid, signal.SIGINT)
        os.kill(pid, signal.SIGTERM)
        time.sleep(0.5)
        assert Path(f"/proc/{pid}").exists()  # ignored both
        began = time.monotonic()
        stage.process.send_signal(signal.SIGINT)
        output = stage.finish(timeout=30)
    assert time.monotonic() - began < 10  # the end of the run waits 5 s at the most
    assert stage.process.returncode == 130
    assert output.splitlines()[-1] == "demo: interrupted (SIGINT)"
    assert not Path(f"/proc/{pid}").exists()
    # It was busy sleeping, so the run could not be ended: the next stage on this host marks it KILLED.
    assert run_status(stage_root, run_id) == "RUNNING"
    tracking.open_stage_experiment("test", "tests")
    assert run_status(stage_root, run_id) == "KILLED"


def test_when_the_stage_is_killed_the_process_ends_its_run_killed(stage_root, stage_env):
    script = STAGE.replace("mlflow_run.log(time.sleep, 600)", "time.sleep(600)")
    with started([sys.executable, "-c", script], stage_root, stage_env(stage_root)) as stage:
        words = stage.lines[stage.wait_for_line("run ")].split()
        run_id, pid = words[1], int(words[3])
        stage.process.send_signal(signal.SIGKILL)
        stage.finish(timeout=30)
        deadline = time.monotonic() + 30
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists()
    assert run_status(stage_root, run_id) == "KILLED"


def log_epoch_after_breaking_the_store(root: str, epoch: int) -> None:
    with contextlib.closing(sqlite3.connect(f"{root}/mlflow.db")) as database, database:
        database.execute("DROP TABLE metrics")  # the store breaks under the running stage
    mlflow.log_metrics({"loss": 0.4}, step=epoch)


def test_metrics_the_store_does_not_take_fail_the_stage_in_one_line_and_the_run_failed(stage_root):
    with pytest.raises(StageError) as error, TrackingClient("test", "tests") as mlflow_run:
        mlflow_run.start_run(tracking.start_run)
        _, run_id = mlflow_run.run_ids()
        mlflow_run.log_epoch(1, {"loss": 0.5})
        mlflow_run.log(log_epoch_after_breaking_the_store, str(stage_root), 2)
    assert str(error.value).startswith(f"MLflow tracking store sqlite:///{stage_root}/mlflow.db")
    assert "\n" not in str(error.value)
    assert run_status(stage_root, run_id) == "FAILED"


def test_terminated_counts_as_killed(stage_root):
    with pytest.raises(Terminated), TrackingClient("test", "tests") as mlflow_run:
        mlflow_run.start_run(tracking.start_run)
        _, run_id = mlflow_run.run_ids()
        raise Terminated("SIGTERM")
    assert run_status(stage_root, run_id) == "KILLED"
