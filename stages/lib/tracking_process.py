"""A stage's MLflow run, recorded by a process of its own beside train and evaluate.

Importing MLflow and opening its store take about 2 s of single-threaded Python, as long as importing
TensorFlow, and in one process the two cannot overlap (the GIL). So these stages record their run through a
TrackingClient, whose process does the MLflow work on the other core (docs/speed.md):

    with TrackingClient("train", experiment_name) as mlflow_run:  # opens the store, returns at once
        ...                                                        # import TensorFlow meanwhile
        mlflow_run.start_run(start_training_run, params)          # returns at once
        experiment_id, run_id = mlflow_run.run_ids()              # waits until the run has started
        mlflow_run.log_epoch(1, {"loss": 0.3})                    # returns at once
        mlflow_run.log(log_model, path)                           # waits until it is logged

The process does these one at a time, in order; after one fails, nothing but the run's end. The error reaches
the stage at the next method that waits, as one line (a bug's traceback is printed there). A wait lasts at most
`wait_seconds()` (MLflow's client retries a dead server for minutes), and Ctrl-C or SIGTERM stop the stage while
it waits; the process ignores both. Leaving the block ends the run: FINISHED, else KILLED (SIGINT, SIGTERM) or
FAILED, waiting END_SECONDS at most. If the stage dies, the process ends the run KILLED; a run nobody could end
(its store down) is marked KILLED by the next stage on this host (tracking.open_stage_experiment).

Not concurrent.futures.ProcessPoolExecutor: its worker cannot tell that the stage died, and killing it after
a wait needs the pool's private list of processes.
"""

import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

from stages.common.cli import Terminated
from stages.common.errors import StageError, first_line
from stages.lib import tracking

WAIT_ENV = "MNIST_TRACKING_WAIT"  # seconds a wait for the tracking store lasts (default WAIT_SECONDS)
WAIT_SECONDS = 180.0
END_SECONDS = 5.0  # after a failure or a signal: how long the run's end may take before the process is killed
# Libraries whose exceptions mean the store or the server, not our code: one line, no traceback.
STORE_ERRORS_FROM = ("mlflow", "requests", "urllib3", "sqlalchemy", "sqlite3", "psycopg")


def wait_seconds() -> float:
    value = os.environ.get(WAIT_ENV) or str(WAIT_SECONDS)
    with contextlib.suppress(ValueError):
        if float(value) > 0:
            return float(value)
    raise StageError(f"{WAIT_ENV} must be a number of seconds > 0, got {value!r}")


class TrackingClient:
    """The stage's side of the MLflow process (see the module's docstring)."""

    def __init__(self, stage: str, experiment_name: str) -> None:
        self._wait_seconds = wait_seconds()
        # spawn, not fork: the stage may already run threads (TensorFlow's, in tests), which fork can't copy.
        context = multiprocessing.get_context("spawn")
        self._connection, their_end = context.Pipe()
        # A new process inherits "ignored" and ignores them from its first instruction (blocking them
        # would not do: spawning unblocks them).
        handlers = {number: signal.signal(number, signal.SIG_IGN) for number in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._process = context.Process(target=_serve, args=(their_end,), daemon=True)
            self._process.start()
        finally:
            for number, handler in handlers.items():
                signal.signal(number, handler)
        their_end.close()
        self._sent = self._answered = 0
        self._error: StageError | None = None
        self._send(tracking.open_stage_experiment, stage, experiment_name)

    def start_run(self, start: Callable[..., Any], *args: Any) -> None:
        """`start(*args)` starts (or reopens) the run, in the stage's experiment; returns at once."""
        self._send(start, *args)

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """Log an epoch's metrics to the run; returns at once."""
        self._send(tracking.log_epoch, epoch, metrics)

    def run_ids(self) -> tuple[str, str]:
        """Wait until the run has started (and what was sent before is done): its (experiment id, run id)."""
        return self.log(_run_ids)

    def log(self, function: Callable[..., Any], *args: Any) -> Any:
        """`function(*args)` logs to the run; wait for it (and what was sent before) and return its result."""
        self._send(function, *args)
        return self._wait(self._wait_seconds)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exception: BaseException | None, trace: TracebackType | None
    ) -> None:
        try:
            if exception is None:
                self.log(tracking.end_run, "FINISHED")
            elif self._process.is_alive():
                status = "KILLED" if isinstance(exception, KeyboardInterrupt | Terminated) else "FAILED"
                self._error = None  # the stage's own exception is the one to report
                self._send(tracking.end_run, status)
                self._wait(END_SECONDS)
        except StageError:
            if exception is None:
                raise
        finally:
            if self._process.is_alive():
                self._process.kill()
            self._connection.close()

    def _send(self, function: Callable[..., Any], *args: Any) -> None:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # it died: the next wait says so
            self._connection.send((function, args))
        self._sent += 1

    def _wait(self, seconds: float) -> Any:
        """Read the answers to everything sent: the last one's result, or the first error."""
        deadline = time.monotonic() + seconds
        result = None
        while self._answered < self._sent:
            # A signal's handler raises in here: Ctrl-C and SIGTERM stop the wait at once.
            if not self._connection.poll(max(0.0, deadline - time.monotonic())):
                self._process.kill()
                raise StageError(
                    f"MLflow tracking store {tracking.tracking_uri()} did not answer within {seconds:g} s "
                    f"(set {WAIT_ENV} to wait longer); run the stage again once it answers"
                )
            try:
                failed, result = self._connection.recv()
            except (EOFError, OSError):
                self._process.join(timeout=5)
                raise StageError(
                    f"MLflow: its process ended unexpectedly (exit code {self._process.exitcode})"
                ) from None
            self._answered += 1
            if failed and self._error is None:
                self._error = result
        if self._error is not None:
            raise self._error
        return result


def _run_ids() -> tuple[str, str]:
    import mlflow

    info = mlflow.active_run().info
    return info.experiment_id, info.run_id


def _serve(connection: Any) -> None:
    """The process: run each function received, answer (failed, result or error); after a failure, run
    nothing but the end of the run (a run started in a store that failed to open would be misfiled). When
    the stage is gone, end the open run KILLED and exit."""
    logging.getLogger("urllib3").setLevel(logging.ERROR)  # a line per retry of a server that is down
    failed = False
    while True:
        try:
            function, args = connection.recv()
            if failed and function is not tracking.end_run:
                answer = (True, StageError(f"MLflow: {function.__name__} not run after an earlier failure"))
            else:
                answer = _run(function, args)  # raises nothing
                failed = failed or answer[0]
            connection.send(answer)
        except (EOFError, OSError):  # the stage is gone
            _run(tracking.end_run, ("KILLED",))
            break
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no interpreter teardown (about a second with MLflow loaded): the stage may be waiting


def _run(function: Callable[..., Any], args: tuple) -> tuple[bool, Any]:
    try:
        return False, function(*args)
    except StageError as exc:
        return True, exc
    except Exception as exc:
        if type(exc).__module__.partition(".")[0] not in STORE_ERRORS_FROM:
            traceback.print_exception(exc, file=sys.stderr)  # a bug
        return True, StageError(f"MLflow tracking store {tracking.tracking_uri()}: {first_line(exc)}")
