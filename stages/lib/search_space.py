"""The search `python -m stages.tune` runs, read from `search.yaml` and validated before anything runs.

Every fixed value, every range bound and every choice goes through params.yaml's own validation
(stages/common/params.py), on top of the current params.yaml; so does every point suggested later.
Ranges are intervals and so are the rules, so valid bounds mean every point between them is valid.
"""

import dataclasses
import math
from pathlib import Path
from typing import Any

from stages.common.errors import StageError
from stages.common.params import Params, is_int, parse_params, read_yaml, unknown_key

SEARCH_FILE = Path("search.yaml")
METRIC = "val_accuracy"  # maximised; test accuracy is never an objective
# Not hyperparameters: searching them would change the data or the validation set the metric is
# measured on, or where the runs are recorded.
NOT_SEARCHABLE = ("source", "tfds_data_dir", "validation_fraction", "mlflow_experiment", "registered_model")
FIXED_ONLY = ("numerics",)  # how the arithmetic is done, not what is learnt: fix it for the whole study
_TOP_KEYS = ("metric", "seed", "budget", "pruner", "parameters", "fixed")


@dataclasses.dataclass(frozen=True)
class Range:
    low: int | float
    high: int | float
    log: bool = False
    integer: bool = False


@dataclasses.dataclass(frozen=True)
class Space:
    """A validated search: what to suggest, what to fix, how long, when to prune."""

    ranges: dict[str, Range]
    choices: dict[str, list[Any]]
    fixed: dict[str, Any]
    seed: int  # the sampler's
    trials: int | None  # complete and pruned trials of the study, over every worker and every resume
    minutes: float | None  # wall time of one `python -m stages.tune`
    warmup_epochs: int  # the pruner never stops a trial before this many epochs
    startup_trials: int  # ... nor before this many trials have finished

    @property
    def grid(self) -> bool:
        """Every searched param has its values listed: the study runs each combination once (Optuna's GridSampler)."""
        return not self.ranges


def _mapping(value: Any, what: str, origin: str, allowed: tuple[str, ...] = ()) -> dict:
    """`value` as a mapping, {} if None; with `allowed`, its keys among them."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise StageError(f"{origin}: {what} must be a mapping, got {value!r}")
    for key in value:
        if allowed and key not in allowed:
            raise StageError(f"{origin}: {unknown_key(key, allowed, f'{what}.')}")
    return value


def _check_value(base: Params, key: str, value: Any, origin: str, what: str) -> None:
    """params.yaml's validation of `value` for `key`, its message followed by where in the file it is."""
    try:
        parse_params({**base.as_dict(), key: value}, origin)
    except StageError as exc:
        raise StageError(f"{exc} ({what})") from None


def parse_space(raw: Any, base: Params, origin: str = str(SEARCH_FILE)) -> Space:
    """Validate a mapping read from search.yaml against the params in `base`; StageError names what is wrong."""
    raw = _mapping(raw, "the file", origin)
    for key in raw:
        if key not in _TOP_KEYS:
            raise StageError(f"{origin}: {unknown_key(key, _TOP_KEYS)}")
    if raw.get("metric", METRIC) != METRIC:
        raise StageError(f"{origin}: metric must be {METRIC} (maximised; never a test metric), got {raw['metric']!r}")
    seed = raw.get("seed", 0)
    if not (is_int(seed) and 0 <= seed < 2**32):
        raise StageError(f"{origin}: seed must be an integer in [0, 4294967295], got {seed!r}")
    budget = _mapping(raw.get("budget"), "budget", origin, ("trials", "minutes"))
    trials, minutes = budget.get("trials"), budget.get("minutes")
    if trials is not None and not (is_int(trials) and trials >= 1):
        raise StageError(f"{origin}: budget.trials must be an integer >= 1, got {trials!r}")
    if minutes is not None and not ((is_int(minutes) or isinstance(minutes, float)) and minutes > 0):
        raise StageError(f"{origin}: budget.minutes must be a number > 0, got {minutes!r}")
    pruner = _mapping(raw.get("pruner"), "pruner", origin, ("warmup_epochs", "startup_trials"))
    warmup, startup = pruner.get("warmup_epochs", 1), pruner.get("startup_trials", 4)
    for key, value in (("warmup_epochs", warmup), ("startup_trials", startup)):
        if not (is_int(value) and value >= 0):
            raise StageError(f"{origin}: pruner.{key} must be an integer >= 0, got {value!r}")

    parameters = _mapping(raw.get("parameters"), "parameters", origin)
    fixed = _mapping(raw.get("fixed"), "fixed", origin)
    if not parameters:
        raise StageError(f"{origin}: parameters is empty: name at least one param to search")
    for key in parameters.keys() & fixed.keys():
        raise StageError(f"{origin}: {key} is both searched (parameters) and fixed")
    for key in (*parameters, *fixed):
        if key in NOT_SEARCHABLE:
            raise StageError(f"{origin}: {key} cannot be searched or fixed here: it is not a hyperparameter")
        if key in FIXED_ONLY and key in parameters:
            raise StageError(f"{origin}: {key} cannot be searched: fix it (fixed.{key}) for the whole study")
    for key, value in fixed.items():
        _check_value(base, key, value, origin, f"fixed.{key}")
    base = parse_params({**base.as_dict(), **fixed}, origin)

    ranges, choices = {}, {}
    for key, spec in parameters.items():
        spec = _mapping(spec, f"parameters.{key}", origin)
        if set(spec) == {"values"}:
            choices[key] = _choices(base, key, spec["values"], origin)
        elif set(spec) in ({"min", "max"}, {"min", "max", "log"}):
            ranges[key] = _range(base, key, spec["min"], spec["max"], spec.get("log", False), origin)
        else:
            expected = "{values: [...]} or {min: ..., max: ...[, log: true]}"
            raise StageError(f"{origin}: parameters.{key} must be {expected}, got {spec!r}")
    if trials is None and minutes is None:
        if ranges:
            grid = "a grid (every param {values: [...]}) runs each point once"
            raise StageError(f"{origin}: budget needs trials, minutes or both ({grid} without)")
        trials = math.prod(len(values) for values in choices.values())  # the grid's size
    return Space(ranges, choices, fixed, seed, trials, None if minutes is None else float(minutes), warmup, startup)


def _choices(base: Params, key: str, values: Any, origin: str) -> list[Any]:
    if not isinstance(values, list) or not values:
        raise StageError(f"{origin}: parameters.{key}.values must be a non-empty list, got {values!r}")
    if len(set(map(repr, values))) != len(values):
        raise StageError(f"{origin}: parameters.{key}.values lists a value twice: {values!r}")
    for value in values:
        _check_value(base, key, value, origin, f"parameters.{key}.values")
    return values


def _range(base: Params, key: str, low: Any, high: Any, log: Any, origin: str) -> Range:
    _check_value(base, key, low, origin, f"parameters.{key}.min")
    _check_value(base, key, high, origin, f"parameters.{key}.max")
    if not low < high:
        raise StageError(f"{origin}: parameters.{key}: empty range, min {low!r} must be below max {high!r}")
    if not isinstance(log, bool):
        raise StageError(f"{origin}: parameters.{key}.log must be true or false, got {log!r}")
    if log and low <= 0:
        raise StageError(f"{origin}: parameters.{key}: a log range needs min > 0, got {low!r}")
    return Range(low, high, log, is_int(getattr(base, key)))  # params.yaml's rule has refused a float bound already


def load_space(path: Path, base: Params) -> Space:
    """Read and validate search.yaml (same YAML reading as params.yaml: 1e-4 is a number)."""
    return parse_space(read_yaml(path, "the search space"), base, str(path))


def suggest(trial: Any, space: Space, base: Params) -> dict[str, Any]:
    """A point of the space from an Optuna trial, fixed values included, validated as params.yaml is."""
    point: dict[str, Any] = dict(space.fixed)
    for key, r in space.ranges.items():
        point[key] = (trial.suggest_int if r.integer else trial.suggest_float)(key, r.low, r.high, log=r.log)
    for key, values in space.choices.items():
        point[key] = trial.suggest_categorical(key, values)
    parse_params({**base.as_dict(), **point}, f"trial {trial.number}")
    return point


def set_arguments(point: dict[str, Any]) -> list[str]:
    """`dvc exp run -S key=value` arguments for a point; floats as Python writes them (params.yaml reads 1e-05)."""
    arguments = []
    for key, value in point.items():
        arguments += ["-S", f"{key}={value!r}" if isinstance(value, float) else f"{key}={value}"]
    return arguments
