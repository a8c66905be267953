"""python -m stages.tune, without training: the search space, naming, pruning decisions, resume."""

import optuna
import pytest

from stages.common.errors import StageError
from stages.common.params import load_params
from stages.lib.search_space import load_space, parse_space, set_arguments, suggest
from tests.conftest import REAL_PARAMS, REPO

BASE = load_params(REAL_PARAMS)


def space(**changes):
    raw = {
        "seed": 1,
        "budget": {"trials": 4},
        "parameters": {"hidden_layer_size": {"min": 16, "max": 256, "log": True}, "dropout": {"min": 0.0, "max": 0.5}},
        "fixed": {"epochs": 2},
    }
    raw.update(changes)
    return raw


def test_the_repository_search_space_is_valid():
    searched = load_space(REPO / "search.yaml", BASE)
    assert searched.trials and searched.ranges and searched.fixed["conv_blocks"] == 2


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"parameters": {"hiden_layer_size": {"min": 1, "max": 9}}}, "unknown key 'hiden_layer_size' (did you mean"),
        ({"parameters": {"dropout": {"min": 0.5, "max": 0.2}}}, "dropout: empty range, min 0.5 must be below max 0.2"),
        ({"parameters": {"dropout": {"min": 0.3, "max": 0.3}}}, "empty range"),
        ({"parameters": {"dropout": {"min": 0.1, "max": 1.5}}}, "dropout must be a number in [0, 1), got 1.5"),
        (
            {"parameters": {"epochs": {"min": 0, "max": 3}}, "fixed": {}},
            "epochs must be an integer >= 1, got 0 (parameters.epochs.min)",
        ),
        ({"parameters": {"hidden_layer_size": {"min": 16.5, "max": 64}}}, "hidden_layer_size must be an integer"),
        ({"parameters": {"dropout": {"min": 0, "max": 0.5, "log": True}}}, "a log range needs min > 0"),
        ({"parameters": {"lr_schedule": {"values": ["constant", "linear"]}}}, "lr_schedule must be one of"),
        ({"parameters": {"lr_schedule": {"values": []}}}, "must be a non-empty list"),
        ({"parameters": {"dropout": {"min": 0.1}}}, "parameters.dropout must be {values"),
        ({"parameters": {}}, "parameters is empty"),
        ({"parameters": {"validation_fraction": {"min": 0.1, "max": 0.2}}}, "not a hyperparameter"),
        ({"fixed": {"epochs": 0}}, "epochs must be an integer >= 1, got 0 (fixed.epochs)"),
        ({"fixed": {"dropout": 0.1}}, "dropout is both searched (parameters) and fixed"),
        ({"metric": "test_accuracy"}, "metric must be val_accuracy"),
        ({"budget": {}}, "budget needs trials, minutes or both"),
        ({"budget": {"trials": 0}}, "budget.trials must be an integer >= 1"),
        ({"budget": {"hours": 2}}, "unknown key 'budget.hours'"),
        ({"pruner": {"warmup_epochs": -1}}, "pruner.warmup_epochs must be an integer >= 0"),
        ({"sampler": "random"}, "unknown key 'sampler'"),
    ],
)
def test_a_bad_search_space_is_one_line_naming_what_is_wrong(changes, message):
    with pytest.raises(StageError) as caught:
        parse_space(space(**changes), BASE, "search.yaml")
    assert str(caught.value).startswith("search.yaml: ") and message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_suggested_points_are_in_the_space_valid_and_seeded():
    searched = parse_space(
        space(parameters={**space()["parameters"], "lr_schedule": {"values": ["constant", "cosine"]}}), BASE
    )

    def points(seed):
        study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
        found = []
        for _ in range(12):
            trial = study.ask()
            found.append(suggest(trial, searched, BASE))
            study.tell(trial, found[-1]["dropout"])
        return found

    first = points(3)
    assert first == points(3) and first != points(4)
    for point in first:
        assert point["epochs"] == 2 and isinstance(point["hidden_layer_size"], int)
        assert 16 <= point["hidden_layer_size"] <= 256 and 0 <= point["dropout"] <= 0.5
        assert point["lr_schedule"] in ("constant", "cosine")


def test_set_arguments_round_trip_through_params_yaml_reading():
    arguments = set_arguments(
        {"learning_rate": 1e-05, "hidden_layer_size": 64, "lr_schedule": "cosine", "dropout": 0.25}
    )
    assert arguments == [
        "-S",
        "learning_rate=1e-05",
        "-S",
        "hidden_layer_size=64",
        "-S",
        "lr_schedule=cosine",
        "-S",
        "dropout=0.25",
    ]
