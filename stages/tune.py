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

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stages.common.cli import Timer, log, run_stage
from stages.common.errors import StageError, first_line
from stages.common.params import Params, load_params
from stages.lib import stop_with_parent, tracking
from stages.lib.experiments import list_experiments
from stages.lib.search_space import SEARCH_FILE, Space, load_space, set_arguments, suggest

if TYPE_CHECKING:
    import optuna

STORAGE_ENV = "OPTUNA_STORAGE"
STUDY_DATABASE = "optuna.db"
DEFAULT_STUDY = "study"
TRIAL_LOGS = Path(".dvc/tmp/tune")  # one log per trial: DVC's and the stages' output (git and DVC ignore it)
PRUNED_TAG = "tune.pruned"
HEARTBEAT_SECONDS = 10  # a worker that stops beating for GRACE_SECONDS (SIGKILL) has its trial marked failed
GRACE_SECONDS = 60
CONNECT_SECONDS = 10  # a study's database server that accepts no connection within this is down
REPORT_WAIT_SECONDS = 60  # at a trial's end, how long epochs the study's database missed wait for it


class TrialFailed(Exception):
    """A trial that did not complete (its experiment failed, or it was interrupted): FAIL, the study goes on."""


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """The study's database, with heartbeats: a trial whose worker was killed is marked failed and retried once."""
    import optuna

    class Storage(optuna.storages.RDBStorage):
        def record_heartbeat(self, trial_id: int) -> None:
            """Optuna's heartbeat thread ends at its first error, and GRACE_SECONDS later the next worker to start
            a trial fails the one still training: a database down for a moment must cost a heartbeat, not a trial."""
            try:
                super().record_heartbeat(trial_id)
            except Exception as exc:
                log("tune", f"heartbeat not recorded ({database_error(exc)}); next try in {HEARTBEAT_SECONDS} s")

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


def open_study(
    name: str, storage: optuna.storages.BaseStorage, space: Space, space_file: Path = SEARCH_FILE
) -> optuna.Study:
    """Create the study or load it (resume, or another machine's): maximise, median pruner, a grid sampler for a
    grid, else TPE seeded per trial. A study started with another search than `space` is refused, unchanged."""
    import optuna

    class TrialSeededTPE(optuna.samplers.TPESampler):
        """Seeded by the seed and the trial's number, which the storage hands out: two machines starting at once
        draw different points (one seed for all drew the same), and one worker repeats its points, resumed or not."""

        def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            super().before_trial(study, trial)
            self._rng.rng.seed(space.seed + trial.number)
            self._random_sampler._rng.rng.seed(space.seed + trial.number)  # its first, random, points

    pruner = optuna.pruners.MedianPruner(n_startup_trials=space.startup_trials, n_warmup_steps=space.warmup_epochs)
    # A grid: each trial takes the point of its number (shuffled by the seed), so no point runs twice.
    sampler = optuna.samplers.GridSampler(space.choices, seed=space.seed) if space.grid else TrialSeededTPE()
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
    import optuna

    counts = {state.name.lower(): 0 for state in optuna.trial.TrialState}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name.lower()] += 1
    return counts


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:  # no trial complete yet
        return None


def describe(params: dict[str, Any]) -> str:
    return ", ".join(
        f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}" for key, value in params.items()
    )


class TrialRunner:
    """Runs trials as `dvc exp run --temp` processes, each in a process group of its own under stop_with_parent
    (which stops it if tune is killed), and stops them: one (pruned) or all (Ctrl-C), by SIGINT to the group,
    which DVC ignores while a stage runs and the train stage takes as "stop at the end of this epoch"."""

    def __init__(self, repo: Path, parent_run_id: str | None) -> None:
        self.repo = repo
        self.parent_run_id = parent_run_id
        self.stopping = threading.Event()
        self._running: set[subprocess.Popen] = set()
        self._lock = threading.RLock()  # stop_all, a signal handler, may interrupt the main thread holding it

    def command(self, name: str, point: dict[str, Any]) -> list[str]:
        return [sys.executable, "-m", "dvc", "exp", "run", "--temp", "-n", name, *set_arguments(point)]

    def experiment_metrics(self, name: str) -> dict[str, Any] | None:
        """The metrics of the current commit's DVC experiment `name`, None if it has none."""
        return next((row.metrics for row in list_experiments(self.repo) if row.name == name), None)

    def run(self, command: list[str], log_path: Path, on_epoch: Callable[[dict[str, Any]], bool]) -> int:
        """Run `command`, its output (stdout and stderr, one pipe, read to the end) into `log_path`; call
        `on_epoch` with each epoch's metrics (train's EPOCH_LINE_PREFIX lines) and stop the trial whenever it
        returns True. Returns the exit status."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1", tracking.EPOCH_JSON_ENV: "1"}
        if self.parent_run_id:
            env[tracking.PARENT_RUN_ENV] = self.parent_run_id
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            if self.stopping.is_set():
                raise TrialFailed("interrupted before it started")
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
            self._running.add(process)
        prefix = tracking.EPOCH_LINE_PREFIX
        try:
            with open(log_path, "w", buffering=1) as log_file:
                for line in process.stdout:
                    log_file.write(line)
                    if line.startswith(prefix) and on_epoch(json.loads(line.removeprefix(prefix))):
                        _interrupt(process)
            return process.wait()
        finally:
            with self._lock:
                self._running.discard(process)
            if process.poll() is None:  # tune itself failed: do not leave the trial running unseen
                _interrupt(process)
                process.wait()

    def stop_all(self) -> None:
        """Ctrl-C: every running trial stops at its next epoch end; no new one starts."""
        with self._lock:
            self.stopping.set()
            for process in self._running:
                _interrupt(process)


def _interrupt(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGINT)


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
        """Report the epochs the database could not take, in order (the study's curves have no holes); raise at
        the first it still cannot take."""
        while self.unreported:
            epoch = self.unreported[0]
            self.trial.report(self.values[epoch], epoch)
            self.unreported.pop(0)

    def report_the_rest(self) -> None:
        """At the trial's end (a trial told complete takes no more epochs): report the epochs the database missed,
        waiting for it up to REPORT_WAIT_SECONDS; else fail the trial, in one line naming them."""
        deadline = time.monotonic() + REPORT_WAIT_SECONDS
        while True:
            try:
                self.report_unreported()
                return
            except Exception as exc:
                if time.monotonic() >= deadline:
                    missing = ", ".join(map(str, self.unreported))
                    failure = f"epochs {missing} never reached the study's database ({database_error(exc)})"
                    log("tune", f"{self.name}: {failure} within {REPORT_WAIT_SECONDS:g} s; the trial fails")
                    raise TrialFailed(f"{self.name}: {failure}") from exc
            time.sleep(1)

    def pruned(self) -> str:
        return (
            f"pruned at epoch {self.pruned_at} (val_accuracy {self.values[self.pruned_at]:.4f} below the median), "
            f"trained {max(self.values)} of {self.epochs} epochs"
        )


def objective(runner: TrialRunner, space: Space, base: Params) -> Callable[[optuna.Trial], float]:
    """Optuna's objective: suggest a point, run it as a DVC experiment reporting each epoch, and return the
    experiment's val_accuracy (also for a point DVC restores from its run-cache, which trains nothing)."""
    import optuna

    def run_trial(trial: optuna.Trial) -> float:
        point = suggest(trial, space, base)
        name = f"{trial.study.study_name}-{trial.number}"  # unique: the database numbers the trials
        trial.set_user_attr("experiment", name)
        metrics = runner.experiment_metrics(name)  # an experiment of this name exists already: read, not rerun
        if metrics is None:
            metrics = run_experiment(trial, name, point)
        return float(metrics["val_accuracy"])

    def run_experiment(trial: optuna.Trial, name: str, point: dict[str, Any]) -> dict[str, Any]:
        """The experiment's metrics; TrialPruned or TrialFailed if it made none."""
        searched = {key: value for key, value in point.items() if key not in space.fixed}
        log("tune", f"trial {trial.number} ({name}) started: {describe(searched)}")
        reports = EpochReports(trial, name, point.get("epochs", base.epochs))
        log_path = runner.repo / TRIAL_LOGS / f"{name}.log"
        status = runner.run(runner.command(name, point), log_path, reports.on_epoch)
        reports.report_the_rest()
        metrics = runner.experiment_metrics(name)  # made: complete, even if a stop signal came after its end
        if metrics is not None:
            return metrics
        if reports.pruned_at is not None and max(reports.values) < reports.epochs:
            trial.set_user_attr("pruned", reports.pruned())
            raise optuna.TrialPruned(f"{name} {reports.pruned()}")
        failure = "interrupted" if runner.stopping.is_set() else f"`dvc exp run` exited {status}"
        trial.set_user_attr("failure", f"{failure}; see {log_path}")
        raise TrialFailed(f"{name}: {failure}")

    return run_trial


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
    MaxTrialsCallback reads the storage) reach `space.trials`, after `space.minutes`, or on Ctrl-C (stop_all)."""
    import optuna

    state = optuna.trial.TrialState
    stops = [lambda study, trial: runner.stopping.is_set() and study.stop()]
    if space.trials is not None:
        stops.append(optuna.study.MaxTrialsCallback(space.trials, states=(state.COMPLETE, state.PRUNED, state.RUNNING)))
    study.optimize(
        objective(runner, space, base),
        n_trials=n_trials,
        timeout=None if space.minutes is None else space.minutes * 60,
        n_jobs=jobs,
        catch=(TrialFailed,),
        callbacks=[*callbacks, log_trial_end, *stops],
    )


def log_trial_end(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    if trial.state.name == "COMPLETE":
        what = f"val_accuracy {trial.value:.4f}"
    elif trial.state.name == "PRUNED":
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
        self._tag(self.run_id, {"tune.study": study.study_name, "mlflow.note.content": note, **_space_tags(space)})
        self.client.log_artifact(self.run_id, str(space_file))

    def _tag(self, run_id: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(run_id, key, value)

    def trial_finished(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """Optuna callback: tag the trial's run (found by its experiment's name and this parent; none if DVC
        restored the trial), if it completed or was pruned, and link its model to the study's run if it is the best
        so far; then update the study's run."""
        from mlflow.entities import LoggedModelOutput

        if trial.state.name in ("COMPLETE", "PRUNED"):
            name, pruned = trial.user_attrs["experiment"], trial.state.name == "PRUNED"
            with _not_fatal(f"tag the run of {name}"):
                query = f"tags.`dvc.experiment` = '{name}' and tags.`mlflow.parentRunId` = '{self.run_id}'"
                best = best_trial(study)
                for run in self.client.search_runs([self.experiment_id], query):
                    tags = {"tune.study": study.study_name, "tune.trial": str(trial.number)}
                    self._tag(run.info.run_id, tags | ({PRUNED_TAG: "true"} if pruned else {}))
                    if best is not None and best.number == trial.number:
                        # The study's output is its best model so far: MLflow 3's UI (GenAI view, its default)
                        # files a run without a model output under "Evaluation runs", not among training runs.
                        models = [LoggedModelOutput(m.model_id, trial.number) for m in run.outputs.model_outputs]
                        self.client.log_outputs(self.run_id, models)
        self.update(study, trial.number)

    def update(self, study: optuna.Study, step: int) -> None:
        """The best value so far with its params, the trials by state, and the pictures, redrawn."""
        with self._lock, _not_fatal("update the study's run"):
            best = best_trial(study)
            if best is not None:
                self.client.log_metric(self.run_id, "best_val_accuracy", best.value, step=step)
                best_params = {f"best.{key}": str(value) for key, value in best.params.items()}
                tags = {"best.experiment": best.user_attrs["experiment"], "best.trial": str(best.number)}
                self._tag(self.run_id, tags | best_params)
            for state, count in trial_counts(study).items():
                self.client.log_metric(self.run_id, f"trials_{state}", count, step=step)
            self._draw(study)

    def _draw(self, study: optuna.Study) -> None:
        """optimization_history.png, param_importances.png, intermediate_values.png (each trial's val_accuracy
        per epoch; pruned ones stop early) as artifacts; one that cannot be drawn yet (importances need two
        complete trials) is left out."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as plots

        pictures = ("optimization_history", "param_importances", "intermediate_values")
        with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "experimental", "too few trials for importances"
            for name in pictures:
                try:
                    figure = getattr(plots, f"plot_{name}")(study).figure
                except Exception:  # too few trials for this picture
                    continue
                figure.savefig(Path(folder) / f"{name}.png", bbox_inches="tight", dpi=100)
                plt.close(figure)
            self.client.log_artifacts(self.run_id, folder)

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


def summary(study: optuna.Study) -> list[str]:
    """The lines printed at the end: trials by state, the best value, its params and how to promote it."""
    count = trial_counts(study)
    lines = [
        f"study {study.study_name}: {sum(count.values())} trials: {count['complete']} complete, "
        f"{count['pruned']} pruned, {count['fail']} failed, {count['running']} running"
    ]
    best = best_trial(study)
    if best is None:
        return [*lines, "no trial complete yet"]
    name = best.user_attrs["experiment"]
    return [
        *lines,
        f"best: trial {best.number}, val_accuracy {best.value:.4f}: {describe(best.params)}",
        f"its experiment: {name}; promote it with: python -m stages.promote {name}",
    ]


@contextlib.contextmanager
def _stopping_on_signals(runner: TrialRunner) -> Iterator[None]:
    """Ctrl-C or SIGTERM: the running trials stop at their next epoch end, and no new one starts."""

    def stop(signum: int, frame: Any) -> None:
        log("tune", f"{signal.Signals(signum).name}: stopping the running trials at their next epoch end")
        runner.stop_all()

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(
    study_name: str,
    trial_budget: int | None,
    minutes: float | None,
    jobs: int,
    storage_url: str | None,
    space_file: Path,
) -> None:
    """Open the study and its parent run, print where the study stands, run trials until the budget is spent
    (or Ctrl-C), and print the summary."""
    import optuna

    timer = Timer()
    if jobs < 1 or (trial_budget is not None and trial_budget < 1) or (minutes is not None and minutes <= 0):
        raise StageError("--jobs and --trials must be at least 1, --minutes above 0")
    base = load_params()
    space = load_space(space_file, base)
    budget = {"trials": trial_budget, "minutes": minutes}
    space = dataclasses.replace(space, **{key: value for key, value in budget.items() if value is not None})
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # tune prints each trial's end itself
    storage_url = storage_url or os.environ.get(STORAGE_ENV) or f"sqlite:///{tracking.repo_root() / STUDY_DATABASE}"
    study = open_study(study_name, open_storage(storage_url), space, space_file)  # first: it may refuse the file
    experiment_id = tracking.open_experiment(base.mlflow_experiment)
    parent = ParentRun(study, experiment_id, space, space_file)
    runner = TrialRunner(tracking.repo_root(), parent.run_id)
    # A killed worker's trial is RUNNING until its heartbeat is GRACE_SECONDS old; then it fails (its point
    # queued again), as Optuna does when a trial starts: here before counting what is left.
    optuna.storages.fail_stale_trials(study)
    count = trial_counts(study)
    done, running = count["complete"] + count["pruned"], count["running"]
    also_running = f", {running} running" if running else ""
    log(
        "tune",
        f"study {study_name}: {done} trials done of {space.trials}{also_running}; MLflow parent run {parent.run_id}",
    )
    left = None if space.trials is None else space.trials - done - running
    with _stopping_on_signals(runner):
        if left is None or left > 0:
            run_trials(study, runner, space, base, left, jobs, callbacks=(parent.trial_finished,))
    every_trial = study.get_trials(deepcopy=False)  # other machines' too
    if every_trial:
        parent.update(study, step=every_trial[-1].number)
    parent.end("KILLED" if runner.stopping.is_set() else "FINISHED")
    for line in summary(study):
        log("tune", line)
    if runner.stopping.is_set():
        log("tune", f"interrupted after {timer}; run the command again to resume")
        raise KeyboardInterrupt
    log("tune", f"done in {timer}")


def arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add(
        "--study",
        dest="study_name",
        metavar="NAME",
        default=DEFAULT_STUDY,
        help=f"the study's name, a prefix of its experiments' names (default: {DEFAULT_STUDY})",
    )
    add(
        "--trials",
        dest="trial_budget",
        metavar="N",
        type=int,
        help="complete + pruned trials the study should have (default: search.yaml's budget)",
    )
    add(
        "--minutes",
        metavar="M",
        type=float,
        help="stop starting trials after this long (default: search.yaml's budget)",
    )
    add("--jobs", metavar="N", type=int, default=1, help="trials at once on this machine (default: 1)")
    add(
        "--storage",
        dest="storage_url",
        metavar="URL",
        help=f"the study's database URL (default: ${STORAGE_ENV}, else sqlite:///<repo>/{STUDY_DATABASE})",
    )
    add(
        "--space",
        dest="space_file",
        metavar="FILE",
        type=Path,
        default=SEARCH_FILE,
        help=f"the search space (default: {SEARCH_FILE})",
    )


if __name__ == "__main__":
    run_stage("tune", __doc__, main, arguments=arguments)
