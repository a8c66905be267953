"""runs: the MLflow run that trained the model of the workspace and of each DVC experiment, found by the model
file's MD5 (tag model.md5), and the MLflow UI's link to their curves; not a stage."""

import urllib.parse

from stages.common.cli import run_stage
from stages.common.errors import StageError
from stages.common.params import load_params
from stages.lib import tracking
from stages.lib.experiments import list_experiments


def ui_link(address: str, experiment_id: str, run_ids: list[str]) -> str:
    """The MLflow UI's chart view (every metric's curves) of these runs. Without workflowType=machine_learning,
    MLflow 3's UI opens an experiment as a GenAI one (traces), whatever its tags say."""
    query = {"workflowType": "machine_learning", "compareRunsMode": "CHART"}
    if run_ids:
        quoted = ", ".join(f"'{run_id}'" for run_id in run_ids)
        query["searchFilter"] = f"attributes.run_id IN ({quoted})"
    return f"{address}/#/experiments/{experiment_id}/runs?{urllib.parse.urlencode(query, quote_via=urllib.parse.quote)}"


def main(names: list[str]) -> None:
    experiments = list_experiments()
    unknown = sorted(set(names) - {e.name for e in experiments})
    if unknown:
        raise StageError(f"no such experiment: {', '.join(unknown)} (see `dvc exp show`)")
    experiment_id = tracking.open_experiment(load_params().mlflow_experiment)
    print(f"MLflow runs in {tracking.tracking_uri()}, experiment id {experiment_id}")
    print(f"{'experiment':<20} {'model md5':<10} {'MLflow run':<33} {'status':<9} {'test_acc':>8}  run name")
    shown = []
    for experiment in (e for e in experiments if not names or e.name in names):
        run = tracking.find_evaluated_run(experiment_id, experiment.model_md5) if experiment.model_md5 else None
        md5 = (experiment.model_md5 or "-")[:8]
        if run is None:
            print(f"{experiment.name:<20} {md5:<10} {'(no run in this store)':<33}")
            continue
        accuracy = run.data.metrics.get("test_accuracy")
        accuracy_shown = f"{accuracy:.4f}" if accuracy is not None else "-"
        row = f"{experiment.name:<20} {md5:<10} {run.info.run_id:<33} {run.info.status:<9} {accuracy_shown:>8}"
        print(f"{row}  {run.info.run_name}")
        shown.append(run.info.run_id)
    print(f"MLflow UI: {ui_link(tracking.ui_address(), experiment_id, list(dict.fromkeys(shown)))}")


if __name__ == "__main__":
    run_stage(
        "runs", __doc__, main, arguments=lambda p: p.add_argument("names", nargs="*", help="experiments (default: all)")
    )
