"""The code the benchmark times, each run in a fresh process (`bench/run.py --worker NAME`).

A worker ends by printing RESULT_MARK and its result as JSON, on the last line of its output.
Nothing heavy is imported at module level: the notebook worker times its own imports.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from bench.repository import REPO as REPO_ROOT

RESULT_MARK = "BENCH-RESULT "  # a worker's last line: this mark, then its result as JSON
# The notebook's hyperparameters; the pipeline worker enforces them whatever params.yaml says.
NOTEBOOK_HYPERPARAMETERS = {
    "batch_size": 100,
    "hidden_layers": 2,
    "hidden_layer_size": 50,
    "learning_rate": 0.001,
    "shuffle_buffer": 10_000,
    "epochs": 5,
}


def make_epoch_timer() -> Any:
    """A Keras callback whose `seconds` lists each epoch's duration (training plus validation)."""
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.seconds: list[float] = []
            self._start = 0.0

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            self.seconds.append(time.perf_counter() - self._start)

    return EpochTimer()


def notebook_worker(num_epochs: int) -> dict[str, Any]:
    """The seed notebook's code as written, except that the data come from the committed IDX files."""
    start = time.perf_counter()
    import numpy as np
    import tensorflow as tf
    import tensorflow_datasets as tfds  # noqa: F401  (the notebook imports it; that costs seconds)

    imported = time.perf_counter()

    # tfds.load(name='mnist', as_supervised=True) cannot download here: the same images from the
    # committed IDX files, with the dtypes tfds gives (uint8 images (28, 28, 1), int64 labels).
    from stages.lib.mnist_sources import RAW_DIR, load_idx

    mnist = load_idx(REPO_ROOT / RAW_DIR)
    mnist_train = tf.data.Dataset.from_tensor_slices((mnist.train.images, mnist.train.labels.astype(np.int64)))
    mnist_test = tf.data.Dataset.from_tensor_slices((mnist.test.images, mnist.test.labels.astype(np.int64)))

    # From here on, the notebook.
    num_validation_samples = 0.1 * len(mnist.train.labels)
    num_validation_samples = tf.cast(num_validation_samples, tf.int64)

    num_test_samples = len(mnist.test.labels)
    num_test_samples = tf.cast(num_test_samples, tf.int64)

    def scale(image, label):
        image = tf.cast(image, tf.float32)
        image /= 255.0
        return image, label

    scaled_train_and_validation_data = mnist_train.map(scale)
    test_data = mnist_test.map(scale)

    BUFFER_SIZE = 10000
    shuffled_train_and_validation_data = scaled_train_and_validation_data.shuffle(BUFFER_SIZE)

    validation_data = shuffled_train_and_validation_data.take(num_validation_samples)
    train_data = shuffled_train_and_validation_data.skip(num_validation_samples)

    BATCH_SIZE = 100
    train_data = train_data.batch(BATCH_SIZE)
    validation_data = validation_data.batch(num_validation_samples)
    test_data = test_data.batch(num_test_samples)
    validation_inputs, validation_targets = next(iter(validation_data))
    loaded = time.perf_counter()

    output_size = 10
    hidden_layer_size = 50
    model = tf.keras.Sequential(
        [
            tf.keras.layers.Flatten(input_shape=(28, 28, 1)),
            tf.keras.layers.Dense(hidden_layer_size, activation="relu"),
            tf.keras.layers.Dense(hidden_layer_size, activation="relu"),
            tf.keras.layers.Dense(output_size, activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])

    NUM_EPOCHS = num_epochs
    timer = make_epoch_timer()  # the only addition
    model.fit(
        train_data,
        epochs=NUM_EPOCHS,
        validation_data=(validation_inputs, validation_targets),
        verbose=2,
        callbacks=[timer],
    )
    fitted = time.perf_counter()

    test_loss, test_accuracy = model.evaluate(test_data)
    print("Test loss: {:.2f}. Test accuracy: {:.2f}%".format(test_loss, test_accuracy * 100.0))
    evaluated = time.perf_counter()
    return {
        "epoch_seconds": timer.seconds,
        "test_accuracy": float(test_accuracy),
        "import_s": imported - start,
        "load_s": loaded - imported,
        "fit_s": fitted - loaded,
        "evaluate_s": evaluated - fitted,
    }


# The CNN winner's layers (docs/search.md): where the choice of kernels costs most.
CNN = {"conv_blocks": 2, "hidden_layers": 1, "hidden_layer_size": 128}


def pipeline_worker(
    deterministic: bool = True, tracked: bool = False, numerics: str = "portable", network: dict | None = None
) -> dict[str, Any]:
    """The train stage's own training and evaluation code, on the records in the current directory.

    `deterministic=False` measures what op determinism costs: `train` seeds without enabling it.
    `numerics` and `network` (params replacing the notebook's) measure what portable numerics cost.
    `tracked=True` logs every epoch into an MLflow run as the train stage does, in the store that
    MLFLOW_TRACKING_URI names (else the copy's mlflow.db), to measure what the store costs.
    """
    from stages import train as train_stage
    from stages.common import paths
    from stages.common.params import load_params
    from stages.evaluate import evaluate
    from stages.lib.input_pipeline import load_examples
    from stages.lib.tensorflow_setup import import_tensorflow

    import_tensorflow(numerics)  # as the train stage does
    if not deterministic:
        import keras

        train_stage.seed_everything = keras.utils.set_random_seed
    params = dataclasses.replace(load_params(), **NOTEBOOK_HYPERPARAMETERS, numerics=numerics)
    params = dataclasses.replace(params, **(network or {}))
    train_examples = load_examples(paths.SPLIT_TRAIN)
    validation_examples = load_examples(paths.SPLIT_VALIDATION)
    timer = make_epoch_timer()
    with contextlib.ExitStack() as tracking:
        callbacks = [timer]
        if tracked:  # as the train stage does: MLflow in a process of its own, given each epoch's metrics
            from stages.lib.tracking_process import TrackingClient

            mlflow_run = tracking.enter_context(TrackingClient("bench", params.mlflow_experiment))
            mlflow_run.start_run(train_stage.start_training_run, params)
            mlflow_run.run_ids()
            callbacks.insert(0, train_stage.epoch_reporter(mlflow_run))
        model, _ = train_stage.train(params, train_examples, validation_examples, callbacks=callbacks)
        if tracked:
            train_stage.save_model(model, paths.MODEL)
            mlflow_run.log(train_stage.log_model, paths.MODEL)
    results = evaluate(model, load_examples(paths.PREPARED_TEST))
    return {"epoch_seconds": timer.seconds, "test_accuracy": results["test_accuracy"]}


def dvc_imports_worker() -> dict[str, Any]:
    """`dvc repro` in this process, to see whether it imported TensorFlow."""
    from dvc.cli import main as dvc_main

    returncode = dvc_main(["repro"])
    return {"returncode": returncode, "tensorflow_imported": "tensorflow" in sys.modules}


# name -> worker, called with the number of epochs (which only the notebook and CNN workers use).
WORKERS: dict[str, Callable[[int], dict[str, Any]]] = {
    "notebook": notebook_worker,
    "pipeline-train": lambda epochs: pipeline_worker(),
    "pipeline-train-nondeterministic": lambda epochs: pipeline_worker(deterministic=False),
    "pipeline-train-tracked": lambda epochs: pipeline_worker(tracked=True),
    "pipeline-train-native": lambda epochs: pipeline_worker(numerics="native"),
    "cnn-train-portable": lambda epochs: pipeline_worker(network={**CNN, "epochs": epochs}),
    "cnn-train-native": lambda epochs: pipeline_worker(numerics="native", network={**CNN, "epochs": epochs}),
    "dvc-imports": lambda epochs: dvc_imports_worker(),
}


def run_worker(name: str, epochs: int) -> None:
    """Run one worker in this process and print its result line."""
    result = WORKERS[name](epochs)
    print(RESULT_MARK + json.dumps(result), flush=True)
