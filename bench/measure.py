"""What the benchmark measures (every figure `--repeats` times; table of median / min / max; same as JSON):

1. notebook loop: the notebook's tf.data + Keras code as written, on the committed MNIST arrays
   (tfds cannot download here); per-epoch times from a Keras callback, and test accuracy.
2. pipeline train: `stages.train.train` on the split records, `stages.evaluate.evaluate` on the
   test records, same hyperparameters; same callback. Again with op determinism off, and with
   numerics native instead of portable (what portable numerics cost: bench/numerics.py alone).
3. notebook script: wall time of the whole process of 1 (imports, data, fit, evaluate, print).
   Figures 1 and 3 come from the same processes: the callback costs nothing measurable.
4. cold `dvc repro`: all four stages, outputs and every DVC cache removed first.
5. `dvc exp run -S epochs=10` with the data stages up to date, against the notebook script
   with NUM_EPOCHS = 10. `dvc exp run` has no `--no-run-cache`, and a new seed would also
   rerun `split`; so the run cache (.dvc/cache/runs) is deleted before each repetition, and the
   command timed is exactly `dvc exp run -S epochs=10`.
6. no-op `dvc repro` (everything up to date); one extra in-process run checks that it imports
   no TensorFlow.
8. the fixed cost of one experiment: `dvc exp run -S epochs=1` (run cache deleted first, as in 5)
   minus one steady-state epoch of 2: everything in an experiment that is not training; and where
   its time goes, phase by phase (bench/phases.py: from when each line of its output arrives).
9. sweep throughput: four queued experiments (`dvc exp run --queue -S hidden_layer_size=...`,
   five epochs each), run with `dvc queue start -j 1`, then four others with `-j 2`; wall time
   from the start of the queue until the last one has finished (one run each: ~4 minutes).
10. with the team stack (PostgreSQL, S3, MLflow server; started for this, on this machine):
   training that logs every epoch to SQLite, then to the server, alternating; and
   `dvc exp run -S epochs=10` against the server.
7. peak memory (max RSS, from os.wait4) and wall time of each stage, run as `python -m stages.<name>`.

DVC only ever runs in a throwaway git copy of the repository (its tracked and new, not ignored,
files, made as for the end-to-end tests: bench/repository.py), never in the repository itself; MLflow
records into that copy's mlflow.db.
Each repetition of 1 and 2 is a fresh process: bench/run.py calls itself with `--worker`
(bench/workers.py).
Every subprocess's output is kept in `<out without .json>-logs/`.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, NamedTuple

from bench.phases import breakdown, timed_output
from bench.repository import REPO as REPO_ROOT
from bench.repository import clone_repository, run, user_env
from bench.workers import RESULT_MARK
from team import stack as team_stack

BENCH_SCRIPT = Path(__file__).resolve().with_name("run.py")  # what a worker process runs
STAGES = ("prepare", "split", "train", "evaluate")


class BenchError(Exception):
    """A measurement could not be taken (a command failed or did something unexpected)."""


# --------------------------------------------------------------------------------------------
# Running commands
# --------------------------------------------------------------------------------------------


class Measured(NamedTuple):
    seconds: float
    max_rss_mib: float  # of the process or any of its descendants
    output: str  # stdout and stderr together


class Runner:
    """Runs commands with wall time and max RSS measured, keeping each one's output in a log folder."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        # The venv first on PATH, and nothing that would redirect MLflow or DVC.
        self.env = user_env(DVC_NO_ANALYTICS="1")
        log_dir.mkdir(parents=True, exist_ok=True)

    def run(self, command: list[str], cwd: Path, log_name: str, env: dict[str, str] | None = None) -> Measured:
        with tempfile.TemporaryFile() as output:
            start = time.perf_counter()
            process = subprocess.Popen(
                command, cwd=cwd, env={**self.env, **(env or {})}, stdout=output, stderr=subprocess.STDOUT
            )
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

    def worker(
        self, name: str, cwd: Path, log_name: str, epochs: int = 5, env: dict[str, str] | None = None
    ) -> tuple[Measured, dict[str, Any]]:
        """Run bench/run.py in worker mode in a fresh process; return the measurement and its result."""
        command = [sys.executable, str(BENCH_SCRIPT), "--worker", name, "--epochs", str(epochs)]
        measured = self.run(command, cwd, log_name, env)
        for line in reversed(measured.output.splitlines()):
            if line.startswith(RESULT_MARK):
                return measured, json.loads(line[len(RESULT_MARK) :])
        raise BenchError(f"worker {name} printed no result line (see {self.log_dir / log_name}.log)")


def git(repo: Path, *args: str) -> None:
    try:
        run(["git", *args], repo)
    except AssertionError as exc:  # how tests/e2e.py reports a failed command
        raise BenchError(str(exc)) from exc


def stages_run(output: str) -> list[str]:
    """Names of the stages DVC ran, from its "Running stage 'name':" lines."""
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]


# --------------------------------------------------------------------------------------------
# The throwaway repository DVC runs in
# --------------------------------------------------------------------------------------------


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
# The measurement sequence
# --------------------------------------------------------------------------------------------


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
    copy = clone_repository(Path(tempfile.mkdtemp(prefix="mnist-bench-")))
    site_cache_dir = dvc_site_cache_dir(copy)
    progress(f"repository copy for DVC: {copy}")
    try:
        for rep in range(1, repeats + 1):
            make_cold(copy, site_cache_dir)
            cold = runner.run([dvc, "repro"], copy, f"dvc-repro-cold-{rep}")
            if stages_run(cold.output) != ["check_params", *STAGES]:
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
            _, result = runner.worker("pipeline-train-native", copy, f"pipeline-train-native-{rep}")
            record_training(samples, "native", result)
            progress(f"pipeline train, numerics native {rep}/{repeats}: epochs {_rounded(result)}")

        for rep in range(1, repeats + 1):
            script, _ = runner.worker("notebook", REPO_ROOT, f"notebook-10-epochs-{rep}", epochs=10)
            samples["notebook_script_10_s"].append(script.seconds)
            progress(f"notebook 10 epochs {rep}/{repeats}: {script.seconds:.1f} s")
            git(copy, "checkout", "-q", "HEAD", "--", ".")  # back to the baseline's params.yaml and dvc.lock
            shutil.rmtree(copy / ".dvc" / "cache" / "runs", ignore_errors=True)
            experiment = runner.run([dvc, "exp", "run", "-S", "epochs=10"], copy, f"dvc-exp-run-10-epochs-{rep}")
            if stages_run(experiment.output) != ["check_params", "train", "evaluate"]:
                raise BenchError(
                    f"dvc exp run ran {stages_run(experiment.output)}, expected check_params, train, evaluate"
                )
            samples["dvc_exp_run_10_s"].append(experiment.seconds)
            progress(f"dvc exp run -S epochs=10 {rep}/{repeats}: {experiment.seconds:.1f} s")

        facts["one_epoch_experiment_phases"] = []
        for rep in range(1, repeats + 1):
            git(copy, "checkout", "-q", "HEAD", "--", ".")
            shutil.rmtree(copy / ".dvc" / "cache" / "runs", ignore_errors=True)
            phases = breakdown(*timed_output([dvc, "exp", "run", "-S", "epochs=1"], copy, user_env()))
            facts["one_epoch_experiment_phases"].append(phases)
            seconds = sum(seconds for _, seconds in phases)
            samples["dvc_exp_run_1_s"].append(seconds)
            progress(f"dvc exp run -S epochs=1 {rep}/{repeats}: {seconds:.1f} s")
        epoch = statistics.median(samples["pipeline_epoch_s"])
        samples["experiment_fixed_cost_s"] = [seconds - epoch for seconds in samples["dvc_exp_run_1_s"]]

        for jobs, sizes in ((1, "32,40,64,72"), (2, "33,41,65,73")):
            git(copy, "checkout", "-q", "HEAD", "--", ".")
            seconds = measure_sweep(runner, copy, dvc, jobs, sizes)
            samples[f"sweep_4_j{jobs}_s"].append(seconds)
            progress(f"sweep of 4 experiments at -j {jobs}: {seconds:.1f} s")

        measure_tracking_server(repeats, runner, copy, dvc, samples)

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


def measure_sweep(runner: Runner, copy: Path, dvc: str, jobs: int, sizes: str) -> float:
    """Queue four experiments (hidden_layer_size=`sizes`), run the queue with `jobs` workers, wait
    until none is queued or running; return the seconds from the start of the queue, checking all
    four succeeded."""
    runner.run([dvc, "exp", "run", "--queue", "-S", f"hidden_layer_size={sizes}"], copy, f"sweep-queue-j{jobs}")
    start = time.perf_counter()
    runner.run([dvc, "queue", "start", "-j", str(jobs)], copy, f"sweep-start-j{jobs}")
    while True:
        time.sleep(2)
        status = subprocess.run(
            [dvc, "queue", "status"], cwd=copy, env=runner.env, capture_output=True, text=True, check=True
        ).stdout
        if not any(word in status.split() for word in ("Queued", "Running")):
            break
    seconds = time.perf_counter() - start
    (runner.log_dir / f"sweep-status-j{jobs}.log").write_text(status)
    succeeded = status.split().count("Success")
    failed = status.split().count("Failed")
    if failed or succeeded < 4:
        raise BenchError(f"sweep at -j {jobs}: {succeeded} succeeded, {failed} failed:\n{status}")
    runner.run([dvc, "queue", "remove", "--all"], copy, f"sweep-remove-j{jobs}")
    runner.run([dvc, "queue", "stop"], copy, f"sweep-stop-j{jobs}")
    return seconds


def measure_tracking_server(repeats: int, runner: Runner, copy: Path, dvc: str, samples: dict) -> None:
    """Training that logs every epoch to the default SQLite store, then to the team stack's MLflow
    server (PostgreSQL, S3), alternating; and `dvc exp run -S epochs=10` against the server."""
    folder = Path(tempfile.mkdtemp(prefix="mnist-bench-stack-"))
    try:
        began = time.perf_counter()
        stack = team_stack.start(folder, free_ports=True)
        progress(f"team stack started in {time.perf_counter() - began:.0f} s: {stack.tracking_uri}")
        server = {
            "MLFLOW_TRACKING_URI": stack.tracking_uri,
            "MLFLOW_TRACKING_USERNAME": stack.mlflow_username,
            "MLFLOW_TRACKING_PASSWORD": stack.mlflow_password,
        }
        for rep in range(1, repeats + 1):
            for store, env in (("sqlite", None), ("server", server)):
                _, result = runner.worker("pipeline-train-tracked", copy, f"tracked-{store}-{rep}", env=env)
                record_training(samples, f"tracked_{store}", result)
                progress(f"pipeline train logging to {store} {rep}/{repeats}: epochs {_rounded(result)}")
            git(copy, "checkout", "-q", "HEAD", "--", ".")
            shutil.rmtree(copy / ".dvc" / "cache" / "runs", ignore_errors=True)
            command = [dvc, "exp", "run", "-S", "epochs=10"]
            experiment = runner.run(command, copy, f"dvc-exp-run-10-epochs-server-{rep}", env=server)
            samples["dvc_exp_run_10_server_s"].append(experiment.seconds)
            progress(f"dvc exp run -S epochs=10, tracking server {rep}/{repeats}: {experiment.seconds:.1f} s")
    finally:
        team_stack.stop(folder)
        shutil.rmtree(folder, ignore_errors=True)


def _rounded(result: dict[str, Any]) -> str:
    return " ".join(f"{s:.2f}" for s in result["epoch_seconds"]) + f" s, test accuracy {result['test_accuracy']:.4f}"
