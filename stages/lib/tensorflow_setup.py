"""Importing TensorFlow: quietly, without what Keras imports for nothing, and with the kernels `numerics` names."""

import os
import sys
from types import ModuleType

# TensorFlow's C++ logs (oneDNN notices, CUDA probing on CPU-only machines) are noise in stage logs;
# real failures still surface as Python exceptions. Set it to 0 to see them.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# What `numerics: portable` sets before TensorFlow loads (docs/determinism.md). TensorFlow picks
# kernels by CPU at run time: oneDNN's ops where the CPU has AVX-512 VNNI/BF16 or AMX, and a
# oneDNN matrix-multiply kernel inside its own ops, each dispatched on the instruction set. Off,
# Eigen's kernels compiled into the wheel do all the arithmetic, on one thread (more threads
# split the sums differently, so the bits would depend on the number of cores).
PORTABLE_KERNELS = {"TF_ENABLE_ONEDNN_OPTS": "0", "TENSORFLOW_USE_CUSTOM_CONTRACTION_KERNEL": "0"}
PORTABLE_THREADS = 1

# Keras imports these whenever they are installed (MLflow brings them), for its scikit-learn wrappers
# and plotting utilities, which no stage uses: about 1 s of every TensorFlow import (docs/speed.md).
KERAS_OPTIONAL_MODULES = ("sklearn", "matplotlib")


def import_tensorflow(numerics: str = "portable") -> ModuleType:
    """Import TensorFlow, its C++ banner silenced (it ignores the setting above), with the CPU kernels that
    `numerics` names: "portable", the same bits on any CPU; "native", TensorFlow's defaults. A process's
    kernels are fixed once TensorFlow is imported: the stages call this first thing."""
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    if numerics == "portable":
        os.environ.update(PORTABLE_KERNELS)
    saved_stderr = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    # None in sys.modules makes `import sklearn` raise ModuleNotFoundError, as if it were not installed.
    hidden = [name for name in KERAS_OPTIONAL_MODULES if name not in sys.modules]
    sys.modules.update(dict.fromkeys(hidden))
    try:
        import tensorflow
    finally:
        for name in hidden:
            del sys.modules[name]
        os.dup2(saved_stderr, 2)
        os.close(saved_stderr)
        os.close(devnull)
    if numerics == "portable":
        tensorflow.config.threading.set_intra_op_parallelism_threads(PORTABLE_THREADS)
    return tensorflow
