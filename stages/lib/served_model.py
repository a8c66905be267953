"""The MLflow model that train logs (MLflow's "models from code": this file is copied into the
model and run by `mlflow.pyfunc.load_model` and `mlflow models serve`; it imports nothing of ours).

It wraps the very `.keras` file that DVC versions and predicts without Keras' progress bar,
which the TensorFlow flavour prints on every call.
"""

import mlflow
import numpy as np


class DigitClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        import keras

        self.model = keras.models.load_model(context.artifacts["keras_model"])

    def predict(self, context: mlflow.pyfunc.PythonModelContext, model_input: np.ndarray, params: dict | None = None):
        """Class probabilities, shape (n, 10), for images of shape (n, 28, 28, 1)."""
        return self.model.predict(np.asarray(model_input), verbose=0)


mlflow.models.set_model(DigitClassifier())
