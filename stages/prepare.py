"""prepare: MNIST from the chosen source -> data/prepared/{train,test}.tfrecord and summary.json."""

import numpy as np

from stages.common import paths
from stages.common.cli import Timer, log, run_stage
from stages.common.dataset import NUM_CLASSES, Examples
from stages.common.outputs import write_json
from stages.common.params import load_params
from stages.common.records import write_examples
from stages.lib.mnist_sources import Dataset, load_idx, load_tfds


def describe(examples: Examples) -> dict:
    counts = np.bincount(examples.labels, minlength=NUM_CLASSES)
    return {"count": len(examples.labels), "per_class": {str(c): int(n) for c, n in enumerate(counts)}}


def prepare(dataset: Dataset, source: str) -> dict:
    """Write both splits as TFRecords and a summary; return the summary."""
    write_examples(paths.PREPARED_TRAIN, dataset.train)
    write_examples(paths.PREPARED_TEST, dataset.test)
    summary = {
        "source": source,
        "train": describe(dataset.train),
        "test": describe(dataset.test),
        "sha256": dataset.sha256,
    }
    write_json(paths.PREPARED_SUMMARY, summary)
    return summary


def main() -> None:
    timer = Timer()
    params = load_params()
    dataset = load_idx() if params.source == "idx" else load_tfds(params.tfds_data_dir or None)
    summary = prepare(dataset, params.source)
    log(
        "prepare",
        f"wrote {summary['train']['count']} train / {summary['test']['count']} test records "
        f"from {params.source} to {paths.PREPARED_DIR} in {timer}",
    )


if __name__ == "__main__":
    run_stage("prepare", __doc__, main)
