"""A study against a grid, from their MLflow runs: best validation accuracy, the winner's test
accuracy, and total training time (each run's wall time, train and evaluate, summed).

    python bench/study_vs_grid.py --study NAME --grid EXPERIMENT [EXPERIMENT ...] [--tracking-uri URI]

Grid runs are named after their DVC experiments; a study's trial runs are the children of its parent
run `study-NAME` (pruned ones included: their time counts too).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import mlflow

REPO_ROOT = Path(__file__).resolve().parents[1]


def summary(runs: list[mlflow.entities.Run]) -> dict[str, float | str]:
    finished = [run for run in runs if "test_accuracy" in run.data.metrics]
    best = max(finished, key=lambda run: run.data.metrics["val_accuracy"])
    minutes = sum((run.info.end_time - run.info.start_time) / 60_000 for run in runs if run.info.end_time)
    return {
        "runs": len(runs),
        "best val_accuracy": best.data.metrics["val_accuracy"],
        "its test_accuracy": best.data.metrics["test_accuracy"],
        "best run": best.info.run_name,
        "training minutes": minutes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", required=True)
    parser.add_argument("--grid", nargs="+", required=True, help="the grid's DVC experiment names")
    parser.add_argument("--tracking-uri", default=f"sqlite:///{REPO_ROOT / 'mlflow.db'}")
    parser.add_argument("--experiment", default="mnist-dnn", help="the MLflow experiment")
    args = parser.parse_args()
    client = mlflow.MlflowClient(args.tracking_uri)
    experiment_id = client.get_experiment_by_name(args.experiment).experiment_id
    every = client.search_runs([experiment_id], max_results=5000)
    grid = [run for run in every if run.info.run_name in args.grid]
    missing = set(args.grid) - {run.info.run_name for run in grid}
    if missing:
        parser.error(f"no MLflow run named {', '.join(sorted(missing))}")
    (parent,) = [run for run in every if run.info.run_name == f"study-{args.study}"]
    trials = [run for run in every if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    rows = {"grid": summary(grid), f"study {args.study}": summary(trials)}
    for name, row in rows.items():
        print(
            f"{name:<14} {row['runs']:>3} runs  best val_accuracy {row['best val_accuracy']:.4f} ({row['best run']}), "
            f"its test_accuracy {row['its test_accuracy']:.4f}, training {row['training minutes']:.1f} min"
        )
    ratio = rows[f"study {args.study}"]["training minutes"] / rows["grid"]["training minutes"]
    print(f"study / grid training time: {ratio:.2f} (target <= 0.5)")


if __name__ == "__main__":
    main()
