"""The dataset's shape and types, shared by every stage (the readers of raw files live in lib/)."""

from typing import NamedTuple

import numpy as np

IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10


class Examples(NamedTuple):
    images: np.ndarray  # uint8, (N, 28, 28, 1)
    labels: np.ndarray  # uint8, (N,)
