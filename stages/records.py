"""The on-disk record format, defined once: TFRecord files of `tf.train.Example`s.

Each record holds one image as raw uint8 bytes (feature `image`, 784 bytes) and its
label (feature `label`, int64). The writer and the framing reader are plain Python
(with google-crc32c for the checksums) so that the data stages need not import
TensorFlow, which costs seconds; `load_examples` is TensorFlow's own reader,
used by the stages that train and evaluate.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import google_crc32c
import numpy as np

from stages.cli import StageError, first_line
from stages.mnist_data import IMAGE_SHAPE, Examples
from stages.outputs import atomic_output

if TYPE_CHECKING:
    import tensorflow as tf

IMAGE_BYTES = int(np.prod(IMAGE_SHAPE))
EVAL_BATCH_SIZE = 1000  # validation and test batches: larger is faster and does not change the result


def _masked_crc(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _length_delimited(field_number: int, payload: bytes) -> bytes:
    return _varint(field_number << 3 | 2) + _varint(len(payload)) + payload


def encode_example(image: bytes, label: int) -> bytes:
    """Serialize a `tf.train.Example` with features `image` (bytes) and `label` (int64)."""
    # Feature: bytes_list is field 1, int64_list field 3; each list's values are field 1 (int64 packed).
    image_feature = _length_delimited(1, _length_delimited(1, image))
    label_feature = _length_delimited(3, _length_delimited(1, _varint(label)))
    # Features.feature is a map<string, Feature>: repeated entries of key (1) and value (2).
    features = b"".join(
        _length_delimited(1, _length_delimited(1, key) + _length_delimited(2, value))
        for key, value in ((b"image", image_feature), (b"label", label_feature))
    )
    return _length_delimited(1, features)


def _frame_record(data: bytes) -> bytes:
    """One TFRecord: length, its masked CRC-32C, the data, and its masked CRC-32C."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", _masked_crc(length)) + data + struct.pack("<I", _masked_crc(data))


def write_framed(path: Path, records: Iterable[bytes]) -> int:
    """Write serialized records to a TFRecord file atomically; return how many were written."""
    count = 0
    with atomic_output(path) as temporary, open(temporary, "wb") as file:
        for record in records:
            file.write(_frame_record(record))
            count += 1
    return count


def write_examples(path: Path, examples: Examples) -> int:
    """Write images and labels as a TFRecord file of Examples, atomically."""
    flat = examples.images.reshape(len(examples.images), -1)
    return write_framed(
        path, (encode_example(image.tobytes(), int(label)) for image, label in zip(flat, examples.labels, strict=True))
    )


def read_framed(path: Path) -> list[bytes]:
    """The serialized records of a TFRecord file, checksums verified; StageError if it is damaged."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise StageError(f"{path}: cannot read: {exc.strerror}") from exc
    records = []
    position = 0
    while position < len(data):
        if position + 12 > len(data):
            raise StageError(f"{path}: truncated record header at byte {position} of {len(data)}")
        header = data[position : position + 8]
        (length,) = struct.unpack("<Q", header)
        (length_crc,) = struct.unpack("<I", data[position + 8 : position + 12])
        if length_crc != _masked_crc(header):
            raise StageError(f"{path}: corrupt record header at byte {position} (length checksum mismatch)")
        start, end = position + 12, position + 12 + length
        if end + 4 > len(data):
            raise StageError(
                f"{path}: truncated record at byte {position}: needs {end + 4} bytes, file has {len(data)}"
            )
        record = data[start:end]
        (data_crc,) = struct.unpack("<I", data[end : end + 4])
        if data_crc != _masked_crc(record):
            raise StageError(f"{path}: corrupt record at byte {position} (data checksum mismatch)")
        records.append(record)
        position = end + 4
    return records


def load_examples(path: Path) -> Examples:
    """Read a TFRecord file of Examples with TensorFlow (batched parsing) into uint8 arrays."""
    import tensorflow as tf

    feature_spec = {
        "image": tf.io.FixedLenFeature([], tf.string),
        "label": tf.io.FixedLenFeature([], tf.int64),
    }

    def parse_batch(serialized: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        parsed = tf.io.parse_example(serialized, feature_spec)
        images = tf.io.decode_raw(parsed["image"], tf.uint8, fixed_length=IMAGE_BYTES)
        # Each record takes 16 bytes of framing besides its data: used to detect a cut-off header.
        framed_bytes = tf.reduce_sum(tf.strings.length(serialized, unit="BYTE") + 16)
        return tf.reshape(images, (-1, *IMAGE_SHAPE)), tf.cast(parsed["label"], tf.uint8), framed_bytes

    if not Path(path).is_file():
        raise StageError(f"{path}: file not found (run `dvc repro` to create it)")
    dataset = tf.data.TFRecordDataset(str(path)).batch(10_000).map(parse_batch)
    try:
        batches = [(images.numpy(), labels.numpy(), int(size)) for images, labels, size in dataset]
    except tf.errors.OpError as exc:
        raise StageError(f"{path}: not a valid TFRecord file of MNIST examples: {first_line(exc)}") from exc
    if not batches:
        raise StageError(f"{path}: contains no records")
    # TensorFlow silently drops a last record cut off inside its 12-byte header.
    read_bytes, file_bytes = sum(b[2] for b in batches), Path(path).stat().st_size
    if read_bytes != file_bytes:
        raise StageError(f"{path}: truncated: {file_bytes - read_bytes} bytes after the last complete record")
    return Examples(np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches]))


def scaled(images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """uint8 pixels -> float32 in [0, 1], in the input pipeline (records keep raw bytes)."""
    import tensorflow as tf

    return tf.cast(images, tf.float32) / 255.0, tf.cast(labels, tf.int64)


def evaluation_dataset(examples: Examples) -> tf.data.Dataset:
    import tensorflow as tf

    return (
        tf.data.Dataset.from_tensor_slices((examples.images, examples.labels))
        .batch(EVAL_BATCH_SIZE)
        .map(scaled)
        .cache()
    )
