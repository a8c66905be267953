"""Where each stage reads and writes, relative to the repository root (mirrors dvc.yaml)."""

from pathlib import Path

PREPARED_DIR = Path("data/prepared")
PREPARED_TRAIN = PREPARED_DIR / "train.tfrecord"
PREPARED_TEST = PREPARED_DIR / "test.tfrecord"
PREPARED_SUMMARY = PREPARED_DIR / "summary.json"

SPLIT_DIR = Path("data/split")
SPLIT_TRAIN = SPLIT_DIR / "train.tfrecord"
SPLIT_VALIDATION = SPLIT_DIR / "validation.tfrecord"
SPLIT_SUMMARY = SPLIT_DIR / "summary.json"

MODEL = Path("models/model.keras")
TRAIN_METRICS = Path("metrics/train.json")
TRAIN_HISTORY = Path("metrics/train_history.csv")
EVALUATE_METRICS = Path("metrics/evaluate.json")
CONFUSION = Path("metrics/confusion.csv")
PER_CLASS_METRICS = Path("metrics/per_class.json")

# The stages with outputs, and those of their outputs that git keeps rather than DVC's cache
# (`cache: false` in dvc.yaml): what to restore, and how, after DVC removed them for a failed run.
OUTPUTS_IN_GIT = {"prepare": (), "split": (), "train": (TRAIN_METRICS,), "evaluate": (EVALUATE_METRICS,)}
