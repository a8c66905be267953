"""Helpers for the slow end-to-end tests: servers, queues, children (the repository copy: bench/repository.py)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from bench.repository import REPO, VENV_BIN, clone_repository, run, user_env  # noqa: F401  (the tests use them too)
from team.stack import free_port  # noqa: F401  (the one free-port helper; the tests' servers use it too)


def copy_repository(source: Path, destination: Path) -> Path:
    """A copy of a repository copy (git history, outputs, DVC cache, MLflow store) that shares nothing with it.

    The MLflow store records absolute artifact locations (experiment, runs, logged models): they are
    rewritten from source/mlartifacts to the copy's own, or every copy would write into the source's."""
    shutil.copytree(source, destination, symlinks=True)
    database = destination / "mlflow.db"
    if database.exists():
        old, new = (source / "mlartifacts").as_uri(), (destination / "mlartifacts").as_uri()
        with contextlib.closing(sqlite3.connect(database)) as connection, connection:
            tables = [name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            for table in tables:
                for column in connection.execute(f"PRAGMA table_info('{table}')"):
                    name, kind = column[1], column[2]
                    if kind.upper().startswith(("VARCHAR", "TEXT")):
                        connection.execute(f'UPDATE "{table}" SET "{name}" = replace("{name}", ?, ?)', (old, new))
    return destination


def changed_stages(repo: Path) -> set[str]:
    return set(json.loads(run(["dvc", "status", "--json"], repo).stdout))


def run_queues(repos: list[Path], jobs: int, env: dict[str, str] | None = None, timeout: float = 1500) -> list[str]:
    """Run each repository's queued experiments with `dvc queue start -j jobs`, all at once, and wait
    until none is queued or running; return each one's `dvc queue status`, then stop its workers.

    Not `dvc exp run --run-all`: a DVC bug can leave it waiting forever after the last experiment
    (its worker's monitor thread dies on a half-written queue message; treeverse/dvc#10428). Under
    load `dvc queue start` itself was seen never to return, its experiments all done: it is not
    waited for, only the queue's status is."""
    starts = [
        subprocess.Popen(
            ["dvc", "queue", "start", "-j", str(jobs)],
            cwd=repo,
            env=env or user_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for repo in repos
    ]
    deadline = time.monotonic() + timeout
    statuses = {}
    while len(statuses) < len(repos):
        assert time.monotonic() < deadline, f"queues still running after {timeout} s"
        time.sleep(2)
        for repo in repos:
            status = run(["dvc", "queue", "status"], repo, env).stdout
            if repo not in statuses and not {"Queued", "Running"} & set(status.split()):
                statuses[repo] = status
    for repo, start in zip(repos, starts, strict=True):
        run(["dvc", "queue", "stop"], repo, env)
        if start.poll() is None:
            start.kill()
        start.wait()
    return [statuses[repo] for repo in repos]


def experiments_shown(repo: Path, env: dict[str, str] | None = None) -> dict:
    """`dvc exp show`'s experiments by name: their metrics files as DVC reports them."""
    rows = json.loads(run(["dvc", "exp", "show", "--json"], repo, env).stdout)
    return {
        experiment["name"]: experiment["revs"][0]["data"]["metrics"]
        for row in rows
        for experiment in row.get("experiments") or []
    }


def stages_run(result: subprocess.CompletedProcess) -> list[str]:
    """The stages a `dvc repro`/`dvc exp run` ran (DVC has no JSON for this), from its "Running stage" lines."""
    return [line.split("'")[1] for line in result.stdout.splitlines() if line.startswith("Running stage '")]


def wait_until_answering(url: str, server: subprocess.Popen, seconds: float, what: str) -> None:
    """Poll `url` until it answers; fail if `server` exits or `seconds` pass first."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, f"{what} did not start"
            time.sleep(0.5)


class Child:
    """A child process whose output (stdout and stderr merged) a thread reads to its end, so that the child
    never blocks on a full pipe while the test waits for a line of it."""

    def __init__(self, process: subprocess.Popen):
        self.process = process
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self.lines.append(None)  # the end of the output
            self._changed.notify_all()

    def wait_for_line(self, prefix: str, after: int = 0) -> int:
        """The index of the first line from index `after` on that starts with `prefix`; fails if the output ends."""
        with self._changed:
            index = after
            while True:
                while index >= len(self.lines):
                    self._changed.wait()
                line = self.lines[index]
                assert line is not None, f"the output ended without a line {prefix!r}:\n{self.output[-3000:]}"
                if line.startswith(prefix):
                    return index
                index += 1

    def finish(self, timeout: float) -> str:
        """Wait for the child to exit; its whole output."""
        self.process.wait(timeout=timeout)
        self._reader.join(timeout=30)
        return self.output

    @property
    def output(self) -> str:
        return "".join(line for line in list(self.lines) if line is not None)


@contextlib.contextmanager
def started(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> Iterator[Child]:
    """Start `args` as a Child; if it still runs when the block ends (a failed test), kill its process group."""
    process = subprocess.Popen(
        args,
        cwd=cwd,
        env=env or user_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        yield Child(process)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
