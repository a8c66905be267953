"""The record format, defined once: TFRecord files of `tf.train.Example`s, features `image` (784 raw uint8 bytes)
and `label` (int64). Written and read here in plain Python, so that the data stages need not import TensorFlow
(seconds); lib/input_pipeline.py has TensorFlow parse what read_framed reads."""

import struct
from collections.abc import Iterable
from pathlib import Path

import google_crc32c
import numpy as np

from stages.common.dataset import IMAGE_SHAPE, Examples
from stages.common.errors import StageError
from stages.common.outputs import atomic_output

IMAGE_BYTES = int(np.prod(IMAGE_SHAPE))


def _crc(data: bytes) -> bytes:
    """TFRecord's masked CRC-32C of `data`, as it is stored: 4 bytes, little-endian."""
    crc = google_crc32c.value(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def _varint(value: int) -> bytes:
    return bytes([value]) if value < 0x80 else bytes([value & 0x7F | 0x80]) + _varint(value >> 7)


def _field(number: int, payload: bytes) -> bytes:  # a length-delimited protobuf field
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_example(image: bytes, label: int) -> bytes:
    """Serialize a `tf.train.Example` with features `image` (bytes) and `label` (int64)."""
    # Feature: bytes_list is field 1, int64_list field 3, each list's values field 1 (int64s packed).
    features = {b"image": _field(1, _field(1, image)), b"label": _field(3, _field(1, _varint(label)))}
    # Features.feature is a map<string, Feature>: repeated entries of key (1) and value (2).
    return _field(1, b"".join(_field(1, _field(1, key) + _field(2, value)) for key, value in features.items()))


def write_framed(path: Path, records: Iterable[bytes]) -> None:
    """Write serialized records to a TFRecord file atomically, each framed by its length, the length's masked
    CRC-32C and its own."""
    with atomic_output(path) as temporary, open(temporary, "wb") as file:
        for record in records:
            length = struct.pack("<Q", len(record))
            file.write(length + _crc(length) + record + _crc(record))


def write_examples(path: Path, examples: Examples) -> None:
    """Write images and labels as a TFRecord file of Examples, atomically."""
    flat = examples.images.reshape(len(examples.images), -1)
    records = (encode_example(image.tobytes(), int(label)) for image, label in zip(flat, examples.labels, strict=True))
    write_framed(path, records)


def read_framed(path: Path) -> list[bytes]:
    """The serialized records of a TFRecord file, checksums verified; StageError if it is damaged."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise StageError(f"{path}: cannot read: {exc.strerror}") from exc
    records, position = [], 0
    while position < len(data):
        # A cut-off header or record leaves a length or checksum short, so one of the comparisons fails.
        length = data[position : position + 8]
        end = position + 12 + int.from_bytes(length, "little")
        record = data[position + 12 : end]
        if data[position + 8 : position + 12] != _crc(length) or data[end : end + 4] != _crc(record):
            raise StageError(
                f"{path}: damaged: a record is cut off or fails its checksum (at byte {position} of {len(data)}); "
                "`dvc checkout` restores DVC's copy"
            )
        records.append(record)
        position = end + 4
    return records
