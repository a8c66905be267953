"""stages/lib/workspace.py: a second run in the workspace is refused and params.yaml put back; a stage whose
params.yaml changed under it fails rather than be recorded under params it did not use."""

import dataclasses
import os
import shutil

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


def test_a_second_run_puts_back_the_params_the_first_runs_with_and_stops(root):
    read_by_train = (root / "params.yaml").read_text()
    with workspace.params_in_use("train"):
        second = read_by_train.replace("epochs: 5", "epochs: 3")
        (root / "params.yaml").write_text(second)  # what the second `dvc exp run -S epochs=3` writes
        with pytest.raises(StageError) as error:
            workspace.refuse_a_second_run()
        assert (root / "params.yaml").read_text() == read_by_train
    assert str(error.value) == (
        f"another DVC run is in this workspace (train, pid {os.getpid()}); put back the params.yaml it runs "
        "with; wait for it, or run experiments side by side with `dvc exp run --temp` or `--queue` "
        "(docs/failures.md)"
    )
    workspace.refuse_a_second_run()  # released: nothing held, nothing refused


def test_nothing_is_held_in_a_copy_that_dvc_runs_elsewhere(root, monkeypatch, tmp_path_factory):
    monkeypatch.setenv("DVC_ROOT", str(tmp_path_factory.mktemp("parent-repository")))  # --temp, --queue
    with workspace.params_in_use("train"):
        workspace.refuse_a_second_run()
    assert not (root / workspace.IN_USE).exists()


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
