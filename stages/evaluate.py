"""evaluate: models/model.keras on data/prepared/test.tfrecord -> metrics/evaluate.json, per-class
metrics and the confusion matrix; recorded in the MLflow run that trained the model (test metrics,
the per-class table, the confusion matrix figure)."""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from stages.common import paths
from stages.common.cli import Timer, log, run_stage, signals_held
from stages.common.dataset import NUM_CLASSES, Examples
from stages.common.errors import StageError
from stages.common.outputs import write_csv, write_json
from stages.common.params import Params, load_params
from stages.lib import tracking
from stages.lib.input_pipeline import evaluation_dataset, load_examples, recorded_count
from stages.lib.model import load_model
from stages.lib.tensorflow_setup import import_tensorflow
from stages.lib.tracking_process import TrackingClient
from stages.lib.workspace import check_params_unchanged, claim_workspace

if TYPE_CHECKING:
    import keras
    import matplotlib.figure

# In the run, one table rather than 20 per-class metrics (each of which the MLflow UI draws as a chart).
PER_CLASS_TABLE = "per_class.json"
KERAS_EPSILON = 1e-7  # keras.config.epsilon(): how far from 0 and 1 its cross-entropy clips probabilities


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray) -> np.ndarray:
    """matrix[actual, predicted] = count."""
    flat = labels.astype(np.int64) * NUM_CLASSES + predictions.astype(np.int64)
    return np.bincount(flat, minlength=NUM_CLASSES**2).reshape(NUM_CLASSES, NUM_CLASSES)


def per_class_metrics(matrix: np.ndarray) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support (test images of the digit) of each digit; 0.0 where the digit
    is never predicted / never present."""
    correct = np.diag(matrix).astype(float)
    predicted, actual = matrix.sum(axis=0), matrix.sum(axis=1)
    precision = np.divide(correct, predicted, out=np.zeros(NUM_CLASSES), where=predicted > 0)
    recall = np.divide(correct, actual, out=np.zeros(NUM_CLASSES), where=actual > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros(NUM_CLASSES), where=both > 0)
    return {
        str(d): {"precision": float(precision[d]), "recall": float(recall[d]), "f1": float(f1[d]), "support": int(n)}
        for d, n in enumerate(actual)
    }


def per_class_table(per_class: dict[str, dict[str, float]]) -> dict[str, list]:
    """One row per digit, in the format of mlflow.log_table (pandas' "split" JSON without index).
    Rounded to 4 decimals (one test image of a digit is about 0.001), so the UI's columns stay narrow."""
    columns = ["digit", *next(iter(per_class.values()))]
    return {"columns": columns, "data": [[int(d), *(round(v, 4) for v in m.values())] for d, m in per_class.items()]}


def portable_probabilities(model: keras.Model, examples: Examples) -> np.ndarray:
    """The model's output, each image's probability of each digit, with the same bits on every x86-64 CPU.
    Keras' softmax layer (TensorFlow's Eigen kernel) multiplies by 1 / sum, computed from the CPU's approximate
    reciprocal instruction (RCPPS), whose bits differ between Intel, AMD and emulators (docs/determinism.md);
    here the last layer's logits are exponentiated and divided by their sum, which IEEE rounds exactly."""
    import keras
    import tensorflow as tf

    output = model.layers[-1]  # Dense(10, softmax), build_model's last layer
    features = keras.Model(model.inputs, output.input).predict(evaluation_dataset(examples), verbose=0)
    logits = tf.matmul(features, output.kernel) + output.bias
    exponentials = tf.exp(logits - tf.reduce_max(logits, axis=1, keepdims=True))
    return (exponentials / tf.reduce_sum(exponentials, axis=1, keepdims=True)).numpy()


def evaluate(model: keras.Model, examples: Examples) -> dict[str, Any]:
    """Test loss (cross-entropy, probabilities clipped as Keras clips them) and accuracy, each image's
    predicted digit and its probabilities; every bit the same on every x86-64 CPU (docs/determinism.md)."""
    import tensorflow as tf

    probabilities = portable_probabilities(model, examples)
    predictions = np.argmax(probabilities, axis=1)
    labels = examples.labels.astype(np.int64)
    of_label = np.clip(
        probabilities[np.arange(len(labels)), labels].astype(np.float64), KERAS_EPSILON, 1 - KERAS_EPSILON
    )
    # TensorFlow's log, not NumPy's: NumPy's float64 log is its own SIMD code on AVX-512 CPUs and the C
    # library's elsewhere, 1 ulp apart on 0.3 % of values. fsum rounds the exact sum: no order to differ.
    losses = -tf.math.log(of_label).numpy()
    loss, accuracy = math.fsum(losses) / len(losses), np.mean(predictions == labels)
    return {
        "test_loss": loss,
        "test_accuracy": float(accuracy),
        "predictions": predictions,
        "probabilities": probabilities,
    }


def format_report(results: dict[str, Any], per_class: dict[str, dict[str, float]], matrix: np.ndarray) -> str:
    lines = [
        # The notebook's own line, for comparison.
        "Test loss: {:.2f}. Test accuracy: {:.2f}%".format(results["test_loss"], results["test_accuracy"] * 100.0),
        "digit  precision  recall      f1  support",
        *(
            f"{d:>5}  {m['precision']:9.4f}  {m['recall']:6.4f}  {m['f1']:6.4f}  {m['support']:7d}"
            for d, m in per_class.items()
        ),
        "confusion matrix (rows: actual, columns: predicted)",
        "     " + "".join(f"{d:>6}" for d in range(NUM_CLASSES)),
        *(f"{a:>5}" + "".join(f"{n:>6}" for n in row) for a, row in enumerate(matrix)),
    ]
    return "\n".join(lines)


def confusion_figure(matrix: np.ndarray) -> matplotlib.figure.Figure:
    # A Figure of its own, not pyplot's: pyplot and its backend machinery cost about 0.3 s to import.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 5.5))
    axes = figure.subplots()
    axes.imshow(matrix, cmap="Blues")
    for (actual, predicted), count in np.ndenumerate(matrix):
        color = "white" if count > matrix.max() / 2 else "black"
        axes.text(predicted, actual, str(count), ha="center", va="center", fontsize=7, color=color)
    axes.set(xticks=range(NUM_CLASSES), yticks=range(NUM_CLASSES), xlabel="predicted", ylabel="actual")
    axes.set_title("MNIST test set: confusion matrix")
    figure.tight_layout()
    return figure


def start_evaluation_run(params: Params, model_md5: str) -> None:
    """Reopen the run that trained the model (see tracking.find_training_run); if no run in this store
    trained it (a model pulled from elsewhere), start a new run that says so."""
    experiment_id = tracking.open_experiment(params.mlflow_experiment)
    import matplotlib.figure  # noqa: F401  (for log_evaluation's figure: imported here, while the stage predicts)

    training = tracking.find_training_run(experiment_id, model_md5)
    if training is not None:
        tracking.start_run(training.info.run_id)
        return
    log(
        "evaluate",
        f"warning: no MLflow run in {tracking.tracking_uri()} trained {paths.MODEL} (md5 {model_md5}); "
        "recording this evaluation in a new run",
    )
    tags = {
        tracking.EVALUATED_MODEL_TAG: model_md5,
        "mlflow.note.content": f"Evaluation only: no run in this store trained the model (md5 {model_md5}).",
    }
    name = f"{tracking.run_name()}-evaluate"
    tracking.start_run(params=params.as_dict(), tags=tags, experiment_id=experiment_id, run_name=name)


def log_evaluation(metrics: dict[str, float], per_class: dict[str, dict[str, float]], matrix: np.ndarray) -> None:
    """Test metrics, the per-class table and the confusion matrix figure, into the active run.
    The table as mlflow.log_table logs it, except that the file is replaced instead of the rows appended to
    it: evaluating the same run again (`dvc repro -f`) leaves one row per digit. Listed once in the run's tag
    mlflow.loggedArtifacts, which makes the UI show the file as a table."""
    import mlflow
    from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS

    mlflow.log_metrics(metrics)
    mlflow.log_dict(per_class_table(per_class), PER_CLASS_TABLE)
    run_id = mlflow.active_run().info.run_id
    logged = json.loads(mlflow.MlflowClient().get_run(run_id).data.tags.get(MLFLOW_LOGGED_ARTIFACTS, "[]"))
    entry = {"path": PER_CLASS_TABLE, "type": "table"}
    if entry not in logged:
        mlflow.set_tag(MLFLOW_LOGGED_ARTIFACTS, json.dumps([*logged, entry]))
    mlflow.log_figure(confusion_figure(matrix), "confusion_matrix.png", save_kwargs={"dpi": 100})


def main() -> None:
    timer = Timer()
    claim_workspace("evaluate")
    params = load_params()
    if not paths.MODEL.is_file():
        raise StageError(f"{paths.MODEL}: file not found (run `dvc repro train` to create it)")
    with TrackingClient("evaluate", params.mlflow_experiment) as mlflow_run:
        mlflow_run.start_run(start_evaluation_run, params, tracking.md5(paths.MODEL))
        import_tensorflow(params.numerics)
        with signals_held():
            model = load_model(paths.MODEL)
            test = load_examples(paths.PREPARED_TEST, recorded_count(paths.PREPARED_SUMMARY, "test", "count"))
            results = evaluate(model, test)
        matrix = confusion_matrix(test.labels, results["predictions"])
        per_class = per_class_metrics(matrix)
        print(format_report(results, per_class, matrix), flush=True)
        metrics = {"test_loss": results["test_loss"], "test_accuracy": results["test_accuracy"]}
        check_params_unchanged(params)
        mlflow_run.log(log_evaluation, metrics, per_class, matrix)
        experiment_id, run_id = mlflow_run.run_ids()
        write_json(paths.PER_CLASS_METRICS, per_class)
        # One row per test image, the layout DVC's confusion template plots.
        rows = zip(test.labels.tolist(), results["predictions"].tolist(), strict=True)
        write_csv(paths.CONFUSION, ["actual", "predicted"], rows)
        write_json(paths.EVALUATE_METRICS, metrics)
    log(
        "evaluate",
        f"test_accuracy {results['test_accuracy']:.4f} on {len(test.labels)} images; "
        f"recorded in MLflow run {run_id} in {timer}",
    )
    tracking.log_run_page("evaluate", experiment_id, run_id)


if __name__ == "__main__":
    run_stage("evaluate", __doc__, main)
