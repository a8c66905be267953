"""stages/lib/workspace.py: a second run in the workspace is refused, between the first's stages too, and
params.yaml put back; a stage whose params.yaml changed under it fails rather than be recorded under params it
did not use."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from stages.common.errors import StageError
from stages.common.params import load_params
from stages.lib import workspace
from tests.conftest import REAL_PARAMS


@pytest.fixture
def root(tmp_path, monkeypatch):
    """A workspace as DVC runs a stage in it: params.yaml, DVC_ROOT and the working directory alike."""
    shutil.copy(REAL_PARAMS, tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    return tmp_path


@pytest.fixture
def two_dvc_runs():
    """Two live processes standing for the `dvc` processes of two runs."""
    processes = [subprocess.Popen(["sleep", "60"]) for _ in range(2)]
    yield [psutil.Process(process.pid) for process in processes]
    for process in processes:
        process.kill()
        process.wait()


def test_a_second_run_puts_back_the_params_the_first_runs_with_and_stops(root, two_dvc_runs):
    first, second = two_dvc_runs
    read_by_first = (root / "params.yaml").read_text()
    workspace.claim_workspace("train", first)
    workspace.claim_workspace("evaluate", first)  # the same run, its next stage
    (root / "params.yaml").write_text(read_by_first.replace("epochs: 5", "epochs: 3"))  # the second's -S
    with pytest.raises(StageError) as error:
        workspace.claim_workspace("check_params", second)
    assert (root / "params.yaml").read_text() == read_by_first
    assert str(error.value) == (
        f"another DVC run is in this workspace (dvc pid {first.pid}, at stage evaluate); put back the params.yaml "
        "it runs with; wait for it, or run experiments side by side with `dvc exp run --temp` or `--queue` "
        "(docs/failures.md)"
    )
    first.kill()
    first.wait()
    workspace.claim_workspace("check_params", second)  # the first's dvc has exited: its claim is void
    assert json.loads((root / workspace.RUN_RECORD).read_text())["pid"] == second.pid


def test_the_claim_holds_between_the_stages_of_the_first_run(root, two_dvc_runs):
    first, second = two_dvc_runs
    workspace.claim_workspace("train", first)  # train has ended; DVC is writing dvc.lock
    with pytest.raises(StageError, match="another DVC run is in this workspace"):
        workspace.claim_workspace("check_params", second)


def test_the_dvc_process_is_found_among_the_stages_ancestors(tmp_path):
    stage = tmp_path / "stage.py"
    stage.write_text("from stages.lib.workspace import dvc_process\nprint(dvc_process().pid)\n")
    fake_dvc = tmp_path / "dvc"  # run as `python .../dvc`, as the venv's dvc script is; stages through a shell
    run_stage = f"subprocess.run('{sys.executable} {stage}', shell=True, check=True)"
    fake_dvc.write_text(f"import os, subprocess\nprint(os.getpid(), flush=True)\n{run_stage}\n")
    env = {**os.environ, "PYTHONPATH": str(Path.cwd())}
    pids = subprocess.run([sys.executable, fake_dvc], capture_output=True, text=True, check=True, env=env).stdout
    printed = pids.split()
    assert printed[0] == printed[1]
    assert workspace.dvc_process() is None  # pytest runs under no dvc


def test_nothing_is_claimed_in_a_copy_that_dvc_runs_elsewhere(root, monkeypatch, tmp_path_factory, two_dvc_runs):
    monkeypatch.setenv("DVC_ROOT", str(tmp_path_factory.mktemp("parent-repository")))  # --temp, --queue
    workspace.claim_workspace("train", two_dvc_runs[0])
    workspace.claim_workspace("train", two_dvc_runs[1])
    assert not (root / workspace.RUN_RECORD).exists()


def test_a_stage_whose_params_changed_under_it_says_which_and_fails(root):
    params = load_params()
    workspace.check_params_unchanged(params)
    trained_with = dataclasses.replace(params, epochs=10, learning_rate=0.01)
    with pytest.raises(StageError) as error:
        workspace.check_params_unchanged(trained_with)
    assert str(error.value).startswith(
        "params.yaml changed while the stage ran (epochs 10 -> 5, learning_rate 0.01 -> 0.001): its outputs would "
        "be recorded with params they were not made with, so none were written"
    )
