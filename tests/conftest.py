"""Shared fixtures: tiny synthetic MNIST-like data, IDX files, and a throwaway repository layout."""

import dataclasses
import gzip
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from stages.common import paths
from stages.common.dataset import Examples
from stages.common.outputs import write_json
from stages.common.params import load_params
from stages.common.records import write_examples
from tests.e2e import clone_repository, run, user_env

REPO = Path(__file__).resolve().parents[1]
REAL_PARAMS = REPO / "params.yaml"


def synthetic_examples(count: int, seed: int = 0) -> Examples:
    """Noise images with a bright vertical band whose position is the label: unique records, easy to learn."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 64, size=(count, 28, 28, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, size=count, dtype=np.uint8)
    for image, label in zip(images, labels, strict=True):
        image[:, 2 * label + 4 : 2 * label + 6, 0] = 255
    return Examples(images, labels)


def decode_example(record: bytes) -> tuple[bytes, int]:
    """(image bytes, label) of a serialized Example, parsed by TensorFlow's own protobuf classes."""
    import tensorflow as tf

    feature = tf.train.Example.FromString(record).features.feature
    return feature["image"].bytes_list.value[0], feature["label"].int64_list.value[0]


@pytest.fixture(scope="session")
def make_examples():
    return synthetic_examples


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """The IDX encoding of a uint8 array: 0x00 0x00 0x08 ndim, one big-endian uint32 per dimension, the data."""
    if magic is None:
        magic = 0x0800 | array.ndim
    header = magic.to_bytes(4, "big") + b"".join(size.to_bytes(4, "big") for size in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


@pytest.fixture(scope="session")
def write_idx():
    """write_idx(path, array, gzipped=False, magic=None) -> the uncompressed bytes written."""

    def write(path: Path, array: np.ndarray, gzipped: bool = False, magic: int | None = None) -> bytes:
        content = idx_bytes(array, magic)
        if gzipped:
            Path(f"{path}.gz").write_bytes(gzip.compress(content, mtime=0))
        else:
            Path(path).write_bytes(content)
        return content

    return write


def write_stage_inputs(root: Path, train: Examples, validation: Examples, test: Examples) -> None:
    """What train and evaluate read, as split and prepare write it: records and summaries with their counts."""
    for path, examples in (
        (paths.SPLIT_TRAIN, train),
        (paths.SPLIT_VALIDATION, validation),
        (paths.PREPARED_TEST, test),
    ):
        write_examples(root / path, examples)
    write_json(root / paths.SPLIT_SUMMARY, {"train": len(train.labels), "validation": len(validation.labels)})
    write_json(root / paths.PREPARED_SUMMARY, {"test": {"count": len(test.labels)}})


def repository_params(**changes):
    """The repository's params.yaml as a Params, with `changes` applied."""
    return dataclasses.replace(load_params(REAL_PARAMS), **changes)


@pytest.fixture
def raw_params():
    """A fresh dict of the real params.yaml, to modify."""
    return yaml.safe_load(REAL_PARAMS.read_text())


def clean_env(root: Path) -> dict[str, str]:
    """Environment for running a stage in `root`: MLflow in root/mlflow.db, stages importable."""
    return user_env(DVC_ROOT=str(root), PYTHONPATH=str(REPO))


def run_stage_process(stage: str, cwd: Path, *args: str, python_args: tuple[str, ...] = ()):
    """`python [python_args] -m stages.<stage> [args]` in `cwd`, as DVC runs it."""
    return subprocess.run(
        [sys.executable, *python_args, "-m", f"stages.{stage}", *args],
        cwd=cwd,
        env=clean_env(cwd),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="session")
def stage_env():
    return clean_env


@pytest.fixture(scope="session")
def run_stage_in():
    return run_stage_process


@pytest.fixture
def stage_root(tmp_path, monkeypatch):
    """A temporary repository root with the real params.yaml; the working directory during the test."""
    shutil.copy(REAL_PARAMS, tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    return tmp_path


@pytest.fixture(scope="session")
def baseline(tmp_path_factory):
    """A copy of the repository in which `dvc repro` has run: the state after a new user's `make repro`."""
    repo = clone_repository(tmp_path_factory.mktemp("baseline") / "repo")
    run(["dvc", "repro"], repo)
    return repo


@pytest.fixture
def repo(baseline, tmp_path):
    """This test's own copy of the baseline. MLflow's experiment keeps the baseline's artifact folder."""
    return shutil.copytree(baseline, tmp_path / "repo", symlinks=True)
