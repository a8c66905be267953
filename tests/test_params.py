import math

import pytest
import yaml

from stages.common.errors import StageError
from stages.common.params import load_params, parse_params
from tests.conftest import REAL_PARAMS, set_params


def test_real_params_file_is_valid_and_typed():
    params = load_params(REAL_PARAMS)
    assert isinstance(params.validation_fraction, float) and isinstance(params.learning_rate, float)
    assert isinstance(params.epochs, int)


def test_as_dict_has_every_key_of_params_yaml(raw_params):
    assert parse_params(raw_params).as_dict() == raw_params


@pytest.mark.parametrize(
    "key, value",
    [
        ("source", "csv"),
        ("source", None),
        ("tfds_data_dir", None),
        ("tfds_data_dir", 5),
        ("seed", -1),
        ("seed", 2**31),
        ("seed", 1.5),
        ("validation_fraction", 0),
        ("validation_fraction", 1),
        ("validation_fraction", 1.5),
        ("validation_fraction", "0.1"),
        ("validation_fraction", math.nan),
        ("shuffle_buffer", 0),
        ("batch_size", 0),
        ("batch_size", -1),
        ("batch_size", 100.0),
        ("epochs", 0),
        ("epochs", True),
        ("epochs", "5"),
        ("hidden_layers", -1),
        ("hidden_layers", False),
        ("hidden_layer_size", 0),
        ("learning_rate", 0),
        ("learning_rate", -0.001),
        ("learning_rate", math.inf),
        ("learning_rate", True),
        ("mlflow_experiment", ""),
        ("mlflow_experiment", "   "),
        ("mlflow_experiment", 3),
        ("registered_model", ""),
        ("conv_blocks", 4),
        ("conv_blocks", -1),
        ("conv_filters", 0),
        ("dropout", 1),
        ("dropout", -0.1),
        ("dropout", "0.2"),
        ("lr_schedule", "linear"),
        ("lr_schedule", None),
        ("augment_shift", 9),
        ("augment_shift", 1.5),
        ("augment_rotation", 46),
        ("augment_rotation", -1),
    ],
)
def test_invalid_value_is_one_line_naming_key_and_value(raw_params, key, value):
    raw_params[key] = value
    with pytest.raises(StageError) as error:
        parse_params(raw_params, "my.yaml")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("my.yaml: ")
    assert key in message
    assert repr(value) in message


@pytest.mark.parametrize(
    "key, value",
    [
        ("seed", 0),
        ("seed", 2**31 - 1),
        ("hidden_layers", 0),
        ("tfds_data_dir", "/data/tfds"),
        ("tfds_data_dir", ""),
        ("source", "tfds"),
        ("validation_fraction", 0.5),
        ("epochs", 1),
    ],
)
def test_boundary_values_are_accepted(raw_params, key, value):
    raw_params[key] = value
    assert getattr(parse_params(raw_params), key) == value


def test_integer_learning_rate_becomes_float(raw_params):
    raw_params["learning_rate"] = 1
    params = parse_params(raw_params)
    assert params.learning_rate == 1.0
    assert isinstance(params.learning_rate, float)


def test_unknown_key_suggests_the_close_one(raw_params):
    raw_params["epoch"] = raw_params.pop("epochs")
    with pytest.raises(StageError, match=r"unknown key 'epoch' \(did you mean 'epochs'\?\)"):
        parse_params(raw_params)


def test_unknown_key_without_close_match_has_no_suggestion(raw_params):
    raw_params["zzzz"] = 1
    with pytest.raises(StageError, match="unknown key 'zzzz'") as error:
        parse_params(raw_params)
    assert "did you mean" not in str(error.value)


def test_missing_key_is_named(raw_params):
    del raw_params["seed"]
    with pytest.raises(StageError, match="missing key 'seed'"):
        parse_params(raw_params)


@pytest.mark.parametrize("text", ["", "- 1\n- 2\n", "just a string\n"])
def test_yaml_that_is_not_a_mapping_is_rejected(tmp_path, text):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(StageError, match="expected a mapping"):
        load_params(path)


def test_invalid_yaml_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("epochs: [1, 2\nseed: 3\n")
    with pytest.raises(StageError, match="not valid YAML") as error:
        load_params(path)
    assert str(path) in str(error.value)
    assert "\n" not in str(error.value)


def test_missing_file_is_named(tmp_path):
    path = tmp_path / "absent.yaml"
    with pytest.raises(StageError, match="cannot read parameters") as error:
        load_params(path)
    assert str(path) in str(error.value)


def test_exponent_notation_is_a_number_as_dvc_writes_it(tmp_path, raw_params):
    # `dvc exp run -S learning_rate=1e-5` writes `learning_rate: 1e-05`: a string for YAML 1.1.
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw_params).replace("learning_rate: 0.001", "learning_rate: 1e-05"))
    assert load_params(path).learning_rate == 1e-05


def test_load_params_reads_changed_values(tmp_path):
    set_params(tmp_path, epochs=7, learning_rate=0.5)
    params = load_params(tmp_path / "params.yaml")
    assert (params.epochs, params.learning_rate) == (7, 0.5)


def imported_modules(importtime_stderr: str) -> set[str]:
    """Module names from `python -X importtime` output."""
    return {
        line.rsplit("|", 1)[1].strip()
        for line in importtime_stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }


def is_heavy(module: str) -> bool:
    return module.split(".")[0] in ("tensorflow", "keras")


@pytest.mark.parametrize("stage", ["prepare", "split", "train", "evaluate"])
def test_bad_param_fails_in_one_line_before_importing_tensorflow(tmp_path, run_stage_in, stage):
    set_params(tmp_path, epochs=0)
    result = run_stage_in(stage, tmp_path, python_args=("-X", "importtime"))
    assert result.returncode == 1
    modules = imported_modules(result.stderr)
    assert "stages.common.params" in modules  # the importtime output was parsed
    assert not [m for m in modules if is_heavy(m)]
    message = [line for line in result.stderr.splitlines() if not line.startswith("import time:")]
    assert len(message) == 1
    assert message[0].startswith(f"{stage}: error: params.yaml: epochs")
    assert "got 0" in message[0]
    assert list(tmp_path.iterdir()) == [tmp_path / "params.yaml"]  # nothing written


@pytest.mark.parametrize("stage", ["prepare", "split", "train", "evaluate"])
def test_help_exits_0_without_importing_tensorflow(tmp_path, run_stage_in, stage):
    result = run_stage_in(stage, tmp_path, "--help", python_args=("-X", "importtime"))
    assert result.returncode == 0
    assert result.stdout.startswith(f"usage: python -m stages.{stage}")
    modules = imported_modules(result.stderr)
    assert "stages.common.cli" in modules
    assert not [m for m in modules if is_heavy(m)]


def test_dvc_exp_run_set_param_changes_only_that_line(tmp_path):
    # `dvc exp run -S` rewrites params.yaml through hydra's override grammar: the rest must survive.
    from dvc.utils.hydra import apply_overrides

    path = tmp_path / "params.yaml"
    path.write_text(REAL_PARAMS.read_text())
    apply_overrides(str(path), ["epochs=10"])
    changed = [
        (a, b)
        for a, b in zip(REAL_PARAMS.read_text().splitlines(), path.read_text().splitlines(), strict=True)
        if a != b
    ]
    assert [b.split("#")[0].strip() for _, b in changed] == ["epochs: 10"]
    assert load_params(path).tfds_data_dir == ""


def test_a_key_given_twice_is_refused_not_silently_overridden(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(REAL_PARAMS.read_text() + "epochs: 10\n")
    line = len(path.read_text().splitlines())
    with pytest.raises(StageError) as error:
        load_params(path)
    assert str(error.value) == (
        f'{path}: not valid YAML: found duplicate key "epochs" with value "10" (original value: "5") (line {line})'
    )
