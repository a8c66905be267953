"""check_params: params.yaml, every key -> nothing; fails on an invalid file.

Each stage validates the whole file before it does anything, but DVC runs only the stages whose
own params changed: an unknown key (`epoch: 10`) would rerun no stage and pass unseen. This stage
depends on the whole file, so every `dvc repro` and `dvc exp run` after any change to it runs
the check (a fraction of a second, no TensorFlow).
"""

import contextlib
import os
import subprocess

from stages.common.cli import in_workspace, log, run_stage
from stages.common.errors import StageError
from stages.common.params import PARAMS_FILE, load_params
from stages.lib.workspace import claim_workspace

# `dvc exp run -S` writes its values into the workspace's params.yaml before any stage runs and leaves
# them there when the experiment fails (merged with any edits of yours: DVC keeps no copy of the file as
# it was). The one command that restores the committed file whatever git's index says (see below):
RESTORE = f"git show HEAD:{PARAMS_FILE} > {PARAMS_FILE}"


def show_git_the_workspace() -> None:
    """Make `git status` true after DVC prepared the experiment in the workspace.

    DVC checked out the committed files and wrote the experiment's over them within the same second (same
    inode, often the same size: `epochs: 0` for `epochs: 5`); git's index keeps the committed files' size
    and time, and git, comparing whole seconds, calls the changed files unchanged: `git status` says clean
    and `git checkout -- .` restores nothing. Reread from HEAD, the index loses that stale information
    (nothing else when nothing is staged) and git compares contents again; DVC's cleanup keeps it so.
    """
    with contextlib.suppress(OSError):  # DVC itself needs no git program
        if subprocess.run(["git", "diff", "--cached", "--quiet"], capture_output=True).returncode == 0:
            subprocess.run(["git", "read-tree", "HEAD"], capture_output=True)


def main() -> None:
    claim_workspace("check_params")
    try:
        load_params()
    except StageError as exc:
        if os.environ.get("DVC_EXP_NAME") and in_workspace():
            show_git_the_workspace()
            raise StageError(
                f"{exc}; dvc exp run left this {PARAMS_FILE} in the workspace, to restore the committed one: {RESTORE}"
            ) from exc
        raise
    log("check_params", f"{PARAMS_FILE} is valid")


if __name__ == "__main__":
    run_stage("check_params", __doc__, main)
