"""numerics: does this machine compute the same bits as the one that made the committed baseline? Two fingerprints
compared with data/baseline/machine.json: training's (one short seeded epoch on synthetic images) and evaluation's
(evaluate on the same images). The same training bits: `make repro` trains the committed model byte for byte;
the same evaluation bits: it evaluates it into the committed metrics. Different: close metrics (docs/determinism.md)."""

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

import numpy as np

from stages.common.cli import run_stage
from stages.common.dataset import IMAGE_SHAPE, NUM_CLASSES, Examples
from stages.common.outputs import write_json
from stages.common.params import Params, load_params
from stages.lib.tensorflow_setup import import_tensorflow

BASELINE_MACHINE = Path("data/baseline/machine.json")
FINGERPRINT_IMAGES = 1000  # ten training steps at the default batch size
# The instruction sets TensorFlow's run-time dispatch looks at (docs/determinism.md).
DISPATCHED_ON = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile")
# What each fingerprint's match, or mismatch, tells of `make repro` on this machine (docs/determinism.md).
PROMISES = {
    "training": (
        "`make repro` trains the committed model file byte for byte",
        "`make repro` trains another model, whose metrics are close to the committed ones",
    ),
    "evaluation": (
        "evaluate writes the committed metrics/evaluate.json for the committed model",
        "evaluate's metrics of the committed model may differ from the committed ones in their last digits",
    ),
}


def md5_of(arrays: list[Any]) -> str:
    return hashlib.md5(b"".join(np.asarray(array).tobytes() for array in arrays)).hexdigest()


def fingerprints(params: Params) -> dict[str, str]:
    """MD5s of two computations on seeded synthetic images. "training": the weights after one epoch (every kernel
    train uses, at its shapes). "evaluation": evaluate's probabilities and loss with the untrained seeded model,
    so that it does not depend on training's bits."""
    from stages.evaluate import evaluate
    from stages.lib.model import build_model
    from stages.train import seed_everything, train

    rng = np.random.default_rng(params.seed)
    images = rng.integers(0, 256, size=(FINGERPRINT_IMAGES, *IMAGE_SHAPE), dtype=np.uint8)
    examples = Examples(images, rng.integers(0, NUM_CLASSES, size=FINGERPRINT_IMAGES, dtype=np.uint8))
    seed_everything(params.seed)
    results = evaluate(build_model(params), examples)
    with contextlib.redirect_stdout(io.StringIO()):  # Keras' epoch line
        model, _ = train(dataclasses.replace(params, epochs=1), examples, examples)
    return {
        "training": md5_of(model.weights),
        "evaluation": md5_of([results["probabilities"], results["test_loss"]]),
    }


def this_machine() -> dict[str, Any]:
    """What a person reads to compare machines."""
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


def main(record: bool, as_json: bool) -> None:
    params = load_params()
    import_tensorflow(params.numerics)
    machine = {**this_machine(), "numerics": params.numerics, "fingerprints": fingerprints(params)}
    if record:
        write_json(BASELINE_MACHINE, machine)
    baseline = json.loads(BASELINE_MACHINE.read_text())
    same_numerics = machine["numerics"] == baseline["numerics"]
    same = {
        part: same_numerics and machine["fingerprints"][part] == baseline["fingerprints"][part] for part in PROMISES
    }
    if as_json:
        print(json.dumps({"this_machine": machine, "baseline": baseline, "same": same}))
        return
    for who, m in (("this machine:", machine), ("baseline machine:", baseline)):
        print(
            f"{who:<20}{m['cpu']}, L1d {m['l1_data_cache']}, {' '.join(m['instruction_sets']) or '-'}, {m['cores']} "
            f"cores, TensorFlow {m['tensorflow']}, numerics {m['numerics']}: fingerprints "
            + ", ".join(f"{part} {m['fingerprints'][part][:8]}" for part in PROMISES)
        )
    for part, (same_bits, different_bits) in PROMISES.items():
        print(f"{part}: " + ("the same bits: " + same_bits if same[part] else "different bits: " + different_bits))


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--record", action="store_true", help=f"write this machine's record to {BASELINE_MACHINE}")
    parser.add_argument("--json", dest="as_json", action="store_true", help="print both records as JSON")


if __name__ == "__main__":
    run_stage("numerics", __doc__, main, arguments=arguments)
