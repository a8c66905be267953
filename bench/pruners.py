"""Median pruner or successive halving? Both replayed over the same recorded learning curves.

    python bench/pruners.py --study NAME [--storage URL] [--warmup-epochs 3] [--startup-trials 4]

Reads the complete trials of a study that ran without pruning (`python -m stages.tune` with
`pruner.warmup_epochs` equal to the epochs): each one's validation accuracy at every epoch, a real
learning curve. Then, for each pruner, feeds those curves in trial order into a fresh in-memory study,
epoch by epoch, as `stages.tune` reports them, and stops a curve where the pruner says so. Prints,
per pruner: the trials stopped, the epochs trained (against all), the best final val_accuracy among
the trials it let finish, and whether that is the best of all (the winner was not pruned).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import optuna

REPO_ROOT = Path(__file__).resolve().parents[1]


def recorded_curves(storage: str, study_name: str) -> list[list[float]]:
    study = optuna.load_study(study_name=study_name, storage=storage)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    curves = [[t.intermediate_values[e] for e in sorted(t.intermediate_values)] for t in complete]
    lengths = {len(curve) for curve in curves}
    if len(lengths) != 1:
        sys.exit(f"pruners: study {study_name}: complete trials have {sorted(lengths)} epochs: not one full run each")
    return curves


def replay(curves: list[list[float]], pruner: optuna.pruners.BasePruner) -> dict[str, float]:
    study = optuna.create_study(direction="maximize", pruner=pruner)
    epochs, stopped, finals = 0, 0, []
    for curve in curves:
        trial = study.ask()
        for epoch, value in enumerate(curve, start=1):
            trial.report(value, epoch)
            epochs += 1
            if epoch < len(curve) and trial.should_prune():
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                stopped += 1
                break
        else:
            study.tell(trial, curve[-1])
            finals.append(curve[-1])
    best_of_all = max(curve[-1] for curve in curves)
    return {
        "stopped": stopped,
        "epochs": epochs,
        "best": max(finals),
        "kept the winner": max(finals) == best_of_all,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", required=True)
    parser.add_argument("--storage", default=f"sqlite:///{REPO_ROOT / 'optuna.db'}")
    parser.add_argument("--warmup-epochs", type=int, default=3, help="as search.yaml's pruner.warmup_epochs")
    parser.add_argument("--startup-trials", type=int, default=4, help="as search.yaml's pruner.startup_trials")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    curves = recorded_curves(args.storage, args.study)
    pruners = {
        "none": optuna.pruners.NopPruner(),
        f"median (warm-up {args.warmup_epochs}, after {args.startup_trials} trials)": optuna.pruners.MedianPruner(
            n_startup_trials=args.startup_trials, n_warmup_steps=args.warmup_epochs
        ),
        f"successive halving (min {args.warmup_epochs} epochs, factor 3)": optuna.pruners.SuccessiveHalvingPruner(
            min_resource=args.warmup_epochs, reduction_factor=3
        ),
        f"successive halving (min {args.warmup_epochs} epochs, factor 2)": optuna.pruners.SuccessiveHalvingPruner(
            min_resource=args.warmup_epochs, reduction_factor=2
        ),
    }
    total = sum(len(curve) for curve in curves)
    print(f"{len(curves)} recorded curves of {len(curves[0])} epochs from study {args.study} ({total} epochs)")
    print(f"{'pruner':<46} {'stopped':>7} {'epochs':>7} {'share':>6} {'best val_accuracy':>18} {'winner kept':>12}")
    for name, pruner in pruners.items():
        result = replay(curves, pruner)
        print(
            f"{name:<46} {result['stopped']:>7} {result['epochs']:>7} {result['epochs'] / total:>6.0%} "
            f"{result['best']:>18.4f} {'yes' if result['kept the winner'] else 'no':>12}"
        )


if __name__ == "__main__":
    main()
