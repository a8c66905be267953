"""The notebook's network, built from params: the one model builder every caller uses."""

from __future__ import annotations

from typing import TYPE_CHECKING

from stages.common.dataset import IMAGE_SHAPE, NUM_CLASSES
from stages.common.params import Params

if TYPE_CHECKING:
    import keras


def build_model(params: Params) -> keras.Model:
    """Flatten -> hidden_layers x Dense(hidden_layer_size, relu) -> Dense(10, softmax); not compiled."""
    import keras

    layers = [keras.Input(shape=IMAGE_SHAPE, name="image"), keras.layers.Flatten()]
    layers += [
        keras.layers.Dense(params.hidden_layer_size, activation="relu", name=f"hidden_{i + 1}")
        for i in range(params.hidden_layers)
    ]
    layers.append(keras.layers.Dense(NUM_CLASSES, activation="softmax", name="output"))
    return keras.Sequential(layers, name="mnist_dnn")
