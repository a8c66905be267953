"""A throwaway git copy of this repository, run as a user would: what the benchmarks and the end-to-end tests share."""

import os
import shutil
import subprocess
import sys
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
