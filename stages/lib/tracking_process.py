"""MLflow in a process of its own, beside train and evaluate.

Importing MLflow and opening its store take about 2 s of single-threaded Python, as long as importing
TensorFlow, and in one process the two cannot overlap (the GIL). So these stages run their MLflow functions
in a second process, on the other core (docs/speed.md):

    with TrackingProcess() as mlflow_process:
        mlflow_process.post(tracking.open_stage_experiment, "train", name)  # returns at once
        ...                                                                  # import TensorFlow meanwhile
        run_id = mlflow_process.call(start_training_run, params)            # waits for the result

Functions run there one at a time, in order; after one fails, only the run's end. Their errors reach the
stage as one line (a bug's traceback is printed there). A call waits at most `wait_seconds()` (MLflow's
client retries a dead server for minutes), and Ctrl-C or SIGTERM stop the stage while it waits; the
process ignores both. Leaving the block ends the run: FINISHED, else KILLED (SIGINT, SIGTERM) or FAILED,
waiting END_SECONDS at most. If the stage dies, the process ends the run KILLED; a run nobody could end
(its store down) is marked KILLED by the next stage on this host (tracking.close_orphaned_runs).
"""

from __future__ import annotations

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
from typing import Any

from stages.common.cli import Terminated
from stages.common.errors import StageError, first_line
from stages.lib import tracking

WAIT_ENV = "MNIST_TRACKING_WAIT"  # seconds a call waits for the tracking store (default WAIT_SECONDS)
WAIT_SECONDS = 180.0
END_SECONDS = 5.0  # after a failure or a signal: how long the run's end may take before the process is killed
# Libraries whose exceptions mean the store or the server, not our code: one line, no traceback.
STORE_ERRORS_FROM = ("mlflow", "requests", "urllib3", "sqlalchemy", "sqlite3", "psycopg")


def wait_seconds() -> float:
    value = os.environ.get(WAIT_ENV, "")
    try:
        seconds = float(value) if value else WAIT_SECONDS
    except ValueError:
        seconds = 0
    if not seconds > 0:
        raise StageError(f"{WAIT_ENV} must be a number of seconds > 0, got {value!r}")
    return seconds


class TrackingProcess:
    """Runs our MLflow functions in a process of its own (see the module's docstring)."""

    def __init__(self) -> None:
        self.wait = wait_seconds()
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
        self._errors: list[StageError] = []

    def post(self, function: Callable[..., Any], *args: Any) -> None:
        """Run `function(*args)` there, after everything sent before; do not wait."""
        self._send(function, args)

    def call(self, function: Callable[..., Any], *args: Any) -> Any:
        """Run `function(*args)` there, after everything sent before; return its result, or raise the first
        error of any of them."""
        return self._answer(self._send(function, args), self.wait)

    def __enter__(self) -> TrackingProcess:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exception: BaseException | None, trace: TracebackType | None
    ) -> None:
        try:
            if exception is None:
                self.call(tracking.end_run, "FINISHED")
            elif self._process.is_alive():
                status = "KILLED" if isinstance(exception, KeyboardInterrupt | Terminated) else "FAILED"
                self._errors.clear()  # the stage's own exception is the one to report
                self._answer(self._send(tracking.end_run, (status,)), END_SECONDS)
        except StageError:
            if exception is None:
                raise
        finally:
            if self._process.is_alive():
                self._process.kill()
            self._connection.close()

    def _send(self, function: Callable[..., Any], args: tuple) -> int:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # it died: the answer's wait says so
            self._connection.send((function, args))
        self._sent += 1
        return self._sent

    def _answer(self, number: int, seconds: float) -> Any:
        deadline = time.monotonic() + seconds
        result = None
        while self._answered < number:
            if not self._connection.poll(max(0.0, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() >= deadline:
                    self._process.kill()
                    raise StageError(
                        f"MLflow tracking store {tracking.tracking_uri()} did not answer within {seconds:g} s "
                        f"(set {WAIT_ENV} to wait longer); run the stage again once it answers"
                    )
                continue
            try:
                failed, result = self._connection.recv()
            except (EOFError, OSError):
                self._process.join(timeout=5)
                raise StageError(
                    f"MLflow: its process ended unexpectedly (exit code {self._process.exitcode})"
                ) from None
            self._answered += 1
            if failed:
                self._errors.append(result)
        if self._errors:
            raise self._errors[0]
        return result


def _serve(connection: Any) -> None:
    """The process: run each function received, answer (failed, result or error); after a failure, run
    nothing but the end of the run (a run started in a store that failed to open would be misfiled). When
    the stage is gone, end the open run KILLED and exit."""
    logging.getLogger("urllib3").setLevel(logging.ERROR)  # a line per retry of a server that is down
    failed = False
    while True:
        try:
            function, args = connection.recv()
        except (EOFError, OSError):  # the stage is gone
            _run(tracking.end_run, ("KILLED",))
            break
        if failed and function is not tracking.end_run:
            answer = (True, StageError(f"MLflow: {function.__name__} not run after an earlier failure"))
        else:
            answer = _run(function, args)
            failed = failed or answer[0]
        try:
            connection.send(answer)
        except (BrokenPipeError, ConnectionResetError):
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
