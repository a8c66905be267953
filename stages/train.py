"""train: data/split/*.tfrecord -> models/model.keras, metrics/train.json, metrics/train_history.csv; one MLflow run."""

from __future__ import annotations

import json
import math
import os
import re
import warnings
import zipfile
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

from stages.common import paths
from stages.common.cli import Timer, log, run_stage, signals_held, stop_requested
from stages.common.dataset import NUM_CLASSES, Examples
from stages.common.outputs import atomic_output, write_csv, write_json
from stages.common.params import Params, load_params
from stages.lib import tracking
from stages.lib.input_pipeline import evaluation_dataset, load_examples, recorded_count, training_dataset
from stages.lib.model import build_model
from stages.lib.tensorflow_setup import import_tensorflow
from stages.lib.tracking_process import TrackingClient
from stages.lib.workspace import check_params_unchanged, claim_workspace

if TYPE_CHECKING:
    import keras

HISTORY_COLUMNS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy")
METRICS = HISTORY_COLUMNS[1:]  # of each epoch

# Up to 1000 optimizer steps per compiled call instead of one (a whole epoch at the notebook's
# batch size): Keras' per-step Python overhead dominates a model this small. Same batches, same
# order, same weights (see docs/speed.md).
TRAINING_STEPS_PER_EXECUTION = 1000

# What the saved model file records instead of the save time, so that same weights => same bytes.
FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
FIXED_DATE_SAVED = "1980-01-01@00:00:00"


def seed_everything(seed: int) -> None:
    """Same seed, same data => same weights: seeds Python, NumPy and TensorFlow; deterministic ops."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def compile_model(model: keras.Model, optimizer: keras.optimizers.Optimizer, steps_per_execution: int) -> None:
    model.compile(
        optimizer=optimizer,
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        steps_per_execution=steps_per_execution,
    )


def learning_rate(params: Params, steps: int) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """Adam's learning rate: constant, or cosine decay from `learning_rate` to 0 over the run's `steps`."""
    import keras

    if params.lr_schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(params.learning_rate, decay_steps=steps)
    return params.learning_rate


def train(
    params: Params,
    train_examples: Examples,
    validation_examples: Examples,
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> tuple[keras.Model, list[dict[str, float]]]:
    """Seed, build, compile and fit the model; return it with one row of metrics per epoch (from 1)."""
    import keras

    seed_everything(params.seed)
    model = build_model(params)
    steps = params.epochs * math.ceil(len(train_examples.labels) / params.batch_size)
    optimizer = keras.optimizers.Adam(learning_rate=learning_rate(params, steps))
    compile_model(model, optimizer, TRAINING_STEPS_PER_EXECUTION)
    if params.early_stopping_patience > 0:  # keeps the best epoch's weights (the first of equal ones)
        stop_early = keras.callbacks.EarlyStopping(
            monitor="val_accuracy", mode="max", patience=params.early_stopping_patience, restore_best_weights=True
        )
        callbacks = [*callbacks, stop_early]
    stop_on_signal = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: setattr(model, "stop_training", model.stop_training or stop_requested())
    )
    history = model.fit(
        training_dataset(train_examples, params.batch_size, params.shuffle_buffer, params.seed),
        epochs=params.epochs,
        validation_data=evaluation_dataset(validation_examples),
        callbacks=[*callbacks, stop_on_signal],
        shuffle=False,  # the dataset shuffles, seeded
        verbose=2,
    ).history
    # Saved for inference with one step per call (same optimizer, weights untouched): Keras'
    # progress bar miscounts when steps_per_execution exceeds the steps of a predict() call.
    compile_model(model, model.optimizer, 1)
    rows = [
        {"epoch": epoch + 1, **{name: float(history[name][epoch]) for name in METRICS}}
        for epoch in range(len(history["loss"]))  # fewer than params.epochs if a signal stopped it
    ]
    return model, rows


def kept_epoch(params: Params, history: list[dict[str, float]]) -> dict[str, float]:
    """The history row of the epoch whose weights the model keeps: the last one, or with early stopping
    the first with the highest val_accuracy (as Keras' EarlyStopping picks it)."""
    if params.early_stopping_patience == 0:
        return history[-1]
    return max(history, key=lambda row: (row["val_accuracy"], -row["epoch"]))


def save_model(model: keras.Model, path: Path) -> None:
    """Save as .keras, atomically, so that same weights => same bytes: Keras writes the save time into
    metadata.json and every zip entry's header, and numbers shared objects by memory address (renumbered
    here 1, 2, ... in order of appearance: the ids only pair up the references to one object)."""
    numbers: dict[bytes, int] = {}

    def renumber(match: re.Match) -> bytes:
        return b'"shared_object_id": %d' % numbers.setdefault(match[1], len(numbers) + 1)

    with atomic_output(path) as temporary:
        model.save(temporary)
        with zipfile.ZipFile(temporary) as saved:
            entries = [(entry, saved.read(entry)) for entry in saved.infolist()]
        with zipfile.ZipFile(temporary, "w") as pinned:
            for entry, content in entries:
                if entry.filename == "metadata.json":
                    content = json.dumps({**json.loads(content), "date_saved": FIXED_DATE_SAVED}).encode()
                elif entry.filename == "config.json":
                    content = re.sub(rb'"shared_object_id": (\d+)', renumber, content)
                fixed = zipfile.ZipInfo(entry.filename, date_time=FIXED_ZIP_TIME)
                fixed.compress_type, fixed.external_attr = entry.compress_type, entry.external_attr
                pinned.writestr(fixed, content)


def start_training_run(params: Params) -> None:
    """Start the training run: its params, where it came from, the data's MD5s."""
    splits = {"train": paths.SPLIT_TRAIN, "validation": paths.SPLIT_VALIDATION}
    data_tags = {f"data.{name}.md5": tracking.md5(path) for name, path in splits.items()}
    tracking.start_run(params=params.as_dict(), tags=data_tags)


def log_model(saved: Path) -> None:
    """Log the saved model file as an MLflow model (stages/lib/served_model.py) with its signature, 10
    probabilities out, and tag the run with the file's MD5. No input schema: the model checks its input
    itself (see served_model.py)."""
    import mlflow
    import numpy as np
    from mlflow.types import Schema, TensorSpec

    # Written out, not inferred, and no input example: MLflow would run the model to infer the
    # one and load it back from the logged copy to validate the other (together about a second).
    signature = mlflow.models.ModelSignature(outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, NUM_CLASSES))]))
    with warnings.catch_warnings():  # that no input example was given: left out on purpose (above)
        warnings.filterwarnings("ignore", message=".*An input example was not provided", category=UserWarning)
        mlflow.pyfunc.log_model(
            name="model",
            python_model=Path(__file__).parent / "lib" / "served_model.py",
            artifacts={"keras_model": str(saved)},
            signature=signature,
            # Given explicitly: inferring them would load the model again in a subprocess (seconds).
            pip_requirements=[f"{name}=={version(name)}" for name in ("tensorflow", "keras", "mlflow")],
        )
    mlflow.set_tag(tracking.MODEL_TAG, tracking.md5(saved))


def read_split() -> tuple[Examples, Examples]:
    """The training and validation records, checked against the counts split wrote."""
    return tuple(
        load_examples(path, recorded_count(paths.SPLIT_SUMMARY, name))
        for path, name in ((paths.SPLIT_TRAIN, "train"), (paths.SPLIT_VALIDATION, "validation"))
    )


def train_metrics(params: Params, history: list[dict[str, float]]) -> dict[str, float]:
    """metrics/train.json: the epochs asked for and the metrics of the epoch the model keeps (with early
    stopping, which one)."""
    kept = kept_epoch(params, history)
    stopped = {"kept_epoch": kept["epoch"]} if params.early_stopping_patience else {}
    return {"epochs": params.epochs, **stopped, **{name: kept[name] for name in METRICS}}


def epoch_reporter(mlflow_run: TrackingClient) -> keras.callbacks.Callback:
    """Each epoch's metrics to the run, and with EPOCH_JSON_ENV set, to stdout for a program (stages.tune)."""
    import keras

    def report(epoch: int, logs: dict[str, float]) -> None:
        metrics = {name: float(logs[name]) for name in METRICS if name in logs}
        mlflow_run.log_epoch(epoch + 1, metrics)
        if os.environ.get(tracking.EPOCH_JSON_ENV):
            print(tracking.EPOCH_LINE_PREFIX + json.dumps({"epoch": epoch + 1, **metrics}), flush=True)

    return keras.callbacks.LambdaCallback(on_epoch_end=report)


def main() -> None:
    timer = Timer()
    claim_workspace("train")
    params = load_params()
    saved = False
    try:
        with TrackingClient("train", params.mlflow_experiment) as mlflow_run:
            import_tensorflow(params.numerics)
            with signals_held():
                train_examples, validation_examples = read_split()
            counts = f"{len(train_examples.labels)} train / {len(validation_examples.labels)} validation"
            log("train", f"{counts} records loaded in {timer}")
            # Only now: a bad input records no run, and a store that refuses us costs no training.
            mlflow_run.start_run(start_training_run, params)
            experiment_id, run_id = mlflow_run.run_ids()
            with signals_held():  # a signal stops training at the end of the epoch, then is raised
                model, history = train(params, train_examples, validation_examples, [epoch_reporter(mlflow_run)])
            check_params_unchanged(params)
            with signals_held():
                save_model(model, paths.MODEL)
                saved = True
            mlflow_run.log(log_model, paths.MODEL)
    except BaseException:
        if saved:  # a model without its complete run, and without its metrics: half of a result
            paths.MODEL.unlink()
        raise
    write_csv(paths.TRAIN_HISTORY, HISTORY_COLUMNS, [[row[name] for name in HISTORY_COLUMNS] for row in history])
    final = train_metrics(params, history)
    write_json(paths.TRAIN_METRICS, final)
    log(
        "train",
        f"{params.epochs} epoch{'s' if params.epochs > 1 else ''}: "
        f"val_accuracy {final['val_accuracy']:.4f}, val_loss {final['val_loss']:.4f}; "
        f"wrote {paths.MODEL} (md5 {tracking.md5(paths.MODEL)}); MLflow run {run_id} in {timer}",
    )
    tracking.log_run_page("train", experiment_id, run_id)


if __name__ == "__main__":
    run_stage("train", __doc__, main)
