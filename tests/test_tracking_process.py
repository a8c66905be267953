"""stages/lib/tracking_process.py: a stage's MLflow work in a process of its own. The works below stand in
for train's and evaluate's (which the stage tests run for real): each writes what it saw to a file."""

from __future__ import annotations

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

from stages.common import paths
from stages.common.cli import Terminated
from stages.common.errors import StageError
from stages.common.params import load_params
from stages.lib.tracking_process import TrackingProcess
from stages.train import record_training
from tests.e2e import started


def noting(log: Path, *what) -> None:
    with open(log, "a") as file:
        file.write(json.dumps([str(item) for item in what]) + "\n")


def notes(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def echoing_work(log: Path):
    """Yields its pid, then the double of each number sent; notes whatever is raised at its yield."""
    noting(log, "started", os.getpid())
    received = yield os.getpid()
    try:
        while received is not None:
            noting(log, "received", received)
            received = yield received * 2
    except BaseException as exc:
        noting(log, "raised at its yield", type(exc).__name__)
        raise
    noting(log, "finished")
    return "done"


def failing_work(message: str):
    yield None
    raise StageError(message)


def test_values_go_in_order_and_the_last_yielded_comes_back(tmp_path):
    log = tmp_path / "log"
    with TrackingProcess(echoing_work, log) as work:
        pid = work.result()
        for number in (1, 2, 3):
            work.send(number)
        assert work.result() == 6  # what it yielded last, after taking everything sent
    assert pid != os.getpid()
    assert notes(log) == [["started", str(pid)], ["received", "1"], ["received", "2"], ["received", "3"], ["finished"]]


def test_its_stage_error_reaches_the_stage_as_one(tmp_path):
    message = "MLflow tracking store x is unreachable"
    with pytest.raises(StageError, match=f"^{message}$"), TrackingProcess(failing_work, message) as work:
        work.send()
        work.send()  # after it failed: dropped, not an error of its own
        work.result()


@pytest.mark.parametrize(
    "exception, seen", [(KeyboardInterrupt(), "KeyboardInterrupt"), (ValueError("bad"), "StageError")]
)
def test_the_stages_exception_is_raised_at_its_yield_and_the_stage_keeps_its_own(tmp_path, exception, seen):
    log = tmp_path / "log"
    with pytest.raises(type(exception)), TrackingProcess(echoing_work, log) as work:
        work.send(1)
        work.result()
        raise exception
    # KeyboardInterrupt and Terminated as they are (the run ends KILLED), anything else as a StageError (FAILED)
    assert notes(log)[-1] == ["raised at its yield", seen]


STAGE = """
import sys, time
from pathlib import Path
from stages.lib.tracking_process import TrackingProcess
from tests.test_tracking_process import echoing_work
with TrackingProcess(echoing_work, Path(sys.argv[1])) as work:
    pid = work.result()
    work.send(1)
    work.result()
    print("pid", pid, flush=True)
    while True:
        time.sleep(0.1)
"""


def test_it_ignores_sigint_and_sigterm_and_ends_its_work_when_the_stage_dies(tmp_path):
    log = tmp_path / "log"
    with started([sys.executable, "-c", STAGE, str(log)], Path.cwd()) as stage:
        pid = int(stage.lines[stage.wait_for_line("pid ")].split()[1])  # the tracking process's
        os.kill(pid, signal.SIGINT)
        os.kill(pid, signal.SIGTERM)
        time.sleep(1)
        assert notes(log) == [["started", str(pid)], ["received", "1"]]  # still running, its work untouched
        stage.process.send_signal(signal.SIGKILL)
        stage.finish(timeout=30)
        deadline = time.monotonic() + 30
        while len(notes(log)) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
    assert notes(log)[-1] == ["raised at its yield", Terminated.__name__]
    for _ in range(50):  # then it exits
        if not Path(f"/proc/{pid}").exists():
            break
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists()


def test_training_metrics_the_store_does_not_take_fail_the_stage_in_one_line_and_the_run_failed(stage_root):
    for name in (paths.SPLIT_TRAIN, paths.SPLIT_VALIDATION):  # only hashed into the run's tags
        (stage_root / name).parent.mkdir(parents=True, exist_ok=True)
        (stage_root / name).write_bytes(b"records")
    with pytest.raises(StageError) as error, TrackingProcess(record_training, load_params()) as work:
        work.send()
        _, run_id = work.result()
        work.send((1, {"loss": 0.5}))
        work.result()
        with contextlib.closing(sqlite3.connect(stage_root / "mlflow.db")) as database, database:
            database.execute("DROP TABLE metrics")  # the store breaks under the running stage
        work.send((2, {"loss": 0.4}))
        work.result()
    assert str(error.value).startswith(f"MLflow: logged data did not reach sqlite:///{stage_root}/mlflow.db")
    assert "\n" not in str(error.value)
    assert mlflow.MlflowClient().get_run(run_id).info.status == "FAILED"
