"""promote: register an experiment's model in the MLflow model registry and move the alias `champion` to it;
not a stage.

Usage: python -m stages.promote [--name NAME] [--force] [EXPERIMENT_OR_RUN_ID]

The candidate: the experiment named (as `dvc exp show` names it) or the MLflow run given by id; by default
the row of `dvc exp show` (workspace, baseline, experiments) with the best validation accuracy, never chosen
on test accuracy. Its training run's model becomes a new version of the registered model NAME, tagged with
the experiment, git commit, data and model MD5s and accuracies, and the alias `champion` moves to it.
A candidate whose test accuracy is below the champion's is refused unless --force. Serve the champion with
`mlflow models serve -m models:/mnist-dnn@champion --env-manager local`.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from stages.common.cli import log, run_stage
from stages.common.errors import StageError, first_line
from stages.common.params import load_params
from stages.lib import tracking
from stages.lib.experiments import Experiment, list_experiments

if TYPE_CHECKING:
    import mlflow

ALIAS = "champion"
LOGGED_MODEL_NAME = "model"  # train's mlflow.pyfunc.log_model(name=...)


def best_by_validation_accuracy(experiments: list[Experiment]) -> Experiment:
    """The row with the highest val_accuracy among those with a model and a test accuracy; of equal ones a
    committed row before the workspace. Test accuracy plays no part: choosing on it would tune to the test set."""
    rows = [e for e in experiments if e.model_md5 and "val_accuracy" in e.metrics and "test_accuracy" in e.metrics]
    if not rows:
        raise StageError("no experiment has a model with val_accuracy and test_accuracy (see `dvc exp show`)")
    return max(rows, key=lambda e: (e.metrics["val_accuracy"], e.rev != "workspace"))


def candidate(
    experiments: list[Experiment], experiment_id: str, wanted: str | None
) -> tuple[Experiment, mlflow.entities.Run]:
    """The experiment to promote and the MLflow run that trained its model: `wanted` is a name from
    `dvc exp show` or a run id; None for the best by validation accuracy."""
    named = [e for e in experiments if e.name == wanted]
    if wanted is not None and not named:
        return _candidate_of_run(experiments, wanted)
    chosen = named[0] if named else best_by_validation_accuracy(experiments)
    if not chosen.model_md5:
        raise StageError(f"{chosen.name} has no model (see `dvc exp show`)")
    run = tracking.find_evaluated_run(experiment_id, chosen.model_md5)
    if run is None:
        raise StageError(
            f"no MLflow run in {tracking.tracking_uri()} trained the model of {chosen.name} "
            f"(md5 {chosen.model_md5}); name another experiment (see `python -m stages.runs`)"
        )
    return chosen, run


def _candidate_of_run(experiments: list[Experiment], run_id: str) -> tuple[Experiment, mlflow.entities.Run]:
    """The run given by id, and the row of `dvc exp show` with its model (a committed one before the workspace)."""
    import mlflow

    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException as exc:
        raise StageError(
            f"no such experiment or MLflow run: {run_id} (see `dvc exp show` and `python -m stages.runs`)"
        ) from exc
    model_md5 = run.data.tags.get(tracking.MODEL_TAG)
    rows = [e for e in experiments if model_md5 and e.model_md5 == model_md5]
    if not rows:
        raise StageError(f"MLflow run {run_id} trained no model that `dvc exp show` lists (model md5 {model_md5})")
    return min(rows, key=lambda e: e.rev == "workspace"), run


def version_tags(experiment: Experiment, run: mlflow.entities.Run) -> dict[str, str]:
    """What the model version records: where the model came from, on what data, how good it is."""
    tags = {
        "dvc.experiment": experiment.name,
        "git.commit": experiment.rev,
        "data.train.md5": run.data.tags.get("data.train.md5"),
        "data.validation.md5": run.data.tags.get("data.validation.md5"),
        "data.test.md5": experiment.test_data_md5,
        "val_accuracy": experiment.metrics.get("val_accuracy"),
        "test_accuracy": experiment.metrics.get("test_accuracy"),
        tracking.MODEL_TAG: experiment.model_md5,
    }
    return {key: str(value) for key, value in tags.items() if value is not None}


def champion(name: str) -> mlflow.entities.model_registry.ModelVersion | None:
    """The version the alias points to, or None (no such registered model, or no alias yet)."""
    import mlflow

    client = mlflow.MlflowClient()
    try:
        registered = client.get_registered_model(name)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise StageError(f"MLflow model registry {tracking.tracking_uri()}: {first_line(exc)}") from exc
    version = registered.aliases.get(ALIAS)
    return client.get_model_version(name, version) if version is not None else None


def register(name: str, run: mlflow.entities.Run, tags: dict[str, str]) -> mlflow.entities.model_registry.ModelVersion:
    """A new version of `name` from the model the run logged, tagged; the registered model is created if new."""
    import mlflow

    client = mlflow.MlflowClient()
    logged = client.search_logged_models(
        [run.info.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}' AND name = '{LOGGED_MODEL_NAME}'",
    )
    if not logged:
        raise StageError(f"MLflow run {run.info.run_id} has no logged model '{LOGGED_MODEL_NAME}'")
    try:
        client.create_registered_model(name)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise StageError(f"MLflow model registry {tracking.tracking_uri()}: {first_line(exc)}") from exc
    model = logged[0]
    return client.create_model_version(
        name, model.model_uri, run_id=run.info.run_id, tags=tags, model_id=model.model_id
    )


def promote(experiments: list[Experiment], experiment_id: str, wanted: str | None, name: str, force: bool) -> str:
    """Register the candidate and move the alias to it, unless it is the champion already or, without
    `force`, tests worse than it; the line that says what happened."""
    import mlflow

    experiment, run = candidate(experiments, experiment_id, wanted)
    tags = version_tags(experiment, run)
    if "test_accuracy" not in tags or "val_accuracy" not in tags:
        raise StageError(f"{experiment.name} has no val_accuracy or test_accuracy (see `dvc exp show`)")
    accuracy = float(tags["test_accuracy"])
    what = (
        f"experiment {experiment.name}, run {run.info.run_id}, "
        f"val_accuracy {float(tags['val_accuracy']):.4f}, test_accuracy {accuracy:.4f}"
    )
    current = champion(name)
    if current is not None and current.tags.get(tracking.MODEL_TAG) == experiment.model_md5:
        return f"{name} version {current.version} ({ALIAS}) is already this model ({what}); nothing to do"
    if current is not None and "test_accuracy" in current.tags and not force:
        champion_accuracy = float(current.tags["test_accuracy"])
        if accuracy < champion_accuracy:
            raise StageError(
                f"{experiment.name} has test_accuracy {accuracy:.4f}, below the {ALIAS}'s {champion_accuracy:.4f} "
                f"({name} version {current.version}); add --force to promote it anyway"
            )
    version = register(name, run, tags)
    mlflow.MlflowClient().set_registered_model_alias(name, ALIAS, version.version)
    return f"registered {name} version {version.version} ({what}) and moved alias {ALIAS} to it"


def main(name: str | None, force: bool, experiment: str | None) -> None:
    params = load_params()
    experiment_id = tracking.open_experiment(params.mlflow_experiment)
    log("promote", promote(list_experiments(), experiment_id, experiment, name or params.registered_model, force))


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", help="the registered model's name (default: registered_model in params.yaml)")
    parser.add_argument("--force", action="store_true", help="promote even if it tests worse than the champion")
    parser.add_argument(
        "experiment",
        nargs="?",
        metavar="EXPERIMENT_OR_RUN_ID",
        help="a name from `dvc exp show` or an MLflow run id (default: the best val_accuracy)",
    )


if __name__ == "__main__":
    run_stage("promote", __doc__, main, arguments=arguments)
