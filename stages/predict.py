"""predict: the digit in each image file (any format, size and polarity) by a .keras file or an MLflow model URI
(models:/mnist-dnn@champion, runs:/<run id>/model); not a stage. Output and "doubtful": README, docs/serving.md."""

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from stages.common import paths
from stages.common.cli import run_stage, signals_held
from stages.common.errors import StageError, first_line
from stages.lib import tracking
from stages.lib.digit_images import load_image, to_mnist
from stages.lib.model import load_model
from stages.lib.tensorflow_setup import import_tensorflow

# The baseline's answers under 90 % are right 71 % of the time, the others 99.2 % (docs/serving.md); under 80 %,
# 6 % of its answers, 61 % against 98.8 %.
DOUBTFUL_BELOW = 0.9


def model_input(digits: np.ndarray) -> np.ndarray:
    """uint8 digits (n, 28, 28) -> what the model takes: uint8 images (n, 28, 28, 1); it scales them itself."""
    return digits.astype(np.uint8)[..., np.newaxis]


def load_predictor(model: str) -> Callable[[np.ndarray], np.ndarray]:
    """The model as a function from model inputs to probabilities (n, 10): a .keras file by Keras, else by MLflow."""
    import_tensorflow()
    if Path(model).suffix == ".keras" and not urlparse(model).scheme:
        if model != str(paths.MODEL) and not Path(model).is_file():
            raise StageError(f"{model}: file not found")  # load_model's hint, `dvc repro`, is for the default
        keras_model = load_model(Path(model))
        return lambda inputs: keras_model.predict(inputs, verbose=0)
    uri, database = tracking.tracking_uri(), tracking.repo_root() / tracking.DATABASE
    if not os.environ.get("MLFLOW_TRACKING_URI") and not database.is_file():  # MLflow would create an empty one
        raise StageError(
            f"{model}: no MLflow store at {database} (run from the repository root, or set MLFLOW_TRACKING_URI)"
        )
    for name, value in tracking.CONNECT_SETTINGS.items():  # fail in seconds if a server is down; the user's win
        os.environ.setdefault(name, value)
    import mlflow

    mlflow.set_tracking_uri(uri)
    try:
        pyfunc_model = mlflow.pyfunc.load_model(model)
    except Exception as exc:  # MlflowException for unknown runs and models, OSError for paths...
        raise StageError(f"{model}: cannot load the MLflow model (tracking store {uri}): {first_line(exc)}") from exc
    return lambda inputs: np.asarray(pyfunc_model.predict(inputs))


def describe(probabilities: np.ndarray) -> str:
    """`7  (7 98.1%, 2 1.2%, 3 0.4%)`: the digit, then the three likeliest; `  doubtful` if under DOUBTFUL_BELOW."""
    top = np.argsort(-probabilities, kind="stable")[:3]
    doubtful = "  doubtful" if probabilities[top[0]] < DOUBTFUL_BELOW else ""
    return f"{top[0]}  ({', '.join(f'{digit} {probabilities[digit]:.1%}' for digit in top)}){doubtful}"


def main(model: str, images: list[str]) -> None:
    predict = load_predictor(model)
    names, digits = [], []
    for name in images:
        try:
            digits.append(to_mnist(load_image(name)))
            names.append(name)
        except StageError as exc:  # this image only: the others are still answered
            print(f"predict: error: {exc}", file=sys.stderr, flush=True)
    if digits:
        with signals_held():
            probabilities = predict(model_input(np.stack(digits)))
        for name, row in zip(names, probabilities, strict=True):
            print(f"{name}: {describe(row)}")
    if len(names) < len(images):
        raise SystemExit(1)


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=str(paths.MODEL), help="a .keras file or an MLflow model URI (default: %(default)s)"
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files, one digit each")


if __name__ == "__main__":
    run_stage("predict", __doc__, main, arguments=arguments)
