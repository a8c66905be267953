"""The model builder's search space: conv blocks, dropout, augmentation, the learning-rate schedule,
and the scaling inside the model. Synthetic data, seconds each."""

import dataclasses

import numpy as np
import pytest

from stages.lib.model import build_model
from stages.train import learning_rate, train
from tests.conftest import SMALL, repository_params, weights_equal


def layer_types(model):
    return [layer.__class__.__name__ for layer in model.layers]


def test_default_model_is_the_notebooks_network_taking_raw_pixels():
    model = build_model(repository_params())
    assert layer_types(model) == ["Rescaling", "Flatten", "Dense", "Dense", "Dense"]
    assert model.count_params() == 784 * 50 + 50 + 50 * 50 + 50 + 50 * 10 + 10
    assert model.inputs[0].dtype == "uint8"


def test_the_model_scales_uint8_pixels_itself():
    model = build_model(repository_params(hidden_layers=0))
    pixels = np.random.default_rng(0).integers(0, 256, size=(4, 28, 28, 1), dtype=np.uint8)
    kernel, bias = model.get_layer("output").get_weights()
    logits = (pixels.reshape(4, 784) / 255.0) @ kernel + bias
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(model.predict(pixels, verbose=0), expected, rtol=1e-4, atol=1e-6)


def test_two_conv_blocks_are_the_classic_small_mnist_cnn():
    model = build_model(repository_params(conv_blocks=2, conv_filters=32, hidden_layers=1, hidden_layer_size=128))
    conv = [layer for layer in model.layers if layer.__class__.__name__ == "Conv2D"]
    assert [layer.filters for layer in conv] == [32, 64]
    assert [layer.output.shape[1:] for layer in conv] == [(26, 26, 32), (11, 11, 64)]
    assert model.get_layer("flatten").output.shape[1:] == (5 * 5 * 64,)
    conv_params = (9 * 32 + 32) + (9 * 32 * 64 + 64)
    assert model.count_params() == conv_params + (1600 * 128 + 128) + (128 * 10 + 10)


def test_dropout_follows_each_hidden_layer_and_the_conv_blocks_and_is_off_at_inference():
    model = build_model(repository_params(conv_blocks=1, dropout=0.5))
    assert layer_types(model) == [
        "Rescaling", "Conv2D", "MaxPooling2D", "Flatten", "Dropout", "Dense", "Dropout", "Dense", "Dropout", "Dense"
    ]  # fmt: skip
    assert {layer.rate for layer in model.layers if layer.__class__.__name__ == "Dropout"} == {0.5}
    images = np.random.default_rng(0).integers(0, 256, size=(8, 28, 28, 1), dtype=np.uint8)
    np.testing.assert_array_equal(model.predict(images, verbose=0), model.predict(images, verbose=0))
    assert not np.allclose(model(images, training=True), model(images, training=False))


def test_augmentation_moves_training_images_only_and_is_seeded():
    params = repository_params(augment_shift=3, augment_rotation=15, seed=7)
    images = np.zeros((16, 28, 28, 1), dtype=np.uint8)
    images[:, 10:18, 12:16] = 255

    def augmented(model):
        shifted = model.get_layer("scale")(images)
        for name in ("shift", "rotate"):
            shifted = model.get_layer(name)(shifted, training=True)
        return np.asarray(shifted)

    first, second = augmented(build_model(params)), augmented(build_model(params))
    np.testing.assert_array_equal(first, second)  # same seed, same shifts and rotations
    assert not np.array_equal(first, augmented(build_model(repository_params(augment_shift=3, augment_rotation=15))))
    assert not np.allclose(first, images / 255.0)
    assert first.sum() < (images / 255.0).sum() * 1.01  # moved (and resampled), not brightened
    model = build_model(params)
    assert np.array_equal(model.get_layer("shift")(images / 255.0, training=False), images / 255.0)


def test_training_with_every_option_on_is_deterministic(small_data):
    params = dataclasses.replace(
        SMALL, conv_blocks=1, conv_filters=4, dropout=0.2, lr_schedule="cosine", augment_shift=2, augment_rotation=10
    )
    first, first_history = train(params, *small_data)
    second, second_history = train(params, *small_data)
    assert weights_equal(first, second)
    assert first_history == second_history
    assert first_history[-1]["val_accuracy"] > 0.3  # chance is 0.1


def test_cosine_schedule_decays_from_the_learning_rate_to_zero_over_the_run():
    schedule = learning_rate(repository_params(learning_rate=0.01, lr_schedule="cosine"), steps=100)
    assert float(schedule(0)) == pytest.approx(0.01)
    assert float(schedule(50)) == pytest.approx(0.005)
    assert float(schedule(100)) == pytest.approx(0.0, abs=1e-9)
    assert learning_rate(repository_params(learning_rate=0.01), steps=100) == 0.01
