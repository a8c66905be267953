"""DVC experiments as `dvc exp show --json` reports them: name, params, metrics, the model file's MD5
by which tracking finds the MLflow runs that trained it, and the test data's MD5."""

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, NamedTuple

from stages.common import paths
from stages.common.errors import StageError, first_line

SHOW_SECONDS = 120
SHOW_ATTEMPTS = 2


class Experiment(NamedTuple):
    name: str  # "workspace", the baseline's branch or commit, or the DVC experiment's name
    rev: str
    params: dict[str, Any]
    metrics: dict[str, Any]  # every metrics file's keys, merged
    model_md5: str | None  # None where the row has no model (an experiment that failed)
    test_data_md5: str | None  # of the test records evaluate read, as DVC recorded them


def _row(name: str, rev: str, data: dict[str, Any]) -> Experiment:
    params = {k: v for file in (data.get("params") or {}).values() for k, v in (file.get("data") or {}).items()}
    metrics = {k: v for file in (data.get("metrics") or {}).values() for k, v in (file.get("data") or {}).items()}
    deps = data.get("deps") or {}
    model, test_data = deps.get(str(paths.MODEL)) or {}, deps.get(str(paths.PREPARED_TEST)) or {}
    return Experiment(name, rev, params, metrics, model.get("hash"), test_data.get("hash"))


def list_experiments(repo: Path = Path()) -> list[Experiment]:
    """The workspace, the baseline commit and every experiment of it, as `dvc exp show` lists them."""
    # DVC of this interpreter's environment: works whether or not the venv is activated.
    command = [sys.executable, "-m", "dvc", "exp", "show", "--json"]
    # Seen once to hang (a futex, under load, beside running `dvc exp run --temp`): bounded, and tried again.
    for attempt in range(1, SHOW_ATTEMPTS + 1):
        try:
            result = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=SHOW_SECONDS)
            break
        except subprocess.TimeoutExpired:
            if attempt == SHOW_ATTEMPTS:
                raise StageError(f"`dvc exp show --json` did not answer within {SHOW_SECONDS} s, twice") from None
    if result.returncode != 0:
        raise StageError(f"`dvc exp show --json` failed: {first_line(Exception(result.stderr))}")
    rows = []
    for baseline in json.loads(result.stdout):
        name = baseline.get("name") or ("workspace" if baseline["rev"] == "workspace" else baseline["rev"][:7])
        rows.append(_row(name, baseline["rev"], baseline["data"]))
        for experiment in baseline.get("experiments") or []:
            for rev in experiment.get("revs") or []:
                if rev.get("data"):
                    rows.append(_row(experiment.get("name") or rev["rev"][:7], rev["rev"], rev["data"]))
    return rows
