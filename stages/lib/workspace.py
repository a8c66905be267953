"""One run at a time in a workspace: params.yaml must hold, until DVC records them, the params a stage used.

DVC writes the params of an experiment's `-S` into the workspace's params.yaml before any stage runs, and
records in dvc.lock what the file holds when a stage ends. So a second `dvc exp run` started while a first
runs would file the first's outputs under the second's params (and DVC loses the first experiment's refs).
Against that, each stage that runs in the workspace claims it for its `dvc` process: RUN_RECORD names that
process and the params.yaml the stage read. Until that process exits, between its stages too, another run's
first stage finds the claim, puts the file back and stops. A stage whose params.yaml changed anyway (an edit)
fails rather than be recorded with params it did not use.
"""

import fcntl
import json
import os
from pathlib import Path

import psutil

from stages.common.cli import in_workspace
from stages.common.errors import StageError
from stages.common.params import PARAMS_FILE, Params, load_params

RUN_RECORD = Path(".dvc/tmp/run-in-workspace.json")  # {"pid", "started", "stage", "params"}
TWO_AT_ONCE = "run experiments side by side with `dvc exp run --temp` or `--queue` (docs/failures.md)"


def dvc_process() -> psutil.Process | None:
    """The `dvc` process that runs this stage (`dvc ...` or `python -m dvc ...`), if any."""
    for process in psutil.Process().parents():
        try:
            if "dvc" in (os.path.basename(part) for part in process.cmdline()[:3]):
                return process
        except psutil.Error:
            continue
    return None


def claim_workspace(stage: str, dvc: psutil.Process | None = None) -> None:
    """Under DVC in the workspace: record that this stage's `dvc` process runs here with the params.yaml it
    read; if another live `dvc` process holds the claim, put back the params.yaml it runs with and stop."""
    if not in_workspace() or not (dvc := dvc or dvc_process()):
        return
    claim = {"pid": dvc.pid, "started": dvc.create_time(), "stage": stage, "params": PARAMS_FILE.read_text()}
    RUN_RECORD.parent.mkdir(parents=True, exist_ok=True)
    with open(RUN_RECORD, "a+") as record:
        fcntl.flock(record, fcntl.LOCK_EX)  # two first stages at the same instant: one claims, one is refused
        record.seek(0)
        holder = json.loads(record.read() or "null")
        if holder and (holder["pid"], holder["started"]) != (claim["pid"], claim["started"]) and _alive(holder):
            _refuse(holder)
        record.truncate(0)
        record.write(json.dumps(claim))


def _alive(holder: dict) -> bool:
    try:
        return psutil.Process(holder["pid"]).create_time() == holder["started"]
    except psutil.NoSuchProcess:
        return False


def _refuse(holder: dict) -> None:
    restored = PARAMS_FILE.read_text() != holder["params"]
    if restored:
        PARAMS_FILE.write_text(holder["params"])
    raise StageError(
        f"another DVC run is in this workspace (dvc pid {holder['pid']}, at stage {holder['stage']})"
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
