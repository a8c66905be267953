"""The MLflow model that train logs, as MLflow's "models from code" (this file is copied into the model, so it
imports nothing of ours): the `.keras` file that DVC versions, predicting without Keras' progress bar, checking its
input itself. The signature has no input schema: MLflow's server casts JSON and CSV to the schema's dtype first,
and a cast to uint8 turns 0.5 into 0 without a word."""

import os

import mlflow
import numpy as np
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

SIDE = 28
SHAPES = {(SIDE, SIDE, 1), (SIDE, SIDE), (SIDE * SIDE,)}  # one image: the model's, no channel, a table row


class InvalidInput(mlflow.exceptions.MlflowException):
    """Bad input: MLflow's server answers HTTP 400 with this message alone. (It sets every MlflowException's
    message to "Failed to predict data '<the whole input, printed>'. Error: <message>": `message` ignores that.)"""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    message = property(lambda self: self.args[0], lambda self, _: None)


def images(model_input) -> np.ndarray:
    """The uint8 images (n, 28, 28, 1) in `model_input`: n images of whole numbers 0-255 (7.0 too: JSON and CSV
    do not tell it from 7) as an array or a DataFrame (the server's `dataframe_split` and CSV); else InvalidInput."""
    pixels = np.asarray(model_input.to_numpy() if hasattr(model_input, "to_numpy") else model_input)
    if pixels.shape[1:] not in SHAPES:
        raise InvalidInput(
            f"expected images of shape (n, 28, 28, 1), (n, 28, 28) or (n, 784), or a table of 784 columns; "
            f"got shape {pixels.shape}"
        )
    if pixels.dtype.kind not in "uif":
        kind = {"U": "text", "S": "text", "b": "true/false", "O": "mixed or missing values"}.get(pixels.dtype.kind)
        raise InvalidInput(f"pixels must be numbers (gray levels 0-255); got {kind or pixels.dtype}")
    flat = pixels.reshape(len(pixels), -1)
    bad = ~((flat >= 0) & (flat <= 255) & (flat == np.round(flat)))  # NaN is bad too
    if bad.any():
        image, pixel = np.argwhere(bad)[0]
        raise InvalidInput(
            f"pixels must be whole numbers from 0 to 255 (raw gray levels, not scaled to 0-1); "
            f"image {image} has {flat[image, pixel]:g} at row {pixel // SIDE}, column {pixel % SIDE}"
        )
    if (faint := np.flatnonzero(flat.max(axis=1) == 1)).size:
        raise InvalidInput(
            f"image {faint[0]}'s brightest pixel is 1: pixels look scaled to 0-1; send raw gray levels 0-255"
        )
    return flat.reshape(-1, SIDE, SIDE, 1).astype(np.uint8)


class DigitClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        # TensorFlow's C++ logs, "failed call to cuInit" on every machine without a GPU among them, would fill
        # the server's output with nothing to act on; failures still raise. TF_CPP_MIN_LOG_LEVEL=0 shows them.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        import keras

        self.model = keras.models.load_model(context.artifacts["keras_model"])

    # model_input is an array, or a DataFrame for `dataframe_split` and CSV; np.ndarray is a hint that MLflow
    # takes as "no schema" (a union would make it warn, and no hint too).
    def predict(self, context: mlflow.pyfunc.PythonModelContext, model_input: np.ndarray, params: dict | None = None):
        """Class probabilities, shape (n, 10), for n images (see `images`)."""
        return self.model.predict(images(model_input), verbose=0)


mlflow.models.set_model(DigitClassifier())
