"""Writing outputs so that a stage killed at any moment never leaves a truncated file behind."""

import contextlib
import csv
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from stages.common.errors import StageError, first_line

TEMP_MARK = ".tmp-"


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; move it into place only if the block succeeds.

    The temporary name starts with a dot and is ignored by git. On any exception,
    SIGTERM and Ctrl-C included, it is removed. A SIGKILL can leave it behind; the next
    write to the same path removes such leftovers. A write the system refuses (a full disk, a
    read-only folder) becomes a StageError naming `path`.
    """
    path = Path(path)
    # Same suffix as the target: some writers (Keras) insist on it.
    temporary = path.parent / f".{path.stem}{TEMP_MARK}{os.getpid()}{path.suffix}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.stem}{TEMP_MARK}*{path.suffix}"):
            stale.unlink(missing_ok=True)
        yield temporary
        os.replace(temporary, path)
    except OSError as exc:
        raise StageError(f"{path}: cannot write: {exc.strerror or first_line(exc)}") from exc
    finally:
        temporary.unlink(missing_ok=True)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write `data` as stable, sorted JSON, atomically."""
    with atomic_output(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Write a header row and `rows` as CSV, atomically."""
    with atomic_output(path) as temporary, open(temporary, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)
