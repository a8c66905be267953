"""Where a one-epoch experiment's time goes: `dvc exp run -S epochs=1`, phase by phase.

    python bench/phases.py [--repeats N] [--repo COPY ...] [--notebook]

Each repetition restores the copy's committed params, deletes DVC's run cache (or DVC would restore
the experiment instead of running it) and runs `dvc exp run -S epochs=1`, noting when each line of its
output arrives. The lines that DVC and the stages print anyway mark the phases (LANDMARKS): a phase
ends at its line, so nothing in the stages exists for measuring. Prints the median, min and max of
every phase.

Without --repo, a throwaway copy of this repository is made and reproduced first. With several
--repo (copies at different commits, each reproduced), their runs alternate, so that load from
elsewhere hits all alike: an A/B of a change, phase by phase.

With --notebook, each repetition also times the notebook's script with ten epochs (bench/workers.py,
as `make bench` does) and `dvc exp run -S epochs=10` in the first copy, one after the other, and
prints the ratio of their medians.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # `python bench/phases.py` puts bench/, not the root, on sys.path

from bench.repository import clone_repository, run, user_env  # noqa: E402  (needs the root on sys.path)

Breakdown = list[tuple[str, float]]

# (phase, the line that ends it), in the order of a one-epoch experiment's output.
LANDMARKS = [
    ("DVC: start, check what changed", r"^Running stage 'check_params'"),
    ("check_params, DVC", r"^Running stage 'train'"),
    ("train: start, import TensorFlow, read the records", r"^train: .* records loaded"),
    ("train: wait for the MLflow run, the epoch", r"^\d+/\d+ - "),  # Keras' epoch line ("Epoch 1/1" only if 2+)
    ("train: save and log the model, write the metrics", r"^train: \d+ epochs?:"),
    ("train exit, DVC", r"^Running stage 'evaluate'"),
    ("evaluate: start, import TensorFlow, load, predict", r"^Test loss:"),
    ("evaluate: log to MLflow, write the metrics", r"^evaluate: test_accuracy"),
]
END = "evaluate exit, DVC: save outputs, commit the experiment"


def timed_output(command: list[str], cwd: Path, env: dict[str, str]) -> tuple[list[tuple[float, str]], float]:
    """Run `command`; each line of its output (stdout and stderr) with the seconds since the start at which
    it arrived, and the whole run's seconds. Fails if the command does."""
    started = time.perf_counter()
    lines = []
    with subprocess.Popen(
        command, cwd=cwd, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    ) as process:  # fmt: skip
        for line in process.stdout:
            lines.append((time.perf_counter() - started, line.rstrip("\n")))
    ended = time.perf_counter() - started
    if process.returncode != 0:
        output = "\n".join(line for _, line in lines)[-3000:]
        raise AssertionError(f"{' '.join(command)} exited {process.returncode}\n{output}")
    return lines, ended


def breakdown(lines: list[tuple[float, str]], ended: float) -> Breakdown:
    """(phase, seconds) in order: from one landmark line to the next, then to the end."""
    rows: Breakdown = []
    previous, position = 0.0, 0
    for name, pattern in LANDMARKS:
        found = next((i for i in range(position, len(lines)) if re.search(pattern, lines[i][1])), None)
        if found is None:
            raise AssertionError(f"no line matched {pattern!r} (phase {name!r})")
        rows.append((name, lines[found][0] - previous))
        previous, position = lines[found][0], found + 1
    rows.append((END, ended - previous))
    return rows


def one_epoch_experiment(copy: Path, env: dict[str, str]) -> Breakdown:
    """Run `dvc exp run -S epochs=1` in `copy` (committed params, no run cache); its breakdown."""
    run(["git", "checkout", "-q", "HEAD", "--", "."], copy)
    shutil.rmtree(copy / ".dvc" / "cache" / "runs", ignore_errors=True)
    return breakdown(*timed_output(["dvc", "exp", "run", "-S", "epochs=1"], copy, env))


def ten_epochs_against_the_notebook(copy: Path, env: dict[str, str]) -> tuple[float, float]:
    """Seconds of the notebook's script with ten epochs, then of `dvc exp run -S epochs=10` in `copy`."""
    started = time.perf_counter()
    bench = [sys.executable, str(REPO_ROOT / "bench" / "run.py"), "--worker", "notebook", "--epochs", "10"]
    run(bench, REPO_ROOT, env, timeout=900)
    notebook = time.perf_counter() - started
    run(["git", "checkout", "-q", "HEAD", "--", "."], copy)
    shutil.rmtree(copy / ".dvc" / "cache" / "runs", ignore_errors=True)
    started = time.perf_counter()
    run(["dvc", "exp", "run", "-S", "epochs=10"], copy, env, timeout=900)
    return notebook, time.perf_counter() - started


def print_table(title: str, samples: list[Breakdown]) -> None:
    """Median (min-max) seconds of each phase over the samples, which list the same phases in order."""
    print(f"\n{title} ({len(samples)} run{'s' if len(samples) > 1 else ''}): median (min-max) seconds")
    width = max(len(name) for name, _ in samples[0])
    for index, (name, _) in enumerate(samples[0]):
        values = [sample[index][1] for sample in samples if len(sample) > index and sample[index][0] == name]
        print(f"  {name:<{width}}  {statistics.median(values):6.2f}  ({min(values):.2f}-{max(values):.2f})")
    totals = [sum(seconds for _, seconds in sample) for sample in samples]
    print(f"  {'total':<{width}}  {statistics.median(totals):6.2f}  ({min(totals):.2f}-{max(totals):.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each copy (default 3)")
    parser.add_argument("--repo", type=Path, action="append", help="a reproduced copy to run in (repeatable)")
    parser.add_argument("--notebook", action="store_true", help="also: ten epochs, the notebook against dvc exp run")
    args = parser.parse_args()
    env = user_env(DVC_NO_ANALYTICS="1")
    copies = args.repo
    if not copies:
        copies = [clone_repository(Path(tempfile.mkdtemp(prefix="mnist-phases-")))]
        run(["dvc", "repro"], copies[0], env, timeout=1200)
        run(["git", "commit", "-qam", "reproduced"], copies[0])
    samples: dict[Path, list[Breakdown]] = {copy: [] for copy in copies}
    ten_epochs: list[tuple[float, float]] = []
    for rep in range(1, args.repeats + 1):
        for copy in copies:
            samples[copy].append(one_epoch_experiment(copy, env))
            total = sum(seconds for _, seconds in samples[copy][-1])
            print(f"{copy}: run {rep}/{args.repeats}: {total:.1f} s", flush=True)
        if args.notebook:
            ten_epochs.append(ten_epochs_against_the_notebook(copies[0], env))
            print(f"ten epochs: notebook {ten_epochs[-1][0]:.1f} s, dvc exp run {ten_epochs[-1][1]:.1f} s", flush=True)
    for copy in copies:
        print_table(f"dvc exp run -S epochs=1 in {copy}", samples[copy])
    if ten_epochs:
        notebook, experiment = (statistics.median(times) for times in zip(*ten_epochs, strict=True))
        print(
            f"\nten epochs, medians of {len(ten_epochs)}: notebook script {notebook:.1f} s, "
            f"dvc exp run -S epochs=10 {experiment:.1f} s: ratio {experiment / notebook:.2f} (target <= 0.5)"
        )
    if not args.repo:
        shutil.rmtree(copies[0], ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    main()
