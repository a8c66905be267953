import signal
import subprocess
import sys

import pytest

from stages.common.cli import Terminated, run_stage
from stages.common.errors import StageError


@pytest.fixture(autouse=True)
def restore_signal_handlers():
    """run_stage installs handlers for SIGINT and SIGTERM; give pytest its own back."""
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def run_script(script, cwd=None, env=None):
    """Run a Python script in a fresh interpreter: run_stage ends its process, so tests run it there."""
    return subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=20)


def fail_with(exception):
    def main():
        raise exception

    return main


@pytest.mark.parametrize(
    "exception, code, message",
    [
        (StageError("data/x: cannot read"), 1, "demo: error: data/x: cannot read"),
        (KeyboardInterrupt(), 130, "demo: interrupted (SIGINT)"),
        (Terminated("SIGTERM"), 143, "demo: terminated (SIGTERM)"),
    ],
)
def test_expected_failures_become_one_line_and_an_exit_code(capsys, exception, code, message):
    with pytest.raises(SystemExit) as exit_:
        run_stage("demo", "a demo stage", fail_with(exception), argv=[])
    assert exit_.value.code == code
    assert capsys.readouterr().err == message + "\n"


def test_success_ends_the_process_at_once_with_exit_0():
    script = (
        "import atexit\n"
        "from stages.common.cli import run_stage\n"
        "atexit.register(print, 'teardown ran')\n"
        "run_stage('demo', 'a demo stage', lambda: print('main ran'), [])\n"
    )
    result = run_script(script)
    # Exit 0 right after main, output flushed, interpreter teardown skipped.
    assert (result.returncode, result.stdout, result.stderr) == (0, "main ran\n", "")


def test_a_bug_keeps_its_traceback(tmp_path, stage_env):
    script = (
        "from stages.common.cli import run_stage\n"
        "def main():\n"
        "    return 1 / 0\n"
        "run_stage('demo', 'a demo stage', main, [])\n"
    )
    result = run_script(script, tmp_path, stage_env(tmp_path))
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert '  File "<string>", line 3, in main' in lines  # down to the line of the bug
    assert lines[-1] == "ZeroDivisionError: division by zero"
    assert "demo: error" not in result.stderr  # a bug is not dressed up as an expected failure


def test_unknown_argument_is_rejected_before_main_runs(capsys):
    calls = []
    with pytest.raises(SystemExit) as exit_:
        run_stage("demo", "a demo stage", lambda: calls.append(1), argv=["--epochs", "3"])
    assert exit_.value.code == 2 and calls == []
    assert "unrecognized arguments: --epochs 3" in capsys.readouterr().err


def test_sigterm_during_a_stage_exits_143(tmp_path, stage_env):
    script = (
        "import os, signal, time\n"
        "from stages.common.cli import run_stage\n"
        "def main():\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(30)\n"
        "run_stage('demo', 'a demo stage', main, [])\n"
    )
    result = run_script(script, tmp_path, stage_env(tmp_path))
    assert result.returncode == 143
    assert result.stderr == "demo: terminated (SIGTERM)\n"


def test_a_signal_inside_signals_held_is_raised_when_the_block_ends(tmp_path, stage_env):
    script = (
        "import os, signal\n"
        "from stages.common.cli import run_stage, signals_held, stop_requested\n"
        "def main():\n"
        "    with signals_held():\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        print('held, stop requested:', stop_requested(), flush=True)\n"
        "    print('not reached')\n"
        "run_stage('demo', 'a demo stage', main, [])\n"
    )
    result = run_script(script, tmp_path, stage_env(tmp_path))
    assert result.returncode == 143
    assert result.stdout == "held, stop requested: True\n"
    assert result.stderr == "demo: terminated (SIGTERM)\n"


@pytest.mark.parametrize(
    "stage, hint",
    [
        ("train", "dvc checkout train && git checkout -- metrics/train.json"),
        ("split", "dvc checkout split"),
        ("check_params", None),  # no outputs to lose
    ],
)
def test_a_stage_failing_under_dvc_says_how_to_restore_the_outputs_dvc_removed(tmp_path, stage_env, stage, hint):
    script = (
        "from stages.common.cli import run_stage\n"
        "from stages.common.errors import StageError\n"
        "def main():\n"
        "    raise StageError('MLflow tracking store is down')\n"
        f"run_stage({stage!r}, 'a stage', main, [])\n"
    )
    result = run_script(script, tmp_path, {**stage_env(tmp_path), "DVC_STAGE": stage})
    expected = [f"{stage}: error: MLflow tracking store is down"]
    if hint:
        expected.append(
            f"{stage}: DVC removed this stage's previous outputs before running it; to restore them: {hint}"
        )
    assert (result.returncode, result.stderr.splitlines()) == (1, expected)
    assert "DVC removed" not in run_script(script, tmp_path, stage_env(tmp_path)).stderr  # run by hand: nothing removed
