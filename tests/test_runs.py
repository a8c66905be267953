from stages.runs import ui_link

RUNS_TABLE = "#/experiments/3/runs?workflowType=machine_learning"


def test_ui_link_opens_the_experiments_training_runs_not_the_genai_overview():
    assert ui_link("sqlite:////repo/mlflow.db?timeout=60", "3") == f"http://127.0.0.1:5000/{RUNS_TABLE}"
    assert ui_link("https://mlflow.example:5000/", "3") == f"https://mlflow.example:5000/{RUNS_TABLE}"
