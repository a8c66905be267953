"""Stages fail cleanly: bad data gives one line and no output; killed training leaves no half-written
output and no MLflow run stuck in RUNNING."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys

import mlflow
import pytest

from stages.common import paths
from stages.common.records import read_framed, write_examples
from tests.conftest import RAW_MNIST, clean_env, set_params, write_stage_inputs
from tests.e2e import started

INPUTS_LEFT = ["data/prepared/summary.json", "data/prepared/test.tfrecord"]  # what split_data writes there


def outputs_left(root) -> list[str]:
    """Every file a stage may have written (or left half-written) under root."""
    return sorted(
        str(path.relative_to(root))
        for folder in ("data/prepared", "models", "metrics")
        if (root / folder).exists()
        for path in (root / folder).rglob("*")
    )


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if ": error: " in line]


def runs(root) -> list:
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_prepare_with_a_tampered_raw_file_names_it_and_writes_nothing(stage_root, run_stage_in):
    shutil.copytree(RAW_MNIST, stage_root / "data/raw/mnist")
    labels = stage_root / "data/raw/mnist/t10k-labels-idx1-ubyte.gz"
    content = bytearray(gzip.decompress(labels.read_bytes()))
    content[100] ^= 0x01
    labels.write_bytes(gzip.compress(bytes(content)))

    result = run_stage_in("prepare", stage_root)
    assert result.returncode == 1
    [line] = error_lines(result)
    assert "t10k-labels-idx1-ubyte.gz: SHA-256 mismatch" in line and "expected ff7bcfd4" in line
    assert outputs_left(stage_root) == []


def test_prepare_with_a_truncated_raw_file_names_it_and_writes_nothing(stage_root, run_stage_in):
    shutil.copytree(RAW_MNIST, stage_root / "data/raw/mnist")
    images = stage_root / "data/raw/mnist/train-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:100_000])

    result = run_stage_in("prepare", stage_root)
    assert result.returncode == 1
    [line] = error_lines(result)
    assert "train-images-idx3-ubyte.gz: cannot decompress or read" in line
    assert outputs_left(stage_root) == []


@pytest.fixture
def split_data(stage_root, make_examples):
    write_stage_inputs(stage_root, make_examples(300, seed=1), make_examples(100, seed=2), make_examples(100, seed=3))
    return stage_root


def test_train_on_a_truncated_tfrecord_names_it_and_records_no_run(split_data, run_stage_in):
    train = split_data / paths.SPLIT_TRAIN
    train.write_bytes(train.read_bytes()[:-300])

    result = run_stage_in("train", split_data)
    assert result.returncode == 1
    [line] = error_lines(result)
    assert line.startswith(f"train: error: {paths.SPLIT_TRAIN}: damaged: a record is cut off")
    assert outputs_left(split_data) == INPUTS_LEFT
    assert runs(split_data) == []


def test_evaluate_with_a_file_that_is_not_a_keras_model_names_it_and_writes_nothing(split_data, run_stage_in):
    (split_data / "models").mkdir()
    (split_data / paths.MODEL).write_bytes(b"not a model")

    result = run_stage_in("evaluate", split_data)
    assert result.returncode == 1
    [line] = error_lines(result)
    assert f"{paths.MODEL}: not a loadable Keras model" in line
    assert outputs_left(split_data) == [*INPUTS_LEFT, "models/model.keras"]
    # No run trained this file: the evaluation's own run, failed; or none, when the failure came before
    # MLflow's process had started the run (on a loaded machine), which then ends without starting it.
    assert [run.info.status for run in runs(split_data)] in (["FAILED"], [])


@contextlib.contextmanager
def long_training(root):
    """`python -m stages.train` with thousands of short epochs (its output drained), once its third epoch began."""
    set_params(root, epochs=100_000, batch_size=10, hidden_layer_size=8)
    env = {**clean_env(root), "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}
    with started([sys.executable, "-m", "stages.train"], root, env) as training:
        training.wait_for_line("Epoch 3/")
        yield training


def test_sigterm_mid_training_ends_the_run_killed_and_writes_nothing(split_data):
    with long_training(split_data) as training:
        training.process.send_signal(signal.SIGTERM)
        output = training.finish(timeout=60)

    assert training.process.returncode == 143, output[-2000:]
    assert "train: terminated (SIGTERM)" in output
    [run] = runs(split_data)
    assert run.info.status == "KILLED"
    assert outputs_left(split_data) == INPUTS_LEFT


def test_sigkill_of_the_stage_alone_leaves_no_output_and_its_mlflow_process_ends_the_run_killed(split_data):
    with long_training(split_data) as training:
        training.process.send_signal(signal.SIGKILL)
        training.finish(timeout=60)
    [run] = runs(split_data)
    assert run.info.status == "KILLED"
    assert outputs_left(split_data) == INPUTS_LEFT


def test_sigkill_of_the_stage_and_its_mlflow_process_leaves_no_output_and_the_next_run_closes_the_orphan(
    split_data, run_stage_in
):
    with long_training(split_data) as training:
        os.killpg(training.process.pid, signal.SIGKILL)
        training.finish(timeout=60)
    [orphan] = runs(split_data)
    assert orphan.info.status == "RUNNING"  # nothing can run on SIGKILL
    assert outputs_left(split_data) == INPUTS_LEFT

    set_params(split_data, epochs=1)
    result = run_stage_in("train", split_data)
    assert result.returncode == 0, result.stderr
    assert f"MLflow run {orphan.info.run_id} was left RUNNING by a killed stage; marked it KILLED" in result.stdout
    statuses = {run.info.run_id: run.info.status for run in runs(split_data)}
    assert statuses.pop(orphan.info.run_id) == "KILLED"
    assert list(statuses.values()) == ["FINISHED"]
    assert json.loads((split_data / paths.TRAIN_METRICS).read_text())["epochs"] == 1
    assert not [name for name in os.listdir(split_data / "models") if ".tmp-" in name]


def cut_mid_record(path):
    path.write_bytes(path.read_bytes()[:-300])


def keep_first_half_of_the_records(path):
    records = read_framed(path)
    half = sum(len(record) + 16 for record in records[: len(records) // 2])
    path.write_bytes(path.read_bytes()[:half])


@pytest.mark.parametrize(
    "damage, message",
    [
        (cut_mid_record, "damaged: a record is cut off or fails its checksum"),
        (keep_first_half_of_the_records, "50 records, expected 100 as its stage wrote it"),
    ],
    ids=["cut-mid-record", "cut-at-a-record-boundary"],
)
def test_evaluate_on_a_damaged_test_file_says_so_and_leaves_the_run_failed_not_finished(
    split_data, run_stage_in, damage, message
):
    set_params(split_data, epochs=1, hidden_layer_size=8)
    assert run_stage_in("train", split_data).returncode == 0
    damage(split_data / paths.PREPARED_TEST)

    result = run_stage_in("evaluate", split_data)
    assert result.returncode == 1
    [line] = error_lines(result)
    assert line == f"evaluate: error: {paths.PREPARED_TEST}: {message}" + line.split(message, 1)[1]
    assert "function_node" not in line and "{{" not in line  # no TensorFlow internals
    [run] = runs(split_data)
    assert run.info.status == "FAILED"
    assert "test_accuracy" not in run.data.metrics
    assert not (split_data / paths.EVALUATE_METRICS).exists()


@pytest.fixture
def full_split_folder(stage_root):
    """data/split on a 64 KiB tmpfs (a disk that fills up), unmounted after; skipped where mounting is refused."""
    folder = stage_root / paths.SPLIT_DIR
    folder.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_nothing_half_written(
    stage_root, full_split_folder, make_examples, run_stage_in
):
    write_examples(stage_root / paths.PREPARED_TRAIN, make_examples(300, seed=1))  # 240 KB to split

    result = run_stage_in("split", stage_root)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"split: error: {paths.SPLIT_TRAIN}: cannot write: No space left on device"]
    assert list(full_split_folder.iterdir()) == []
