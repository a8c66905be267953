"""The thin command-line layer every stage shares: one-line errors, exit codes, signals, quiet TensorFlow."""

from __future__ import annotations

import argparse
import contextlib
import importlib.abc
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from types import FrameType, ModuleType

from stages.common import paths
from stages.common.errors import StageError

# TensorFlow's C++ logs (oneDNN notices, CUDA probing on CPU-only machines) are noise in
# stage logs; real failures still surface as Python exceptions. Set it to 0 to see them.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


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
    """Whether a signal is being held by signals_held()."""
    return _held_signal is not None


# What `numerics: portable` sets before TensorFlow loads (docs/determinism.md). TensorFlow picks
# kernels by CPU at run time: oneDNN's ops where the CPU has AVX-512 VNNI/BF16 or AMX, and a
# oneDNN matrix-multiply kernel inside its own ops, each dispatched on the instruction set. Off,
# Eigen's kernels compiled into the wheel do all the arithmetic, on one thread (more threads
# split the sums differently, so the bits would depend on the number of cores).
PORTABLE_KERNELS = {"TF_ENABLE_ONEDNN_OPTS": "0", "TENSORFLOW_USE_CUSTOM_CONTRACTION_KERNEL": "0"}
PORTABLE_THREADS = 1


# Keras imports these whenever they are installed (MLflow brings them), for its scikit-learn wrappers
# and plotting utilities, which no stage uses: about 1 s of every TensorFlow import (docs/speed.md).
KERAS_OPTIONAL_MODULES = ("sklearn", "matplotlib")


class _HiddenModules(importlib.abc.MetaPathFinder):
    """While installed first in sys.meta_path: these top-level packages look not installed."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> None:
        if fullname.partition(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {fullname!r} (hidden while TensorFlow loads)", name=fullname)
        return None


def import_tensorflow(numerics: str = "portable") -> ModuleType:
    """Import TensorFlow, its C++ banner silenced (it ignores the setting above), with the CPU
    kernels that `numerics` names: "portable", the same bits on any CPU; "native", TensorFlow's
    defaults. Only the call that imports TensorFlow chooses (a process's kernels are fixed once
    TensorFlow runs): the stages call it first thing."""
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    if numerics == "portable":
        os.environ.update(PORTABLE_KERNELS)
    saved_stderr = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    hidden = _HiddenModules(tuple(name for name in KERAS_OPTIONAL_MODULES if name not in sys.modules))
    sys.meta_path.insert(0, hidden)
    try:
        import tensorflow
    finally:
        sys.meta_path.remove(hidden)
        os.dup2(saved_stderr, 2)
        os.close(saved_stderr)
        os.close(devnull)
    if numerics == "portable":
        tensorflow.config.threading.set_intra_op_parallelism_threads(PORTABLE_THREADS)
    return tensorflow


# Where a stage's time goes, for bench/phases.py: with MNIST_PHASE_LOG set, each stage appends one line
# "<unix time>\t<stage>\t<phase>" per phase it ends (its process start, "imports", ..., "exit").
PHASE_LOG = "MNIST_PHASE_LOG"
_stage_name = ""


def phase(name: str) -> None:
    """Mark the end of phase `name` of the running stage (nothing unless MNIST_PHASE_LOG is set)."""
    if os.environ.get(PHASE_LOG):
        with open(os.environ[PHASE_LOG], "a") as marks:
            marks.write(f"{time.time():.3f}\t{_stage_name}\t{name}\n")


def _process_start_time() -> float:
    """When this process started (Linux; within 10 ms), so that the interpreter's start-up counts."""
    with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
        started_after_boot = int(stat.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        return time.time() - (float(uptime.read().split()[0]) - started_after_boot)


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
    """Parse the command line (`--help`; whatever `arguments` adds, passed to `main` by name), run
    `main`, and turn failures into one line and a non-zero exit.

    On success the process ends here, without the interpreter's teardown: with TensorFlow and
    MLflow loaded that takes about 2 s, and by now every output is written and closed and the
    MLflow run ended.
    """
    parser = argparse.ArgumentParser(
        prog=f"python -m stages.{name}", description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    if arguments is not None:
        arguments(parser)
    global _stage_name
    _stage_name = name
    if os.environ.get(PHASE_LOG):
        with open(os.environ[PHASE_LOG], "a") as marks:
            marks.write(f"{_process_start_time():.3f}\t{name}\tstart\n")
        phase("python and the stage's modules")
    parsed = vars(parser.parse_args(argv))
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        main(**parsed)
        sys.stdout.flush()
        sys.stderr.flush()
        phase("end")
        os._exit(0)
    except StageError as exc:
        _fail(name, f"error: {exc}", 1)
    except KeyboardInterrupt:
        _fail(name, "interrupted (SIGINT)", 130)
    except Terminated:
        _fail(name, "terminated (SIGTERM)", 143)
    except Exception:  # a bug: its traceback follows
        _print_restore_hint(name)
        raise


def _print_restore_hint(stage: str) -> None:
    """Under DVC, which removes a stage's outputs before running it: the command that restores them."""
    if os.environ.get("DVC_STAGE") and stage in paths.OUTPUTS_IN_GIT:
        command = " && ".join(
            [f"dvc checkout {stage}", *(f"git checkout -- {path}" for path in paths.OUTPUTS_IN_GIT[stage])]
        )
        print(
            f"{stage}: DVC removed this stage's previous outputs before running it; to restore them: {command}",
            file=sys.stderr,
            flush=True,
        )


def _fail(name: str, message: str, exit_code: int) -> None:
    print(f"{name}: {message}", file=sys.stderr, flush=True)
    _print_restore_hint(name)
    sys.exit(exit_code)
