import re

import numpy as np
import pytest

from stages.common.dataset import Examples
from stages.common.errors import StageError
from stages.common.outputs import atomic_output, write_json
from stages.common.records import encode_example, read_framed, write_examples, write_framed
from stages.lib.input_pipeline import load_examples
from tests.conftest import decode_example


@pytest.fixture(scope="module")
def examples(make_examples):
    return make_examples(64, seed=3)


@pytest.fixture
def record_file(tmp_path, examples):
    path = tmp_path / "records.tfrecord"
    write_examples(path, examples)
    return path


def tf_example(image: bytes, label: int) -> bytes:
    import tensorflow as tf

    feature = {
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(deterministic=True)


@pytest.mark.parametrize("label", [0, 9, 200, 2**40])
def test_encoding_is_byte_identical_to_tensorflow_and_round_trips(label):
    image = np.random.default_rng(label % 7).integers(0, 256, 784, dtype=np.uint8).tobytes()
    encoded = encode_example(image, label)
    assert encoded == tf_example(image, label)
    assert decode_example(encoded) == (image, label)


def test_tensorflow_reads_back_what_was_written(record_file, examples):
    loaded = load_examples(record_file)
    assert loaded.images.dtype == np.uint8 and loaded.labels.dtype == np.uint8
    np.testing.assert_array_equal(loaded.images, examples.images)
    np.testing.assert_array_equal(loaded.labels, examples.labels)


def test_framing_reader_returns_every_record_in_order(record_file, examples):
    records = read_framed(record_file)
    assert len(records) == len(examples.labels)
    decoded = [decode_example(record) for record in records]
    assert [label for _, label in decoded] == examples.labels.tolist()
    assert decoded[5][0] == examples.images[5].tobytes()


def test_writing_is_deterministic(tmp_path, record_file, examples):
    write_examples(tmp_path / "again.tfrecord", examples)
    assert (tmp_path / "again.tfrecord").read_bytes() == record_file.read_bytes()


def test_writing_more_than_one_tensorflow_batch_keeps_everything(tmp_path):
    # load_examples parses in batches of 10,000 records.
    images = np.zeros((10_003, 28, 28, 1), np.uint8)
    images[:, 0, 0, 0] = np.arange(10_003) % 251
    path = tmp_path / "big.tfrecord"
    write_examples(path, Examples(images, (np.arange(10_003) % 10).astype(np.uint8)))
    loaded = load_examples(path)
    np.testing.assert_array_equal(loaded.images[:, 0, 0, 0], images[:, 0, 0, 0])
    assert loaded.labels[-1] == 10_002 % 10


def flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def keep_bytes(path, count):
    path.write_bytes(path.read_bytes()[:count])


def frame_size(path):
    frame = len(read_framed(path)[0]) + 16
    assert path.stat().st_size == 64 * frame  # every label fits one varint byte: equal frames
    return frame


# Each damage gets the file and the size of one frame (8-byte length, 4-byte CRC, record, 4-byte CRC);
# each test gets the offset of the damaged frame.
@pytest.mark.parametrize(
    "damage, offset",
    [
        (lambda p, frame: keep_bytes(p, 64 * frame - 10), lambda frame: 63 * frame),
        (lambda p, frame: keep_bytes(p, 63 * frame + 5), lambda frame: 63 * frame),
        (lambda p, frame: flip_byte(p, 2 * frame + 3), lambda frame: 2 * frame),
        (lambda p, frame: flip_byte(p, frame + 12 + 500), lambda frame: frame),
    ],
    ids=["truncated-record", "truncated-header", "flipped-length", "flipped-data"],
)
def test_damaged_file_is_rejected_by_both_readers(record_file, damage, offset):
    frame = frame_size(record_file)
    damage(record_file, frame)
    size = record_file.stat().st_size
    message = f"{record_file}: damaged: a record is cut off or fails its checksum (at byte {offset(frame)} of {size})"
    for read in (read_framed, load_examples):
        with pytest.raises(StageError, match=re.escape(message)):
            read(record_file)


def test_missing_file_is_named_by_both_readers(tmp_path):
    path = tmp_path / "absent.tfrecord"
    with pytest.raises(StageError, match="cannot read") as error:
        read_framed(path)
    assert str(path) in str(error.value)
    with pytest.raises(StageError, match="file not found"):
        load_examples(path)


def test_empty_file_has_no_records(tmp_path):
    path = tmp_path / "empty.tfrecord"
    write_framed(path, [])
    assert read_framed(path) == []
    with pytest.raises(StageError, match="contains no records"):
        load_examples(path)


def test_atomic_output_replaces_the_file_only_on_success(tmp_path):
    path = tmp_path / "out.json"
    write_json(path, {"b": 1, "a": [2]})
    assert path.read_text() == '{\n  "a": [\n    2\n  ],\n  "b": 1\n}\n'
    with pytest.raises(RuntimeError), atomic_output(path) as temporary:
        temporary.write_text("half")
        raise RuntimeError("killed")
    assert path.read_text().startswith('{\n  "a"')
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_failed_record_write_leaves_the_old_file_and_no_temporary(record_file, examples):
    before = record_file.read_bytes()
    labels_too_short = Examples(examples.images, examples.labels[:-1])
    with pytest.raises(ValueError):
        write_examples(record_file, labels_too_short)
    assert record_file.read_bytes() == before
    assert [p.name for p in record_file.parent.iterdir()] == [record_file.name]


def test_leftover_temporary_of_a_killed_writer_is_removed_by_the_next_write(tmp_path):
    (tmp_path / ".model.tmp-12345.keras").write_text("left by SIGKILL")
    (tmp_path / ".other.tmp-12345.keras").write_text("another output's")
    with atomic_output(tmp_path / "model.keras") as temporary:
        temporary.write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-12345.keras", "model.keras"]
