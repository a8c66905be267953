"""The network, built from params (the one model builder every caller uses), or loaded from its file.

With the default params it is the notebook's: flatten -> 2 x Dense(50, relu) -> Dense(10, softmax).
The model takes raw uint8 pixels and scales them itself, so a served model cannot be fed the
wrong scale; augmentation layers are part of it too, and only act in training.
"""

from pathlib import Path
from typing import TYPE_CHECKING

from stages.common.dataset import IMAGE_SHAPE, NUM_CLASSES
from stages.common.errors import StageError, first_line
from stages.common.params import Params

if TYPE_CHECKING:
    import keras


def build_model(params: Params) -> "keras.Model":
    """uint8 image -> rescale to [0, 1] -> [random shift/rotation] -> conv_blocks x (conv, pool)
    -> flatten -> hidden_layers x (Dense(hidden_layer_size, relu), [dropout]) -> Dense(10, softmax);
    not compiled. The augmentation layers draw from `params.seed`."""
    import keras

    layers = [
        keras.Input(shape=IMAGE_SHAPE, dtype="uint8", name="image"),
        keras.layers.Rescaling(1 / 255, name="scale"),
    ]
    augmentation = {"fill_mode": "constant", "seed": params.seed}  # shifted-in pixels are background
    if params.augment_shift:
        factor = params.augment_shift / IMAGE_SHAPE[0]
        layers.append(keras.layers.RandomTranslation(factor, factor, name="shift", **augmentation))
    if params.augment_rotation:
        layers.append(keras.layers.RandomRotation(params.augment_rotation / 360, name="rotate", **augmentation))
    for i in range(params.conv_blocks):
        layers += [
            keras.layers.Conv2D(params.conv_filters * 2**i, 3, activation="relu", name=f"conv_{i + 1}"),
            keras.layers.MaxPooling2D(2, name=f"pool_{i + 1}"),
        ]
    layers.append(keras.layers.Flatten(name="flatten"))
    if params.conv_blocks and params.dropout:
        layers.append(keras.layers.Dropout(params.dropout, seed=params.seed, name="conv_dropout"))
    for i in range(params.hidden_layers):
        layers.append(keras.layers.Dense(params.hidden_layer_size, activation="relu", name=f"hidden_{i + 1}"))
        if params.dropout:
            layers.append(keras.layers.Dropout(params.dropout, seed=params.seed, name=f"dropout_{i + 1}"))
    layers.append(keras.layers.Dense(NUM_CLASSES, activation="softmax", name="output"))
    return keras.Sequential(layers, name="mnist_dnn")


def load_model(path: Path) -> "keras.Model":
    import keras

    if not Path(path).is_file():
        raise StageError(f"{path}: file not found (run `dvc repro train` to create it)")
    try:
        return keras.models.load_model(path)
    except Exception as exc:  # Keras raises ValueError, OSError, zipfile errors... for a bad file
        raise StageError(f"{path}: not a loadable Keras model: {first_line(exc)}") from exc
