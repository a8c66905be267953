"""dvc.yaml lists, for each stage, exactly the project code that the stage imports, directly or not:
an import without its `deps:` line would let DVC keep a stale output."""

import ast
from pathlib import Path

import pytest
import yaml

from tests.e2e import REPO

PIPELINE = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def module_path(name: str) -> Path | None:
    """The file of a project module (`stages.common.cli` -> stages/common/cli.py), or None if not ours."""
    base = REPO.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imports_of(path: Path) -> set[str]:
    """Every module name an import statement in the file may load, function-level imports included."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return names


def project_files_used_by(module: str) -> set[Path]:
    """The stage's own file and every project file it imports, transitively, with their packages' __init__."""
    found: set[Path] = set()
    pending = [module]
    while pending:
        name = pending.pop()
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__.py and a/b/__init__.py
            path = module_path(".".join(parts[:depth]))
            if path is not None and path not in found:
                found.add(path)
                pending.extend(imports_of(path))
    return found


def listed_code(stage: str) -> set[Path]:
    """The .py files that the stage's `deps:` name under stages/, folders expanded."""
    files = set()
    for dep in PIPELINE[stage]["deps"]:
        path = REPO / dep
        if dep.startswith("stages"):
            files |= {p for p in path.rglob("*.py") if "__pycache__" not in p.parts} if path.is_dir() else {path}
    return files


@pytest.mark.parametrize("stage", list(PIPELINE))
def test_dvc_yaml_lists_exactly_the_code_each_stage_imports(stage):
    module = PIPELINE[stage]["cmd"].removeprefix("python -m ")
    used, listed = project_files_used_by(module), listed_code(stage)
    missing = sorted(str(p.relative_to(REPO)) for p in used - listed)
    unused = sorted(str(p.relative_to(REPO)) for p in listed - used)
    assert (missing, unused) == ([], []), f"{stage}: add to deps {missing}; remove from deps {unused}"


def test_the_import_scan_sees_through_packages_and_function_level_imports():
    used = {str(p.relative_to(REPO)) for p in project_files_used_by("stages.prepare")}
    assert {"stages/__init__.py", "stages/common/__init__.py", "stages/common/errors.py"} <= used
    assert "stages/lib/mnist_sources.py" in used and "stages/lib/tracking.py" not in used


def test_the_restore_hint_knows_which_outputs_dvc_yaml_keeps_in_git():
    from stages.common.paths import OUTPUTS_IN_GIT

    in_git = {
        stage: tuple(
            Path(path)
            for entry in PIPELINE[stage].get("metrics", [])
            for path, options in entry.items()
            if options.get("cache") is False
        )
        for stage in PIPELINE
        if "outs" in PIPELINE[stage]
    }
    assert in_git == OUTPUTS_IN_GIT
