"""End to end: a tiny study (4 trials x 2 epochs, 2 at once) in a copy of the baseline, resumed, a point DVC
has trained before restored from its run-cache, and the winner promoted."""

from __future__ import annotations

import sys

import mlflow
import optuna
import pytest

from stages.tune import PRUNED_TAG
from tests.e2e import experiments_shown, run

pytestmark = pytest.mark.slow

TINY_SPACE = """
seed: 7
budget: {trials: 4}
pruner: {warmup_epochs: 1, startup_trials: 1}
parameters:
  hidden_layer_size: {min: 16, max: 128, log: true}
  learning_rate: {min: 0.0005, max: 0.005, log: true}
fixed:
  epochs: 2
"""


def tune(repo, *args):
    return run([sys.executable, "-m", "stages.tune", "--space", "tiny.yaml", *args], repo, timeout=1200)


def test_a_tiny_study_runs_each_trial_as_an_experiment_under_one_parent_run(repo):
    (repo / "tiny.yaml").write_text(TINY_SPACE)
    run(["git", "add", "tiny.yaml"], repo)
    run(["git", "commit", "-qm", "tiny search space"], repo)

    result = tune(repo, "--study", "tiny", "--jobs", "2")
    assert "tune: study tiny: 4 trials: 4 complete, 0 pruned, 0 failed, 0 running\n" in result.stdout
    assert "python -m stages.promote tiny-" in result.stdout

    # Two epochs: a prune decided at epoch 1 would stop the trial at the end of epoch 2, its last; none is pruned.
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{repo / 'optuna.db'}")
    assert [(t.number, t.state.name, sorted(t.intermediate_values)) for t in study.trials] == [
        (n, "COMPLETE", [1, 2]) for n in range(4)
    ]
    shown = experiments_shown(repo)
    assert sorted(name for name in shown if name.startswith("tiny-")) == [f"tiny-{n}" for n in range(4)]
    for trial in study.trials:
        assert trial.value == shown[f"tiny-{trial.number}"]["metrics/train.json"]["data"]["val_accuracy"]

    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mnist-dnn")
    (parent,) = client.search_runs(
        [experiment.experiment_id], "tags.`tune.study` = 'tiny' and attributes.run_name = 'study-tiny'"
    )
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["best_val_accuracy"] == study.best_value
    assert parent.data.tags["best.experiment"] == f"tiny-{study.best_trial.number}"
    assert parent.data.tags["space.hidden_layer_size"] == "[16, 128] log" and parent.data.tags["budget.trials"] == "4"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"optimization_history.png", "param_importances.png", "intermediate_values.png", "tiny.yaml"} <= artifacts
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    by_name = {child.info.run_name: child for child in children}
    assert sorted(by_name) == [f"tiny-{n}" for n in range(4)]
    for n, child in enumerate(by_name[f"tiny-{n}"] for n in range(4)):
        assert (
            child.info.status == "FINISHED" and len(client.get_metric_history(child.info.run_id, "val_accuracy")) == 2
        )
        assert {key: child.data.tags.get(key) for key in ("tune.study", "tune.trial", PRUNED_TAG)} == {
            "tune.study": "tiny",
            "tune.trial": str(n),
            PRUNED_TAG: None,
        }

    # Run again: the budget is spent; nothing is trained, no experiment added.
    again = tune(repo, "--study", "tiny", "--jobs", "2")
    assert "tune: study tiny: 4 trials done of 4" in again.stdout
    assert set(experiments_shown(repo)) == set(shown)

    # Two one-trial studies with the same seed (one job: Optuna reseeds the sampler for more) suggest the
    # same point: DVC restores the second from its run-cache (no training, no MLflow run), and the
    # study still gets its value.
    first = tune(repo, "--study", "first", "--trials", "1")
    assert "tune: trial 0 (first-0): val_accuracy" in first.stdout
    repeat = tune(repo, "--study", "repeat", "--trials", "1")
    assert "tune: trial 0 (repeat-0): val_accuracy" in repeat.stdout
    original, repeated = (
        optuna.load_study(study_name=name, storage=f"sqlite:///{repo / 'optuna.db'}").trials[0]
        for name in ("first", "repeat")
    )
    assert repeated.params == original.params and repeated.value == original.value
    assert "Stage 'train' is cached - skipping run" in (repo / ".dvc/tmp/tune/repeat-0.log").read_text()
    assert not client.search_runs([experiment.experiment_id], "tags.`dvc.experiment` = 'repeat-0'")

    promoted = run([sys.executable, "-m", "stages.promote", f"tiny-{study.best_trial.number}"], repo)
    assert f"experiment tiny-{study.best_trial.number}" in promoted.stdout
