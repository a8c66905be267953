"""The pipeline's parameters: `params.yaml` loaded into one typed, validated object.

Nothing else reads the YAML. Validation happens here, before any stage imports
TensorFlow, so a typo costs a second, not a training run.
"""

import dataclasses
import difflib
import math
import re
from pathlib import Path
from typing import Any

import yaml

from stages.common.errors import StageError, first_line

PARAMS_FILE = Path("params.yaml")
SOURCES = ("idx", "tfds")
LR_SCHEDULES = ("constant", "cosine")
NUMERICS = ("portable", "native")


@dataclasses.dataclass(frozen=True)
class Params:
    """Every hyperparameter of the pipeline; their values, the notebook's by default, are in params.yaml."""

    source: str
    tfds_data_dir: str  # "" for tfds' default
    seed: int
    validation_fraction: float
    shuffle_buffer: int
    batch_size: int
    epochs: int
    conv_blocks: int
    conv_filters: int
    hidden_layers: int
    hidden_layer_size: int
    dropout: float
    learning_rate: float
    lr_schedule: str
    augment_shift: int
    augment_rotation: float
    early_stopping_patience: int
    numerics: str
    mlflow_experiment: str
    registered_model: str

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def is_int(value: Any) -> bool:
    """An integer and not a bool (to Python, YAML's true is the integer 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _is_name(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != ""


# key -> (check, what is allowed); each check gets the raw YAML value.
_RULES: dict[str, tuple[Any, str]] = {
    "source": (lambda v: v in SOURCES, f"one of {', '.join(SOURCES)}"),
    # '' rather than null for the default: `dvc exp run -S` rewrites null as an empty value.
    "tfds_data_dir": (lambda v: isinstance(v, str), "a directory path, or '' for tfds' default"),
    "seed": (lambda v: is_int(v) and 0 <= v < 2**31, "an integer in [0, 2147483647]"),
    "validation_fraction": (lambda v: _is_number(v) and 0 < v < 1, "a number strictly between 0 and 1"),
    "shuffle_buffer": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "batch_size": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "epochs": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    # Each conv block (3x3 conv, no padding, 2x2 pooling) shrinks the image: 28 -> 13 -> 5 -> 1.
    "conv_blocks": (lambda v: is_int(v) and 0 <= v <= 3, "an integer in [0, 3]"),
    "conv_filters": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "hidden_layers": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    "hidden_layer_size": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "dropout": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "learning_rate": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "lr_schedule": (lambda v: v in LR_SCHEDULES, f"one of {', '.join(LR_SCHEDULES)}"),
    "augment_shift": (lambda v: is_int(v) and 0 <= v <= 8, "an integer number of pixels in [0, 8]"),
    "augment_rotation": (lambda v: _is_number(v) and 0 <= v <= 45, "a number of degrees in [0, 45]"),
    "early_stopping_patience": (lambda v: is_int(v) and v >= 0, "an integer >= 0 (0: no early stopping)"),
    "numerics": (lambda v: v in NUMERICS, f"one of {', '.join(NUMERICS)}"),
    "mlflow_experiment": (_is_name, "a non-empty string"),
    "registered_model": (_is_name, "a non-empty string"),
}


def unknown_key(key: Any, allowed: Any, prefix: str = "") -> str:
    """What to say of a key that is not among `allowed`: the closest allowed key, then all of them."""
    hint = difflib.get_close_matches(str(key), allowed, n=1)
    suggestion = f" (did you mean '{prefix}{hint[0]}'?)" if hint else ""
    return f"unknown key '{prefix}{key}'{suggestion}; allowed keys: {', '.join(allowed)}"


def parse_params(raw: Any, origin: str = str(PARAMS_FILE)) -> Params:
    """Validate a mapping read from YAML; raise StageError naming the key, value and what is allowed."""
    if not isinstance(raw, dict):
        raise StageError(f"{origin}: expected a mapping of parameters, got {type(raw).__name__}")
    for key in raw:
        if key not in _RULES:
            raise StageError(f"{origin}: {unknown_key(key, _RULES)}")
    for key, (check, allowed) in _RULES.items():
        if key not in raw:
            raise StageError(f"{origin}: missing key '{key}' ({allowed})")
        if not check(raw[key]):
            raise StageError(f"{origin}: {key} must be {allowed}, got {raw[key]!r}")
    values = dict(raw)
    values["validation_fraction"] = float(values["validation_fraction"])
    for key in ("learning_rate", "dropout", "augment_rotation"):
        values[key] = float(values[key])
    return Params(**values)


class _ParamsLoader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, which reads `1e-05` (as `dvc exp run -S learning_rate=1e-5` writes
    it) as a string; this loader reads floats as YAML 1.2 does, and refuses a key given twice
    (PyYAML would silently keep the last; DVC refuses the file)."""


def _mapping_without_duplicate_keys(loader: _ParamsLoader, node: yaml.MappingNode) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key '{key}' appears twice (again on line {key_node.start_mark.line + 1})"
            )
        seen.add(key)
    return loader.construct_mapping(node)


_ParamsLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicate_keys)


_ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+|\.[0-9_]+(?:[eE][-+]?[0-9]+)?)$"
        r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"
    ),
    list("-+0123456789."),
)


def read_yaml(path: Path, what: str = "parameters") -> Any:
    """A YAML file as params.yaml is read (floats as YAML 1.2, no key twice); StageError if it cannot be."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise StageError(f"{path}: cannot read {what}: {exc.strerror}") from exc
    try:
        return yaml.load(text, Loader=_ParamsLoader)
    except yaml.YAMLError as exc:
        raise StageError(f"{path}: not valid YAML: {first_line(exc)}") from exc


def load_params(path: Path = PARAMS_FILE) -> Params:
    """Read and validate `params.yaml`."""
    return parse_params(read_yaml(path), str(path))
