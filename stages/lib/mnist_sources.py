"""The two sources of MNIST, the official IDX files in `data/raw/mnist/` or tensorflow-datasets: both give uint8
images of shape (N, 28, 28, 1) and uint8 labels 0-9."""

import gzip
import hashlib
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

from stages.common.dataset import IMAGE_SHAPE, NUM_CLASSES, Examples
from stages.common.errors import StageError, first_line

RAW_DIR = Path("data/raw/mnist")

# SHA-256 of the official, uncompressed files (see data/raw/mnist/README.md).
PINNED_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension


class Dataset(NamedTuple):
    train: Examples
    test: Examples
    sha256: dict[str, str]  # file name -> SHA-256 of its uncompressed content; empty for tfds


def parse_idx(data: bytes, expected_magic: int, origin: str) -> np.ndarray:
    """Decode the IDX format: a big-endian magic number, one uint32 per dimension, then the bytes."""
    if len(data) < 4:
        raise StageError(f"{origin}: truncated: {len(data)} bytes, too short for an IDX header")
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise StageError(f"{origin}: wrong magic number: expected 0x{expected_magic:08x}, got 0x{magic:08x}")
    ndim = magic & 0xFF
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise StageError(f"{origin}: truncated: {len(data)} bytes, header needs {header_size}")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected_size = header_size + int(np.prod(shape))
    if len(data) != expected_size:
        raise StageError(f"{origin}: size mismatch for shape {shape}: expected {expected_size} bytes, got {len(data)}")
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape)


def read_idx(raw_dir: Path, name: str, magic: int, expected_sha256: dict[str, str]) -> tuple[Path, np.ndarray]:
    """The IDX file `name` in `raw_dir`, gzipped or not, its SHA-256 verified, decoded; and its path."""
    path = next((p for p in (raw_dir / f"{name}.gz", raw_dir / name) if p.is_file()), None)
    if path is None:
        raise StageError(f"{raw_dir / name}[.gz]: file not found (expected the official MNIST IDX file)")
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise StageError(f"{path}: cannot decompress or read: {exc}") from exc
    if (sha256 := hashlib.sha256(data).hexdigest()) != expected_sha256[name]:
        raise StageError(
            f"{path}: SHA-256 mismatch of the uncompressed content: expected {expected_sha256[name]}, got {sha256}"
        )
    return path, parse_idx(data, magic, str(path))


def load_idx(raw_dir: Path = RAW_DIR, expected_sha256: dict[str, str] = PINNED_SHA256) -> Dataset:
    """Read and verify the four IDX files: SHA-256, magic numbers, shapes, counts and labels."""
    splits = []
    for prefix in ("train", "t10k"):
        images_path, images = read_idx(raw_dir, f"{prefix}-images-idx3-ubyte", IDX_IMAGES_MAGIC, expected_sha256)
        labels_path, labels = read_idx(raw_dir, f"{prefix}-labels-idx1-ubyte", IDX_LABELS_MAGIC, expected_sha256)
        if images.shape[1:] != IMAGE_SHAPE[:2]:
            raise StageError(f"{images_path}: expected 28x28 images, got {images.shape[1]}x{images.shape[2]}")
        if len(images) != len(labels):
            raise StageError(
                f"{labels_path}: count mismatch: {len(labels)} labels for {len(images)} images in {images_path}"
            )
        if labels.size and labels.max() >= NUM_CLASSES:
            raise StageError(f"{labels_path}: labels must be 0-9, found {int(labels.max())}")
        splits.append(Examples(images.reshape(-1, *IMAGE_SHAPE), labels))
    return Dataset(*splits, dict(expected_sha256))  # every file verified by read_idx


def load_tfds(data_dir: str | None) -> Dataset:
    """`tfds.load('mnist', as_supervised=True)`, as the notebook does; downloads if not cached."""
    from stages.lib.tensorflow_setup import import_tensorflow

    import_tensorflow()  # tfds imports it: silence its banner here too
    import tensorflow_datasets as tfds

    try:
        loaded = tfds.load("mnist", split=["train", "test"], as_supervised=True, data_dir=data_dir)
    except Exception as exc:  # tfds raises many types (network, missing files, checksum); all mean the same here
        location = data_dir or "the default tfds data_dir"
        raise StageError(f"tfds: cannot load 'mnist' from {location}: {first_line(exc)}") from exc
    splits = []
    for dataset in loaded:  # each split in one batch (train, 60,000); tfds' images are (28, 28, 1) uint8 already
        images, labels = tfds.as_numpy(dataset.batch(100_000).get_single_element())
        splits.append(Examples(images, labels.astype(np.uint8)))
    return Dataset(*splits, {})
