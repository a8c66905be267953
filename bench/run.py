"""Benchmark: the seed notebook against the DVC pipeline, measured side by side on this machine.

Run from the repository root with the virtualenv's python (its bin directory on PATH):

    python bench/run.py [--repeats N] [--quick] [--out bench/results/latest.json]

What it measures (every figure `--repeats` times; table of median / min / max; same as JSON):

1. notebook loop: the notebook's tf.data + Keras code as written, on the committed MNIST arrays
   (tfds cannot download here); per-epoch times from a Keras callback, and test accuracy.
2. pipeline train: `stages.train.train` on the split records, `stages.evaluate.evaluate` on the
   test records, same hyperparameters; same callback.
3. notebook script: wall time of the whole process of 1 (imports, data, fit, evaluate, print).
   Figures 1 and 3 come from the same processes: the callback costs nothing measurable.
4. cold `dvc repro`: all four stages, outputs and every DVC cache removed first.
5. `dvc exp run -S epochs=10` with the data stages up to date, against the notebook script
   with NUM_EPOCHS = 10. `dvc exp run` has no `--no-run-cache`, and a new seed would also
   rerun `split`; so the run cache (.dvc/cache/runs) is deleted before each repetition, and the
   command timed is exactly `dvc exp run -S epochs=10`.
6. no-op `dvc repro` (everything up to date); one extra in-process run checks that it imports
   no TensorFlow.
7. peak memory (max RSS, from os.wait4) and wall time of each stage, run as `python -m stages.<name>`.

DVC only ever runs in a throwaway git copy of the repository (tracked files plus data/raw),
never in the repository itself; MLflow records into that copy's mlflow.db.
Each repetition of 1 and 2 is a fresh process: the script calls itself with `--worker`.
Every subprocess's output is kept in `<out without .json>-logs/`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, NamedTuple

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # `python bench/run.py` puts bench/, not the root, on sys.path

STAGES = ("prepare", "split", "train", "evaluate")
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

# key -> (label, unit), in table order.
FIGURES = {
    "notebook_epoch_s": ("notebook loop: epoch time, median of epochs 2-5", "s"),
    "pipeline_epoch_s": ("pipeline train: epoch time, median of epochs 2-5", "s"),
    "notebook_first_epoch_s": ("notebook loop: first epoch", "s"),
    "pipeline_first_epoch_s": ("pipeline train: first epoch", "s"),
    "notebook_test_accuracy": ("notebook loop: test accuracy", "%"),
    "pipeline_test_accuracy": ("pipeline train: test accuracy", "%"),
    "nondeterministic_epoch_s": ("pipeline train, op determinism off: epoch time, 2-5", "s"),
    "nondeterministic_first_epoch_s": ("pipeline train, op determinism off: first epoch", "s"),
    "notebook_script_s": ("notebook script, whole, 5 epochs", "s"),
    "notebook_import_s": ("  of which: import tensorflow + tensorflow_datasets", "s"),
    "notebook_load_s": ("  of which: load data, build tf.data pipeline", "s"),
    "notebook_fit_s": ("  of which: model.fit", "s"),
    "notebook_evaluate_s": ("  of which: model.evaluate", "s"),
    "dvc_repro_cold_s": ("cold dvc repro (4 stages)", "s"),
    "dvc_repro_cold_rss_mib": ("cold dvc repro: max RSS of any process", "MiB"),
    "notebook_script_10_s": ("notebook script, whole, 10 epochs", "s"),
    "dvc_exp_run_10_s": ("dvc exp run -S epochs=10", "s"),
    "dvc_repro_noop_s": ("no-op dvc repro", "s"),
    **{f"stage_{name}_s": (f"stage {name}: wall time", "s") for name in STAGES},
    **{f"stage_{name}_rss_mib": (f"stage {name}: max RSS", "MiB") for name in STAGES},
}


class BenchError(Exception):
    """A measurement could not be taken (a command failed or did something unexpected)."""


# --------------------------------------------------------------------------------------------
# Workers: each runs in a fresh process and ends by printing RESULT_MARK + JSON.
# --------------------------------------------------------------------------------------------


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
    from stages.mnist_data import RAW_DIR, load_idx

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


def pipeline_worker(deterministic: bool = True) -> dict[str, Any]:
    """The train stage's own training and evaluation code, on the records in the current directory.

    `deterministic=False` measures what op determinism costs: the one call that enables it is skipped.
    """
    from stages import import_tensorflow, paths
    from stages.evaluate import evaluate
    from stages.params import load_params
    from stages.records import load_examples
    from stages.train import train

    tf = import_tensorflow()
    if not deterministic:
        tf.config.experimental.enable_op_determinism = lambda: None
    params = dataclasses.replace(load_params(), **NOTEBOOK_HYPERPARAMETERS)
    train_examples = load_examples(paths.SPLIT_TRAIN)
    validation_examples = load_examples(paths.SPLIT_VALIDATION)
    timer = make_epoch_timer()
    model, _ = train(params, train_examples, validation_examples, callbacks=[timer])
    results = evaluate(model, load_examples(paths.PREPARED_TEST))
    return {"epoch_seconds": timer.seconds, "test_accuracy": results["test_accuracy"]}


def dvc_imports_worker() -> dict[str, Any]:
    """`dvc repro` in this process, to see whether it imported TensorFlow."""
    from dvc.cli import main as dvc_main

    returncode = dvc_main(["repro"])
    return {"returncode": returncode, "tensorflow_imported": "tensorflow" in sys.modules}


WORKERS = {
    "notebook": lambda args: notebook_worker(args.epochs),
    "pipeline-train": lambda args: pipeline_worker(),
    "pipeline-train-nondeterministic": lambda args: pipeline_worker(deterministic=False),
    "dvc-imports": lambda args: dvc_imports_worker(),
}


# --------------------------------------------------------------------------------------------
# Running commands
# --------------------------------------------------------------------------------------------


class Measured(NamedTuple):
    seconds: float
    max_rss_mib: float  # of the process or any of its descendants
    output: str  # stdout and stderr together


def subprocess_env() -> dict[str, str]:
    """This environment, with the venv first on PATH and nothing that would redirect MLflow or DVC."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in ("MLFLOW_TRACKING_URI", "DVC_ROOT") and not name.startswith("DVC_EXP")
    }
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    return env


class Runner:
    """Runs commands with wall time and max RSS measured, keeping each one's output in a log folder."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.env = subprocess_env()
        log_dir.mkdir(parents=True, exist_ok=True)

    def run(self, command: list[str], cwd: Path, log_name: str) -> Measured:
        with tempfile.TemporaryFile() as output:
            start = time.perf_counter()
            process = subprocess.Popen(command, cwd=cwd, env=self.env, stdout=output, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(process.pid, 0)  # unlike wait(), gives this child's resource usage
            seconds = time.perf_counter() - start
            process.returncode = os.waitstatus_to_exitcode(status)
            output.seek(0)
            text = output.read().decode(errors="replace")
        (self.log_dir / f"{log_name}.log").write_text(f"$ {' '.join(command)}  (in {cwd})\n{text}")
        if process.returncode != 0:
            tail = "\n".join(text.splitlines()[-30:])
            raise BenchError(f"`{' '.join(command)}` in {cwd} exited with {process.returncode}:\n{tail}")
        return Measured(seconds, usage.ru_maxrss / 1024, text)  # ru_maxrss is in KiB on Linux

    def worker(self, name: str, cwd: Path, log_name: str, epochs: int = 5) -> tuple[Measured, dict[str, Any]]:
        """Run this script in worker mode in a fresh process; return the measurement and its result."""
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--epochs", str(epochs)]
        measured = self.run(command, cwd, log_name)
        for line in reversed(measured.output.splitlines()):
            if line.startswith(RESULT_MARK):
                return measured, json.loads(line[len(RESULT_MARK) :])
        raise BenchError(f"worker {name} printed no result line (see {self.log_dir / log_name}.log)")


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


def stages_run(output: str) -> list[str]:
    """Names of the stages DVC ran, from its "Running stage 'name':" lines."""
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]


# --------------------------------------------------------------------------------------------
# The throwaway repository DVC runs in
# --------------------------------------------------------------------------------------------


def make_repository_copy() -> Path:
    """A fresh git repository holding this repository's tracked files (as in the working tree) and data/raw."""
    copy = Path(tempfile.mkdtemp(prefix="mnist-bench-"))
    for name in git(REPO_ROOT, "ls-files", "-z").split("\0"):
        source = REPO_ROOT / name
        if name and source.is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copy / name)
    shutil.copytree(REPO_ROOT / "data" / "raw", copy / "data" / "raw", dirs_exist_ok=True)
    git(copy, "init", "-q")
    git(copy, "config", "user.name", "bench")  # `dvc exp run` commits experiments
    git(copy, "config", "user.email", "bench@localhost")
    git(copy, "add", "-A")
    git(copy, "commit", "-q", "-m", "bench: copy of the working tree")
    return copy


def dvc_site_cache_dir(copy: Path) -> Path:
    """Where DVC keeps this repository's file-hash state and data index (outside the repository)."""
    from dvc.repo import Repo

    with Repo(str(copy)) as repo:
        return Path(repo.site_cache_dir)


def make_cold(copy: Path, site_cache_dir: Path) -> None:
    """Remove every output, dvc.lock, DVC's caches (objects, run cache, hash state) and the MLflow store."""
    removable = ["data/prepared", "data/split", "models", "metrics", ".dvc/cache", ".dvc/tmp", "mlartifacts", "mlruns"]
    for name in removable:
        shutil.rmtree(copy / name, ignore_errors=True)
    for name in ["dvc.lock", "mlflow.db"]:
        (copy / name).unlink(missing_ok=True)
    shutil.rmtree(site_cache_dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------


class Check(NamedTuple):
    name: str
    value: float
    unit: str
    target: str
    passed: bool


def summarize(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def checks(samples: dict[str, list[float]]) -> list[Check]:
    """The targets, evaluated on medians (peak RSS: the largest value seen)."""
    m = {key: statistics.median(values) for key, values in samples.items()}
    peak_rss = max(max(samples[f"stage_{name}_rss_mib"]) for name in STAGES)
    accuracy_gap = m["pipeline_test_accuracy"] - m["notebook_test_accuracy"]  # already in percent
    ratios = [
        ("steady-state epoch time, pipeline / notebook loop", "pipeline_epoch_s", "notebook_epoch_s", 0.10),
        ("first epoch, pipeline / notebook", "pipeline_first_epoch_s", "notebook_first_epoch_s", 0.5),
        ("cold dvc repro / notebook script", "dvc_repro_cold_s", "notebook_script_s", 1.2),
        ("dvc exp run -S epochs=10 / notebook script 10 epochs", "dvc_exp_run_10_s", "notebook_script_10_s", 0.6),
    ]
    return [
        *(Check(name, m[a] / m[b], "x", f"<= {limit:.2f}", m[a] / m[b] <= limit) for name, a, b, limit in ratios),
        Check("no-op dvc repro", m["dvc_repro_noop_s"], "s", "<= 2 s", m["dvc_repro_noop_s"] <= 2),
        Check("peak RSS of any stage", peak_rss, "MiB", "<= 2048 MiB", peak_rss <= 2048),
        Check("test accuracy, pipeline - notebook", accuracy_gap, "points", "within +-0.5", abs(accuracy_gap) <= 0.5),
    ]


def progress(message: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {message}", flush=True)


def record_training(samples: dict[str, list[float]], prefix: str, result: dict[str, Any]) -> None:
    epochs = result["epoch_seconds"]
    samples[f"{prefix}_first_epoch_s"].append(epochs[0])
    samples[f"{prefix}_epoch_s"].append(statistics.median(epochs[1:]))
    samples[f"{prefix}_test_accuracy"].append(100 * result["test_accuracy"])


def measure(repeats: int, runner: Runner, keep_copy: bool) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Take every measurement `repeats` times; return the samples and facts observed on the way."""
    samples: dict[str, list[float]] = defaultdict(list)
    facts: dict[str, Any] = {}
    dvc = shutil.which("dvc", path=runner.env["PATH"])
    python = shutil.which("python", path=runner.env["PATH"])
    if dvc is None or python is None:
        raise BenchError("dvc or python not found on PATH (run with the virtualenv's python)")
    copy = make_repository_copy()
    site_cache_dir = dvc_site_cache_dir(copy)
    progress(f"repository copy for DVC: {copy}")
    try:
        for rep in range(1, repeats + 1):
            make_cold(copy, site_cache_dir)
            cold = runner.run([dvc, "repro"], copy, f"dvc-repro-cold-{rep}")
            if stages_run(cold.output) != list(STAGES):
                raise BenchError(f"cold dvc repro ran {stages_run(cold.output)}, expected all of {STAGES}")
            samples["dvc_repro_cold_s"].append(cold.seconds)
            samples["dvc_repro_cold_rss_mib"].append(cold.max_rss_mib)
            progress(f"cold dvc repro {rep}/{repeats}: {cold.seconds:.1f} s")

        for rep in range(1, repeats + 1):
            noop = runner.run([dvc, "repro"], copy, f"dvc-repro-noop-{rep}")
            if stages_run(noop.output):
                raise BenchError(f"no-op dvc repro ran stages {stages_run(noop.output)}")
            samples["dvc_repro_noop_s"].append(noop.seconds)
            progress(f"no-op dvc repro {rep}/{repeats}: {noop.seconds:.2f} s")
        _, imports = runner.worker("dvc-imports", copy, "dvc-repro-noop-imports")
        facts["noop_dvc_repro_imported_tensorflow"] = imports["tensorflow_imported"]
        progress(f"no-op dvc repro imported tensorflow: {imports['tensorflow_imported']}")
        git(copy, "add", "-A")
        git(copy, "commit", "-q", "-m", "bench: pipeline outputs (baseline for dvc exp run)")

        # Notebook and pipeline alternate, so that load from elsewhere hits both alike.
        for rep in range(1, repeats + 1):
            script, result = runner.worker("notebook", REPO_ROOT, f"notebook-5-epochs-{rep}")
            record_training(samples, "notebook", result)
            samples["notebook_script_s"].append(script.seconds)
            for phase in ("import", "load", "fit", "evaluate"):
                samples[f"notebook_{phase}_s"].append(result[f"{phase}_s"])
            progress(f"notebook 5 epochs {rep}/{repeats}: {script.seconds:.1f} s, epochs {_rounded(result)}")
            pipeline, result = runner.worker("pipeline-train", copy, f"pipeline-train-{rep}")
            record_training(samples, "pipeline", result)
            progress(f"pipeline train {rep}/{repeats}: {pipeline.seconds:.1f} s, epochs {_rounded(result)}")
            _, result = runner.worker("pipeline-train-nondeterministic", copy, f"pipeline-train-nondet-{rep}")
            record_training(samples, "nondeterministic", result)
            progress(f"pipeline train, op determinism off {rep}/{repeats}: epochs {_rounded(result)}")

        for rep in range(1, repeats + 1):
            script, _ = runner.worker("notebook", REPO_ROOT, f"notebook-10-epochs-{rep}", epochs=10)
            samples["notebook_script_10_s"].append(script.seconds)
            progress(f"notebook 10 epochs {rep}/{repeats}: {script.seconds:.1f} s")
            git(copy, "checkout", "-q", "HEAD", "--", ".")  # back to the baseline's params.yaml and dvc.lock
            shutil.rmtree(copy / ".dvc" / "cache" / "runs", ignore_errors=True)
            experiment = runner.run([dvc, "exp", "run", "-S", "epochs=10"], copy, f"dvc-exp-run-10-epochs-{rep}")
            if stages_run(experiment.output) != ["train", "evaluate"]:
                raise BenchError(f"dvc exp run ran {stages_run(experiment.output)}, expected train and evaluate")
            samples["dvc_exp_run_10_s"].append(experiment.seconds)
            progress(f"dvc exp run -S epochs=10 {rep}/{repeats}: {experiment.seconds:.1f} s")

        git(copy, "checkout", "-q", "HEAD", "--", ".")
        for rep in range(1, repeats + 1):
            for name in STAGES:
                stage = runner.run([python, "-m", f"stages.{name}"], copy, f"stage-{name}-{rep}")
                samples[f"stage_{name}_s"].append(stage.seconds)
                samples[f"stage_{name}_rss_mib"].append(stage.max_rss_mib)
                progress(f"stage {name} {rep}/{repeats}: {stage.seconds:.1f} s, {stage.max_rss_mib:.0f} MiB")
    finally:
        if keep_copy:
            progress(f"kept the repository copy: {copy}")
        else:
            shutil.rmtree(copy, ignore_errors=True)
            shutil.rmtree(site_cache_dir, ignore_errors=True)
    return samples, facts


def _rounded(result: dict[str, Any]) -> str:
    return " ".join(f"{s:.2f}" for s in result["epoch_seconds"]) + f" s, test accuracy {result['test_accuracy']:.4f}"


def machine_info(repeats: int) -> dict[str, Any]:
    cpu_model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    dirty = git(REPO_ROOT, "status", "--porcelain", "--", "stages", "dvc.yaml", "params.yaml").strip() != ""
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "versions": {
            package: importlib.metadata.version(package)
            for package in ("tensorflow", "keras", "tensorflow-datasets", "dvc", "mlflow")
        },
        "git_commit": git(REPO_ROOT, "rev-parse", "HEAD").strip(),
        "pipeline_code_uncommitted_changes": dirty,
        "repeats": repeats,
    }


def print_report(summary: dict[str, dict[str, Any]], check_results: list[Check], info: dict[str, Any]) -> None:
    versions = ", ".join(f"{name} {version}" for name, version in info["versions"].items())
    print(f"\n{info['date']}  {info['hostname']}  {info['cpu_model']} ({info['cpu_count']} cores)  {versions}")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in info['load_average_at_start'])}\n")
    print(f"{'figure':<54} {'unit':>5} {'median':>9} {'min':>9} {'max':>9} {'n':>3}")
    for key, (label, unit) in FIGURES.items():
        s = summary[key]
        print(f"{label:<54} {unit:>5} {s['median']:9.3f} {s['min']:9.3f} {s['max']:9.3f} {len(s['values']):>3}")
    print(f"\n{'check':<54} {'value':>10} {'unit':<6} {'target':<13} result")
    for check in check_results:
        verdict = "PASS" if check.passed else "FAIL"
        print(f"{check.name:<54} {check.value:10.3f} {check.unit:<6} {check.target:<13} {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="repetitions of every measurement (default 3)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 repetition, everything measured")
    parser.add_argument("--out", type=Path, default=Path("bench/results/latest.json"), help="JSON results file")
    parser.add_argument("--keep-copy", action="store_true", help="keep the temporary repository copy")
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, default=5, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        result = WORKERS[args.worker](args)
        print(RESULT_MARK + json.dumps(result), flush=True)
        return

    repeats = 1 if args.quick else args.repeats
    if repeats < 1:
        parser.error("--repeats must be at least 1")
    info = machine_info(repeats)
    runner = Runner(args.out.parent / f"{args.out.stem}-logs")
    samples, facts = measure(repeats, runner, args.keep_copy)
    summary = {key: summarize(samples[key]) for key in FIGURES}
    check_results = checks(samples)
    print_report(summary, check_results, info)
    print(f"no-op dvc repro imported tensorflow: {facts['noop_dvc_repro_imported_tensorflow']}")

    report = {
        **info,
        **facts,
        "figures": {key: {"label": FIGURES[key][0], "unit": FIGURES[key][1], **summary[key]} for key in FIGURES},
        "checks": [check._asdict() for check in check_results],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} (logs in {runner.log_dir})")


if __name__ == "__main__":
    try:
        main()
    except BenchError as exc:
        sys.exit(f"bench: error: {exc}")
