import shutil
import subprocess

from tests.e2e import REPO


def test_a_venv_linked_rather_than_created_is_ignored_too(tmp_path):
    """`ln -s <shared venv> .venv` is a file to git, not a folder: `.venv/` would not ignore it."""
    shutil.copy(REPO / ".gitignore", tmp_path / ".gitignore")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / ".venv").symlink_to(tmp_path)
    result = subprocess.run(["git", "status", "--porcelain"], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert result.stdout == "?? .gitignore\n"
