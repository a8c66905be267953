"""One run at a time in a workspace: params.yaml must hold, until DVC records them, the params a stage used.

DVC writes the params of an experiment's `-S` into the workspace's params.yaml before any stage runs, and
records in dvc.lock what the file holds when a stage ends. So a second `dvc exp run` started while a first
trains would file the first's outputs under the second's params (and DVC loses the first experiment's
refs). Against that, train and evaluate hold `params_in_use` while they run in the workspace: a lock, and
the params.yaml they read. The second run's check_params finds it, puts the file back and stops; and a
stage whose params.yaml changed anyway (an edit) fails rather than be recorded with params it did not use.
"""

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path

from stages.common.cli import in_workspace
from stages.common.errors import StageError
from stages.common.params import PARAMS_FILE, Params, load_params

IN_USE = Path(".dvc/tmp/params-in-use.json")  # {"pid", "stage", "params"}: the holder, the text it read
TWO_AT_ONCE = "run experiments side by side with `dvc exp run --temp` or `--queue` (docs/failures.md)"


@contextlib.contextmanager
def params_in_use(stage: str) -> Iterator[None]:
    """Under DVC in the workspace: for the block, hold IN_USE with the params.yaml this stage read."""
    if not in_workspace():
        yield
        return
    IN_USE.parent.mkdir(parents=True, exist_ok=True)
    with open(IN_USE, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a stage of another run, after check_params: wait for it
        held.truncate(0)
        held.write(json.dumps({"pid": os.getpid(), "stage": stage, "params": PARAMS_FILE.read_text()}))
        held.flush()
        try:
            yield
        finally:
            held.truncate(0)


def refuse_a_second_run() -> None:
    """In check_params: if a stage of another run trains in this workspace, put back the params.yaml it read
    (which this run's `dvc exp run -S` overwrote) and stop."""
    if not in_workspace() or not IN_USE.exists():
        return
    with open(IN_USE) as held:
        try:
            fcntl.flock(held, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return  # nobody holds it
        except BlockingIOError:
            holder = json.loads(held.read() or "null")
    if holder is None:
        return
    restored = PARAMS_FILE.read_text() != holder["params"]
    if restored:
        PARAMS_FILE.write_text(holder["params"])
    raise StageError(
        f"another DVC run is in this workspace ({holder['stage']}, pid {holder['pid']})"
        + (f"; put back the {PARAMS_FILE} it runs with" if restored else "")
        + f"; wait for it, or {TWO_AT_ONCE}"
    )


def check_params_unchanged(params: Params) -> None:
    """Fail if params.yaml no longer holds `params`: DVC would record this stage's outputs under others."""
    now = load_params()
    changed = [
        f"{key} {value!r} -> {getattr(now, key)!r}"
        for key, value in params.as_dict().items()
        if getattr(now, key) != value
    ]
    if changed:
        raise StageError(
            f"{PARAMS_FILE} changed while the stage ran ({', '.join(changed)}): its outputs would be recorded "
            f"with params they were not made with, so none were written; run one experiment at a time in a "
            f"workspace, or {TWO_AT_ONCE}"
        )
