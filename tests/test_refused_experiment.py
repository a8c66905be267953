"""A refused `dvc exp run`: DVC has written its -S values into params.yaml before check_params refuses them."""

import subprocess
import sys

import pytest

from stages.check_params import RESTORE
from tests.conftest import clean_env
from tests.e2e import run


def check_params(root, **env):
    return subprocess.run(
        [sys.executable, "-m", "stages.check_params"],
        cwd=root,
        env={**clean_env(root), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def unknown_key(stage_root):
    with (stage_root / "params.yaml").open("a") as file:
        file.write("optimizer: sgd\n")
    return stage_root


def test_refused_in_a_workspace_experiment_the_one_line_says_how_to_restore_params(unknown_key):
    result = check_params(unknown_key, DVC_EXP_NAME="utile-zest")
    [line] = result.stderr.splitlines()
    assert line.startswith("check_params: error: params.yaml: unknown key 'optimizer'; allowed keys: ")
    assert line.endswith(
        "; dvc exp run left this params.yaml in the workspace, to restore the committed one: "
        "git show HEAD:params.yaml > params.yaml"
    )
    assert result.returncode == 1


def test_under_dvc_repro_or_in_a_queued_experiments_copy_there_is_nothing_to_restore(unknown_key):
    assert RESTORE not in check_params(unknown_key).stderr  # dvc repro: the file is the user's own
    assert RESTORE not in check_params(unknown_key, DVC_EXP_NAME="x", DVC_ROOT="/elsewhere").stderr  # --queue


def test_refused_in_a_workspace_experiment_what_you_staged_stays_staged(unknown_key):
    for command in (
        ["init", "-q"],
        ["add", "params.yaml"],
        ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c"],
    ):
        run(["git", *command], unknown_key)
    (unknown_key / "notes.txt").write_text("mine\n")
    run(["git", "add", "notes.txt"], unknown_key)
    assert check_params(unknown_key, DVC_EXP_NAME="utile-zest").returncode == 1
    assert run(["git", "diff", "--cached", "--name-only"], unknown_key).stdout == "notes.txt\n"


@pytest.mark.slow
def test_after_a_refused_experiment_the_printed_command_restores_params_and_the_next_repro_runs(repo):
    committed = run(["git", "show", "HEAD:params.yaml"], repo).stdout
    for override in ("+optimizer=sgd", "epochs=0"):
        result = run(["dvc", "exp", "run", "-S", override], repo, check=False)
        assert result.returncode != 0
        [hint] = [line for line in result.stderr.splitlines() if line.startswith("check_params: error:")]
        assert hint.endswith(f"to restore the committed one: {RESTORE}")
        assert (repo / "params.yaml").read_text() != committed
        run(["sh", "-c", RESTORE], repo)
        assert (repo / "params.yaml").read_text() == committed
    run(["dvc", "repro"], repo)


@pytest.mark.slow
def test_after_a_refused_experiment_git_status_shows_every_changed_file_and_checkout_restores_them(repo):
    """DVC rewrites files within a second of checking out the committed ones, same size, and git's index kept
    the committed ones' stat: `git status` said clean and `git checkout -- .` restored nothing."""
    # The `repo` fixture's HEAD holds the baseline as this machine reproduced it.
    run(["dvc", "exp", "run", "-S", "epochs=2"], repo)
    assert run(["dvc", "exp", "run", "-S", "epochs=0"], repo, check=False).returncode != 0
    changed = {line[3:] for line in run(["git", "status", "--porcelain"], repo).stdout.splitlines()}
    assert changed == {"params.yaml", "dvc.lock", "metrics/train.json", "metrics/evaluate.json"}
    run(["git", "read-tree", "HEAD"], repo)  # for the failures check_params cannot see (make restore touches instead)
    run(["git", "checkout", "--", "."], repo)
    for path in ("params.yaml", "dvc.lock", "metrics/train.json", "metrics/evaluate.json"):
        assert (repo / path).read_text() == run(["git", "show", f"HEAD:{path}"], repo).stdout, path
    assert run(["git", "status", "--porcelain"], repo).stdout == ""
