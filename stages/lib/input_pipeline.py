"""The TensorFlow input pipelines: record files into memory, then batches for training and evaluation: raw uint8
pixels (the model scales them itself) and int64 labels, as Keras' loss wants them."""

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from stages.common.dataset import IMAGE_SHAPE, Examples
from stages.common.errors import StageError, first_line
from stages.common.records import IMAGE_BYTES, read_framed

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
    """A TFRecord file of Examples as uint8 arrays, its records read and checked by `read_framed` and parsed by
    TensorFlow; StageError if it is damaged or, given `expected_count`, holds another number of records."""
    import tensorflow as tf

    if not Path(path).is_file():
        raise StageError(f"{path}: file not found (run `dvc repro` to create it)")
    records = read_framed(path)
    if not records:
        raise StageError(f"{path}: contains no records")
    if expected_count is not None and len(records) != expected_count:
        raise StageError(
            f"{path}: {len(records)} records, expected {expected_count} as its stage wrote it "
            "(the file was changed since; `dvc checkout` restores DVC's copy)"
        )
    spec = {"image": tf.io.FixedLenFeature([], tf.string), "label": tf.io.FixedLenFeature([], tf.int64)}
    try:
        parsed = tf.io.parse_example(records, spec)
        images = tf.io.decode_raw(parsed["image"], tf.uint8, fixed_length=IMAGE_BYTES)
    except tf.errors.OpError as exc:
        raise StageError(f"{path}: not a TFRecord file of MNIST examples: {first_line(exc)}") from exc
    return Examples(images.numpy().reshape(-1, *IMAGE_SHAPE), parsed["label"].numpy().astype(np.uint8))


def training_dataset(examples: Examples, batch_size: int, shuffle_buffer: int, seed: int) -> "tf.data.Dataset":
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


def evaluation_dataset(examples: Examples) -> "tf.data.Dataset":
    import tensorflow as tf

    batches = tf.data.Dataset.from_tensor_slices((examples.images, examples.labels.astype(np.int64)))
    return batches.batch(EVAL_BATCH_SIZE).cache()
