"""numerics: does this machine compute the same bits as the one that made the committed baseline?

Trains the network params.yaml describes for one short epoch on synthetic images, with the
kernels its `numerics` selects, and hashes the weights and predictions: every kernel a training
uses, at its shapes, in a few seconds. Compares that fingerprint with the one recorded beside the
committed baseline (data/baseline/machine.json). The same: `make repro` here gives the committed
model file byte for byte. Different: it gives metrics within the tolerances of
docs/determinism.md, and `make restore` brings the committed outputs back.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import platform
from pathlib import Path
from typing import Any

from stages.common.cli import run_stage
from stages.common.dataset import IMAGE_SHAPE, NUM_CLASSES, Examples
from stages.common.outputs import write_json
from stages.common.params import Params, load_params
from stages.lib.tensorflow_setup import import_tensorflow

BASELINE_MACHINE = Path("data/baseline/machine.json")
FINGERPRINT_IMAGES = 1000  # ten training steps at the default batch size
# The instruction sets TensorFlow's run-time dispatch looks at (docs/determinism.md).
DISPATCHED_ON = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile")


def fingerprint(params: Params) -> str:
    """MD5 of the weights and predictions after one seeded epoch on synthetic images."""
    import numpy as np

    from stages.train import train

    rng = np.random.default_rng(params.seed)
    images = rng.integers(0, 256, size=(FINGERPRINT_IMAGES, *IMAGE_SHAPE), dtype=np.uint8)
    examples = Examples(images, rng.integers(0, NUM_CLASSES, size=FINGERPRINT_IMAGES, dtype=np.uint8))
    with contextlib.redirect_stdout(io.StringIO()):  # Keras' epoch line
        model, _ = train(dataclasses.replace(params, epochs=1), examples, examples)
    digest = hashlib.md5()
    for weight in model.weights:
        digest.update(np.asarray(weight).tobytes())
    digest.update(model.predict(images, verbose=0).tobytes())
    return digest.hexdigest()


def this_machine() -> dict[str, Any]:
    """What a person reads to compare machines: CPU, L1 data cache, dispatched-on instruction sets."""
    import tensorflow as tf

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    fields = {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in cpuinfo.splitlines())}
    caches = Path("/sys/devices/system/cpu/cpu0/cache")
    l1d = [
        (cache / "size").read_text().strip()
        for cache in sorted(caches.glob("index*"))
        if (cache / "level").read_text().strip() == "1" and (cache / "type").read_text().strip() == "Data"
    ]
    return {
        "cpu": fields.get("model name") or platform.processor() or platform.machine(),
        "l1_data_cache": l1d[0] if l1d else None,
        "instruction_sets": [name for name in DISPATCHED_ON if name in fields.get("flags", "").split()],
        "cores": os.cpu_count(),
        "tensorflow": tf.__version__,
    }


def describe(machine: dict[str, Any]) -> str:
    return (
        f"{machine['cpu']}, L1d {machine['l1_data_cache']}, {' '.join(machine['instruction_sets']) or '-'}, "
        f"{machine['cores']} cores, TensorFlow {machine['tensorflow']}, numerics {machine['numerics']}: "
        f"fingerprint {machine['fingerprint'][:8]}"
    )


def main(record: bool, as_json: bool) -> None:
    params = load_params()
    import_tensorflow(params.numerics)
    machine = {**this_machine(), "numerics": params.numerics, "fingerprint": fingerprint(params)}
    if record:
        write_json(BASELINE_MACHINE, machine)
    baseline = json.loads(BASELINE_MACHINE.read_text())
    same = (machine["numerics"], machine["fingerprint"]) == (baseline["numerics"], baseline["fingerprint"])
    if as_json:
        print(json.dumps({"this_machine": machine, "baseline": baseline, "same": same}))
        return
    print(f"{'this machine:':<20}{describe(machine)}")
    print(f"{'baseline machine:':<20}{describe(baseline)}")
    if same:
        print("the same bits: `make repro` reproduces the committed model file byte for byte")
    else:
        print("different bits: `make repro` gives metrics close to the committed ones (docs/determinism.md)")


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--record", action="store_true", help=f"write this machine's record to {BASELINE_MACHINE}")
    parser.add_argument("--json", dest="as_json", action="store_true", help="print both records as JSON")


if __name__ == "__main__":
    run_stage("numerics", __doc__, main, arguments=arguments)
