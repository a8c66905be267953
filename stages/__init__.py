"""The MNIST pipeline's stages (prepare, split, train, evaluate) and the modules they share."""

from __future__ import annotations

import os
from types import ModuleType

# TensorFlow's C++ logs (oneDNN notices, CUDA probing on CPU-only machines) are noise in
# stage logs; real failures still surface as Python exceptions. Set it to 0 to see them.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def import_tensorflow() -> ModuleType:
    """Import TensorFlow with the C++ banner it prints on import silenced (it ignores the setting above)."""
    saved_stderr = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import tensorflow
    finally:
        os.dup2(saved_stderr, 2)
        os.close(saved_stderr)
        os.close(devnull)
    return tensorflow
