"""The TensorFlow input pipelines: record files into memory, then batches for training and evaluation: raw uint8
pixels (the model scales them itself) and int64 labels, as Keras' loss wants them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from stages.common.dataset import IMAGE_SHAPE, Examples
from stages.common.errors import StageError, first_line
from stages.common.records import FRAMING_BYTES, IMAGE_BYTES

if TYPE_CHECKING:
    import tensorflow as tf

EVAL_BATCH_SIZE = 1000  # validation and test batches: larger is faster and does not change the result


def recorded_count(summary: Path, *keys: str) -> int:
    """The record count that the stage which wrote a file noted in its summary.json, at `keys`."""
    try:
        value = json.loads(Path(summary).read_text())
        for key in keys:
            value = value[key]
        return int(value)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StageError(f"{summary}: cannot read the record count {'.'.join(keys)}: {first_line(exc)}") from exc


def load_examples(path: Path, expected_count: int | None = None) -> Examples:
    """A TFRecord file of Examples, parsed by TensorFlow in batches, as uint8 arrays; StageError if it is damaged
    or, given `expected_count`, holds another number of records."""
    import tensorflow as tf

    def parse_batch(serialized: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        spec = {"image": tf.io.FixedLenFeature([], tf.string), "label": tf.io.FixedLenFeature([], tf.int64)}
        parsed = tf.io.parse_example(serialized, spec)
        images = tf.io.decode_raw(parsed["image"], tf.uint8, fixed_length=IMAGE_BYTES)
        framed_bytes = tf.reduce_sum(tf.strings.length(serialized, unit="BYTE") + FRAMING_BYTES)
        return tf.reshape(images, (-1, *IMAGE_SHAPE)), tf.cast(parsed["label"], tf.uint8), framed_bytes

    if not Path(path).is_file():
        raise StageError(f"{path}: file not found (run `dvc repro` to create it)")
    dataset = tf.data.TFRecordDataset(str(path)).batch(10_000).map(parse_batch)
    try:
        batches = [(images.numpy(), labels.numpy(), int(size)) for images, labels, size in dataset]
    except tf.errors.DataLossError as exc:
        raise StageError(
            f"{path}: damaged: a record is cut off or fails its checksum (`dvc checkout` restores DVC's copy)"
        ) from exc
    except tf.errors.OpError as exc:
        raise StageError(f"{path}: not a TFRecord file of MNIST examples: {first_line(exc)}") from exc
    if not batches:
        raise StageError(f"{path}: contains no records")
    images, labels, sizes = zip(*batches, strict=True)
    # TensorFlow silently drops a last record cut off inside its 12-byte header.
    if (file_bytes := Path(path).stat().st_size) != sum(sizes):
        raise StageError(f"{path}: truncated: {file_bytes - sum(sizes)} bytes after the last complete record")
    examples = Examples(np.concatenate(images), np.concatenate(labels))
    if expected_count is not None and len(examples.labels) != expected_count:
        raise StageError(
            f"{path}: {len(examples.labels)} records, expected {expected_count} as its stage wrote it "
            "(the file was changed since; `dvc checkout` restores DVC's copy)"
        )
    return examples


def training_dataset(examples: Examples, batch_size: int, shuffle_buffer: int, seed: int) -> tf.data.Dataset:
    """Batches reshuffled every epoch with `shuffle_buffer` and `seed`. What is shuffled is the indices of the
    images, kept in memory as one tensor: the same order as shuffling the examples, at half the CPU cost."""
    import tensorflow as tf

    images, labels = tf.constant(examples.images), tf.constant(examples.labels.astype(np.int64))
    return (
        tf.data.Dataset.range(len(examples.labels))
        .shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
        .batch(batch_size)
        .map(lambda indices: (tf.gather(images, indices), tf.gather(labels, indices)))
        .prefetch(tf.data.AUTOTUNE)
    )


def evaluation_dataset(examples: Examples) -> tf.data.Dataset:
    import tensorflow as tf

    batches = tf.data.Dataset.from_tensor_slices((examples.images, examples.labels.astype(np.int64)))
    return batches.batch(EVAL_BATCH_SIZE).cache()
