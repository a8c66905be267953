import json

import numpy as np
import pytest

from stages.common import paths
from stages.common.dataset import Examples
from stages.common.errors import StageError
from stages.common.records import read_framed, write_examples
from stages.lib.mnist_sources import Dataset
from stages.prepare import prepare
from stages.split import split, split_indices
from tests.conftest import decode_example


def test_split_indices_partition_everything():
    train, validation = split_indices(1000, 0.1, seed=42)
    assert (len(train), len(validation)) == (900, 100)
    assert not set(train) & set(validation)
    assert sorted([*train, *validation]) == list(range(1000))
    assert list(train) == sorted(train) and list(validation) == sorted(validation)


def test_split_indices_depend_only_on_the_seed():
    first, second, other = (split_indices(1000, 0.1, seed) for seed in (42, 42, 43))
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    assert not np.array_equal(first[1], other[1])


def test_validation_set_is_a_random_sample_not_a_block():
    _, validation = split_indices(1000, 0.1, seed=0)
    assert validation.max() - validation.min() > 500


@pytest.mark.parametrize("count, fraction, empty", [(10, 0.04, "validation"), (10, 0.96, "training"), (1, 0.5, "")])
def test_fraction_leaving_an_empty_side_is_an_error(count, fraction, empty):
    with pytest.raises(StageError, match=f"leaves an empty {empty}"):
        split_indices(count, fraction, seed=0)


@pytest.fixture
def prepared(stage_root, make_examples):
    """data/prepared/train.tfrecord of 300 distinct records; returns the records."""
    write_examples(paths.PREPARED_TRAIN, make_examples(300, seed=1))
    return read_framed(paths.PREPARED_TRAIN)


def test_split_copies_records_unchanged_into_two_disjoint_files(prepared):
    summary = split(0.2, seed=7)
    train, validation = read_framed(paths.SPLIT_TRAIN), read_framed(paths.SPLIT_VALIDATION)
    assert (len(train), len(validation)) == (240, 60)
    assert len(set(prepared)) == 300  # records are distinct, so set arithmetic below is exact
    assert not set(train) & set(validation)
    assert set(train) | set(validation) == set(prepared)
    assert train == [r for r in prepared if r in set(train)]  # original order kept
    assert summary == {"seed": 7, "validation_fraction": 0.2, "train": 240, "validation": 60}
    assert json.loads(paths.SPLIT_SUMMARY.read_text()) == summary


def test_split_is_byte_identical_when_run_again(prepared):
    split(0.2, seed=7)
    first = [p.read_bytes() for p in (paths.SPLIT_TRAIN, paths.SPLIT_VALIDATION, paths.SPLIT_SUMMARY)]
    split(0.2, seed=7)
    assert first == [p.read_bytes() for p in (paths.SPLIT_TRAIN, paths.SPLIT_VALIDATION, paths.SPLIT_SUMMARY)]
    split(0.2, seed=8)
    assert paths.SPLIT_VALIDATION.read_bytes() != first[1]


def test_split_without_prepared_records_names_the_file(stage_root):
    with pytest.raises(StageError, match=str(paths.PREPARED_TRAIN)):
        split(0.1, seed=0)
    assert not paths.SPLIT_DIR.exists()


def test_split_main_reads_params_yaml(prepared, capsys):
    from stages.split import main

    main()  # the real params.yaml: validation_fraction 0.1, seed 42
    assert len(read_framed(paths.SPLIT_VALIDATION)) == 30
    assert json.loads(paths.SPLIT_SUMMARY.read_text())["seed"] == 42
    assert "270 train / 30 validation records" in capsys.readouterr().out


def test_prepare_writes_records_and_per_class_counts(stage_root, make_examples):
    rng = np.random.default_rng(0)
    train_labels = np.repeat(np.arange(10, dtype=np.uint8), np.arange(1, 11))  # digit d appears d + 1 times
    rng.shuffle(train_labels)
    train = Examples(make_examples(55, seed=2).images, train_labels)
    test = Examples(make_examples(4, seed=3).images, np.full(4, 3, np.uint8))
    summary = prepare(Dataset(train, test, {"train-images-idx3-ubyte": "abc"}), "idx")

    for path, examples in ((paths.PREPARED_TRAIN, train), (paths.PREPARED_TEST, test)):
        decoded = [decode_example(record) for record in read_framed(path)]
        assert [label for _, label in decoded] == examples.labels.tolist()
        assert b"".join(image for image, _ in decoded) == examples.images.tobytes()
    assert summary["train"] == {"count": 55, "per_class": {str(d): d + 1 for d in range(10)}}
    assert summary["test"] == {"count": 4, "per_class": {str(d): 4 if d == 3 else 0 for d in range(10)}}
    assert summary["source"] == "idx" and summary["sha256"] == {"train-images-idx3-ubyte": "abc"}
    assert json.loads(paths.PREPARED_SUMMARY.read_text()) == summary
