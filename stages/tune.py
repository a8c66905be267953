"""tune: a hyperparameter search over search.yaml with Optuna, each trial an ordinary DVC experiment; not a stage.

Usage: python -m stages.tune [--study NAME] [--trials N] [--minutes M] [--jobs N] [--storage URL] [--space FILE]

Each trial is `dvc exp run --temp -S ... -n <study>-<trial number>`: it shows in `dvc exp show` and can be
applied, pushed and promoted (`python -m stages.promote <name>`) like any other. A TPE sampler, seeded,
suggests the points; a median pruner stops a trial whose per-epoch val_accuracy falls behind, at the end
of an epoch (its MLflow run ends KILLED, tagged `tune.pruned`; it makes no DVC experiment). The study
lives in a database: OPTUNA_STORAGE or --storage, by default optuna.db beside mlflow.db; several
processes or machines on one database share the study. Ctrl-C stops the running trials at their next
epoch end; running the command again resumes the study.
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
import warnings
from collections.abc import Callable, Iterator
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


class TrialFailed(Exception):
    """A trial that did not complete (its experiment failed, or it was interrupted): FAIL, the study goes on."""


def experiment_name(study: str, number: int) -> str:
    """The DVC experiment (and MLflow run) name of a trial: unique in a study, since the database numbers trials."""
    return f"{study}-{number}"


def default_storage() -> str:
    return os.environ.get(STORAGE_ENV) or f"sqlite:///{tracking.repo_root() / STUDY_DATABASE}"


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
    # SQLite: wait for the one writer rather than fail; a server: reconnect after it went away.
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
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


def open_study(name: str, storage: optuna.storages.BaseStorage, space: Space) -> optuna.Study:
    """Create the study or load it (resume, or another machine's): maximise, seeded TPE, median pruner."""
    import optuna

    study = optuna.create_study(
        study_name=name,
        storage=storage,
        direction="maximize",
        pruner=optuna.pruners.MedianPruner(n_startup_trials=space.startup_trials, n_warmup_steps=space.warmup_epochs),
        load_if_exists=True,
    )
    # Seeded by the trials already there: a new study draws from `seed` itself, but a second machine
    # joining (or a resume) must not draw the same sequence again: with one seed, two machines were
    # seen suggesting the same first points.
    study.sampler = optuna.samplers.TPESampler(seed=space.seed + len(study.trials))
    return study


def trial_counts(study: optuna.Study) -> dict[str, int]:
    """The study's trials by state ("complete", "pruned", "running", ...: every state, 0 if none), one read."""
    import optuna

    counts = {state.name.lower(): 0 for state in optuna.trial.TrialState}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name.lower()] += 1
    return counts


def stop_at_budget(budget: int) -> optuna.study.MaxTrialsCallback:
    """Optuna callback, after each trial: start no other once the study's trials done and running, by every
    worker (it reads the storage), reach the budget."""
    import optuna

    state = optuna.trial.TrialState
    return optuna.study.MaxTrialsCallback(budget, states=(state.COMPLETE, state.PRUNED, state.RUNNING))


# ---------------------------------------------------------------- one trial: a DVC experiment


class Trials:
    """Runs trials as `dvc exp run --temp` processes, each in its own process group, and stops them:
    one (pruned) or all (Ctrl-C), by SIGINT, which DVC ignores while a stage runs and the train stage
    takes as "stop at the end of this epoch"."""

    def __init__(self, repo: Path, parent_run_id: str | None) -> None:
        self.repo = repo
        self.parent_run_id = parent_run_id
        self.stopping = threading.Event()
        self._running: dict[int, subprocess.Popen] = {}
        self._lock = threading.RLock()  # stop_all, a signal handler, may interrupt the main thread holding it

    def command(self, name: str, point: dict[str, Any]) -> list[str]:
        return [sys.executable, "-m", "dvc", "exp", "run", "--temp", "-n", name, *set_arguments(point)]

    def metrics(self, name: str) -> dict[str, Any] | None:
        """The metrics of the current commit's DVC experiment `name`, None if it has none."""
        return next((row.metrics for row in list_experiments(self.repo) if row.name == name), None)

    def run(self, command: list[str], log_path: Path, on_epoch: Callable[[int, float], bool]) -> tuple[int, bool]:
        """Run `command`, its output (stdout and stderr, one pipe, read to the end) into `log_path`; call
        `on_epoch(epoch, val_accuracy)` at each epoch's line (train's EPOCH_LINE_PREFIX and JSON) and stop the
        process the first time it returns True. Returns the exit status and whether it was stopped for `on_epoch`."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1", tracking.EPOCH_JSON_ENV: "1"}
        if self.parent_run_id:
            env[tracking.PARENT_RUN_ENV] = self.parent_run_id
        log_path.parent.mkdir(parents=True, exist_ok=True)
        pruned = False
        with open(log_path, "w", buffering=1) as log_file, self._started(command, env) as process:
            for line in process.stdout:
                log_file.write(line)
                if line.startswith(tracking.EPOCH_LINE_PREFIX):
                    metrics = json.loads(line.removeprefix(tracking.EPOCH_LINE_PREFIX))
                    if on_epoch(metrics["epoch"], metrics["val_accuracy"]) and not pruned:
                        pruned = True  # the epoch under way when the signal comes is the last
                        self._interrupt(process)
            status = process.wait()
        return status, pruned

    @contextlib.contextmanager
    def _started(self, command: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen]:
        with self._lock:
            if self.stopping.is_set():
                raise TrialFailed("interrupted before it started")
            process = subprocess.Popen(
                [sys.executable, stop_with_parent.__file__, str(os.getpid()), *command],  # stopped if tune is killed
                cwd=self.repo,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,  # Ctrl-C reaches tune only; tune decides what the trials get
            )
            self._running[process.pid] = process
        try:
            yield process
        finally:
            with self._lock:
                self._running.pop(process.pid, None)
            if process.poll() is None:  # tune itself failed: do not leave the trial running unseen
                self._interrupt(process)
                process.wait()

    @staticmethod
    def _interrupt(process: subprocess.Popen) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGINT)

    def stop_all(self) -> None:
        """Ctrl-C: every running trial stops at its next epoch end; no new one starts."""
        with self._lock:
            self.stopping.set()
            for process in self._running.values():
                self._interrupt(process)


def objective(
    trials: Trials, space: Space, base: Params, study_name: str, mark_run: Callable[[str, dict[str, str]], None]
) -> Callable[[optuna.Trial], float]:
    """Optuna's objective: suggest a point, run it as a DVC experiment, report each epoch, prune, return
    the experiment's val_accuracy (also for a point DVC restores from its run-cache, which trains nothing)."""
    import optuna

    def run_trial(trial: optuna.Trial) -> float:
        point = suggest(trial, space, base)
        name = experiment_name(study_name, trial.number)
        trial.set_user_attr("experiment", name)
        done = trials.metrics(name)  # a retried trial whose experiment exists already
        if done is None:
            log_path = trials.repo / TRIAL_LOGS / f"{name}.log"
            log("tune", f"trial {trial.number} ({name}) started: {_describe(point, space)}")

            epochs, last_epoch = [], point.get("epochs", base.epochs)

            def on_epoch(epoch: int, value: float) -> bool:
                epochs.append(epoch)
                try:
                    trial.report(value, epoch)
                    # Not at the last epoch: the trial is complete by then, stopping it would save nothing.
                    return epoch < last_epoch and trial.should_prune()
                except Exception as exc:  # the study's database is down: train on, unpruned
                    log("tune", f"{name}: epoch {epoch} not reported to the study ({database_error(exc)}); not pruning")
                    return False

            status, pruned = trials.run(trials.command(name, point), log_path, on_epoch)
            done = trials.metrics(name) if status == 0 else None  # complete, even if stopped too late
            if done is None:
                if pruned:
                    mark_run(name, {PRUNED_TAG: "true", "tune.study": study_name, "tune.trial": str(trial.number)})
                    raise optuna.TrialPruned(f"{name} pruned after epoch {epochs[-1]}")
                failure = "interrupted" if trials.stopping.is_set() else f"`dvc exp run` exited {status}"
                trial.set_user_attr("failure", f"{failure}; see {log_path}")
                raise TrialFailed(f"{name}: {failure}")
        mark_run(name, {"tune.study": study_name, "tune.trial": str(trial.number)})
        return float(done["val_accuracy"])

    return run_trial


def _describe(point: dict[str, Any], space: Space) -> str:
    searched = [key for key in point if key not in space.fixed]
    return ", ".join(
        f"{key}={point[key]:.4g}" if isinstance(point[key], float) else f"{key}={point[key]}" for key in searched
    )


# ---------------------------------------------------------------- the study's parent run in MLflow


class ParentRun:
    """One MLflow run per study, the parent of every trial's run: the search space, the budget, the best
    value so far with its params, and pictures (optimisation history, importances, per-epoch curves)."""

    def __init__(self, study: optuna.Study, experiment_id: str, space: Space, space_file: Path) -> None:
        """Open the study's run (its id is kept in the study), or create it; tag it with the space and budget."""
        import mlflow

        self.client = mlflow.MlflowClient()
        self.study = study
        self.experiment_id = experiment_id
        self._lock = threading.RLock()  # stop_all, a signal handler, may interrupt the main thread holding it
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
        self.client.set_tag(self.run_id, "tune.study", study.study_name)
        self.client.set_tag(self.run_id, "mlflow.note.content", f"Optuna study '{study.study_name}': {space_file}")
        for key, value in _space_tags(space).items():
            self.client.set_tag(self.run_id, key, value)
        self.client.log_artifact(self.run_id, str(space_file))

    def trial_finished(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """Optuna callback: the best value so far and its params; the pictures, redrawn."""

        with self._lock, _not_fatal("update the study's run"):
            try:
                best = study.best_trial
            except ValueError:
                best = None  # no trial complete yet
            if best is not None:
                self.client.log_metric(self.run_id, "best_val_accuracy", best.value, step=trial.number)
                self.client.set_tag(self.run_id, "best.experiment", best.user_attrs.get("experiment", ""))
                self.client.set_tag(self.run_id, "best.trial", str(best.number))
                for key, value in best.params.items():
                    self.client.set_tag(self.run_id, f"best.{key}", str(value))
            for state, count in trial_counts(study).items():
                self.client.log_metric(self.run_id, f"trials_{state}", count, step=trial.number)
            self.draw()

    def draw(self) -> None:
        """optimization_history.png, param_importances.png, intermediate_values.png (each trial's
        val_accuracy per epoch; pruned ones stop early) as artifacts; a picture that cannot be drawn
        yet (importances need two complete trials) is left out."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as plots

        with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "experimental", "too few trials for importances"
            for name, draw in (
                ("optimization_history", plots.plot_optimization_history),
                ("param_importances", plots.plot_param_importances),
                ("intermediate_values", plots.plot_intermediate_values),
            ):
                try:
                    axes = draw(self.study)
                except Exception:  # too few trials for this picture
                    continue
                figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
                figure.savefig(Path(folder) / f"{name}.png", bbox_inches="tight", dpi=100)
                plt.close(figure)
            self.client.log_artifacts(self.run_id, folder)

    def mark_run(self, name: str, tags: dict[str, str]) -> None:
        """Tag the trial's MLflow run, found by its experiment's name (none if DVC restored the trial)."""
        with _not_fatal(f"tag the run of {name}"):
            runs = self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.`dvc.experiment` = '{name}' and tags.`mlflow.parentRunId` = '{self.run_id}'",
            )
            for run in runs:
                for key, value in tags.items():
                    self.client.set_tag(run.info.run_id, key, value)

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
    tags |= {"budget.trials": str(space.trials), "budget.minutes": str(space.minutes), "sampler.seed": str(space.seed)}
    tags |= {"pruner": f"median, warmup {space.warmup_epochs} epochs, after {space.startup_trials} trials"}
    return tags


# ---------------------------------------------------------------- the command


def summary(study: optuna.Study) -> list[str]:
    """The lines printed at the end: trials by state, the best value, its params and how to promote it."""

    count = trial_counts(study)
    lines = [
        f"study {study.study_name}: {sum(count.values())} trials: {count['complete']} complete, "
        f"{count['pruned']} pruned, {count['fail']} failed, {count['running']} running"
    ]
    try:
        best = study.best_trial
    except ValueError:
        return [*lines, "no trial complete yet"]
    params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.params.items())
    name = best.user_attrs.get("experiment", experiment_name(study.study_name, best.number))
    return [
        *lines,
        f"best: trial {best.number}, val_accuracy {best.value:.4f}: {params}",
        f"its experiment: {name}; promote it with: python -m stages.promote {name}",
    ]


@contextlib.contextmanager
def _stopping_on_signals(trials: Trials) -> Iterator[None]:
    """Ctrl-C or SIGTERM: the running trials stop at their next epoch end, and no new one starts."""

    def stop(signum: int, frame: Any) -> None:
        log("tune", f"{signal.Signals(signum).name}: stopping the running trials at their next epoch end")
        trials.stop_all()

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(study: str, trials: int | None, minutes: float | None, jobs: int, storage: str | None, space: Path) -> None:
    import optuna

    timer = Timer()
    base = load_params()
    searched = load_space(space, base)
    if jobs < 1 or (trials is not None and trials < 1) or (minutes is not None and minutes <= 0):
        raise StageError("--jobs and --trials must be at least 1, --minutes above 0")
    searched = dataclasses.replace(
        searched,
        trials=trials if trials is not None else searched.trials,
        minutes=minutes if minutes is not None else searched.minutes,
    )
    budget, limit = searched.trials, searched.minutes
    experiment_id = tracking.open_experiment(base.mlflow_experiment)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # tune prints each trial's end itself
    the_study = open_study(study, open_storage(storage or default_storage()), searched)
    parent = ParentRun(the_study, experiment_id, searched, space)
    runner = Trials(tracking.repo_root(), parent.run_id)
    callbacks: list[Callable] = [parent.trial_finished, _logging_trial]
    if budget is not None:
        callbacks.append(stop_at_budget(budget))
    # A killed worker's trial stays RUNNING until its heartbeat is GRACE_SECONDS old; then it fails (and its
    # point is queued again): as Optuna does when a trial starts, but before counting what is left.
    optuna.storages.fail_stale_trials(the_study)
    count = trial_counts(the_study)
    done, running = count["complete"] + count["pruned"], count["running"]
    left = None if budget is None else budget - done - running
    log(
        "tune",
        f"study {study}: {done} trials done of {budget}"
        f"{f', {running} running' if running else ''}; MLflow parent run {parent.run_id}",
    )
    status = "FINISHED"
    with _stopping_on_signals(runner):
        if left is None or left > 0:
            the_study.optimize(
                objective(runner, searched, base, study, parent.mark_run),
                n_trials=left,
                timeout=None if limit is None else limit * 60,
                n_jobs=jobs,
                catch=(TrialFailed,),
                callbacks=[*callbacks, lambda s, t: runner.stopping.is_set() and s.stop()],
            )
        if runner.stopping.is_set():
            status = "KILLED"
    parent.trial_finished(the_study, the_study.trials[-1]) if the_study.trials else parent.draw()
    parent.end(status)
    for line in summary(the_study):
        log("tune", line)
    if status == "KILLED":
        log("tune", f"interrupted after {timer}; run the command again to resume")
    else:
        log("tune", f"done in {timer}")
    if status == "KILLED":
        raise KeyboardInterrupt


def _logging_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    what = f"val_accuracy {trial.value:.4f}" if trial.value is not None else trial.state.name.lower()
    if trial.state.name == "FAIL":
        what = f"failed: {trial.user_attrs.get('failure', 'see the log above')}"
    if trial.state.name == "PRUNED":
        what = f"pruned after epoch {max(trial.intermediate_values, default=0)}"
    log("tune", f"trial {trial.number} ({trial.user_attrs.get('experiment', '')}): {what}")


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--study",
        default=DEFAULT_STUDY,
        help=f"the study's name, a prefix of its experiments' names (default: {DEFAULT_STUDY})",
    )
    parser.add_argument(
        "--trials", type=int, help="complete + pruned trials the study should have (default: search.yaml's budget)"
    )
    parser.add_argument(
        "--minutes", type=float, help="stop starting trials after this long (default: search.yaml's budget)"
    )
    parser.add_argument("--jobs", type=int, default=1, help="trials at once on this machine (default: 1)")
    parser.add_argument(
        "--storage", help=f"the study's database URL (default: ${STORAGE_ENV}, else sqlite:///<repo>/{STUDY_DATABASE})"
    )
    parser.add_argument("--space", type=Path, default=SEARCH_FILE, help=f"the search space (default: {SEARCH_FILE})")


if __name__ == "__main__":
    run_stage("tune", __doc__, main, arguments=arguments)
