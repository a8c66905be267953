"""End to end: a tiny study (4 trials x 2 epochs, 2 at once) in a copy of the baseline, resumed, a point DVC
has trained before restored from its run-cache, a tiny grid, and the winner promoted."""

from __future__ import annotations

import subprocess
import sys

import mlflow
import optuna
import pytest

from stages.tune import PRUNED_TAG
from tests.e2e import experiments_shown, run, user_env

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
TINY_GRID = """
parameters:
  hidden_layer_size: {values: [16, 32]}
fixed:
  epochs: 1
"""


def tune(repo, *args, space="tiny.yaml"):
    return run([sys.executable, "-m", "stages.tune", "--space", space, *args], repo, timeout=1200)


def test_a_tiny_study_runs_each_trial_as_an_experiment_under_one_parent_run(repo):
    (repo / "tiny.yaml").write_text(TINY_SPACE)
    (repo / "grid.yaml").write_text(TINY_GRID)
    run(["git", "add", "tiny.yaml", "grid.yaml"], repo)
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
    # The parent's outputs: each best-so-far trial's model at the step of the trials finished, so the highest step
    # is the best's (at two at once, trials end out of their numbers' order). Without a model output, MLflow's UI
    # files the parent under "Evaluation runs".
    (best_model,) = by_name[f"tiny-{study.best_trial.number}"].outputs.model_outputs
    outputs = parent.outputs.model_outputs
    assert max(outputs, key=lambda output: output.step).model_id == best_model.model_id
    assert {output.model_id for output in outputs} <= {
        model.model_id for child in children for model in child.outputs.model_outputs
    }
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

    # Two one-trial studies with the same seed (trial 0's point: the seed's in both) suggest the
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

    # A grid (every param {values: [...]}): each point once, its budget the grid's size, each a DVC experiment.
    result = tune(repo, "--study", "grid", "--jobs", "2", space="grid.yaml")
    assert "tune: study grid: 0 trials done of 2;" in result.stdout
    assert "tune: study grid: 2 trials: 2 complete, 0 pruned, 0 failed, 0 running\n" in result.stdout
    grid = optuna.load_study(study_name="grid", storage=f"sqlite:///{repo / 'optuna.db'}")
    assert sorted(t.params["hidden_layer_size"] for t in grid.trials) == [16, 32]
    shown = experiments_shown(repo)
    for trial in grid.trials:
        assert trial.value == shown[f"grid-{trial.number}"]["metrics/train.json"]["data"]["val_accuracy"]

    # Two processes started at the same instant on one study, as two machines would: the database numbers their
    # trials and each trial's number seeds its point, so their first points differ (with one seed for both, and
    # both opening the study before either made a trial, they were the same).
    command = [sys.executable, "-m", "stages.tune", "--space", "tiny.yaml", "--study", "twin", "--trials", "2"]
    together = [subprocess.Popen(command, cwd=repo, env=user_env(), stdout=subprocess.DEVNULL) for _ in range(2)]
    assert [process.wait(timeout=1200) for process in together] == [0, 0]
    twin = optuna.load_study(study_name="twin", storage=f"sqlite:///{repo / 'optuna.db'}")
    assert [t.state.name for t in twin.trials] == ["COMPLETE", "COMPLETE"]
    assert twin.trials[0].params != twin.trials[1].params

    promoted = run([sys.executable, "-m", "stages.promote", f"tiny-{study.best_trial.number}"], repo)
    assert f"experiment tiny-{study.best_trial.number}" in promoted.stdout
