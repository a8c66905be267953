"""python -m stages.tune, without training: the search space, naming, pruning decisions, resume."""

import contextlib
import os
import sqlite3
import subprocess
import sys
import threading
import time

import optuna
import pytest
import yaml
from optuna.storages._heartbeat import get_heartbeat_thread

from stages import tune
from stages.common.errors import StageError
from stages.common.params import load_params
from stages.lib.search_space import load_space, parse_space, set_arguments, suggest
from tests.conftest import REAL_PARAMS, REPO

BASE = load_params(REAL_PARAMS)


def space(**changes):
    raw = {
        "seed": 1,
        "budget": {"trials": 4},
        "parameters": {"hidden_layer_size": {"min": 16, "max": 256, "log": True}, "dropout": {"min": 0.0, "max": 0.5}},
        "fixed": {"epochs": 2},
    }
    raw.update(changes)
    return raw


def test_the_repository_search_space_is_valid_and_read_whole():
    raw = yaml.safe_load((REPO / "search.yaml").read_text())
    searched = load_space(REPO / "search.yaml", BASE)
    assert searched.fixed == raw["fixed"] and searched.seed == raw["seed"]
    assert (searched.trials, searched.minutes) == (raw["budget"]["trials"], raw["budget"]["minutes"])
    assert (searched.warmup_epochs, searched.startup_trials) == (
        raw["pruner"]["warmup_epochs"],
        raw["pruner"]["startup_trials"],
    )
    assert {key: [r.low, r.high, r.log] for key, r in searched.ranges.items()} == {
        key: [spec["min"], spec["max"], spec.get("log", False)]
        for key, spec in raw["parameters"].items()
        if "min" in spec
    }
    assert searched.choices == {key: spec["values"] for key, spec in raw["parameters"].items() if "values" in spec}


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"parameters": {"hiden_layer_size": {"min": 1, "max": 9}}}, "unknown key 'hiden_layer_size' (did you mean"),
        ({"parameters": {"dropout": {"min": 0.5, "max": 0.2}}}, "dropout: empty range, min 0.5 must be below max 0.2"),
        ({"parameters": {"dropout": {"min": 0.3, "max": 0.3}}}, "empty range"),
        ({"parameters": {"dropout": {"min": 0.1, "max": 1.5}}}, "dropout must be a number in [0, 1), got 1.5"),
        (
            {"parameters": {"epochs": {"min": 0, "max": 3}}, "fixed": {}},
            "epochs must be an integer >= 1, got 0 (parameters.epochs.min)",
        ),
        ({"parameters": {"hidden_layer_size": {"min": 16.5, "max": 64}}}, "hidden_layer_size must be an integer"),
        ({"parameters": {"dropout": {"min": 0, "max": 0.5, "log": True}}}, "a log range needs min > 0"),
        ({"parameters": {"lr_schedule": {"values": ["constant", "linear"]}}}, "lr_schedule must be one of"),
        ({"parameters": {"lr_schedule": {"values": []}}}, "must be a non-empty list"),
        ({"parameters": {"dropout": {"min": 0.1}}}, "parameters.dropout must be {values"),
        ({"parameters": {}}, "parameters is empty"),
        ({"parameters": {"validation_fraction": {"min": 0.1, "max": 0.2}}}, "not a hyperparameter"),
        ({"parameters": {"numerics": {"values": ["portable", "native"]}}}, "numerics cannot be searched: fix it"),
        ({"fixed": {"epochs": 0}}, "epochs must be an integer >= 1, got 0 (fixed.epochs)"),
        ({"fixed": {"dropout": 0.1}}, "dropout is both searched (parameters) and fixed"),
        ({"metric": "test_accuracy"}, "metric must be val_accuracy"),
        ({"budget": {}}, "budget needs trials, minutes or both"),
        ({"budget": {"trials": 0}}, "budget.trials must be an integer >= 1"),
        ({"budget": {"hours": 2}}, "unknown key 'budget.hours'"),
        ({"pruner": {"warmup_epochs": -1}}, "pruner.warmup_epochs must be an integer >= 0"),
        ({"sampler": "random"}, "unknown key 'sampler'"),
    ],
)
def test_a_bad_search_space_is_one_line_naming_what_is_wrong(changes, message):
    with pytest.raises(StageError) as caught:
        parse_space(space(**changes), BASE, "search.yaml")
    assert str(caught.value).startswith("search.yaml: ") and message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_bad_search_space_stops_the_command_before_anything_runs(tmp_path, run_stage_in):
    (tmp_path / "params.yaml").write_bytes(REAL_PARAMS.read_bytes())
    (tmp_path / "search.yaml").write_text("parameters:\n  dropout: {min: 0.5, max: 0.2}\nbudget: {trials: 2}\n")
    result = run_stage_in("tune", tmp_path)
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        == "tune: error: search.yaml: parameters.dropout: empty range, min 0.5 must be below max 0.2"
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["params.yaml", "search.yaml"]  # nothing written


def test_suggested_points_are_in_the_space_valid_and_seeded():
    searched = parse_space(
        space(parameters={**space()["parameters"], "lr_schedule": {"values": ["constant", "cosine"]}}), BASE
    )

    def points(seed):
        study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
        found = []
        for _ in range(12):
            trial = study.ask()
            found.append(suggest(trial, searched, BASE))
            study.tell(trial, found[-1]["dropout"])
        return found

    first = points(3)
    assert first == points(3) and first != points(4)
    for point in first:
        assert point["epochs"] == 2 and isinstance(point["hidden_layer_size"], int)
        assert 16 <= point["hidden_layer_size"] <= 256 and 0 <= point["dropout"] <= 0.5
        assert point["lr_schedule"] in ("constant", "cosine")


def test_set_arguments_round_trip_through_params_yaml_reading():
    arguments = set_arguments(
        {"learning_rate": 1e-05, "hidden_layer_size": 64, "lr_schedule": "cosine", "dropout": 0.25}
    )
    assert arguments == [
        "-S",
        "learning_rate=1e-05",
        "-S",
        "hidden_layer_size=64",
        "-S",
        "lr_schedule=cosine",
        "-S",
        "dropout=0.25",
    ]


# ---------------------------------------------------------------- the runner, on a stand-in for `dvc exp run`

# Prints an epoch line as train does for a program (MNIST_EPOCH_JSON) for each value given, a little apart;
# on SIGINT it stops after the
# current epoch's line and exits 130, as the train stage does under DVC; "fail" exits 1. Writes its name into `ran`.
FAKE_TRIAL = """
import json, os, signal, sys, time
from pathlib import Path
stop = []
signal.signal(signal.SIGINT, lambda *_: stop.append(1))
name, values = sys.argv[1], sys.argv[2:]
with open(Path(sys.argv[0]).parent / "ran", "a") as ran:
    ran.write(f"{name} {os.getpid()}\\n")
print("Running stage 'train':", flush=True)
print("some noise on stderr", file=sys.stderr, flush=True)
for epoch, value in enumerate(values, 1):
    if value == "fail":
        sys.exit(1)
    time.sleep(0.5)  # time for the signal to come, on a busy machine too
    stopping = bool(stop)  # a signal that comes after this epoch's line stops the next one
    if os.environ.get("MNIST_EPOCH_JSON") == "1":
        print("train: epoch " + json.dumps({"epoch": epoch, "val_accuracy": float(value)}), flush=True)
    if stopping:
        sys.exit(130)
"""


class FakeTrials(tune.Trials):
    """Trials whose `dvc exp run` is FAKE_TRIAL printing the curve `curves[name]`; done = its last value."""

    def __init__(self, folder, curves):
        super().__init__(folder, None)
        self.script = folder / "fake_trial.py"
        self.script.write_text(FAKE_TRIAL)
        self.curves, self.done = curves, {}

    def command(self, name, point):
        return [sys.executable, str(self.script), name, *map(str, self.curves[name])]

    def metrics(self, name):
        return self.done.get(name)

    def run(self, command, log_path, on_epoch):
        status, pruned = super().run(command, log_path, on_epoch)
        if status == 0:
            self.done[command[2]] = {"val_accuracy": float(command[-1])}
        return status, pruned

    def ran(self):
        path = self.script.parent / "ran"
        return [line.split()[0] for line in path.read_text().splitlines()] if path.exists() else []


def tiny_study(folder, name="s", startup_trials=2, warmup_epochs=1, epochs=3):
    pruner = {"startup_trials": startup_trials, "warmup_epochs": warmup_epochs}
    searched = parse_space(space(pruner=pruner, fixed={"epochs": epochs}), BASE)
    storage = tune.open_storage(f"sqlite:///{folder / 'optuna.db'}")
    return tune.open_study(name, storage, searched), searched


def optimize(study, searched, trials, n, callbacks=None):
    marked = {}
    run_trial = tune.objective(
        trials, searched, BASE, study.study_name, lambda name, tags: marked.setdefault(name, tags)
    )
    study.optimize(run_trial, n_trials=n, catch=(tune.TrialFailed,), callbacks=callbacks)
    return marked


def test_experiment_names_are_the_study_and_the_trial_number():
    assert tune.experiment_name("cnn", 0) == "cnn-0" and tune.experiment_name("cnn", 12) == "cnn-12"


def test_the_runner_reads_every_epoch_and_stops_the_trial_at_an_epoch_end(tmp_path):
    trials = FakeTrials(tmp_path, {"s-0": [0.5, 0.6, 0.7, 0.8, 0.9]})
    seen = []
    status, pruned = trials.run(
        trials.command("s-0", {}), tmp_path / "s-0.log", lambda epoch, value: seen.append((epoch, value)) or epoch == 2
    )
    assert (status, pruned) == (130, True)
    assert seen[:3] == [(1, 0.5), (2, 0.6), (3, 0.7)]  # stopped once, at the end of the epoch under way
    assert len(seen) in (3, 4)
    log_text = (tmp_path / "s-0.log").read_text()
    assert "some noise on stderr" in log_text  # stderr read too
    assert log_text.count("train: epoch ") in (3, 4)  # the signal comes during the next epoch, which ends it


def test_a_trial_behind_the_median_is_pruned_and_makes_no_experiment(tmp_path):
    curves = {
        "s-0": [0.90, 0.95, 0.97],
        "s-1": [0.92, 0.96, 0.98],
        "s-2": [0.50, 0.60, 0.99],
        "s-3": [0.93, 0.97, 0.985],
    }
    study, searched = tiny_study(tmp_path)
    trials = FakeTrials(tmp_path, curves)
    marked = optimize(study, searched, trials, 4)
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "COMPLETE", "PRUNED", "COMPLETE"]
    assert study.trials[2].intermediate_values == {1: 0.5, 2: 0.6}  # pruned at 1, stopped at the end of 2
    assert marked["s-2"][tune.PRUNED_TAG] == "true" and "s-2" not in trials.done
    assert study.best_trial.number == 3 and study.best_value == 0.985


def test_pruning_waits_for_the_warm_up_and_the_first_trials(tmp_path):
    curves = {"s-0": [0.9, 0.9, 0.9], "s-1": [0.1, 0.1, 0.95], "s-2": [0.1, 0.1, 0.1]}
    study, searched = tiny_study(tmp_path, startup_trials=1, warmup_epochs=2)
    optimize(study, searched, FakeTrials(tmp_path, curves), 3)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "PRUNED", "PRUNED"]
    assert [max(t.intermediate_values) for t in study.trials[1:]] == [3, 3]  # pruned at 2, stopped after 3


def test_a_trial_behind_the_median_at_its_last_epoch_is_complete_not_pruned(tmp_path):
    curves = {"s-0": [0.9, 0.95], "s-1": [0.9, 0.96], "s-2": [0.95, 0.5]}
    study, searched = tiny_study(tmp_path, epochs=2)
    optimize(study, searched, FakeTrials(tmp_path, curves), 3)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "COMPLETE"]


def test_resuming_never_reruns_a_completed_trial(tmp_path):
    curves = {f"s-{n}": [0.9 + n / 100] for n in range(5)}
    study, searched = tiny_study(tmp_path)
    trials = FakeTrials(tmp_path, curves)
    optimize(study, searched, trials, 2)
    again, _ = tiny_study(tmp_path)  # a new process: the study from its database
    assert tune.trial_counts(again)["complete"] == 2
    optimize(again, searched, trials, 1)
    assert trials.ran() == ["s-0", "s-1", "s-2"]
    assert [t.value for t in again.trials] == [0.9, 0.91, 0.92]


def test_a_trial_whose_experiment_exists_is_read_not_rerun(tmp_path):
    study, searched = tiny_study(tmp_path)
    trials = FakeTrials(tmp_path, {"s-0": [0.5]})
    trials.done["s-0"] = {"val_accuracy": 0.97}  # e.g. a worker killed after DVC committed the experiment
    optimize(study, searched, trials, 1)
    assert trials.ran() == [] and study.trials[0].value == 0.97


def test_a_failed_trial_is_recorded_and_the_study_goes_on(tmp_path):
    study, searched = tiny_study(tmp_path)
    trials = FakeTrials(tmp_path, {"s-0": [0.9, "fail"], "s-1": [0.9]})
    optimize(study, searched, trials, 2)
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE"]
    assert study.trials[0].user_attrs["failure"].startswith("`dvc exp run` exited 1; see ")


def test_stop_all_stops_the_running_trials_and_starts_no_new_one(tmp_path):
    trials = FakeTrials(tmp_path, {"s-0": [0.5] * 40})
    threading.Timer(0.5, trials.stop_all).start()
    status, pruned = trials.run(trials.command("s-0", {}), tmp_path / "s-0.log", lambda e, v: False)
    assert status == 130 and not pruned
    with pytest.raises(tune.TrialFailed, match="interrupted"):
        trials.run(trials.command("s-0", {}), tmp_path / "again.log", lambda e, v: False)


# One worker of a study on the database in argv[1], its heartbeat every second, its trials FakeTrials.
WORKER = """
import sys
from pathlib import Path
from stages import tune
from tests.test_tune import FakeTrials, optimize, tiny_study
tune.HEARTBEAT_SECONDS, tune.GRACE_SECONDS = 1, 3
folder = Path(sys.argv[1])
study, searched = tiny_study(folder)
optimize(study, searched, FakeTrials(folder, {f"s-{n}": [0.9] * 30 for n in range(3)}), 1)
"""


def worker_env():
    return {**os.environ, "PYTHONPATH": str(REPO)}


def test_a_worker_killed_with_sigkill_leaves_a_failed_trial_its_point_is_retried_and_its_trial_stopped(
    tmp_path, monkeypatch
):
    worker = subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path)], cwd=REPO, env=worker_env())
    deadline = time.monotonic() + 60
    while not (tmp_path / "ran").exists():
        assert time.monotonic() < deadline and worker.poll() is None
        time.sleep(0.2)
    time.sleep(1)  # into its first epochs
    worker.kill()
    worker.wait()
    time.sleep(4)  # the grace period passes without a heartbeat; the orphaned trial stops at its epoch end
    monkeypatch.setattr(tune, "HEARTBEAT_SECONDS", 1)
    monkeypatch.setattr(tune, "GRACE_SECONDS", 3)
    study, searched = tiny_study(tmp_path)
    trials = FakeTrials(tmp_path, {"s-1": [0.93] * 3})
    optimize(study, searched, trials, 1)
    first, retried = study.trials
    assert (first.state.name, retried.state.name) == ("FAIL", "COMPLETE")
    assert retried.params == first.params and retried.value == 0.93  # the killed trial's point, run again
    orphan = int((tmp_path / "ran").read_text().split()[1])
    assert not os.path.exists(f"/proc/{orphan}")  # the killed worker's trial stopped, not left to train on


# One of two workers of a study whose budget is 4 trials, as two machines run it: each may run all 4, its
# trials argv[2] epochs long (half a second each).
BUDGET_WORKER = """
import sys
from pathlib import Path
from stages import tune
from tests.test_tune import FakeTrials, optimize, tiny_study
folder, epochs = Path(sys.argv[1]), int(sys.argv[2])
study, searched = tiny_study(folder, startup_trials=10)
optimize(study, searched, FakeTrials(folder, {f"s-{n}": [0.9] * epochs for n in range(8)}), 4, [tune.stop_at_budget(4)])
"""


def test_two_workers_on_one_study_start_no_trial_past_its_budget(tmp_path):
    # Short trials on one, long ones on the other: when the long one ends, the short one's fourth trial runs.
    # Counting finished trials only, the long one would start a fifth.
    tiny_study(tmp_path)  # the study exists before the workers open it
    workers = [
        subprocess.Popen([sys.executable, "-c", BUDGET_WORKER, str(tmp_path), epochs], cwd=REPO, env=worker_env())
        for epochs in ("2", "7")
    ]
    assert [worker.wait(timeout=120) for worker in workers] == [0, 0]
    study, _ = tiny_study(tmp_path)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
    assert sorted(FakeTrials(tmp_path, {}).ran()) == ["s-0", "s-1", "s-2", "s-3"]


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_a_heartbeat_the_database_cannot_take_is_skipped_and_the_next_one_recorded(tmp_path, monkeypatch, capsys):
    # Optuna's heartbeat thread ends at the first error it meets; the trial would be failed while it trains.
    storage = tune.open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    storage.heartbeat_interval = 1
    trial = optuna.create_study(storage=storage).ask()
    beats = []
    record = optuna.storages.RDBStorage.record_heartbeat

    def down_for_two_beats(self, trial_id):
        beats.append(trial_id)
        if len(beats) <= 2:
            raise OSError("could not connect to server")
        record(self, trial_id)

    monkeypatch.setattr(optuna.storages.RDBStorage, "record_heartbeat", down_for_two_beats)
    with get_heartbeat_thread(trial._trial_id, storage):
        deadline = time.monotonic() + 30
        while len(beats) < 3:
            assert time.monotonic() < deadline, "the heartbeat stopped"
            time.sleep(0.1)
    with contextlib.closing(sqlite3.connect(tmp_path / "optuna.db")) as database:
        assert database.execute("SELECT trial_id FROM trial_heartbeats").fetchall() == [(trial._trial_id,)]
    assert capsys.readouterr().out.count("tune: heartbeat not recorded (could not connect to server); next try") == 2


def test_a_trial_trains_on_unpruned_while_the_study_database_cannot_take_its_epochs(tmp_path, monkeypatch, capsys):
    def database_down(*args):
        raise OSError("could not connect to server")

    study, searched = tiny_study(tmp_path)
    monkeypatch.setattr(optuna.trial.Trial, "report", database_down)
    optimize(study, searched, FakeTrials(tmp_path, {"s-0": [0.9, 0.91, 0.92]}), 1)
    assert study.trials[0].state.name == "COMPLETE" and study.trials[0].value == 0.92
    assert (
        "s-0: epoch 1 not reported to the study (could not connect to server); not pruning" in capsys.readouterr().out
    )
