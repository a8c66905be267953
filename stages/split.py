"""split: data/prepared/train.tfrecord -> data/split/{train,validation}.tfrecord, disjoint and fixed."""

import numpy as np

from stages.common import paths
from stages.common.cli import Timer, log, run_stage
from stages.common.errors import StageError
from stages.common.outputs import write_json
from stages.common.params import load_params
from stages.common.records import read_framed, write_framed


def split_indices(count: int, validation_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, validation) record indices: a seeded random, disjoint partition of range(count)."""
    validation_count = round(count * validation_fraction)
    if not 0 < validation_count < count:
        raise StageError(
            f"validation_fraction {validation_fraction} of {count} records leaves an empty "
            f"{'validation' if validation_count == 0 else 'training'} set"
        )
    order = np.random.default_rng(seed).permutation(count)
    return np.sort(order[validation_count:]), np.sort(order[:validation_count])


def split(validation_fraction: float, seed: int) -> dict:
    """Copy the prepared training records, unchanged, into the two split files; return a summary."""
    records = read_framed(paths.PREPARED_TRAIN)
    train_indices, validation_indices = split_indices(len(records), validation_fraction, seed)
    write_framed(paths.SPLIT_TRAIN, (records[i] for i in train_indices))
    write_framed(paths.SPLIT_VALIDATION, (records[i] for i in validation_indices))
    summary = {
        "seed": seed,
        "validation_fraction": validation_fraction,
        "train": len(train_indices),
        "validation": len(validation_indices),
    }
    write_json(paths.SPLIT_SUMMARY, summary)
    return summary


def main() -> None:
    timer = Timer()
    params = load_params()
    summary = split(params.validation_fraction, params.seed)
    log(
        "split",
        f"wrote {summary['train']} train / {summary['validation']} validation records "
        f"(seed {params.seed}) to {paths.SPLIT_DIR} in {timer}",
    )


if __name__ == "__main__":
    run_stage("split", __doc__, main)
