"""python -m stages.tune, without training: the search space, naming, pruning decisions, resume."""

import contextlib
import dataclasses
import json
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import optuna
import psutil
import pytest
import yaml

from stages import tune
from stages.common.errors import StageError
from stages.common.params import load_params
from stages.lib import stop_with_parent
from stages.lib.search_space import load_space, parse_space, set_arguments, suggest
from stages.lib.tracking import EPOCH_JSON_ENV, EPOCH_LINE_PREFIX
from tests.conftest import REAL_PARAMS, REPO
from tests.e2e import run

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
    "name, grid, trials", [("search-quick.yaml", False, 12), ("sweep-dense.yaml", True, 4), ("sweep-cnn.yaml", True, 2)]
)
def test_the_repositorys_quick_search_and_sweeps_are_valid(name, grid, trials):
    searched = load_space(REPO / name, BASE)
    assert (searched.grid, searched.trials) == (grid, trials)


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
        ({"budjet": {"trials": 2}}, "unknown key 'budjet' (did you mean 'budget'?)"),
        ({"budget": {"trails": 2}}, "unknown key 'budget.trails' (did you mean 'budget.trials'?)"),
        ({"budget": None}, "budget needs trials, minutes or both (a grid"),
        ({"budget": None, "parameters": {"hiden_layer_size": {"values": [64, 128]}}}, "unknown key 'hiden_layer_size'"),
        ({"budget": None, "parameters": {"dropout": {"values": [0.1, 1.5]}}}, "got 1.5 (parameters.dropout.values)"),
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


def test_a_search_whose_every_param_lists_its_values_is_a_grid_its_budget_the_grid_size():
    grid = {"hidden_layer_size": {"values": [64, 128]}, "dropout": {"values": [0.1, 0.2, 0.3]}}
    assert parse_space(space(budget=None, parameters=grid), BASE).trials == 6
    assert parse_space(space(budget={"trials": 2}, parameters=grid), BASE).trials == 2
    assert parse_space(space(parameters=grid), BASE).grid and not parse_space(space(), BASE).grid


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


# ---------------------------------------------------------------- trials, on a stand-in for `dvc exp run`

# The stand-in (FakeRunner's command): argv[1] is the experiment's name, then one argument per step. A number is
# an epoch of that val_accuracy, printed as train prints it for a program (when tune sets its variable); "wait"
# waits for SIGINT (a minute at most), after which the next epoch is the last, as train stops at the end of the
# epoch under way; "after:FILE" waits until FILE exists; "fail" exits 1. At the end the experiment is complete:
# experiments/<name>.json holds its val_accuracy. SIGINT is blocked all along: only "wait" takes it, so where a
# signal comes does not depend on timing. Records its pid in started/<name> and a SIGINT taken in interrupted/<name>.
FAKE_TRIAL = """
import json, os, signal, sys, time
from pathlib import Path
name, steps = sys.argv[1], sys.argv[2:]
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
for folder in ("started", "interrupted", "experiments"):
    Path(folder).mkdir(exist_ok=True)
Path("started", name).write_text(str(os.getpid()))
print("some noise on stderr", file=sys.stderr, flush=True)
epoch, value, stopping = 0, None, False
for step in steps:
    if step == "fail":
        sys.exit(1)
    elif step == "wait":
        if signal.sigtimedwait({signal.SIGINT}, 60) is None:
            sys.exit(f"{name}: no SIGINT came")
        Path("interrupted", name).touch()
        stopping = True
    elif step.startswith("after:"):
        while not Path(step.removeprefix("after:")).exists():
            time.sleep(0.05)
    else:
        epoch, value = epoch + 1, float(step)
        if os.environ.get(EPOCH_JSON_ENV) == "1":
            print(EPOCH_LINE_PREFIX + json.dumps({"epoch": epoch, "val_accuracy": value}), flush=True)
        if stopping:
            sys.exit(130)
Path("experiments", name + ".json").write_text(json.dumps({"val_accuracy": value}))
"""


class FakeRunner(tune.TrialRunner):
    """A TrialRunner in `folder` whose `dvc exp run` is FAKE_TRIAL taking the steps `steps[name]`."""

    def __init__(self, folder, steps):
        super().__init__(folder, None)
        names = f"EPOCH_JSON_ENV, EPOCH_LINE_PREFIX = {EPOCH_JSON_ENV!r}, {EPOCH_LINE_PREFIX!r}\n"
        (folder / "fake_trial.py").write_text(names + FAKE_TRIAL)
        self.steps = steps

    def command(self, name, point):
        return [sys.executable, "fake_trial.py", name, *map(str, self.steps[name])]

    def experiment_metrics(self, name):
        path = self.repo / "experiments" / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else None


def started(folder):
    return sorted(path.name for path in (folder / "started").glob("*"))


def tiny_study(folder, trials=4, startup_trials=2, warmup_epochs=1, epochs=3):
    """The study `s` in folder/optuna.db (created, or opened as another process would); `epochs` None: params.yaml's."""
    raw = space(budget={"trials": trials}, pruner={"startup_trials": startup_trials, "warmup_epochs": warmup_epochs})
    searched = parse_space({**raw, "fixed": {} if epochs is None else {"epochs": epochs}}, BASE)
    return tune.open_study("s", tune.open_storage(f"sqlite:///{folder / 'optuna.db'}"), searched), searched


def wait_for(condition, what, seconds=60):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {seconds} s"
        time.sleep(0.1)


def test_the_runner_reads_each_epoch_and_stops_the_trial_at_the_end_of_the_epoch_under_way(tmp_path):
    runner = FakeRunner(tmp_path, {"s-0": [0.5, 0.6, "wait", 0.7, 0.8]})
    seen = []
    status = runner.run(
        runner.command("s-0", {}), tmp_path / "s-0.log", lambda epoch: seen.append(epoch) or len(seen) == 2
    )
    assert status == 130
    assert seen == [
        {"epoch": 1, "val_accuracy": 0.5},
        {"epoch": 2, "val_accuracy": 0.6},
        {"epoch": 3, "val_accuracy": 0.7},
    ]
    log_text = (tmp_path / "s-0.log").read_text()
    assert log_text.count(EPOCH_LINE_PREFIX) == 3 and "some noise on stderr" in log_text  # stderr read too


def test_a_trial_behind_the_median_is_pruned_says_when_and_makes_no_experiment(tmp_path, capsys):
    steps = {
        "s-0": [0.90, 0.95, 0.97, 0.98],
        "s-1": [0.92, 0.96, 0.98, 0.985],
        "s-2": [0.50, "wait", 0.60, 0.99, 0.99],
        "s-3": [0.93, 0.97, 0.985, 0.99],
    }
    study, searched = tiny_study(tmp_path, epochs=4)
    tune.run_trials(study, FakeRunner(tmp_path, steps), searched, BASE, 4)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "PRUNED", "COMPLETE"]
    assert study.trials[2].intermediate_values == {1: 0.5, 2: 0.6}  # pruned at 1, stopped at the end of 2
    assert "tune: trial 2 (s-2): pruned at epoch 1 (val_accuracy 0.5000 below the median), trained 2 of 4 epochs\n" in (
        capsys.readouterr().out
    )
    assert sorted(path.name for path in (tmp_path / "experiments").iterdir()) == ["s-0.json", "s-1.json", "s-3.json"]
    assert study.best_trial.number == 3 and study.best_value == 0.99


def test_pruning_waits_for_the_warm_up_and_the_first_trials_and_counts_params_yaml_epochs(tmp_path, capsys):
    steps = {"s-0": [0.9] * 4, "s-1": [0.1] * 4, "s-2": [0.1, 0.1, "wait", 0.1, 0.1]}
    study, searched = tiny_study(tmp_path, startup_trials=2, warmup_epochs=2, epochs=None)
    tune.run_trials(study, FakeRunner(tmp_path, steps), searched, dataclasses.replace(BASE, epochs=4), 3)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "PRUNED"]
    assert "tune: trial 2 (s-2): pruned at epoch 2 (val_accuracy 0.1000 below the median), trained 3 of 4 epochs\n" in (
        capsys.readouterr().out
    )


@pytest.mark.parametrize(
    "epochs, warmup_epochs, stops_at",
    [(5, 1, [1]), (4, 2, [2]), (3, 1, [1]), (4, 3, []), (2, 1, []), (1, 1, [])],
)
def test_the_pruner_stops_a_trial_once_and_only_where_stopping_saves_an_epoch(epochs, warmup_epochs, stops_at):
    # The stop signal ends the epoch under way: decided at the last but one epoch or later, the trial would
    # have trained all its epochs anyway.
    pruner = optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=warmup_epochs)
    study = optuna.create_study(direction="maximize", pruner=pruner)
    study.add_trial(optuna.trial.create_trial(value=0.9, intermediate_values=dict.fromkeys(range(1, 6), 0.9)))
    reports = tune.EpochReports(study.ask(), "s-1", epochs)
    assert [
        epoch for epoch in range(1, epochs + 1) if reports.on_epoch({"epoch": epoch, "val_accuracy": 0.1})
    ] == stops_at


@pytest.mark.parametrize("after_the_signal, state, value", [([], "COMPLETE", 0.3), (["fail"], "FAIL", None)])
def test_a_trial_whose_stop_signal_comes_after_its_last_epoch_is_never_pruned(tmp_path, after_the_signal, state, value):
    # Pruned at epoch 1 of 3, but the signal comes once the 3 are trained: if the experiment still completes, the
    # trial is complete with its value; if it fails (train raises the signal it held), the trial failed.
    steps = {"s-0": [0.9, 0.9, 0.9], "s-1": [0.1, 0.2, 0.3, "wait", *after_the_signal]}
    study, searched = tiny_study(tmp_path, startup_trials=1)
    tune.run_trials(study, FakeRunner(tmp_path, steps), searched, BASE, 2)
    assert (tmp_path / "interrupted/s-1").exists()
    assert [(t.state.name, t.value) for t in study.trials] == [("COMPLETE", 0.9), (state, value)]


def test_resuming_never_reruns_a_completed_trial(tmp_path):
    runner = FakeRunner(tmp_path, {f"s-{n}": [0.9 + n / 100] for n in range(3)})
    study, searched = tiny_study(tmp_path)
    tune.run_trials(study, runner, searched, BASE, 2)
    again, _ = tiny_study(tmp_path)  # a new process: the study from its database
    assert tune.trial_counts(again) == {"running": 0, "waiting": 0, "complete": 2, "pruned": 0, "fail": 0}
    tune.run_trials(again, runner, searched, BASE, 1)
    assert started(tmp_path) == ["s-0", "s-1", "s-2"]
    assert [t.value for t in again.trials] == [0.9, 0.91, 0.92]


def test_a_trial_whose_experiment_exists_is_read_not_rerun(tmp_path):
    study, searched = tiny_study(tmp_path)
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments/s-0.json").write_text('{"val_accuracy": 0.97}')
    tune.run_trials(study, FakeRunner(tmp_path, {}), searched, BASE, 1)
    assert started(tmp_path) == [] and study.trials[0].value == 0.97


def test_a_failed_trial_is_recorded_and_the_study_goes_on(tmp_path, capsys):
    study, searched = tiny_study(tmp_path)
    tune.run_trials(study, FakeRunner(tmp_path, {"s-0": [0.9, "fail"], "s-1": [0.9]}), searched, BASE, 2)
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE"]
    failure = f"`dvc exp run` exited 1; see {tmp_path / tune.TRIAL_LOGS / 's-0.log'}"
    assert study.trials[0].user_attrs["failure"] == failure
    assert f"tune: trial 0 (s-0): failed: {failure}\n" in capsys.readouterr().out


def test_stop_all_stops_the_running_trials_at_their_epoch_end_and_starts_no_new_one(tmp_path):
    runner = FakeRunner(tmp_path, {"s-0": [0.5, "wait", 0.5, 0.5]})
    status = runner.run(runner.command("s-0", {}), tmp_path / "s-0.log", lambda epoch: runner.stop_all())
    assert status == 130 and (tmp_path / "s-0.log").read_text().count(EPOCH_LINE_PREFIX) == 2
    study, searched = tiny_study(tmp_path)
    tune.run_trials(study, runner, searched, BASE, 3)
    assert [(t.state.name, t.user_attrs.get("failure")) for t in study.trials] == [("FAIL", None)]
    assert started(tmp_path) == ["s-0"]  # the one run before, none since


# The command takes its SIGINT with the signal blocked all along (as FAKE_TRIAL does), so only stop_with_parent
# can be killed by the second one: when it comes as the command has just exited.
STOPPED_COMMAND = """
import signal, sys
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
print("ready", flush=True)
signal.sigwait({signal.SIGINT})
sys.exit(130)
"""


def run_under_stop_with_parent(*command, stdout=None):
    wrapped = [sys.executable, stop_with_parent.__file__, str(os.getpid()), sys.executable, "-c", *command]
    return subprocess.Popen(wrapped, stdout=stdout, text=True, start_new_session=True)


def test_stop_with_parent_exits_with_its_commands_status_whenever_a_second_sigint_comes():
    for milliseconds in range(30):  # the second at 0 to 29 ms: before, as and after the command ends
        process = run_under_stop_with_parent(STOPPED_COMMAND, stdout=subprocess.PIPE)
        assert process.stdout.readline() == "ready\n"
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C, then stop_all again
        time.sleep(milliseconds / 1000)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGINT)
        assert process.wait(timeout=30) == 130


def test_stop_with_parent_reports_a_command_killed_by_a_signal_as_a_shell_does():
    killed = "import os, signal; signal.signal(signal.SIGINT, signal.SIG_DFL); os.kill(os.getpid(), signal.SIGINT)"
    assert run_under_stop_with_parent(killed).wait(timeout=30) == 128 + signal.SIGINT


def test_a_grid_runs_each_point_once_two_at_a_time_and_stops_at_its_size(tmp_path):
    raw = space(budget=None, parameters={"hidden_layer_size": {"values": [16, 32]}, "dropout": {"values": [0.1, 0.2]}})
    searched = parse_space(raw, BASE)
    study = tune.open_study("s", tune.open_storage(f"sqlite:///{tmp_path / 'optuna.db'}"), searched)
    tune.run_trials(study, FakeRunner(tmp_path, {f"s-{n}": [0.9] for n in range(6)}), searched, BASE, None, jobs=2)
    assert started(tmp_path) == ["s-0", "s-1", "s-2", "s-3"]
    points = sorted((t.params["hidden_layer_size"], t.params["dropout"]) for t in study.trials)
    assert points == [(16, 0.1), (16, 0.2), (32, 0.1), (32, 0.2)]


def test_one_worker_suggests_the_same_points_resumed_or_not(tmp_path):
    steps = {f"s-{n}": [0.9 + n / 100] for n in range(3)}
    for folder in ("straight", "resumed"):
        (tmp_path / folder).mkdir()
    straight, searched = tiny_study(tmp_path / "straight")
    tune.run_trials(straight, FakeRunner(tmp_path / "straight", steps), searched, BASE, 3)
    tune.run_trials(tiny_study(tmp_path / "resumed")[0], FakeRunner(tmp_path / "resumed", steps), searched, BASE, 2)
    resumed, _ = tiny_study(tmp_path / "resumed")  # a new process
    tune.run_trials(resumed, FakeRunner(tmp_path / "resumed", steps), searched, BASE, 1)
    assert [t.params for t in resumed.trials] == [t.params for t in straight.trials]


def first_point_worker(folder, barrier):
    """A worker of the study in `folder` that runs one trial once the other worker has opened the study too."""
    study, searched = tiny_study(folder)
    barrier.wait()  # both opened the study before either made a trial: two machines starting at the same instant
    tune.run_trials(study, FakeRunner(folder, {f"s-{n}": [0.9] for n in range(2)}), searched, BASE, 1)


def test_two_workers_starting_at_the_same_instant_suggest_different_first_points(tmp_path):
    tiny_study(tmp_path)
    spawn = multiprocessing.get_context("spawn")
    barrier = spawn.Barrier(2)
    workers = [spawn.Process(target=first_point_worker, args=(tmp_path, barrier)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [worker.exitcode for worker in workers] == [0, 0]
    first, second = tiny_study(tmp_path)[0].trials
    assert first.state.name == second.state.name == "COMPLETE" and first.params != second.params


def test_a_study_resumed_with_another_search_is_refused_naming_what_changed_and_left_as_it_was(tmp_path):
    storage = tune.open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    tune.open_study("s", storage, parse_space(space(), BASE))
    started_with = optuna.load_study(study_name="s", storage=storage).user_attrs
    tune.open_study("s", storage, parse_space(space(budget={"trials": 9}), BASE))  # a new budget is no new search
    edited = {**space()["parameters"], "hidden_layer_size": {"min": 32, "max": 256, "log": True}}
    with pytest.raises(StageError) as caught:
        tune.open_study("s", storage, parse_space(space(parameters=edited, fixed={"epochs": 3}), BASE))
    assert str(caught.value) == (
        "search.yaml: study 's' was started with fixed.epochs 2 (now 3), space.hidden_layer_size [16, 256] log "
        "(now [32, 256] log); use a new --study name or restore the file"
    )
    study = optuna.load_study(study_name="s", storage=storage)
    assert study.user_attrs == started_with and study.trials == []


def test_the_command_refuses_an_edited_search_file_before_anything_is_written(tmp_path, run_stage_in):
    (tmp_path / "params.yaml").write_bytes(REAL_PARAMS.read_bytes())
    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    tune.open_study("s", tune.open_storage(storage), parse_space(space(), BASE))
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(space(seed=2)))
    result = run_stage_in("tune", tmp_path, "--study", "s", "--storage", storage)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (
        "tune: error: search.yaml: study 's' was started with sampler.seed 1 (now 2); "
        "use a new --study name or restore the file\n"
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["params.yaml", "search.yaml", "studies.db"]


def one_trial_worker(folder):
    """A worker of the study in `folder`, its heartbeat every second, its trial waiting for SIGINT after epoch 1."""
    tune.HEARTBEAT_SECONDS, tune.GRACE_SECONDS = 1, 3
    study, searched = tiny_study(folder)
    tune.run_trials(study, FakeRunner(folder, {"s-0": [0.9, "wait", 0.9, 0.9]}), searched, BASE, 1)


def test_a_sigkilled_worker_stops_its_trial_as_ctrl_c_would_and_its_point_is_retried(tmp_path, monkeypatch):
    worker = multiprocessing.get_context("spawn").Process(target=one_trial_worker, args=(tmp_path,))
    worker.start()
    wait_for(lambda: (tmp_path / "started/s-0").exists(), "trial started")
    worker.kill()
    worker.join()
    with contextlib.suppress(psutil.NoSuchProcess):
        psutil.Process(int((tmp_path / "started/s-0").read_text())).wait(timeout=60)
    assert (tmp_path / "interrupted/s-0").exists()  # stopped by SIGINT to its group, not left to train on

    monkeypatch.setattr(tune, "HEARTBEAT_SECONDS", 1)
    monkeypatch.setattr(tune, "GRACE_SECONDS", 3)
    study, searched = tiny_study(tmp_path)
    # The killed worker's trial fails once its heartbeat is GRACE_SECONDS old (and its point is queued again).
    wait_for(lambda: optuna.storages.fail_stale_trials(study) or study.trials[0].state.name == "FAIL", "stale trial")
    tune.run_trials(study, FakeRunner(tmp_path, {"s-1": [0.93]}), searched, BASE, 1)
    first, retried = study.trials
    assert (first.state.name, retried.state.name) == ("FAIL", "COMPLETE")
    assert retried.params == first.params and retried.value == 0.93  # the killed trial's point, run again


def budget_worker(folder):
    """A worker of the study in `folder` (budget 4 trials) that may run 4 trials itself, as another machine would.
    s-0 runs until s-1 has started; s-1 until s-3 is complete."""
    steps = {"s-0": [0.9, "after:started/s-1"], "s-1": [0.9, "after:experiments/s-3.json"]}
    study, searched = tiny_study(folder, startup_trials=10)
    tune.run_trials(study, FakeRunner(folder, steps | {f"s-{n}": [0.9] for n in range(2, 6)}), searched, BASE, 4)


def test_two_workers_on_one_study_start_no_trial_past_its_budget(tmp_path):
    # A runs s-0, then B s-1 until A has run s-2 and s-3: 3 complete and B's running one make 4. Counting finished
    # trials only, A would start a fifth.
    tiny_study(tmp_path, startup_trials=10)  # the study exists before the workers open it, with their search
    spawn = multiprocessing.get_context("spawn")
    a, b = (spawn.Process(target=budget_worker, args=(tmp_path,)) for _ in range(2))
    a.start()
    wait_for(lambda: (tmp_path / "started/s-0").exists(), "first trial")
    b.start()
    a.join(timeout=120)
    b.join(timeout=120)
    assert (a.exitcode, b.exitcode) == (0, 0)
    study, _ = tiny_study(tmp_path, startup_trials=10)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
    assert started(tmp_path) == ["s-0", "s-1", "s-2", "s-3"]


def test_a_heartbeat_the_database_cannot_take_is_skipped_and_the_next_one_recorded(tmp_path, monkeypatch, capsys):
    # Optuna's heartbeat thread ends at the first error it meets; the trial would be failed while it trains.
    monkeypatch.setattr(tune, "HEARTBEAT_SECONDS", 1)
    study = optuna.create_study(storage=tune.open_storage(f"sqlite:///{tmp_path / 'optuna.db'}"))
    beats, recorded = [], threading.Event()
    record = optuna.storages.RDBStorage.record_heartbeat

    def down_for_two_beats(self, trial_id):
        beats.append(trial_id)
        if len(beats) <= 2:
            raise OSError("could not connect to server")
        record(self, trial_id)
        recorded.set()

    monkeypatch.setattr(optuna.storages.RDBStorage, "record_heartbeat", down_for_two_beats)
    study.optimize(
        lambda trial: float(recorded.wait(timeout=60)), n_trials=1
    )  # the trial lasts until a beat is recorded
    assert study.trials[0].value == 1.0 and len(beats) == 3
    with contextlib.closing(sqlite3.connect(tmp_path / "optuna.db")) as database:
        assert (
            database.execute("SELECT trial_id FROM trial_heartbeats").fetchall()
            == database.execute("SELECT trial_id FROM trials").fetchall()
        )
    assert capsys.readouterr().out.count("tune: heartbeat not recorded (could not connect to server); next try") == 2


# A pipeline of one stage that writes metrics/train.json as train does, val_accuracy 0.9<epochs>, and prints its
# epoch line for a program when tune asks for it.
ONE_EPOCH = """test -z "$MNIST_EPOCH_JSON" || echo 'train: epoch {"epoch": 1, "val_accuracy": 0.9${epochs}}';
mkdir -p metrics && echo '{"val_accuracy": 0.9${epochs}}' > metrics/train.json"""


def test_a_trial_is_a_dvc_experiment_whose_epochs_come_from_trains_line_and_value_from_dvc_exp_show(tmp_path):
    (tmp_path / "params.yaml").write_text("epochs: 1\n")
    stage = {"cmd": ONE_EPOCH, "params": ["epochs"], "metrics": [{"metrics/train.json": {"cache": False}}]}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": stage}}))
    for command in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"]):
        run(command, tmp_path)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "pipeline"], tmp_path)
    runner, seen = tune.TrialRunner(tmp_path, None), []
    status = runner.run(
        runner.command("cnn-3", {"epochs": 3}), tmp_path / "cnn-3.log", lambda e: seen.append(e) or False
    )
    assert (status, seen) == (0, [{"epoch": 1, "val_accuracy": 0.93}])
    assert runner.experiment_metrics("cnn-3") == {"val_accuracy": 0.93}
    assert runner.experiment_metrics("cnn-4") is None


def test_the_studys_run_holds_the_search_the_best_so_far_by_trials_finished_and_its_model(stage_root):
    from mlflow.entities import LoggedModelOutput

    from stages.lib import tracking

    study, searched = tiny_study(stage_root)
    (stage_root / "search.yaml").write_text(yaml.safe_dump(space()))
    experiment_id = tracking.open_experiment("mnist-dnn")
    parent = tune.ParentRun(study, experiment_id, searched, stage_root / "search.yaml")
    client, models = parent.client, {}
    for n in range(3):  # each trial's run, as train makes it: a child of the study's run, with its model
        tags = {"dvc.experiment": f"s-{n}", "mlflow.parentRunId": parent.run_id}
        run = client.create_run(experiment_id, run_name=f"s-{n}", tags=tags)
        models[n] = client.create_logged_model(experiment_id).model_id
        client.log_outputs(run.info.run_id, [LoggedModelOutput(models[n], 0)])
    steps = {"s-0": [0.9], "s-1": [0.95], "s-2": [0.93]}
    tune.run_trials(study, FakeRunner(stage_root, steps), searched, BASE, 3, callbacks=(parent.update,))
    parent.end("FINISHED")

    run = client.get_run(parent.run_id)
    best = [(m.step, m.value) for m in client.get_metric_history(parent.run_id, "best_val_accuracy")]
    assert best == [(1, 0.9), (2, 0.95), (3, 0.95)]  # step: the trials finished
    assert run.data.metrics["trials_complete"] == 3 and run.data.metrics["trials_pruned"] == 0
    assert run.data.tags["best.experiment"] == "s-1" and run.data.tags["best.trial"] == "1"
    assert run.data.tags["space.hidden_layer_size"] == "[16, 256] log" and run.data.tags["fixed.epochs"] == "3"
    assert sorted((o.step, o.model_id) for o in run.outputs.model_outputs) == [(1, models[0]), (2, models[1])]
    for n in range(3):
        (child,) = client.search_runs([experiment_id], f"tags.`dvc.experiment` = 's-{n}'")
        assert (child.data.tags["tune.study"], child.data.tags["tune.trial"]) == ("s", str(n))
    pictures = {"optimization_history.png", "param_importances.png", "intermediate_values.png"}
    assert {a.path for a in client.list_artifacts(parent.run_id)} == pictures | {"search.yaml"}
