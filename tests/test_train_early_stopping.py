"""early_stopping_patience: off by default; on, training stops on a plateau of val_accuracy, keeps the best
epoch's weights, reports that epoch's metrics, and is as deterministic as the rest."""

import numpy as np
import pytest

from stages.common.errors import StageError
from stages.common.params import load_params, parse_params
from stages.lib.input_pipeline import evaluation_dataset
from stages.train import kept_epoch, train
from tests.conftest import REAL_PARAMS, repository_params

# The synthetic bands are learnt to 100 % validation accuracy in a few epochs, then it can only plateau.
PATIENT = repository_params(
    epochs=12,
    hidden_layer_size=16,
    batch_size=32,
    shuffle_buffer=300,
    learning_rate=0.01,
    seed=1,
    early_stopping_patience=2,
)


def rows(*accuracies):
    return [{"epoch": n, "val_accuracy": a} for n, a in enumerate(accuracies, 1)]


def test_it_is_off_by_default_and_must_be_a_non_negative_integer(raw_params):
    assert load_params(REAL_PARAMS).early_stopping_patience == 0
    for bad in (-1, 1.5, True):
        with pytest.raises(StageError, match="early_stopping_patience must be an integer >= 0"):
            parse_params({**raw_params, "early_stopping_patience": bad})


def test_the_kept_epoch_is_the_last_without_early_stopping_and_the_first_best_with_it():
    history = rows(0.5, 0.9, 0.8, 0.9, 0.7)
    assert kept_epoch(repository_params(), history)["epoch"] == 5
    assert kept_epoch(repository_params(early_stopping_patience=3), history)["epoch"] == 2


@pytest.fixture(scope="module")
def data(make_examples):
    return make_examples(300, seed=1), make_examples(100, seed=2)


def test_training_stops_on_a_plateau_and_keeps_the_best_epochs_weights_deterministically(data):
    model, history = train(PATIENT, *data)
    kept = kept_epoch(PATIENT, history)
    assert len(history) < PATIENT.epochs and len(history) == kept["epoch"] + PATIENT.early_stopping_patience
    _, accuracy = model.evaluate(evaluation_dataset(data[1]), verbose=0)
    assert accuracy == pytest.approx(kept["val_accuracy"])  # the model is the kept epoch's
    again, history_again = train(PATIENT, *data)
    assert history_again == history
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), again.get_weights(), strict=True))
