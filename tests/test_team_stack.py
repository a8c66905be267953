"""team/stack.py's commands that need no running service: status of a stopped stack, start without PostgreSQL,
the DVC remote `start` configures."""

import json
import subprocess
import sys

from team import stack


def test_start_without_postgresql_says_in_one_line_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(stack, "DEBIAN_PG", tmp_path / "no-debian-postgresql")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no initdb on PATH either
    monkeypatch.delenv("TEAM_STACK_PG_BIN", raising=False)

    assert stack.main(["start", "--dir", str(tmp_path / "stack")]) == 1

    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("stack: error: PostgreSQL's initdb not found: install PostgreSQL (Debian, Ubuntu: apt-get")
    assert "TEAM_STACK_PG_BIN" in err
    assert stack.status(tmp_path / "stack") == {"postgres": None, "s3": None, "mlflow": None}  # nothing started


def test_status_of_a_stopped_stack_reports_it_and_is_no_error(tmp_path, capsys):
    ports = {"postgres": 15432, "s3": 19000, "mlflow": 15000}
    gone = {"pid": 2**22 + 1, "start": "0"}  # above any pid Linux hands out
    (tmp_path / "stack.json").write_text(json.dumps({"ports": ports, "pids": dict.fromkeys(ports, gone)}))
    assert stack.main(["status", "--dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{service:8} {'stopped':22} 127.0.0.1:{port}" for service, port in ports.items()
    ]


def test_status_of_a_stack_never_started_says_how_to_start_it(tmp_path, capsys):
    assert stack.main(["status", "--dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"no stack in {tmp_path}: never started (make team-start)\n"


def test_the_stacks_s3_store_becomes_the_clones_default_dvc_remote_in_config_local_only_and_again_changes_nothing(
    tmp_path,
):
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "-q", "--no-scm"], cwd=tmp_path, check=True)
    tracked = (tmp_path / ".dvc/config").read_text()
    team = stack.Stack(folder=tmp_path, ports={"postgres": 1, "s3": 19000, "mlflow": 2})

    line = stack._use_as_dvc_remote(team, tmp_path)
    local = (tmp_path / ".dvc/config.local").read_text()
    where = tmp_path / ".dvc/config.local"
    assert line == f"DVC remote `team` (s3://dvc at http://127.0.0.1:19000): this clone's default, in {where}"
    assert "endpointurl = http://127.0.0.1:19000" in local and "secret_access_key = team-stack-s3-secret" in local
    assert "connect_timeout = 5" in local and "read_timeout = 10" in local  # not botocore's 60 s, tried 25 times
    remotes = subprocess.run([*dvc, "remote", "list"], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert remotes.stdout.split() == ["team", "s3://dvc", "(default)"]
    assert (tmp_path / ".dvc/config").read_text() == tracked

    assert stack._use_as_dvc_remote(team, tmp_path) == line
    assert (tmp_path / ".dvc/config.local").read_text() == local
