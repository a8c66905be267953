import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from stages.common.errors import StageError
from stages.lib.mnist_sources import (
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    PINNED_SHA256,
    load_idx,
    load_tfds,
    parse_idx,
)
from tests.conftest import RAW_MNIST, set_params

COUNTS = {"train": 40, "t10k": 15}


def write_raw_dir(folder, make_examples, write_idx, gzipped):
    """Four tiny IDX files; returns (folder, examples by prefix, SHA-256 by file name, gzipped)."""
    examples, hashes = {}, {}
    for seed, (prefix, count) in enumerate(COUNTS.items()):
        examples[prefix] = make_examples(count, seed)
        images, labels = examples[prefix]
        for name, array in ((f"{prefix}-images-idx3-ubyte", images[..., 0]), (f"{prefix}-labels-idx1-ubyte", labels)):
            hashes[name] = hashlib.sha256(write_idx(folder / name, array, gzipped)).hexdigest()
    return folder, examples, hashes, gzipped


@pytest.fixture(params=[False, True], ids=["plain", "gzipped"])
def raw_dir(request, tmp_path, make_examples, write_idx):
    return write_raw_dir(tmp_path, make_examples, write_idx, request.param)


def file_of(folder: Path, name: str, gzipped: bool) -> Path:
    return folder / (f"{name}.gz" if gzipped else name)


def read_content(path: Path) -> bytes:
    return gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()


def write_content(path: Path, content: bytes) -> str:
    """Replace the file's uncompressed content; return its SHA-256."""
    path.write_bytes(gzip.compress(content) if path.suffix == ".gz" else content)
    return hashlib.sha256(content).hexdigest()


def test_good_files_load_with_shapes_values_and_hashes(raw_dir):
    folder, examples, hashes, _ = raw_dir
    dataset = load_idx(folder, hashes)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        loaded = getattr(dataset, split)
        assert loaded.images.shape == (COUNTS[prefix], 28, 28, 1)
        assert loaded.images.dtype == np.uint8 and loaded.labels.dtype == np.uint8
        np.testing.assert_array_equal(loaded.images, examples[prefix].images)
        np.testing.assert_array_equal(loaded.labels, examples[prefix].labels)
    assert dataset.sha256 == hashes


def test_missing_file_is_named(raw_dir):
    folder, _, hashes, gzipped = raw_dir
    file_of(folder, "t10k-labels-idx1-ubyte", gzipped).unlink()
    with pytest.raises(StageError, match="file not found") as error:
        load_idx(folder, hashes)
    assert str(folder / "t10k-labels-idx1-ubyte") in str(error.value)


def test_sha256_mismatch_names_file_expected_and_actual(raw_dir):
    folder, _, hashes, gzipped = raw_dir
    path = file_of(folder, "train-images-idx3-ubyte", gzipped)
    content = bytearray(read_content(path))
    content[100] ^= 0x01
    actual = write_content(path, bytes(content))
    with pytest.raises(StageError, match="SHA-256 mismatch") as error:
        load_idx(folder, hashes)
    assert str(path) in str(error.value)
    assert f"expected {hashes['train-images-idx3-ubyte']}, got {actual}" in str(error.value)


def test_truncated_file_with_matching_hash_fails_on_size(raw_dir):
    folder, _, hashes, gzipped = raw_dir
    path = file_of(folder, "train-images-idx3-ubyte", gzipped)
    content = read_content(path)
    hashes["train-images-idx3-ubyte"] = write_content(path, content[:-7])
    with pytest.raises(StageError, match="size mismatch") as error:
        load_idx(folder, hashes)
    assert str(path) in str(error.value)
    assert f"expected {len(content)} bytes, got {len(content) - 7}" in str(error.value)


def test_truncated_gzip_is_named(tmp_path, make_examples, write_idx):
    folder, _, hashes, _ = write_raw_dir(tmp_path, make_examples, write_idx, gzipped=True)
    path = folder / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(StageError, match="cannot decompress") as error:
        load_idx(folder, hashes)
    assert str(path) in str(error.value)


def test_wrong_magic_names_file_expected_and_actual(raw_dir, write_idx):
    folder, examples, hashes, gzipped = raw_dir
    # A labels file whose header claims three dimensions, as an images file does.
    content = write_idx(
        folder / "t10k-labels-idx1-ubyte", examples["t10k"].labels.reshape(-1, 1, 1), gzipped, IDX_IMAGES_MAGIC
    )
    hashes["t10k-labels-idx1-ubyte"] = hashlib.sha256(content).hexdigest()
    with pytest.raises(StageError, match="wrong magic number: expected 0x00000801, got 0x00000803") as error:
        load_idx(folder, hashes)
    assert str(file_of(folder, "t10k-labels-idx1-ubyte", gzipped)) in str(error.value)


def test_count_mismatch_names_both_files(raw_dir, write_idx):
    folder, examples, hashes, gzipped = raw_dir
    content = write_idx(folder / "train-labels-idx1-ubyte", examples["train"].labels[:-1], gzipped)
    hashes["train-labels-idx1-ubyte"] = hashlib.sha256(content).hexdigest()
    with pytest.raises(StageError, match="count mismatch: 39 labels for 40 images") as error:
        load_idx(folder, hashes)
    assert str(file_of(folder, "train-labels-idx1-ubyte", gzipped)) in str(error.value)
    assert str(file_of(folder, "train-images-idx3-ubyte", gzipped)) in str(error.value)


def test_label_out_of_range_is_rejected(raw_dir, write_idx):
    folder, examples, hashes, gzipped = raw_dir
    labels = examples["t10k"].labels.copy()
    labels[3] = 12
    content = write_idx(folder / "t10k-labels-idx1-ubyte", labels, gzipped)
    hashes["t10k-labels-idx1-ubyte"] = hashlib.sha256(content).hexdigest()
    with pytest.raises(StageError, match="labels must be 0-9, found 12"):
        load_idx(folder, hashes)


def test_images_of_wrong_size_are_rejected(raw_dir, write_idx):
    folder, _, hashes, gzipped = raw_dir
    content = write_idx(folder / "t10k-images-idx3-ubyte", np.zeros((15, 27, 28), np.uint8), gzipped)
    hashes["t10k-images-idx3-ubyte"] = hashlib.sha256(content).hexdigest()
    with pytest.raises(StageError, match="expected 28x28 images, got 27x28"):
        load_idx(folder, hashes)


def test_parse_idx_decodes_shape_and_values():
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    data = bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4]) + array.tobytes()
    np.testing.assert_array_equal(parse_idx(data, IDX_IMAGES_MAGIC, "x"), array)


@pytest.mark.parametrize(
    "data, match",
    [
        (b"\x00\x00", "origin: truncated: 2 bytes, too short"),
        (bytes([0, 0, 8, 1, 0, 0]), "origin: truncated: 6 bytes, header needs 8"),
        (bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]), r"origin: size mismatch for shape \(5,\): expected 13 bytes, got 10"),
        (bytes([0, 0, 8, 1, 0, 0, 0, 1, 1, 2]), "expected 9 bytes, got 10"),
        (bytes([0, 0, 9, 1, 0, 0, 0, 0]), "origin: wrong magic number: expected 0x00000801, got 0x00000901"),
    ],
)
def test_parse_idx_rejects_malformed_data(data, match):
    with pytest.raises(StageError, match=match):
        parse_idx(data, IDX_LABELS_MAGIC, "origin")


def test_committed_mnist_files_match_the_pinned_hashes():
    dataset = load_idx(RAW_MNIST)
    assert dataset.train.images.shape == (60_000, 28, 28, 1)
    assert dataset.test.images.shape == (10_000, 28, 28, 1)
    assert dataset.train.labels.shape == (60_000,) and dataset.test.labels.shape == (10_000,)
    assert set(np.unique(dataset.train.labels)) == set(range(10)) == set(np.unique(dataset.test.labels))
    assert dataset.sha256 == PINNED_SHA256


def test_tfds_can_prepare_mnist_here_not_only_its_mock():
    """`source: tfds` with network: tfds' builder locates its code with `importlib_resources`, which
    tensorflow-datasets does not declare (a user's first download failed on it; mock_data never gets there)."""
    import tensorflow_datasets as tfds

    assert tfds.builder("mnist", data_dir="unused").code_path.name == "mnist.py"


def test_tfds_source_gives_the_same_layout():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=12):
        dataset = load_tfds(None)
    for examples in (dataset.train, dataset.test):
        assert examples.images.shape == (12, 28, 28, 1)
        assert examples.images.dtype == np.uint8 and examples.labels.dtype == np.uint8
        assert examples.labels.shape == (12,)
        assert examples.labels.max() <= 9
    assert dataset.sha256 == {}


def test_prepare_stage_with_the_tfds_source_writes_records(stage_root):
    import tensorflow_datasets as tfds

    from stages import prepare
    from stages.common import paths
    from stages.common.records import read_framed

    set_params(stage_root, source="tfds")
    with tfds.testing.mock_data(num_examples=12):
        prepare.main()
    assert len(read_framed(paths.PREPARED_TRAIN)) == 12 and len(read_framed(paths.PREPARED_TEST)) == 12
    summary = json.loads(paths.PREPARED_SUMMARY.read_text())
    assert summary["source"] == "tfds" and summary["train"]["count"] == 12
