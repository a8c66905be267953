"""tune: a hyperparameter search over search.yaml with Optuna, each trial an ordinary DVC experiment; not a stage.

Usage: python -m stages.tune [--study NAME] [--trials N] [--minutes M] [--jobs N] [--storage URL] [--space FILE]

Each trial is `dvc exp run --temp -S ... -n <study>-<trial number>`: it shows in `dvc exp show` and can be
applied, pushed and promoted (`python -m stages.promote <name>`) like any other. A TPE sampler, seeded by the
seed and each trial's number, suggests the points (a grid sampler, each point once, when every searched param
lists its values); a median pruner stops a trial whose per-epoch val_accuracy falls behind, at the end
of an epoch (its MLflow run ends KILLED, tagged `tune.pruned`; it makes no DVC experiment). The study
lives in a database: OPTUNA_STORAGE or --storage, by default optuna.db beside mlflow.db; several
processes or machines on one database share the study. Ctrl-C stops the running trials at their next
epoch end; running the command again resumes the study, under the search it started with (an edited search
file is refused).
"""

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import optuna
import psutil
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from stages.common.cli import Timer, log, run_stage
from stages.common.errors import StageError, first_line
from stages.common.params import Params, load_params
from stages.lib import stop_with_parent, tracking
from stages.lib.experiments import list_experiments
from stages.lib.search_space import SEARCH_FILE, Space, load_space, set_arguments, suggest

STORAGE_ENV = "OPTUNA_STORAGE"
STUDY_DATABASE = "optuna.db"
TRIAL_LOGS = Path(".dvc/tmp/tune")  # one log per trial: DVC's and the stages' output (git and DVC ignore it)
PRUNED_TAG = "tune.pruned"
HEARTBEAT_SECONDS = 10  # a worker that stops beating for GRACE_SECONDS (SIGKILL) has its trial marked failed
GRACE_SECONDS = 60
CONNECT_SECONDS = 10  # a study's database server that accepts no connection within this is down
REPORT_WAIT_SECONDS = 60  # at a trial's end, how long epochs the study's database missed wait for it


class TrialFailed(Exception):
    """A trial that did not complete (its experiment failed, or it was interrupted): FAIL, the study goes on."""


class Storage(optuna.storages.RDBStorage):
    def record_heartbeat(self, trial_id: int) -> None:
        """Optuna's heartbeat thread ends at its first error, and GRACE_SECONDS later the next worker to start
        a trial fails the one still training: a database down for a moment must cost a heartbeat, not a trial."""
        try:
            super().record_heartbeat(trial_id)
        except Exception as exc:
            log("tune", f"heartbeat not recorded ({database_error(exc)}); next try in {HEARTBEAT_SECONDS} s")


def open_storage(url: str) -> Storage:
    """The study's database, with heartbeats: a trial whose worker was killed is marked failed and retried once."""
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats, plots
    # SQLite: wait for the one writer rather than fail; a server: reconnect after it went away, and give up on
    # one that does not answer within CONNECT_SECONDS (psycopg's own limit: 130 s), unless the URL says otherwise.
    if url.startswith("sqlite"):
        engine: dict[str, Any] = {"connect_args": {"timeout": 60}}
    else:
        engine = {"pool_pre_ping": True}
        if "connect_timeout=" not in url:
            engine["connect_args"] = {"connect_timeout": CONNECT_SECONDS}
    try:
        return Storage(
            url,
            engine_kwargs=engine,
            heartbeat_interval=HEARTBEAT_SECONDS,
            grace_period=GRACE_SECONDS,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
        )
    except Exception as exc:
        raise StageError(f"study storage {url.split('@')[-1]} is unreachable or broken: {first_line(exc)}") from exc


def database_error(exc: BaseException) -> str:
    """What went wrong, from the driver (Optuna's own message guesses at "invalid data in the commit")."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return first_line(exc)


class TrialSeededTPE(optuna.samplers.BaseSampler):
    """Optuna's TPE sampler, a new one for each trial, seeded by the seed plus the trial's number, which the storage
    hands out: two machines starting at once draw different points (one seed for all drew the same), and one worker
    draws the same points, resumed or not."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.by_trial: dict[int, optuna.samplers.TPESampler] = {}  # --jobs runs several trials at once

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.by_trial[trial.number] = optuna.samplers.TPESampler(seed=self.seed + trial.number)
        self.by_trial[trial.number].before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self.by_trial[trial.number].infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, space: dict[str, BaseDistribution]) -> dict:
        return self.by_trial[trial.number].sample_relative(study, trial, space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, name: str, within: BaseDistribution) -> Any:
        return self.by_trial[trial.number].sample_independent(study, trial, name, within)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Any) -> None:
        self.by_trial.pop(trial.number).after_trial(study, trial, state, values)


def open_study(
    name: str, storage: optuna.storages.BaseStorage, space: Space, space_file: Path = SEARCH_FILE
) -> optuna.Study:
    """Create the study or load it (resume, or another machine's): maximise, median pruner, a grid sampler for a
    grid (each trial takes the point of its number, shuffled by the seed, so no point runs twice), else TPE.
    A study started with another search than `space` is refused, unchanged."""
    pruner = optuna.pruners.MedianPruner(n_startup_trials=space.startup_trials, n_warmup_steps=space.warmup_epochs)
    sampler = optuna.samplers.GridSampler(space.choices, seed=space.seed) if space.grid else TrialSeededTPE(space.seed)
    study = optuna.create_study(
        study_name=name, storage=storage, direction="maximize", sampler=sampler, pruner=pruner, load_if_exists=True
    )
    search = {key: value for key, value in _space_tags(space).items() if not key.startswith("budget.")}
    started = study.user_attrs.get("search")
    if started is None:
        study.set_user_attr("search", search)
    elif started != search:  # its trials ran under the search it started with: refuse rather than mix
        changes = ", ".join(
            f"{key} {started.get(key, '(none)')} (now {search.get(key, '(none)')})"
            for key in sorted(started.keys() | search.keys())
            if started.get(key) != search.get(key)
        )
        raise StageError(
            f"{space_file}: study '{name}' was started with {changes}; use a new --study name or restore the file"
        )
    return study


def trial_counts(study: optuna.Study) -> dict[str, int]:
    """The study's trials by state ("complete", "pruned", "running", ...: every state, 0 if none), one read."""
    counts = {state.name.lower(): 0 for state in TrialState}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name.lower()] += 1
    return counts


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:  # no trial complete yet
        return None


def describe(params: dict[str, Any]) -> str:
    return ", ".join(
        f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}" for key, value in params.items()
    )


class TrialRunner:
    """Runs trials as `dvc exp run --temp` processes, each under stop_with_parent (which stops it if tune is killed)
    leading a process group of its own, and stops them: one (pruned) or all (Ctrl-C), by SIGINT to the group,
    which DVC ignores while a stage runs and the train stage takes as "stop at the end of this epoch"."""

    def __init__(self, repo: Path, parent_run_id: str | None) -> None:
        self.repo = repo
        self.parent_run_id = parent_run_id
        self.stopping = threading.Event()

    def command(self, name: str, point: dict[str, Any]) -> list[str]:
        return [sys.executable, "-m", "dvc", "exp", "run", "--temp", "-n", name, *set_arguments(point)]

    def experiment_metrics(self, name: str) -> dict[str, Any] | None:
        """The metrics of the current commit's DVC experiment `name`, None if it has none."""
        return next((row.metrics for row in list_experiments(self.repo) if row.name == name), None)

    def run(self, command: list[str], log_path: Path, on_epoch: Callable[[dict[str, Any]], bool]) -> int:
        """Run `command`, its output (stdout and stderr, one pipe, read to the end) into `log_path`; call
        `on_epoch` with each epoch's metrics (train's EPOCH_LINE_PREFIX lines) and stop the trial whenever it
        returns True. Returns the exit status."""
        if self.stopping.is_set():
            raise TrialFailed("interrupted before it started")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", tracking.EPOCH_JSON_ENV: "1"}
        if self.parent_run_id:
            env[tracking.PARENT_RUN_ENV] = self.parent_run_id
        log_path.parent.mkdir(parents=True, exist_ok=True)
        process = subprocess.Popen(
            [sys.executable, stop_with_parent.__file__, str(os.getpid()), *command],
            cwd=self.repo,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # Ctrl-C reaches tune only; tune decides what the trials get
        )
        if self.stopping.is_set():  # stop_all came as it started, and may not have seen it
            _interrupt(process.pid)
        prefix = tracking.EPOCH_LINE_PREFIX
        try:
            with open(log_path, "w", buffering=1) as log_file:
                for line in process.stdout:
                    log_file.write(line)
                    if line.startswith(prefix) and on_epoch(json.loads(line.removeprefix(prefix))):
                        _interrupt(process.pid)
            return process.wait()
        finally:
            if process.poll() is None:  # tune itself failed: do not leave the trial running unseen
                _interrupt(process.pid)
                process.wait()

    def stop_all(self) -> None:
        """Ctrl-C: every running trial stops at its next epoch end; no new one starts."""
        self.stopping.set()
        for child in psutil.Process().children():  # a trial's stop_with_parent leads its process group
            _interrupt(child.pid)

    def stop_on_signals(self) -> None:
        """From now on, Ctrl-C or SIGTERM: stop_all."""

        def stop(signum: int, frame: Any) -> None:
            log("tune", f"{signal.Signals(signum).name}: stopping the running trials at their next epoch end")
            self.stop_all()

        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, stop)


def _interrupt(group: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # no such group: that child of tune is no trial
        os.killpg(group, signal.SIGINT)


@dataclasses.dataclass
class EpochReports:
    """A trial's epochs as train reports them: each to the study, and whether the pruner stops the trial."""

    trial: optuna.Trial
    name: str
    epochs: int  # the trial's, from its point or params.yaml
    values: dict[int, float] = dataclasses.field(default_factory=dict)  # val_accuracy by epoch
    pruned_at: int | None = None  # the epoch at which the pruner said stop
    unreported: list[int] = dataclasses.field(default_factory=list)  # epochs the study's database has not taken yet

    def on_epoch(self, metrics: dict[str, Any]) -> bool:
        """Report the epoch, after those the database could not take before; True, once, if the pruner says stop
        and stopping saves an epoch (a stop signal ends the epoch under way: from the last but one epoch on, the
        trial would train all its epochs)."""
        epoch = metrics["epoch"]
        self.values[epoch] = metrics["val_accuracy"]
        self.unreported.append(epoch)
        try:
            self.report_unreported()
            if self.pruned_at is None and epoch < self.epochs - 1 and self.trial.should_prune():
                self.pruned_at = epoch
                return True
        except Exception as exc:  # the study's database is down: train on, unpruned, and report it later
            log("tune", f"{self.name}: epoch {epoch} kept to report later ({database_error(exc)}); not pruning")
        return False

    def report_unreported(self) -> None:
        """In order (the study's curves have no holes); raises at the first epoch the database still cannot take."""
        while self.unreported:
            self.trial.report(self.values[self.unreported[0]], self.unreported[0])
            self.unreported.pop(0)

    def report_the_rest(self) -> None:
        """At the trial's end (a trial told complete takes no more epochs): report the epochs the database missed,
        waiting for it up to REPORT_WAIT_SECONDS; else fail the trial, in one line naming them."""
        deadline = time.monotonic() + REPORT_WAIT_SECONDS
        while True:
            try:
                return self.report_unreported()
            except Exception as exc:
                if time.monotonic() >= deadline:
                    missing = ", ".join(map(str, self.unreported))
                    failure = f"epochs {missing} never reached the study's database ({database_error(exc)})"
                    log("tune", f"{self.name}: {failure} within {REPORT_WAIT_SECONDS:g} s; the trial fails")
                    raise TrialFailed(f"{self.name}: {failure}") from exc
            time.sleep(1)

    def pruned(self) -> str | None:
        """Why the trial stopped early, if the pruner stopped it before its last epoch."""
        if self.pruned_at is None or max(self.values) >= self.epochs:
            return None
        return (
            f"pruned at epoch {self.pruned_at} (val_accuracy {self.values[self.pruned_at]:.4f} below the median), "
            f"trained {max(self.values)} of {self.epochs} epochs"
        )


def run_trials(
    study: optuna.Study,
    runner: TrialRunner,
    space: Space,
    base: Params,
    n_trials: int | None,
    jobs: int = 1,
    callbacks: Sequence[Callable] = (),
) -> None:
    """Run up to `n_trials` trials (None: no limit), `jobs` at once, calling `callbacks` and printing a line as
    each ends; start none once the study's trials complete, pruned or running (every worker's:
    MaxTrialsCallback reads the storage) reach `space.trials`, after `space.minutes`, or on Ctrl-C (stop_all).
    A trial's value is its DVC experiment's val_accuracy (also for a point DVC restores from its run-cache)."""

    def run_trial(trial: optuna.Trial) -> float:
        point = suggest(trial, space, base)
        name = f"{trial.study.study_name}-{trial.number}"  # unique: the database numbers the trials
        trial.set_user_attr("experiment", name)
        metrics = runner.experiment_metrics(name)  # an experiment of this name exists already: read, not rerun
        if metrics is not None:
            return float(metrics["val_accuracy"])
        searched = {key: value for key, value in point.items() if key not in space.fixed}
        log("tune", f"trial {trial.number} ({name}) started: {describe(searched)}")
        reports = EpochReports(trial, name, point.get("epochs", base.epochs))
        log_path = runner.repo / TRIAL_LOGS / f"{name}.log"
        status = runner.run(runner.command(name, point), log_path, reports.on_epoch)
        reports.report_the_rest()
        metrics = runner.experiment_metrics(name)  # made: complete, even if a stop signal came after its end
        if metrics is not None:
            return float(metrics["val_accuracy"])
        pruned = reports.pruned()
        if pruned:
            trial.set_user_attr("pruned", pruned)
            raise optuna.TrialPruned(f"{name} {pruned}")
        failure = "interrupted" if runner.stopping.is_set() else f"`dvc exp run` exited {status}"
        trial.set_user_attr("failure", f"{failure}; see {log_path}")
        raise TrialFailed(f"{name}: {failure}")

    stops = [lambda study, trial: runner.stopping.is_set() and study.stop()]
    if space.trials is not None:
        counted = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
        stops.append(optuna.study.MaxTrialsCallback(space.trials, states=counted))
    study.optimize(
        run_trial,
        n_trials=n_trials,
        timeout=None if space.minutes is None else space.minutes * 60,
        n_jobs=jobs,
        catch=(TrialFailed,),
        callbacks=[*callbacks, log_trial_end, *stops],
    )


def log_trial_end(study: optuna.Study, trial: FrozenTrial) -> None:
    if trial.state == TrialState.COMPLETE:
        what = f"val_accuracy {trial.value:.4f}"
    elif trial.state == TrialState.PRUNED:
        what = trial.user_attrs["pruned"]
    else:
        what = f"failed: {trial.user_attrs.get('failure', 'see the log above')}"
    log("tune", f"trial {trial.number} ({trial.user_attrs.get('experiment', '')}): {what}")


class ParentRun:
    """One MLflow run per study, the parent of every trial's run: the search space, the budget, the best
    value so far with its params, and pictures (optimisation history, importances, per-epoch curves)."""

    def __init__(self, study: optuna.Study, experiment_id: str, space: Space, space_file: Path) -> None:
        """Open the study's run (its id is kept in the study), or create it; tag it with the space and budget."""
        import mlflow

        self.client = mlflow.MlflowClient()
        self.experiment_id = experiment_id
        self._lock = threading.Lock()  # trials end in several threads; matplotlib is not thread-safe
        run_id = study.user_attrs.get("mlflow.run_id")
        try:
            run = self.client.get_run(run_id) if run_id else None
        except mlflow.exceptions.MlflowException:
            run = None  # another tracking store than the study's first run used
        if run is None:
            run = self.client.create_run(experiment_id, run_name=f"study-{study.study_name}")
            study.set_user_attr("mlflow.run_id", run.info.run_id)
        else:
            self.client.update_run(run.info.run_id, status="RUNNING")
        self.run_id = run.info.run_id
        note = f"Optuna study '{study.study_name}': {space_file}"
        self._log(self.run_id, {"tune.study": study.study_name, "mlflow.note.content": note, **_space_tags(space)})
        self.client.log_artifact(self.run_id, str(space_file))

    def _log(self, run_id: str, tags: dict[str, str], metrics: dict[str, float] | None = None, step: int = 0) -> None:
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value in (metrics or {}).items()]
        self.client.log_batch(run_id, metrics=metrics, tags=[RunTag(key, value) for key, value in tags.items()])

    def update(self, study: optuna.Study, trial: FrozenTrial | None = None) -> None:
        """Optuna's callback as each trial ends, and once at the end (`trial` None): tag the trial's run (found by
        its experiment's name and this parent; none if DVC restored the trial) and, if it is the best so far, add
        its model to the study's run's outputs; then the best value so far with its params, the trials by state,
        and the pictures, redrawn; each at the step of the trials finished."""
        from mlflow.entities import LoggedModelOutput

        with self._lock, _not_fatal("update the study's run"):
            best, count = best_trial(study), trial_counts(study)
            step = count["complete"] + count["pruned"] + count["fail"]
            if trial is not None and trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
                tags = {"tune.study": study.study_name, "tune.trial": str(trial.number)}
                if trial.state == TrialState.PRUNED:
                    tags[PRUNED_TAG] = "true"
                name, parent = trial.user_attrs["experiment"], self.run_id
                query = f"tags.`dvc.experiment` = '{name}' and tags.`mlflow.parentRunId` = '{parent}'"
                for run in self.client.search_runs([self.experiment_id], query):
                    self._log(run.info.run_id, tags)
                    if best is not None and best.number == trial.number:
                        # The study's output is its best model so far: MLflow 3's UI (GenAI view, its default)
                        # files a run without a model output under "Evaluation runs", not among training runs.
                        models = [LoggedModelOutput(model.model_id, step) for model in run.outputs.model_outputs]
                        self.client.log_outputs(self.run_id, models)
            metrics = {f"trials_{state}": float(n) for state, n in count.items()}
            tags = {}
            if best is not None:
                metrics["best_val_accuracy"] = best.value
                tags = {"best.experiment": best.user_attrs["experiment"], "best.trial": str(best.number)}
                tags |= {f"best.{key}": str(value) for key, value in best.params.items()}
            self._log(self.run_id, tags, metrics, step)
            self._draw(study)

    def _draw(self, study: optuna.Study) -> None:
        """optimization_history.png, param_importances.png, intermediate_values.png (each trial's val_accuracy
        per epoch; pruned ones stop early); one that cannot be drawn yet (importances need two complete trials)
        is left out."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as plots

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "experimental", "too few trials for importances"
            for name in ("optimization_history", "param_importances", "intermediate_values"):
                try:
                    figure = getattr(plots, f"plot_{name}")(study).figure
                except Exception:  # too few trials for this picture
                    continue
                self.client.log_figure(
                    self.run_id, figure, f"{name}.png", save_kwargs={"bbox_inches": "tight", "dpi": 100}
                )
                plt.close(figure)

    def end(self, status: str) -> None:
        with _not_fatal("end the study's run"):
            self.client.set_terminated(self.run_id, status)


@contextlib.contextmanager
def _not_fatal(what: str) -> Iterator[None]:
    """The study's own records in MLflow are not worth a trial: a tracking server that is down (after
    MLflow's retries) costs an update, which the next trial's redoes, not the study."""
    try:
        yield
    except Exception as exc:
        log("tune", f"MLflow: could not {what}: {first_line(exc)}; the study goes on")


def _space_tags(space: Space) -> dict[str, str]:
    """The search space and the budget, one tag each, as a user reads them in search.yaml."""
    tags = {f"space.{key}": f"[{r.low}, {r.high}]{' log' if r.log else ''}" for key, r in space.ranges.items()}
    tags |= {f"space.{key}": json.dumps(values) for key, values in space.choices.items()}
    tags |= {f"fixed.{key}": str(value) for key, value in space.fixed.items()}
    tags |= {"budget.trials": str(space.trials), "budget.minutes": str(space.minutes)}
    tags |= {"sampler": "grid" if space.grid else "TPE", "sampler.seed": str(space.seed)}
    tags |= {"pruner": f"median, warmup {space.warmup_epochs} epochs, after {space.startup_trials} trials"}
    return tags


def log_summary(study: optuna.Study) -> None:
    """The trials by state, the best value, its params and how to promote it."""
    count = trial_counts(study)
    log(
        "tune",
        f"study {study.study_name}: {sum(count.values())} trials: {count['complete']} complete, "
        f"{count['pruned']} pruned, {count['fail']} failed, {count['running']} running",
    )
    best = best_trial(study)
    if best is None:
        log("tune", "no trial complete yet")
        return
    name = best.user_attrs["experiment"]
    log("tune", f"best: trial {best.number}, val_accuracy {best.value:.4f}: {describe(best.params)}")
    log("tune", f"its experiment: {name}; promote it with: python -m stages.promote {name}")


def main(
    study_name: str, trials: int | None, minutes: float | None, jobs: int, storage: str | None, space_file: Path
) -> None:
    """Open the study and its parent run, say where the study stands, run trials until the budget is spent
    (or Ctrl-C), and print the summary."""
    timer = Timer()
    if jobs < 1 or (trials is not None and trials < 1) or (minutes is not None and minutes <= 0):
        raise StageError("--jobs and --trials must be at least 1, --minutes above 0")
    base = load_params()
    space = load_space(space_file, base)
    space = dataclasses.replace(space, trials=trials or space.trials, minutes=minutes or space.minutes)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # tune prints each trial's end itself
    storage = storage or os.environ.get(STORAGE_ENV) or f"sqlite:///{tracking.repo_root() / STUDY_DATABASE}"
    study = open_study(study_name, open_storage(storage), space, space_file)  # first: it may refuse the file
    parent = ParentRun(study, tracking.open_experiment(base.mlflow_experiment), space, space_file)
    # A killed worker's trial is RUNNING until its heartbeat is GRACE_SECONDS old; then it fails (its point
    # queued again), as Optuna does when a trial starts: here before counting what is left.
    optuna.storages.fail_stale_trials(study)
    count = trial_counts(study)
    done, running = count["complete"] + count["pruned"], count["running"]
    also_running = f", {running} running" if running else ""
    standing = f"study {study_name}: {done} trials done of {space.trials}{also_running}"
    log("tune", f"{standing}; MLflow parent run {parent.run_id}")
    runner = TrialRunner(tracking.repo_root(), parent.run_id)
    runner.stop_on_signals()
    left = None if space.trials is None else space.trials - done - running  # 0 or less: optimize runs none
    run_trials(study, runner, space, base, left, jobs, callbacks=(parent.update,))
    if study.get_trials(deepcopy=False):
        parent.update(study)  # other machines' trials too
    parent.end("KILLED" if runner.stopping.is_set() else "FINISHED")
    log_summary(study)
    if runner.stopping.is_set():
        log("tune", f"interrupted after {timer}; run the command again to resume")
        raise KeyboardInterrupt
    log("tune", f"done in {timer}")


def arguments(parser: argparse.ArgumentParser) -> None:
    budget = "(default: search.yaml's budget)"
    database = f"(default: ${STORAGE_ENV}, else sqlite:///<repo>/{STUDY_DATABASE})"
    for flag, dest, metavar, kind, default, text in (
        ("--study", "study_name", "NAME", str, "study", "the study's name, a prefix of its experiments' names"),
        ("--trials", "trials", "N", int, None, f"complete + pruned trials the study should have {budget}"),
        ("--minutes", "minutes", "M", float, None, f"stop starting trials after this long {budget}"),
        ("--jobs", "jobs", "N", int, 1, "trials at once on this machine"),
        ("--storage", "storage", "URL", str, None, f"the study's database URL {database}"),
        ("--space", "space_file", "FILE", Path, SEARCH_FILE, "the search space"),
    ):
        shown = "" if default is None else f" (default: {default})"
        parser.add_argument(flag, dest=dest, metavar=metavar, type=kind, default=default, help=text + shown)


if __name__ == "__main__":
    run_stage("tune", __doc__, main, arguments=arguments)
