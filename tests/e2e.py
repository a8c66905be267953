"""Helpers for the slow end-to-end tests: a throwaway git copy of this repository, run like a user would."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def user_env(**extra: str) -> dict[str, str]:
    """The environment of a user with the venv activated and no tracking server configured."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def run(args: list[str], cwd: Path, env: dict[str, str] | None = None, check: bool = True, timeout: float = 900):
    result = subprocess.run(
        args, cwd=cwd, env=env or user_env(), capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


def clone_repository(destination: Path) -> Path:
    """Copy the working tree's tracked and new (not ignored) files into a fresh git repository."""
    listed = run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], REPO).stdout
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    run(["git", "init", "-q", "-b", "main"], destination)
    # DVC commits experiments: the copy needs an identity even where git has no global one (CI).
    run(["git", "config", "user.name", "e2e test"], destination)
    run(["git", "config", "user.email", "e2e@example.com"], destination)
    run(["git", "add", "-A"], destination)
    run(["git", "commit", "-qm", "copy"], destination)
    return destination


def changed_stages(repo: Path) -> set[str]:
    return set(json.loads(run(["dvc", "status", "--json"], repo).stdout))


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
