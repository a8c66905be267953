"""The notebook's network, built from params: the one model builder every caller uses."""

from __future__ import annotations

from typing import TYPE_CHECKING

from stages.mnist_data import IMAGE_SHAPE, NUM_CLASSES
from stages.params import Params

if TYPE_CHECKING:
    import keras

# Up to 1000 optimizer steps per compiled call instead of one (a whole epoch at the notebook's
# batch size): Keras' per-step Python overhead dominates a model this small. Same batches, same
# order, same weights (see README: speed).
TRAINING_STEPS_PER_EXECUTION = 1000


def _compile(model: keras.Model, optimizer: keras.optimizers.Optimizer, steps_per_execution: int) -> None:
    model.compile(
        optimizer=optimizer,
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        steps_per_execution=steps_per_execution,
    )


def build_model(params: Params) -> keras.Model:
    """Flatten -> hidden_layers x Dense(hidden_layer_size, relu) -> Dense(10, softmax), compiled with Adam."""
    import keras

    layers = [keras.Input(shape=IMAGE_SHAPE, name="image"), keras.layers.Flatten()]
    layers += [
        keras.layers.Dense(params.hidden_layer_size, activation="relu", name=f"hidden_{i + 1}")
        for i in range(params.hidden_layers)
    ]
    layers.append(keras.layers.Dense(NUM_CLASSES, activation="softmax", name="output"))
    model = keras.Sequential(layers, name="mnist_dnn")
    _compile(model, keras.optimizers.Adam(learning_rate=params.learning_rate), TRAINING_STEPS_PER_EXECUTION)
    return model


def prepare_for_inference(model: keras.Model) -> None:
    """Recompile with one step per call (same optimizer, weights untouched) before saving: Keras'
    progress bar miscounts when steps_per_execution exceeds the steps of a predict() call."""
    _compile(model, model.optimizer, 1)
