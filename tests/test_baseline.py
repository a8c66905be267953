"""The committed baseline is reachable from any CPU, offline: data/baseline holds its DVC outputs and its machine."""

import hashlib
import json
import subprocess
from pathlib import Path

import yaml

from stages.common import paths
from stages.numerics import BASELINE_MACHINE

REPO = Path(__file__).resolve().parents[1]
BASELINE_FILES = REPO / "data/baseline/files/md5"


def committed(path: str) -> str:
    """`path` as committed (the workspace's copy changes with every `make repro` on another CPU)."""
    return subprocess.run(["git", "show", f"HEAD:{path}"], cwd=REPO, capture_output=True, text=True, check=True).stdout


def test_data_baseline_holds_exactly_the_cached_outputs_of_the_committed_train_and_evaluate():
    lock = yaml.safe_load(committed("dvc.lock"))
    in_git = {str(path) for stage_paths in paths.OUTPUTS_IN_GIT.values() for path in stage_paths}
    expected = {
        out["md5"]
        for stage in ("train", "evaluate")
        for out in lock["stages"][stage]["outs"]
        if out["path"] not in in_git
    }
    stored = {file.parent.name + file.name: file for file in BASELINE_FILES.glob("*/*")}
    assert set(stored) == expected  # every one of them, and nothing stale
    for md5, file in stored.items():
        assert hashlib.md5(file.read_bytes()).hexdigest() == md5, file


def test_the_baseline_machine_is_recorded_with_the_committed_numerics():
    machine = json.loads((REPO / BASELINE_MACHINE).read_text())
    assert machine["numerics"] == yaml.safe_load(committed("params.yaml"))["numerics"]
    assert set(machine["fingerprints"]) == {"training", "evaluation"}
    for fingerprint in machine["fingerprints"].values():
        assert len(fingerprint) == 32 and set(fingerprint) <= set("0123456789abcdef")
    assert f"tensorflow=={machine['tensorflow']}" in committed("requirements.lock")
