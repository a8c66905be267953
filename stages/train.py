"""train: data/split/*.tfrecord -> models/model.keras, metrics/train.json, metrics/train_history.csv; one MLflow run."""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from stages import import_tensorflow, paths, tracking
from stages.cli import Timer, log, run_stage, signals_held, stop_requested
from stages.mnist_data import Examples
from stages.model import build_model, prepare_for_inference
from stages.outputs import atomic_output, write_json
from stages.params import Params, load_params
from stages.records import evaluation_dataset, load_examples, scaled

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

HISTORY_COLUMNS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy")


def seed_everything(seed: int) -> None:
    """Same seed, same data => same weights: seeds Python, NumPy and TensorFlow; deterministic ops."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def training_dataset(examples: Examples, params: Params) -> tf.data.Dataset:
    """Batches scaled on the fly, reshuffled every epoch with `shuffle_buffer` and `seed`.

    The images stay in memory as one tensor; what is shuffled is their indices, and each batch is
    gathered at once. Same order as shuffling the examples themselves, at half the CPU cost.
    """
    import tensorflow as tf

    images, labels = tf.constant(examples.images), tf.constant(examples.labels)
    return (
        tf.data.Dataset.range(len(examples.labels))
        .shuffle(params.shuffle_buffer, seed=params.seed, reshuffle_each_iteration=True)
        .batch(params.batch_size)
        .map(lambda indices: scaled(tf.gather(images, indices), tf.gather(labels, indices)))
        .prefetch(tf.data.AUTOTUNE)
    )


def train(
    params: Params,
    train_examples: Examples,
    validation_examples: Examples,
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> tuple[keras.Model, list[dict[str, float]]]:
    """Seed, build and fit the model; return it with one row of metrics per epoch (epoch counts from 1)."""
    import keras

    seed_everything(params.seed)
    model = build_model(params)
    stop_on_signal = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: setattr(model, "stop_training", model.stop_training or stop_requested())
    )
    history = model.fit(
        training_dataset(train_examples, params),
        epochs=params.epochs,
        validation_data=evaluation_dataset(validation_examples),
        callbacks=[*callbacks, stop_on_signal],
        shuffle=False,  # the dataset shuffles, seeded
        verbose=2,
    ).history
    prepare_for_inference(model)
    rows = [
        {"epoch": epoch + 1, **{name: float(history[name][epoch]) for name in HISTORY_COLUMNS[1:]}}
        for epoch in range(len(history["loss"]))  # fewer than params.epochs if a signal stopped it
    ]
    return model, rows


def md5(path: Path) -> str:
    """The file's MD5, as DVC records it in dvc.lock, so a run can be matched to its data."""
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def write_history(path: Path, rows: list[dict[str, float]]) -> None:
    with atomic_output(path) as temporary, open(temporary, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=HISTORY_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def log_epoch(epoch: int, logs: dict[str, float]) -> None:
    """Per-epoch metrics to MLflow, asynchronously so training never waits for the store."""
    import mlflow

    metrics = {name: float(logs[name]) for name in HISTORY_COLUMNS[1:] if name in logs}
    mlflow.log_metrics(metrics, step=epoch + 1, synchronous=False)


def log_model(model: keras.Model, examples: Examples) -> str:
    """Log the Keras model as an MLflow model with signature and input example; return its URI."""
    import keras
    import mlflow
    import tensorflow as tf

    example = (examples.images[:5] / 255.0).astype("float32")
    signature = mlflow.models.infer_signature(example, model.predict(example, verbose=0))
    # MLflow predicts on the input example with Keras' progress bar on; keep it out of the log.
    keras.utils.disable_interactive_logging()
    try:
        info = mlflow.tensorflow.log_model(
            model,
            name="model",
            signature=signature,
            input_example=example,
            # Given explicitly: inferring them would load the model again in a subprocess (seconds).
            pip_requirements=[
                f"tensorflow=={tf.__version__}",
                f"keras=={keras.__version__}",
                f"mlflow=={mlflow.__version__}",
            ],
        )
    finally:
        keras.utils.enable_interactive_logging()
    return info.model_uri


def main() -> None:
    timer = Timer()
    params = load_params()
    experiment_id = tracking.connect(params.mlflow_experiment)
    import_tensorflow()
    import keras
    import mlflow

    with signals_held():
        train_examples = load_examples(paths.SPLIT_TRAIN)
        validation_examples = load_examples(paths.SPLIT_VALIDATION)
    log(
        "train",
        f"{len(train_examples.labels)} train / {len(validation_examples.labels)} validation records loaded in {timer}",
    )
    with tracking.recorded_run(experiment_id=experiment_id, run_name=tracking.run_name()) as run:
        mlflow.log_params(params.as_dict())
        mlflow.set_tags(
            {
                **tracking.source_tags(),
                "data.train.md5": md5(paths.SPLIT_TRAIN),
                "data.validation.md5": md5(paths.SPLIT_VALIDATION),
            }
        )
        with signals_held():  # a signal stops training at the end of the epoch, then is raised
            model, history = train(
                params, train_examples, validation_examples, [keras.callbacks.LambdaCallback(on_epoch_end=log_epoch)]
            )
        with signals_held():
            model_uri = log_model(model, validation_examples)
            with atomic_output(paths.MODEL) as temporary:
                model.save(temporary)
        write_history(paths.TRAIN_HISTORY, history)
        final = {name: history[-1][name] for name in HISTORY_COLUMNS[1:]}
        write_json(
            paths.TRAIN_METRICS,
            {"epochs": params.epochs, **final, "mlflow_run_id": run.info.run_id, "mlflow_model_uri": model_uri},
        )
    log(
        "train",
        f"{params.epochs} epochs: val_accuracy {final['val_accuracy']:.4f}, val_loss {final['val_loss']:.4f}; "
        f"wrote {paths.MODEL}; MLflow run {run.info.run_id} in {timer}",
    )


if __name__ == "__main__":
    run_stage("train", __doc__, main)
