"""The default SQLite store: under parallel experiments (`dvc queue start -j 2`), and cut off while created."""

import subprocess
import sys
import time

from tests.conftest import clean_env

OPEN = "from stages.lib import tracking; print(tracking.open_experiment('sweep'))"


def test_parallel_stages_on_a_new_mlflow_db_all_get_the_experiment(tmp_path):
    # Without the setup lock, MLflow's schema migration races and one process fails
    # ("Online migration expected to match one row ... 0 found").
    env = clean_env(tmp_path)
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outputs = [p.communicate(timeout=300) for p in processes]  # drains both pipes while waiting
    results = [(p.returncode, out, err) for p, (out, err) in zip(processes, outputs, strict=True)]
    assert [code for code, _, _ in results] == [0] * 4, [err.strip().splitlines()[-1:] for _, _, err in results]
    assert len({out.strip() for _, out, _ in results}) == 1  # one experiment, the same id for all
    assert (tmp_path / "mlflow.db").is_file()


def test_a_store_creation_cut_off_leaves_no_store_and_the_next_stage_creates_a_whole_one(tmp_path):
    # A stage that fails in its first seconds kills its MLflow process, perhaps half-way through creating
    # mlflow.db (its migrations take seconds): a half-migrated store could never be opened again.
    partial = tmp_path / ".mlflow.db.partial"
    opening = subprocess.Popen([sys.executable, "-c", OPEN], cwd=tmp_path, env=clean_env(tmp_path))
    deadline = time.monotonic() + 120
    while not partial.exists() and opening.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    opening.kill()
    opening.wait()
    assert partial.exists()
    assert not (tmp_path / "mlflow.db").exists()

    result = subprocess.run(
        [sys.executable, "-c", OPEN], cwd=tmp_path, env=clean_env(tmp_path), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "mlflow.db").is_file()
    assert not partial.exists()
