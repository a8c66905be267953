"""The pipeline's parameters: `params.yaml` loaded into one typed, validated object.

Nothing else reads the YAML. Validation happens here, before any stage imports
TensorFlow, so a typo costs a second, not a training run.
"""

import dataclasses
import difflib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from stages.common.errors import StageError, first_line

PARAMS_FILE = Path("params.yaml")
SOURCES = ("idx", "tfds")
LR_SCHEDULES = ("constant", "cosine")
NUMERICS = ("portable", "native")


def is_int(value: Any) -> bool:
    """An integer and not a bool (to Python, YAML's true is the integer 1); search_space's rules use it too."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _is_name(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != ""


def _rule(check: Callable[[Any], bool], allowed: str) -> Any:
    """A field of Params with its rule: `check` gets the raw YAML value, `allowed` says what passes."""
    return dataclasses.field(metadata={"check": check, "allowed": allowed})


@dataclasses.dataclass(frozen=True)
class Params:
    """Every hyperparameter of the pipeline and what it accepts; the values, the notebook's by default, are in
    params.yaml."""

    source: str = _rule(lambda v: v in SOURCES, f"one of {', '.join(SOURCES)}")
    # '' rather than null for the default: `dvc exp run -S` rewrites null as an empty value.
    tfds_data_dir: str = _rule(lambda v: isinstance(v, str), "a directory path, or '' for tfds' default")
    seed: int = _rule(lambda v: is_int(v) and 0 <= v < 2**31, "an integer in [0, 2147483647]")
    validation_fraction: float = _rule(lambda v: _is_number(v) and 0 < v < 1, "a number strictly between 0 and 1")
    shuffle_buffer: int = _rule(lambda v: is_int(v) and v >= 1, "an integer >= 1")
    batch_size: int = _rule(lambda v: is_int(v) and v >= 1, "an integer >= 1")
    epochs: int = _rule(lambda v: is_int(v) and v >= 1, "an integer >= 1")
    # Each conv block (3x3 conv, no padding, 2x2 pooling) shrinks the image: 28 -> 13 -> 5 -> 1.
    conv_blocks: int = _rule(lambda v: is_int(v) and 0 <= v <= 3, "an integer in [0, 3]")
    conv_filters: int = _rule(lambda v: is_int(v) and v >= 1, "an integer >= 1")
    hidden_layers: int = _rule(lambda v: is_int(v) and v >= 0, "an integer >= 0")
    hidden_layer_size: int = _rule(lambda v: is_int(v) and v >= 1, "an integer >= 1")
    dropout: float = _rule(lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)")
    learning_rate: float = _rule(lambda v: _is_number(v) and v > 0, "a number > 0")
    lr_schedule: str = _rule(lambda v: v in LR_SCHEDULES, f"one of {', '.join(LR_SCHEDULES)}")
    augment_shift: int = _rule(lambda v: is_int(v) and 0 <= v <= 8, "an integer number of pixels in [0, 8]")
    augment_rotation: float = _rule(lambda v: _is_number(v) and 0 <= v <= 45, "a number of degrees in [0, 45]")
    early_stopping_patience: int = _rule(lambda v: is_int(v) and v >= 0, "an integer >= 0 (0: no early stopping)")
    numerics: str = _rule(lambda v: v in NUMERICS, f"one of {', '.join(NUMERICS)}")
    mlflow_experiment: str = _rule(_is_name, "a non-empty string")
    registered_model: str = _rule(_is_name, "a non-empty string")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def unknown_key(key: Any, allowed: Any, prefix: str = "") -> str:
    """What to say of a key that is not among `allowed`: the closest allowed key, then all of them."""
    hint = difflib.get_close_matches(str(key), allowed, n=1)
    suggestion = f" (did you mean '{prefix}{hint[0]}'?)" if hint else ""
    return f"unknown key '{prefix}{key}'{suggestion}; allowed keys: {', '.join(allowed)}"


def parse_params(raw: Any, origin: str = str(PARAMS_FILE)) -> Params:
    """Validate a mapping read from YAML; raise StageError naming the key, value and what is allowed."""
    if not isinstance(raw, dict):
        raise StageError(f"{origin}: expected a mapping of parameters, got {type(raw).__name__}")
    fields = {field.name: field for field in dataclasses.fields(Params)}
    for key in raw:
        if key not in fields:
            raise StageError(f"{origin}: {unknown_key(key, fields)}")
    values = {}
    for key, field in fields.items():
        allowed = field.metadata["allowed"]
        if key not in raw:
            raise StageError(f"{origin}: missing key '{key}' ({allowed})")
        if not field.metadata["check"](raw[key]):
            raise StageError(f"{origin}: {key} must be {allowed}, got {raw[key]!r}")
        values[key] = float(raw[key]) if field.type is float else raw[key]
    return Params(**values)


def read_yaml(path: Path, what: str = "parameters") -> Any:
    """A YAML file read as DVC reads params.yaml, with ruamel.yaml: YAML 1.2 (`1e-05` is a float, `on` a string)
    and a key given twice refused; StageError if it cannot be."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise StageError(f"{path}: cannot read {what}: {exc.strerror}") from exc
    try:
        return YAML(typ="safe").load(text)
    except MarkedYAMLError as exc:  # its message runs to many lines: the problem and where is enough
        raise StageError(f"{path}: not valid YAML: {exc.problem} (line {exc.problem_mark.line + 1})") from exc
    except YAMLError as exc:
        raise StageError(f"{path}: not valid YAML: {first_line(exc)}") from exc


def load_params(path: Path = PARAMS_FILE) -> Params:
    """Read and validate `params.yaml`."""
    return parse_params(read_yaml(path), str(path))
