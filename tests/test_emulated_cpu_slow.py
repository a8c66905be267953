"""Portable numerics on another kind of CPU, emulated: QEMU's user mode runs the venv's Python with the CPUID of an
AMD EPYC (AVX2 and FMA, no AVX-512, 32 KiB L1 data cache) on this machine. Training and evaluate must give this
machine's bits there (docs/determinism.md). About 3 minutes of emulation on a quiet 2-core machine."""

from __future__ import annotations

import csv
import json
import platform
import shutil

import pytest

from stages.common import paths
from tests.e2e import REPO, VENV_BIN, run

QEMU = shutil.which("qemu-x86_64")
EMULATED_CPU = "EPYC"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(QEMU is None or platform.machine() != "x86_64", reason="needs qemu-user on x86-64"),
]

# TensorFlow's own softmax and the instruction sets NumPy dispatches on, on whichever CPU runs it.
PROBE = """
import hashlib, json
import numpy as np
from numpy._core._multiarray_umath import __cpu_features__
from stages.lib.tensorflow_setup import import_tensorflow
tf = import_tensorflow("portable")
logits = np.random.default_rng(0).normal(0, 5, (1000, 10)).astype(np.float32)
features = {name: __cpu_features__[name] for name in ("AVX2", "FMA3", "AVX512F")}
print(json.dumps({**features, "softmax": hashlib.md5(tf.nn.softmax(logits).numpy().tobytes()).hexdigest()}))
"""

EVALUATE = """
import json
from stages.common import paths
from stages.lib.tensorflow_setup import import_tensorflow
import_tensorflow("portable")
from stages.evaluate import evaluate
from stages.lib.input_pipeline import load_examples
from stages.lib.model import load_model
results = evaluate(load_model(paths.MODEL), load_examples(paths.PREPARED_TEST))
print(json.dumps({name: results[name] for name in ("test_loss", "test_accuracy")}))
print(json.dumps(results["predictions"].tolist()))
"""


def python(*args: str, emulated: bool = False) -> list[str]:
    command = [str(VENV_BIN / "python"), *args]
    return [QEMU, "-cpu", EMULATED_CPU, *command] if emulated else command


def test_the_emulated_cpu_has_avx2_and_fma_only_and_another_softmax():
    native = json.loads(run(python("-c", PROBE), REPO).stdout)
    emulated = json.loads(run(python("-c", PROBE, emulated=True), REPO).stdout)
    assert (emulated["AVX2"], emulated["FMA3"], emulated["AVX512F"]) == (True, True, False)
    # Keras' softmax layer computes its reciprocal from the CPU's approximate one (RCPPS): a real CPU's and
    # QEMU's differ. So the emulated CPU is another CPU to TensorFlow, and evaluate's equal bits below mean something.
    assert emulated["softmax"] != native["softmax"]


def test_numerics_gives_the_same_training_and_evaluation_fingerprints_on_the_emulated_cpu():
    native = json.loads(run(python("-m", "stages.numerics", "--json"), REPO).stdout)["this_machine"]
    emulated = json.loads(run(python("-m", "stages.numerics", "--json", emulated=True), REPO).stdout)["this_machine"]
    assert emulated["fingerprints"] == native["fingerprints"]


def test_evaluate_gives_the_same_metrics_and_predictions_on_the_emulated_cpu(baseline):
    metrics, predictions = run(python("-c", EVALUATE, emulated=True), baseline).stdout.splitlines()
    # Compared with what this machine's `dvc repro` wrote: the same float, to the last bit, through JSON.
    assert json.loads(metrics) == json.loads((baseline / paths.EVALUATE_METRICS).read_text())
    with (baseline / paths.CONFUSION).open(newline="") as file:
        assert json.loads(predictions) == [int(row["predicted"]) for row in csv.DictReader(file)]
