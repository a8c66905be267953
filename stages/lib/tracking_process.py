"""MLflow in a process of its own, beside the stage that records into it (train, evaluate).

Importing MLflow and opening its store take about 2 s of single-threaded Python, and so does importing
TensorFlow; in one process they cannot overlap (the GIL). So these stages hand their MLflow work to a
second process, which does it on the other core while the stage imports TensorFlow and reads its data
(docs/speed.md has the figures).

The work is a generator function of the stage (`train.record_training`, say), run in that process:
- it runs up to its first `yield` at once;
- `send(value)` resumes it with `value` at that `yield`, without waiting for it;
- `result()` waits until it has taken everything sent, and returns what it last yielded, or raises what
  it raised (a StageError stays one, so its one-line message reaches the user);
- leaving the `with` block finishes it: normally, by resuming it with None (its run ends FINISHED); on
  an exception, by raising the exception at its `yield` (its `tracking.recorded_run` ends the run KILLED
  on SIGINT/SIGTERM, else FAILED).

The process never receives SIGINT or SIGTERM: the stage decides what a signal means and tells it, as
above. If the stage dies (SIGKILL, a crash), the work gets Terminated at its `yield`: the run ends KILLED.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import traceback
from collections.abc import Callable, Generator
from types import TracebackType
from typing import Any

from stages.common.cli import Terminated
from stages.common.errors import StageError, first_line

Work = Callable[..., Generator[Any, Any, Any]]


class TrackingProcess:
    """Runs `work(*args)` in a new process (see the module's docstring)."""

    def __init__(self, work: Work, *args: Any) -> None:
        # spawn, not fork: the stage may already run threads (TensorFlow's, in tests), which fork can't copy.
        context = multiprocessing.get_context("spawn")
        self._connection, their_end = context.Pipe()
        # Ignored while it starts (for a few milliseconds here): a new process inherits "ignored", and then
        # ignores them from its first instruction. Blocking them would not do: spawning unblocks them.
        handlers = {number: signal.signal(number, signal.SIG_IGN) for number in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._process = context.Process(target=_serve, args=(their_end, work, args), daemon=True)
            self._process.start()
        finally:
            for number, handler in handlers.items():
                signal.signal(number, handler)
        their_end.close()
        self._replies_due = 1  # its first yield
        self._last: Any = None
        self._error: BaseException | None = None

    def send(self, value: Any = None) -> None:
        self._request("send", value)

    def result(self) -> Any:
        while self._replies_due:
            try:
                kind, value = self._connection.recv()
            except (EOFError, OSError):  # it ended after an error (already received) or died
                self._replies_due = 0
                if self._error is None:
                    self._error = StageError(f"MLflow: its process ended unexpectedly (exit code {self._exit_code()})")
                break
            self._replies_due -= 1
            if kind == "error":
                self._error = self._error or value
            else:
                self._last = value
        if self._error is not None:
            raise self._error
        return self._last

    def __enter__(self) -> TrackingProcess:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exception: BaseException | None, trace: TracebackType | None
    ) -> None:
        if exception is None:
            self.send(None)
            self.result()
            return
        if self._error is None:  # it still runs: end its work with the stage's exception
            if not isinstance(exception, KeyboardInterrupt | Terminated):
                exception = StageError(first_line(exception))  # the type may not pickle; the status is FAILED
            self._request("throw", exception)
            # What comes back is the stage's own exception, raised back, or what ending the run raised.
            with contextlib.suppress(BaseException):
                self.result()
        self._connection.close()

    def _request(self, kind: str, value: Any) -> None:
        if self._error is not None:
            return
        try:
            self._connection.send((kind, value))
            self._replies_due += 1
        except (BrokenPipeError, ConnectionResetError):  # it ended: result() says why
            pass

    def _exit_code(self) -> int | None:
        self._process.join(timeout=5)
        return self._process.exitcode


def _serve(connection: Any, work: Work, args: tuple) -> None:
    """The process: run the work, one request at a time, replying to each; exit when it is done."""
    generator = work(*args)
    request: tuple[str, Any] = ("send", None)
    while True:
        kind, value = request
        try:
            reply = ("yielded", generator.send(value) if kind == "send" else generator.throw(value))
        except StopIteration as stop:
            reply = ("returned", stop.value)
        except BaseException as exc:
            reply = ("error", _picklable(exc))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the stage is gone
            connection.send(reply)
        if reply[0] != "yielded":
            break
        try:
            request = connection.recv()
        except (EOFError, OSError):  # the stage is gone
            request = ("throw", Terminated("the stage's process ended"))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no interpreter teardown (about a second with MLflow loaded): the stage may be waiting


def _picklable(exception: BaseException) -> BaseException:
    """What the stage can receive: its own exception types as they are, anything else (a bug) as a
    RuntimeError carrying the traceback, which is printed here too."""
    if isinstance(exception, StageError | KeyboardInterrupt | Terminated):
        return exception
    traceback.print_exception(exception, file=sys.stderr)
    return RuntimeError(f"in the MLflow process: {type(exception).__name__}: {first_line(exception)}")
