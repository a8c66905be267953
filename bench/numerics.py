"""Benchmark: what portable numerics cost per epoch, against TensorFlow's native kernels (docs/determinism.md).

Run from the repository root with the virtualenv's python (its bin directory on PATH):

    python bench/numerics.py [--repeats N] [--cnn-epochs N]

In a throwaway copy of the repository where `dvc repro split` made the records, fresh processes
train the notebook's network (5 epochs), then the CNN of docs/search.md (`--cnn-epochs` after a
first one, 0 to skip), with numerics portable and native alternating; prints each one's median
epoch time (epochs 2 and later) and the ratio portable / native.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the root, as bench/run.py does

from bench.measure import Runner  # noqa: E402
from bench.repository import clone_repository, run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each setting (default 3)")
    parser.add_argument(
        "--cnn-epochs", type=int, default=2, help="timed CNN epochs after a first one (default 2; 0: no CNN)"
    )
    args = parser.parse_args()
    copy = clone_repository(Path(tempfile.mkdtemp(prefix="mnist-bench-numerics-")))
    run(["dvc", "repro", "split"], copy)
    runner = Runner(Path("bench/results/numerics-logs"))
    networks = [("notebook network", "pipeline-train", "pipeline-train-native", 5)]
    if args.cnn_epochs:
        networks.append(("CNN (2 conv blocks)", "cnn-train-portable", "cnn-train-native", args.cnn_epochs + 1))
    print(f"{'network':<22} {'portable s':>10} {'native s':>10} {'ratio':>6}  (median epoch time, epochs 2+)")
    for label, portable, native, epochs in networks:
        seconds: dict[str, list[float]] = {portable: [], native: []}
        for rep in range(args.repeats):
            for worker in (portable, native):
                _, result = runner.worker(worker, copy, f"{worker}-{rep}", epochs=epochs)
                seconds[worker].append(statistics.median(result["epoch_seconds"][1:]))
        portable_s, native_s = statistics.median(seconds[portable]), statistics.median(seconds[native])
        print(f"{label:<22} {portable_s:10.3f} {native_s:10.3f} {portable_s / native_s:6.2f}", flush=True)


if __name__ == "__main__":
    main()
