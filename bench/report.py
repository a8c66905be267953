"""The benchmark's figures and targets, the machine it ran on, and the report: printed table and JSON."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import socket
import statistics
from pathlib import Path
from typing import Any, NamedTuple

from bench.measure import STAGES
from bench.phases import print_table
from bench.repository import REPO as REPO_ROOT
from bench.repository import run

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
    "native_epoch_s": ("pipeline train, numerics native: epoch time, 2-5", "s"),
    "native_first_epoch_s": ("pipeline train, numerics native: first epoch", "s"),
    "notebook_script_s": ("notebook script, whole, 5 epochs", "s"),
    "notebook_import_s": ("  of which: import tensorflow + tensorflow_datasets", "s"),
    "notebook_load_s": ("  of which: load data, build tf.data pipeline", "s"),
    "notebook_fit_s": ("  of which: model.fit", "s"),
    "notebook_evaluate_s": ("  of which: model.evaluate", "s"),
    "dvc_repro_cold_s": ("cold dvc repro (4 stages)", "s"),
    "dvc_repro_cold_rss_mib": ("cold dvc repro: max RSS of any process", "MiB"),
    "notebook_script_10_s": ("notebook script, whole, 10 epochs", "s"),
    "dvc_exp_run_10_s": ("dvc exp run -S epochs=10", "s"),
    "dvc_exp_run_1_s": ("dvc exp run -S epochs=1", "s"),
    "experiment_fixed_cost_s": ("  fixed cost of an experiment: that minus one epoch", "s"),
    "sweep_4_j1_s": ("sweep of 4 experiments (5 epochs each), -j 1", "s"),
    "sweep_4_j2_s": ("sweep of 4 experiments (5 epochs each), -j 2", "s"),
    "tracked_sqlite_epoch_s": ("train, every epoch logged to SQLite: epoch time, 2-5", "s"),
    "tracked_server_epoch_s": ("train, every epoch logged to the MLflow server: epoch time, 2-5", "s"),
    "dvc_exp_run_10_server_s": ("dvc exp run -S epochs=10, MLflow server (PostgreSQL, S3)", "s"),
    "dvc_repro_noop_s": ("no-op dvc repro", "s"),
    **{f"stage_{name}_s": (f"stage {name}: wall time", "s") for name in STAGES},
    **{f"stage_{name}_rss_mib": (f"stage {name}: max RSS", "MiB") for name in STAGES},
}


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
        ("epoch time, numerics portable / native", "pipeline_epoch_s", "native_epoch_s", 1.10),
        ("cold dvc repro / notebook script", "dvc_repro_cold_s", "notebook_script_s", 1.2),
        (
            "epoch time, logging to the MLflow server / to SQLite",
            "tracked_server_epoch_s",
            "tracked_sqlite_epoch_s",
            1.05,
        ),
        ("dvc exp run -S epochs=10 / notebook script 10 epochs", "dvc_exp_run_10_s", "notebook_script_10_s", 0.5),
    ]
    return [
        *(Check(name, m[a] / m[b], "x", f"<= {limit:.2f}", m[a] / m[b] <= limit) for name, a, b, limit in ratios),
        Check("no-op dvc repro", m["dvc_repro_noop_s"], "s", "<= 2 s", m["dvc_repro_noop_s"] <= 2),
        Check(
            "fixed cost of an experiment",
            m["experiment_fixed_cost_s"],
            "s",
            "<= 10 s",
            m["experiment_fixed_cost_s"] <= 10,
        ),
        Check("peak RSS of any stage", peak_rss, "MiB", "<= 2048 MiB", peak_rss <= 2048),
        Check("test accuracy, pipeline - notebook", accuracy_gap, "points", "within +-0.5", abs(accuracy_gap) <= 0.5),
    ]


def git_output(*args: str) -> str:
    return run(["git", *args], REPO_ROOT).stdout


def machine_info(repeats: int) -> dict[str, Any]:
    cpu_model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    dirty = git_output("status", "--porcelain", "--", "stages", "dvc.yaml", "params.yaml").strip() != ""
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
        "git_commit": git_output("rev-parse", "HEAD").strip(),
        "pipeline_code_uncommitted_changes": dirty,
        "repeats": repeats,
    }


def print_report(
    summary: dict[str, dict[str, Any]], check_results: list[Check], info: dict[str, Any], facts: dict[str, Any]
) -> None:
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
    print(f"no-op dvc repro imported tensorflow: {facts['noop_dvc_repro_imported_tensorflow']}")
    print_table("Where dvc exp run -S epochs=1 spends its time", facts["one_epoch_experiment_phases"])


def results_json(
    summary: dict[str, dict[str, Any]], check_results: list[Check], info: dict[str, Any], facts: dict[str, Any]
) -> dict[str, Any]:
    """What the JSON results file holds: the machine, the facts, every figure and every check."""
    return {
        **info,
        **facts,
        "figures": {key: {"label": FIGURES[key][0], "unit": FIGURES[key][1], **summary[key]} for key in FIGURES},
        "checks": [check._asdict() for check in check_results],
    }
