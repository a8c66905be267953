"""team/stack.py on a machine without PostgreSQL: one line that says what to install, no traceback."""

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
