"""Benchmark: the seed notebook against the DVC pipeline, measured side by side on this machine.

Run from the repository root with the virtualenv's python (its bin directory on PATH):

    python bench/run.py [--repeats N] [--quick] [--out bench/results/latest.json]

The code timed is in bench/workers.py, the measurement sequence in bench/measure.py, the figures,
targets and report in bench/report.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # `python bench/run.py` puts bench/, not the root, on sys.path

from bench import measure, report, workers  # noqa: E402  (needs the root on sys.path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=f"{__doc__}\n{measure.__doc__}", formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3, help="repetitions of every measurement (default 3)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 repetition, everything measured")
    parser.add_argument("--out", type=Path, default=Path("bench/results/latest.json"), help="JSON results file")
    parser.add_argument("--keep-copy", action="store_true", help="keep the temporary repository copy")
    parser.add_argument("--worker", choices=workers.WORKERS, help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, default=5, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        workers.run_worker(args.worker, args.epochs)
        return

    repeats = 1 if args.quick else args.repeats
    if repeats < 1:
        parser.error("--repeats must be at least 1")
    info = report.machine_info(repeats)
    runner = measure.Runner(args.out.parent / f"{args.out.stem}-logs")
    samples, facts = measure.measure(repeats, runner, args.keep_copy)
    summary = {key: report.summarize(samples[key]) for key in report.FIGURES}
    check_results = report.checks(samples)
    report.print_report(summary, check_results, info, facts)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report.results_json(summary, check_results, info, facts), indent=2) + "\n")
    print(f"wrote {args.out} (logs in {runner.log_dir})")


if __name__ == "__main__":
    try:
        main()
    except measure.BenchError as exc:
        sys.exit(f"bench: error: {exc}")
