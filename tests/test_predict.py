"""stages/predict.py: image files -> digits, run as a user runs it (`python -m stages.predict`).

Fast tests use a fixed model (random but seeded weights), whose probabilities the test computes itself;
the slow one trains the real network on MNIST and checks that reading digits from image files costs
no accuracy.
"""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages import predict
from stages.common import paths
from stages.common.dataset import Examples
from stages.common.errors import StageError
from stages.lib import tracking
from stages.lib.digit_images import load_image, to_mnist
from tests.conftest import RAW_MNIST, clean_env, mlflow_as_a_stage, mnist_test_digits, repository_params, write_digit
from tests.e2e import REPO

LINE = re.compile(
    r"(?P<path>.+): (?P<digit>\d)  \((?P<top>\d \d+\.\d%, \d \d+\.\d%, \d \d+\.\d%)\)(?P<doubtful>  doubtful)?"
)

# How a digit is written to a file: format, scale, canvas (times the digit's size), where on it, ink and paper.
STYLES = [
    dict(suffix=".png"),  # 28x28, as in MNIST
    dict(suffix=".jpg", scale=3),
    dict(suffix=".png", scale=5, ink=0, paper=255),
    dict(suffix=".jpg", scale=4, canvas=(1.5, 3.0), where=(0.1, 0.8), ink=20, paper=230),
    dict(suffix=".png", scale=2, canvas=(2.0, 1.4), where=(0.9, 0.1), ink=220, paper=40),
    dict(suffix=".jpg", scale=7, canvas=(1.3, 1.3), where=(0.0, 1.0), ink=0, paper=255),
    dict(suffix=".jpg", scale=4, canvas=(1.5, 1.5), ink=20, paper=220, dimmest=0.3),  # photographed, uneven light
    dict(suffix=".jpg", scale=5, canvas=(1.4, 1.8), where=(0.3, 0.6), ink=10, paper=235, dimmest=0.15),
]


def run_predict(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stages.predict", *map(str, args)],
        cwd=cwd,
        env=env or clean_env(cwd),
        capture_output=True,
        text=True,
        timeout=600,
    )


def parse(stdout: str) -> list[tuple[str, int, list[tuple[int, float]]]]:
    """(path, digit, [(digit, probability) x 3]) per line; every line must match the format."""
    parsed = []
    for line in stdout.splitlines():
        match = LINE.fullmatch(line)
        assert match, f"unexpected output line: {line!r}"
        top = [(int(d), float(p.rstrip("%")) / 100) for d, p in (item.split() for item in match["top"].split(", "))]
        if abs(top[0][1] - predict.DOUBTFUL_BELOW) > 0.0005:  # printed to 0.1 %: 90.0% may be either
            assert bool(match["doubtful"]) == (top[0][1] < predict.DOUBTFUL_BELOW), line
        parsed.append((match["path"], int(match["digit"]), top))
    return parsed


# --- Fast: a fixed model ---


@pytest.fixture(scope="module")
def fixed_model(tmp_path_factory):
    """(.keras file, model, weights): uint8 pixels -> /255 -> Flatten -> Dense(10, softmax), seeded random
    weights; the same input contract as the pipeline's model."""
    import keras

    rng = np.random.default_rng(0)
    weights = [rng.normal(0.0, 0.1, (784, 10)).astype(np.float32), rng.normal(0.0, 0.5, 10).astype(np.float32)]
    model = keras.Sequential(
        [
            keras.Input((28, 28, 1), dtype="uint8"),
            keras.layers.Rescaling(1 / 255),
            keras.layers.Flatten(),
            keras.layers.Dense(10, "softmax"),
        ]
    )
    model.set_weights(weights)
    path = tmp_path_factory.mktemp("model") / "fixed.keras"
    model.save(path)
    return path, model, weights


def expected_probabilities(image: Path, weights) -> np.ndarray:
    """What the fixed model gives for the image file, computed here: the digit scaled to [0, 1], softmax(x W + b)."""
    x = to_mnist(load_image(image)).reshape(784).astype(np.float64) / 255.0
    logits = x @ weights[0] + weights[1]
    return np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Four real test digits written in four styles."""
    folder = tmp_path_factory.mktemp("images")
    return [write_digit(d, folder / f"digit{i}", **STYLES[i + 1]) for i, d in enumerate(mnist_test_digits(4))]


def check_answers(stdout: str, images: list[Path], weights) -> None:
    """One line per image, in order: the most probable digit, then the top three exactly as computed."""
    answers = parse(stdout)
    assert [path for path, _, _ in answers] == [str(image) for image in images]
    for (_, digit, top), image in zip(answers, images, strict=True):
        expected = expected_probabilities(image, weights)
        ranked = np.argsort(-expected)[:3]
        assert [d for d, _ in top] == ranked.tolist() and digit == ranked[0]
        assert [p for _, p in top] == pytest.approx(expected[ranked], abs=0.0005 + 1e-6)  # printed to 0.1 %
        assert [p for _, p in top] == sorted((p for _, p in top), reverse=True) and sum(p for _, p in top) <= 1.0015
    assert len({tuple(d for d, _ in top) for _, _, top in answers}) > 1  # the images do get different answers


def test_model_input_is_the_raw_uint8_pixels_with_a_channel_axis():
    digits = np.array([[[0, 51], [255, 128]]], dtype=np.uint8)
    inputs = predict.model_input(digits)
    assert inputs.dtype == np.uint8 and inputs.shape == (1, 2, 2, 1)
    np.testing.assert_array_equal(inputs[0, :, :, 0], digits[0])  # the model scales them itself


def test_describe_gives_the_digit_and_the_three_likeliest_in_order():
    probabilities = np.array([0.01, 0.2, 0.0, 0.7, 0.0, 0.0, 0.0, 0.034, 0.001, 0.055])
    assert predict.describe(probabilities) == "3  (3 70.0%, 1 20.0%, 9 5.5%)  doubtful"
    assert predict.describe(np.full(10, 0.1)) == "0  (0 10.0%, 1 10.0%, 2 10.0%)  doubtful"  # ties: lower first


def test_an_answer_under_90_percent_is_marked_doubtful():
    photographed_four = np.array([0.0, 0.0, 0.0, 0.414, 0.286, 0.3, 0.0, 0.0, 0.0, 0.0])
    assert predict.describe(photographed_four) == "3  (3 41.4%, 5 30.0%, 4 28.6%)  doubtful"
    assert predict.describe(np.array([0.0] * 8 + [0.1, 0.9])) == "9  (9 90.0%, 8 10.0%, 0 0.0%)"
    assert predict.describe(np.array([0.0] * 8 + [0.1001, 0.8999])) == "9  (9 90.0%, 8 10.0%, 0 0.0%)  doubtful"


def test_each_image_gets_its_digit_and_top_three_by_the_workspaces_model(fixed_model, images, tmp_path):
    path, _, weights = fixed_model
    (tmp_path / paths.MODEL).parent.mkdir()
    shutil.copy(path, tmp_path / paths.MODEL)
    result = run_predict(tmp_path, *images)
    assert (result.returncode, result.stderr) == (0, "")
    check_answers(result.stdout, images, weights)


def test_bad_images_are_one_line_each_and_the_others_are_still_answered(fixed_model, images, tmp_path):
    path, _, weights = fixed_model
    (tmp_path / "note.png").write_text("seven\n")
    (tmp_path / "empty.jpg").write_bytes(b"")
    Image.new("L", (60, 40), 255).save(tmp_path / "white.png")
    (tmp_path / "folder").mkdir()
    bad = {
        "note.png": "not an image (or not a format Pillow can read)",
        "empty.jpg": "the file is empty (0 bytes)",
        "white.png": "blank image: no digit found (contrast 0 of 255, need 32)",
        "missing.png": "cannot read the image: No such file or directory",
        "folder": "cannot read the image: Is a directory",
    }
    arguments = [images[0], "note.png", "empty.jpg", images[1], "white.png", "missing.png", "folder", *images[2:]]
    result = run_predict(tmp_path, "--model", path, *arguments)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"predict: error: {name}: {problem}" for name, problem in bad.items()]
    check_answers(result.stdout, images, weights)


def test_it_runs_in_the_repository_root_on_images_anywhere_and_elsewhere_python_finds_no_stages(
    fixed_model, images, tmp_path
):
    """What the README says: run it in the repository root (as installed, the venv has no `stages` package)."""
    env = {k: v for k, v in clean_env(tmp_path).items() if k not in ("PYTHONPATH", "DVC_ROOT")}
    elsewhere = run_predict(tmp_path, "--help", env=env)
    assert elsewhere.returncode == 1 and "No module named 'stages'" in elsewhere.stderr
    result = run_predict(REPO, "--model", fixed_model[0], *images, env=env)  # absolute paths, in another folder
    assert (result.returncode, result.stderr) == (0, "")
    check_answers(result.stdout, images, fixed_model[2])


@pytest.mark.parametrize(
    "model, message",
    [
        ("models/model.keras", "models/model.keras: file not found (run `dvc repro train` to create it)"),
        ("other.keras", "other.keras: file not found"),
        ("broken.keras", "broken.keras: not a loadable Keras model: "),
        (
            "runs:/0123456789abcdef0123456789abcdef/model",
            "runs:/0123456789abcdef0123456789abcdef/model: no MLflow store",
        ),
    ],
)
def test_a_missing_or_broken_model_is_a_stage_error_naming_it(tmp_path, model, message):
    (tmp_path / "broken.keras").write_text("not a zip file")
    with mlflow_as_a_stage(tmp_path), pytest.raises(StageError, match=re.escape(message)) as error:
        predict.load_predictor(model)
    assert "\n" not in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.keras"]  # no empty mlflow.db


# --- Fast: MLflow models on a temporary SQLite store ---


@pytest.fixture(scope="module")
def logged(fixed_model, tmp_path_factory, make_examples):
    """(store root, {kind: model URI}): the fixed model logged as train logs it, registered as digits@champion."""
    import mlflow

    from stages.train import log_model

    path, model, _ = fixed_model
    root = tmp_path_factory.mktemp("store")
    with mlflow_as_a_stage(root):
        with tracking.start_run(experiment_id=tracking.open_experiment("tests")) as run:
            log_model(path)
        model_id = mlflow.last_logged_model().model_id
        version = mlflow.register_model(f"models:/{model_id}", "digits").version
        mlflow.MlflowClient().set_registered_model_alias("digits", "champion", version)
    uris = {"run": f"runs:/{run.info.run_id}/model", "alias": "models:/digits@champion", "id": f"models:/{model_id}"}
    return root, uris


@pytest.mark.parametrize("kind", ["run", "alias", "id"])
def test_mlflow_model_uris_in_the_projects_store(logged, fixed_model, images, tmp_path, kind):
    root, uris = logged
    if kind == "alias":  # from elsewhere, with the store given by MLFLOW_TRACKING_URI
        env = {**clean_env(tmp_path), "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db"}
        result = run_predict(tmp_path, "--model", uris[kind], *images, env=env)
    else:  # in the repository root: its mlflow.db
        result = run_predict(root, "--model", uris[kind], *images)
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    check_answers(result.stdout, images, fixed_model[2])
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize(
    "model, message",
    [
        ("runs:/0123456789abcdef0123456789abcdef/model", "Run with id=0123456789abcdef0123456789abcdef not found"),
        ("models:/mnist-dnn@champion", "Registered Model with name=mnist-dnn not found"),
    ],
)
def test_an_unknown_mlflow_model_is_one_line_before_any_image_is_read(logged, model, message):
    root, _ = logged
    result = run_predict(root, "--model", model, "missing.png")
    assert (result.returncode, result.stdout) == (1, "")
    [line] = result.stderr.splitlines()  # nothing about missing.png: the model comes first
    store = f"sqlite:///{root}/mlflow.db?timeout=60"
    assert line == f"predict: error: {model}: cannot load the MLflow model (tracking store {store}): {message}"


# --- Slow: the real network, trained on MNIST ---


@pytest.mark.slow
def test_digits_read_from_image_files_are_predicted_as_well_as_the_originals(tmp_path):
    """1200 MNIST test digits as PNG/JPEG files of other sizes, offsets and polarities, and photographed in
    light fading across the page: predict's accuracy through the command is within one point of the
    model's on the original 28x28 digits."""
    from stages.lib.mnist_sources import load_idx
    from stages.lib.tensorflow_setup import import_tensorflow
    from stages.train import save_model, train

    import_tensorflow()
    mnist = load_idx(RAW_MNIST)
    train_images, train_labels = mnist.train
    held_out = 54_000  # as split holds out 6,000 for validation (a fixed slice here: the data need no `dvc repro`)
    model, _ = train(
        repository_params(epochs=2),
        Examples(train_images[:held_out], train_labels[:held_out]),
        Examples(train_images[held_out:], train_labels[held_out:]),
    )
    save_model(model, tmp_path / "model.keras")

    count = 1200
    digits, labels = mnist.test.images[:count, :, :, 0], mnist.test.labels[:count]
    originals = np.argmax(model.predict(predict.model_input(digits), verbose=0), axis=1)
    files = [write_digit(d, tmp_path / f"{i:04d}", **STYLES[i % len(STYLES)]) for i, d in enumerate(digits)]
    result = run_predict(tmp_path, "--model", "model.keras", *(f.name for f in files))
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    answers = parse(result.stdout)
    assert [path for path, _, _ in answers] == [f.name for f in files]
    predicted = np.array([digit for _, digit, _ in answers])

    correct = predicted == labels
    on_originals, on_files = np.mean(originals == labels), np.mean(correct)
    by_style = ", ".join(
        f"{s['suffix']} x{s.get('scale', 1)} light to {s.get('dimmest', 1.0)} {np.mean(correct[i :: len(STYLES)]):.3f}"
        for i, s in enumerate(STYLES)
    )
    report = (
        f"accuracy on the original digits {on_originals:.4f}, on the image files {on_files:.4f} ({by_style}); "
        f"same answer for {np.mean(predicted == originals):.4f} of the digits; only one of the two right for "
        f"{np.sum(correct != (originals == labels))}"
    )
    print(report)
    assert on_originals > 0.9, report
    # "Costs no accuracy", one-sided (the files may do better), and held to the noise of 1,200 digits:
    # were the files as good as the originals, the digits on which only one of the two is right (d) would
    # split like a fair coin, so the files' loss has a standard deviation of sqrt(d) / 1,200 (McNemar).
    # Three of those is the margin: 0.015 for d = 36 (3 % of the answers differ).
    assert on_originals - on_files <= 3 * np.sqrt(np.sum(correct != (originals == labels))) / count, report
