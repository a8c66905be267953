"""check_params: params.yaml, every key -> nothing; fails on an invalid file.

Each stage validates the whole file before it does anything, but DVC runs only the stages whose
own params changed: an unknown key (`epoch: 10`) would rerun no stage and pass unseen. This stage
depends on the whole file, so every `dvc repro` and `dvc exp run` after any change to it runs
the check (a fraction of a second, no TensorFlow).
"""

from __future__ import annotations

import os
from pathlib import Path

from stages.common.cli import log, run_stage
from stages.common.errors import StageError
from stages.common.params import PARAMS_FILE, load_params

# `dvc exp run -S` writes its values into the workspace's params.yaml before any stage runs and leaves
# them there when the experiment fails (merged with any edits of yours: DVC keeps no copy of the file as
# it was). Git may not even see the change: DVC rewrites the file within a second of checking out the
# committed one, and git's index keeps that one's size and time (README: what happens when things go
# wrong). So the one command that restores it whatever git's index says:
RESTORE = f"git show HEAD:{PARAMS_FILE} > {PARAMS_FILE}"


def in_workspace_experiment() -> bool:
    """Whether `dvc exp run` runs this stage in the workspace (not in a temporary copy: --queue, --temp)."""
    root = os.environ.get("DVC_ROOT")
    return bool(os.environ.get("DVC_EXP_NAME")) and root is not None and Path(root).resolve() == Path.cwd().resolve()


def main() -> None:
    try:
        load_params()
    except StageError as exc:
        if in_workspace_experiment():
            raise StageError(
                f"{exc}; dvc exp run left this {PARAMS_FILE} in the workspace, to restore the committed one: {RESTORE}"
            ) from exc
        raise
    log("check_params", f"{PARAMS_FILE} is valid")


if __name__ == "__main__":
    run_stage("check_params", __doc__, main)
