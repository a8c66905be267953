"""check_params: params.yaml, every key -> nothing; fails on an invalid file.

Each stage validates the whole file before it does anything, but DVC runs only the stages whose
own params changed: an unknown key (`epoch: 10`) would rerun no stage and pass unseen. This stage
depends on the whole file, so every `dvc repro` and `dvc exp run` after any change to it runs
the check (a fraction of a second, no TensorFlow).
"""

from __future__ import annotations

from stages.common.cli import log, run_stage
from stages.common.params import PARAMS_FILE, load_params


def main() -> None:
    load_params()
    log("check_params", f"{PARAMS_FILE} is valid")


if __name__ == "__main__":
    run_stage("check_params", __doc__, main)
