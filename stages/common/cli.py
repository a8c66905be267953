"""The thin command-line layer every stage shares: one-line errors, exit codes, signals, progress lines."""

import argparse
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

from stages.common import paths
from stages.common.errors import StageError


class Terminated(BaseException):
    """Raised in the main thread when the process receives SIGTERM, so cleanup code runs."""


_held_signal: int | None = None  # a signal received inside signals_held(), raised when it ends
_holding = False


def _raise_for(signum: int) -> None:
    raise KeyboardInterrupt if signum == signal.SIGINT else Terminated(signal.Signals(signum).name)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    global _held_signal
    if _holding:
        _held_signal = signum
    else:
        _raise_for(signum)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM while TensorFlow runs, then raise them when the block ends.

    An exception raised inside TensorFlow's Python wrappers (where a signal handler would raise
    it) can corrupt its state: seen here as heap corruption on SIGTERM mid-epoch. Long loops
    poll `stop_requested()` to end early.
    """
    global _holding, _held_signal
    _holding = True
    try:
        yield
    finally:
        _holding = False
    if _held_signal is not None:
        signum, _held_signal = _held_signal, None
        _raise_for(signum)


def stop_requested() -> bool:
    return _held_signal is not None  # held by signals_held()


def log(stage: str, message: str) -> None:
    # One write per line: print() writes the text and the newline apart, and threads (stages.tune's)
    # could then write into each other's lines.
    sys.stdout.write(f"{stage}: {message}\n")
    sys.stdout.flush()


class Timer:
    """Seconds since creation, for the stages' progress lines."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __str__(self) -> str:
        return f"{time.perf_counter() - self.start:.1f} s"


def run_stage(
    name: str,
    description: str,
    main: Callable[..., None],
    argv: list[str] | None = None,
    arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> None:
    """Parse the command line (whatever `arguments` adds is passed to `main` by name), run `main`, and turn
    failures into one line and a non-zero exit. On success, end the process without the interpreter's
    teardown (about 2 s with TensorFlow and MLflow loaded): every output is written and closed by then."""
    parser = argparse.ArgumentParser(
        prog=f"python -m stages.{name}", description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    if arguments is not None:
        arguments(parser)
    parsed = vars(parser.parse_args(argv))
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    failure = None
    try:
        main(**parsed)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    except StageError as exc:
        failure = f"error: {exc}", 1
    except KeyboardInterrupt:
        failure = "interrupted (SIGINT)", 130
    except Terminated:
        failure = "terminated (SIGTERM)", 143
    finally:  # a bug (an exception not caught above) keeps its traceback, after these lines
        if failure is not None:
            print(f"{name}: {failure[0]}", file=sys.stderr, flush=True)
        _print_restore_hint(name)
    sys.exit(failure[1])


def in_workspace() -> bool:
    """Whether DVC runs this stage in the repository itself (not in a copy: `dvc exp run --temp`, `--queue`)."""
    root = os.environ.get("DVC_ROOT")
    return root is not None and Path(root).resolve() == Path.cwd().resolve()


def _print_restore_hint(stage: str) -> None:
    """DVC removed the outputs of a stage it runs in the workspace: the command that restores them."""
    if os.environ.get("DVC_STAGE") and in_workspace() and stage in paths.OUTPUTS_IN_GIT:
        restore = [f"dvc checkout {stage}", *(f"git checkout -- {path}" for path in paths.OUTPUTS_IN_GIT[stage])]
        print(
            f"{stage}: DVC removed this stage's previous outputs before running it; to restore them: "
            + " && ".join(restore),
            file=sys.stderr,
            flush=True,
        )
