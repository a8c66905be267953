"""The one error type every module raises for a problem the user can fix."""


class StageError(Exception):
    """A problem the user can fix (bad parameter, missing or corrupt file); printed as one line."""


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (libraries' messages run to pages)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
