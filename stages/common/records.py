"""The on-disk record format, defined once: TFRecord files of `tf.train.Example`s.

Each record holds one image as raw uint8 bytes (feature `image`, 784 bytes) and its
label (feature `label`, int64). The writer and the framing reader are plain Python
(with google-crc32c for the checksums) so that the data stages need not import
TensorFlow, which costs seconds; TensorFlow's own reader is in lib/input_pipeline.py.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from pathlib import Path

import google_crc32c
import numpy as np

from stages.common.dataset import IMAGE_SHAPE, Examples
from stages.common.errors import StageError
from stages.common.outputs import atomic_output

IMAGE_BYTES = int(np.prod(IMAGE_SHAPE))
FRAMING_BYTES = 16  # per record besides its data: 8-byte length, two 4-byte checksums


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
    """One TFRecord (FRAMING_BYTES longer than `data`): length, its masked CRC-32C, the data, and its masked CRC-32C."""
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
