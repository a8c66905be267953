"""promote: register an experiment's model in the MLflow model registry and move the alias `champion` to it;
not a stage. Which candidate, its tags and when it is refused: docs/serving.md."""

import argparse

from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from stages.common.cli import log, run_stage
from stages.common.errors import StageError, first_line
from stages.common.params import load_params
from stages.lib import tracking
from stages.lib.experiments import Experiment, list_experiments

ALIAS = "champion"
LOGGED_MODEL_NAME = "model"  # train's mlflow.pyfunc.log_model(name=...)


def best_by_validation_accuracy(experiments: list[Experiment]) -> Experiment:
    """The evaluated row with the highest val_accuracy, a committed one before the workspace. Test accuracy
    plays no part: choosing on it would tune to the test set."""
    rows = [e for e in experiments if e.model_md5 and "val_accuracy" in e.metrics and "test_accuracy" in e.metrics]
    if not rows:
        raise StageError("no experiment has a model with val_accuracy and test_accuracy (see `dvc exp show`)")
    return max(rows, key=lambda e: (e.metrics["val_accuracy"], e.rev != "workspace"))


def candidate(experiments: list[Experiment], experiment_id: str, wanted: str | None) -> tuple[Experiment, Run]:
    """The experiment to promote and the run that trained its model: `wanted` is a name from `dvc exp show`,
    a run id, or None for the best by validation accuracy."""
    named = [e for e in experiments if e.name == wanted]
    if wanted is not None and not named:  # a run id, and the row with its model (a committed one first)
        try:
            run = MlflowClient().get_run(wanted)
        except MlflowException as exc:
            raise StageError(
                f"no such experiment or MLflow run: {wanted} (see `dvc exp show` and `python -m stages.runs`)"
            ) from exc
        model_md5 = run.data.tags.get(tracking.MODEL_TAG)
        rows = [e for e in experiments if model_md5 and e.model_md5 == model_md5]
        if not rows:
            raise StageError(f"MLflow run {wanted} trained no model that `dvc exp show` lists (model md5 {model_md5})")
        return min(rows, key=lambda e: e.rev == "workspace"), run
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


def version_tags(experiment: Experiment, run: Run) -> dict[str, str]:
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


def champion(client: MlflowClient, name: str) -> ModelVersion | None:
    """The version the alias points to; None if there is no such registered model or no alias yet."""
    try:
        return client.get_model_version_by_alias(name, ALIAS)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):  # no such model; no alias
            return None
        raise StageError(f"MLflow model registry {tracking.tracking_uri()}: {first_line(exc)}") from exc


def register(client: MlflowClient, name: str, run: Run, tags: dict[str, str]) -> ModelVersion:
    """A new version of `name` (created if new) from the model the run logged, tagged."""
    logged = client.search_logged_models(
        [run.info.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}' AND name = '{LOGGED_MODEL_NAME}'",
    )
    if not logged:
        raise StageError(f"MLflow run {run.info.run_id} has no logged model '{LOGGED_MODEL_NAME}'")
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise StageError(f"MLflow model registry {tracking.tracking_uri()}: {first_line(exc)}") from exc
    model = logged[0]
    return client.create_model_version(
        name, model.model_uri, run_id=run.info.run_id, tags=tags, model_id=model.model_id
    )


def promote(experiments: list[Experiment], experiment_id: str, wanted: str | None, name: str, force: bool) -> str:
    """Register the candidate and move the alias to it, unless it is the champion already or, without
    `force`, tests worse than it; the line that says what happened."""
    experiment, run = candidate(experiments, experiment_id, wanted)
    tags = version_tags(experiment, run)
    if "test_accuracy" not in tags or "val_accuracy" not in tags:
        raise StageError(f"{experiment.name} has no val_accuracy or test_accuracy (see `dvc exp show`)")
    accuracy = float(tags["test_accuracy"])
    what = (
        f"experiment {experiment.name}, run {run.info.run_id}, "
        f"val_accuracy {float(tags['val_accuracy']):.4f}, test_accuracy {accuracy:.4f}"
    )
    client = MlflowClient()
    current = champion(client, name)
    if current is not None and current.tags.get(tracking.MODEL_TAG) == experiment.model_md5:
        return f"{name} version {current.version} ({ALIAS}) is already this model ({what}); nothing to do"
    best = current.tags.get("test_accuracy") if current is not None else None
    if best is not None and not force and accuracy < float(best):
        raise StageError(
            f"{experiment.name} has test_accuracy {accuracy:.4f}, below the {ALIAS}'s {float(best):.4f} "
            f"({name} version {current.version}); add --force to promote it anyway"
        )
    version = register(client, name, run, tags)
    client.set_registered_model_alias(name, ALIAS, version.version)
    return f"registered {name} version {version.version} ({what}) and moved alias {ALIAS} to it"


def main(name: str | None, force: bool, experiment: str | None) -> None:
    params = load_params()
    experiment_id = tracking.open_experiment(params.mlflow_experiment)
    log("promote", promote(list_experiments(), experiment_id, experiment, name or params.registered_model, force))


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", help="the registered model's name (default: registered_model in params.yaml)")
    parser.add_argument("--force", action="store_true", help="promote even if it tests worse than the champion")
    which = "a name from `dvc exp show` or an MLflow run id (default: the best val_accuracy)"
    parser.add_argument("experiment", nargs="?", metavar="EXPERIMENT_OR_RUN_ID", help=which)


if __name__ == "__main__":
    run_stage("promote", __doc__, main, arguments=arguments)
