"""Shared fixtures and helpers: tiny synthetic MNIST-like data, IDX files and digit images, a throwaway
repository layout, MLflow isolation, and the repository copies of the slow tests."""

import contextlib
import dataclasses
import gzip
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from stages.common import paths
from stages.common.dataset import Examples
from stages.common.outputs import write_json
from stages.common.params import load_params
from stages.common.records import write_examples
from stages.lib.tracking import MODEL_TAG, md5
from stages.train import HISTORY_COLUMNS
from tests.e2e import REPO, clone_repository, copy_repository, run, user_env

REAL_PARAMS = REPO / "params.yaml"
RAW_MNIST = REPO / "data/raw/mnist"  # the official IDX files, committed
EPOCH_METRICS = HISTORY_COLUMNS[1:]  # what training logs to MLflow at every epoch


# --- Timeouts: a budget per kind of test (pytest-timeout; the default for fast tests is in pyproject.toml) ---

# Slow tests, measured on 2 cores shared with five other jobs (load average 11, 2026-11-29): the
# baseline's `dvc repro`, paid in the setup of the first slow test, 3 to 7 min; four queued 2-epoch
# experiments, 7 min until all four runs were recorded. 20 min is about twice the slowest test with the
# baseline on top, and longer than the 900 s that e2e.run gives one command, whose error (with the
# command's output) is the more telling one when a command hangs.
SLOW_TIMEOUT = 1200


def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT))


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


@pytest.fixture(scope="session")
def small_data():
    """(training, validation) synthetic examples for SMALL: 300 and 100."""
    return synthetic_examples(300, seed=1), synthetic_examples(100, seed=2)


def weights_equal(a, b) -> bool:
    """Two Keras models have exactly the same weights."""
    return all(np.array_equal(x, y) for x, y in zip(a.get_weights(), b.get_weights(), strict=True))


def mnist_test_digits(count: int) -> np.ndarray:
    """The first `count` MNIST test digits, uint8 (count, 28, 28), straight from the committed IDX file."""
    data = gzip.decompress((RAW_MNIST / "t10k-images-idx3-ubyte.gz").read_bytes())
    return np.frombuffer(data, np.uint8, count=count * 28 * 28, offset=16).reshape(count, 28, 28)


def write_digit(
    digit,
    path,
    suffix,
    scale=1,
    canvas=(1.0, 1.0),
    where=(0.5, 0.5),
    ink=255,
    paper=0,
    noise=0.0,
    resample=None,
    quality=90,
    dimmest=1.0,
) -> Path:
    """`digit` (28x28, bright on black) scaled `scale` times (bicubic unless `resample`), at `where` (fractions
    of the free space) on a canvas `canvas` times its size, in gray level `ink` on `paper` plus Gaussian noise,
    lit from the left, the light falling linearly to `dimmest` of full at the right edge, saved as
    `path` + `suffix` (a JPEG at `quality`)."""
    side = 28 * scale
    image = Image.fromarray(digit).resize((side, side), resample or Image.Resampling.BICUBIC)
    height, width = round(side * canvas[0]), round(side * canvas[1])
    top, left = round((height - side) * where[0]), round((width - side) * where[1])
    field = np.zeros((height, width))
    field[top : top + side, left : left + side] = np.asarray(image) / 255.0
    field = paper + (ink - paper) * field + np.random.default_rng(0).normal(0.0, noise, field.shape)
    field *= np.linspace(1.0, dimmest, width)
    path = Path(f"{path}{suffix}")
    Image.fromarray(np.clip(np.rint(field), 0, 255).astype(np.uint8)).save(path, quality=quality)
    return path


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


# Small and quick, with a learning rate high enough to learn the synthetic bands in two epochs.
SMALL = repository_params(epochs=2, hidden_layer_size=16, batch_size=32, shuffle_buffer=300, learning_rate=0.01, seed=1)


@pytest.fixture
def raw_params():
    """A fresh dict of the real params.yaml, to modify."""
    return yaml.safe_load(REAL_PARAMS.read_text())


def set_params(root: Path, **changes) -> dict:
    """Write root/params.yaml: the one there (else the repository's) with `changes`, key order kept; the dict."""
    source = root / "params.yaml" if (root / "params.yaml").exists() else REAL_PARAMS
    params = {**yaml.safe_load(source.read_text()), **changes}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params


@contextlib.contextmanager
def mlflow_as_a_stage(root: Path, tracking_uri: str | None = None) -> Iterator[None]:
    """This process as a stage run in `root` sees MLflow: working directory and DVC_ROOT `root` (so the
    store is root/mlflow.db), DVC_EXP_NAME unset, MLFLOW_TRACKING_URI `tracking_uri` (None: unset).
    Afterwards the environment is restored and MLflow's process-wide tracking URI reset."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)  # nothing MLflow writes may land in the repository
        patch.setenv("DVC_ROOT", str(root))
        patch.delenv("DVC_EXP_NAME", raising=False)
        if tracking_uri is None:
            patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        else:
            patch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
        try:
            yield
        finally:
            if "mlflow" in sys.modules:
                sys.modules["mlflow"].set_tracking_uri(None)


def answering_model(answer: str):
    """A tiny MLflow model that answers `answer` for every input: a test can tell which model it loaded."""
    import mlflow

    class Answer(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return [answer] * len(model_input)

    return Answer()


def runs_that_trained(client, model: Path, experiment: str = "mnist-dnn") -> list:
    """The runs of `experiment` tagged as having trained the model file `model`, newest first."""
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    return client.search_runs(
        [experiment_id], filter_string=f"tags.`{MODEL_TAG}` = '{md5(model)}'", order_by=["attributes.start_time DESC"]
    )


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
def stage_root(tmp_path):
    """A temporary repository root with the real params.yaml, seen as a stage sees it (mlflow_as_a_stage)."""
    shutil.copy(REAL_PARAMS, tmp_path / "params.yaml")
    with mlflow_as_a_stage(tmp_path):
        yield tmp_path


@pytest.fixture(scope="session")
def baseline(tmp_path_factory):
    """A copy of the repository in which a new user's `dvc repro` has run, with its result committed.

    Two commits: HEAD~1 is the repository as committed (dvc.lock and metrics/ as the repository has
    them); HEAD, "repro on this machine", adds whatever this machine's repro wrote differently (the
    model's bytes, and so dvc.lock and metrics/, differ between CPUs; the commit is empty where they
    do not). Every test compares against HEAD, what this machine produces; only the test that
    promises "the same bytes as committed" looks at HEAD~1."""
    repo = clone_repository(tmp_path_factory.mktemp("baseline") / "repo")
    run(["dvc", "repro"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-q", "--allow-empty", "-m", "repro on this machine"], repo)
    return repo


@pytest.fixture
def repo(baseline, tmp_path):
    """This test's own copy of the baseline: git history, outputs, DVC cache, MLflow store and artifacts."""
    return copy_repository(baseline, tmp_path / "repo")
