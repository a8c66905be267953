import urllib.parse

from stages.runs import ui_link


def test_ui_link_opens_the_chart_view_of_the_training_runs_listed_not_the_genai_overview():
    link = ui_link("http://127.0.0.1:5000", "3", ["a" * 32, "b" * 32])
    address, query = link.split("?")
    assert address == "http://127.0.0.1:5000/#/experiments/3/runs"
    assert urllib.parse.parse_qs(query) == {
        "workflowType": ["machine_learning"],  # else MLflow 3.17's UI shows an empty GenAI overview
        "compareRunsMode": ["CHART"],  # the runs page's chart view: every metric's curves, run by run
        "searchFilter": [f"attributes.run_id IN ('{'a' * 32}', '{'b' * 32}')"],
    }


def test_ui_link_without_runs_shows_the_whole_experiment():
    link = ui_link("https://mlflow.example:5000", "3", [])
    assert (
        link == "https://mlflow.example:5000/#/experiments/3/runs?workflowType=machine_learning&compareRunsMode=CHART"
    )


def test_against_a_server_a_stage_prints_its_runs_page_and_mlflow_prints_no_link_of_its_own(monkeypatch, capsys):
    from mlflow.environment_variables import MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT

    from stages.lib import tracking

    # MLflow's "View experiment at: …/#/experiments/<id>" opens the UI's empty GenAI overview.
    assert MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT.get()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000/")
    tracking.log_run_page("train", "3", "c" * 32)
    assert capsys.readouterr().out == (
        f"train: MLflow UI: http://mlflow.example:5000/#/experiments/3/runs/{'c' * 32}?workflowType=machine_learning\n"
    )
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    tracking.log_run_page("train", "3", "c" * 32)  # the local store: `python -m stages.runs` gives the link
    assert capsys.readouterr().out == ""


def test_mlflow_shows_no_progress_bars_in_stage_logs():
    from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR

    import stages.lib.tracking  # noqa: F401  (sets MLflow's switch)

    assert not MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.get()
