"""Check requirements.lock on every supported target: it installs from wheels and pins all that it installs.

    python .ci/check_lock.py UV [requirements.lock]

A target is a Python that pyproject.toml's requires-python allows (3.11-3.13) on one of PLATFORMS. For each,
`uv pip install --dry-run` as that target into an empty folder: wheels only (but for SDIST_ONLY), markers
evaluated for the target. It fails if a target does not resolve, or if what it would install differs from the
lock's lines that apply there (a dependency the lock forgot, or a pin that does not hold).
Needs `packaging` (markers, versions) and the network (the package index's metadata, no wheels downloaded).
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
# uv's name for the platform: the marker environment it stands for.
PLATFORMS = {
    "x86_64-manylinux_2_28": {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"},
    "aarch64-manylinux_2_28": {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "aarch64"},
    "aarch64-apple-darwin": {"sys_platform": "darwin", "platform_system": "Darwin", "platform_machine": "arm64"},
}
SDIST_ONLY = ("antlr4-python3-runtime", "promise")  # pure Python, published without wheels: pip builds them anywhere


def supported_pythons(pyproject: Path) -> list[str]:
    allowed = SpecifierSet(tomllib.loads(pyproject.read_text())["project"]["requires-python"])
    return [f"3.{minor}" for minor in range(8, 20) if f"3.{minor}" in allowed]


def lock_pins(lock: Path, python: str, platform: str) -> dict[str, str]:
    """{name: version} of the lock's lines whose markers hold on that target."""
    environment = {
        **PLATFORMS[platform],
        "python_version": python,
        "python_full_version": f"{python}.0",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "os_name": "posix",
    }
    pins = {}
    for line in lock.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate(environment):
                (spec,) = requirement.specifier
                pins[canonicalize_name(requirement.name)] = spec.version
    return pins


def would_install(uv: str, lock: Path, python: str, platform: str) -> dict[str, str] | str:
    """{name: version} that uv would install on that target, or why it would not."""
    no_binary = [arg for name in SDIST_ONLY for arg in ("--no-binary", name)]
    with tempfile.TemporaryDirectory() as empty:
        result = subprocess.run(
            [uv, "pip", "install", "--dry-run", "--target", empty, "--python-version", python,
             "--python-platform", platform, "--only-binary", ":all:", *no_binary, "-r", str(lock)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
    if result.returncode != 0:
        return " ".join(result.stderr.split())
    return {
        canonicalize_name(name): version
        for name, version in re.findall(r"^ \+ (\S+)==(\S+)$", result.stderr + result.stdout, re.MULTILINE)
    }


def main(argv: list[str]) -> int:
    uv, lock = argv[0], Path(argv[1] if len(argv) > 1 else REPO / "requirements.lock")
    failed = 0
    for python in supported_pythons(REPO / "pyproject.toml"):
        for platform in PLATFORMS:
            began = time.monotonic()
            pinned, resolved = lock_pins(lock, python, platform), would_install(uv, lock, python, platform)
            if isinstance(resolved, str):
                failed += 1
                print(f"{python} {platform:24} DOES NOT RESOLVE: {resolved}")
                continue
            differ = sorted(
                f"{name} {pinned.get(name, 'not in the lock')} -> {resolved.get(name, 'not installed')}"
                for name in pinned.keys() | resolved.keys()
                if pinned.get(name) != resolved.get(name)
            )
            failed += bool(differ)
            verdict = "ok" if not differ else "DIFFERS: " + "; ".join(differ)
            print(f"{python} {platform:24} {len(resolved):4} packages {time.monotonic() - began:5.1f} s  {verdict}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
