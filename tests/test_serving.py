"""`mlflow models serve` over HTTP, on a model trained on tiny synthetic data and logged as train logs it:
every route the server takes (`instances`, `inputs`, `dataframe_split`, CSV) gives the .keras file's
predictions for pixels that are whole numbers 0-255, and answers anything else with HTTP 400 and one
message (stages/lib/served_model.py)."""

import io
import json
import os
import re
import shutil
import signal
import subprocess
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pandas as pd
import pytest

from stages.lib import tracking
from stages.lib.mnist_sources import load_idx
from tests.conftest import REPO, repository_params
from tests.e2e import free_port, user_env, wait_until_answering

ROUTES = ["instances", "inputs", "dataframe_split", "csv"]
RULE = "pixels must be whole numbers from 0 to 255 (raw gray levels, not scaled to 0-1)"


@pytest.fixture(scope="module")
def server_log(tmp_path_factory):
    """Where the `served` fixture's server writes its stderr."""
    return tmp_path_factory.mktemp("serving-log") / "stderr.txt"


@pytest.fixture(scope="module")
def served(tmp_path_factory, make_examples, server_log):
    """(address of /invocations, test images uint8 (5, 28, 28, 1), the .keras file's probabilities for them,
    the Keras model): a model trained for one epoch, logged and registered as mnist-dnn@champion, served as
    the README says."""
    import mlflow

    from stages.train import log_model, save_model, train

    root = tmp_path_factory.mktemp("serving")
    params = repository_params(epochs=1, hidden_layer_size=8, batch_size=32, shuffle_buffer=100)
    model, _ = train(params, make_examples(200, seed=1), make_examples(50, seed=2))
    save_model(model, root / "model.keras")
    images = make_examples(5, seed=3).images
    expected = model.predict(images, verbose=0)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setenv("DVC_ROOT", str(root))
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        try:
            with tracking.start_run(experiment_id=tracking.open_experiment("tests")):
                log_model(root / "model.keras")
            version = mlflow.register_model(f"models:/{mlflow.last_logged_model().model_id}", "mnist-dnn").version
            mlflow.MlflowClient().set_registered_model_alias("mnist-dnn", "champion", version)
        finally:
            mlflow.set_tracking_uri(None)

    port = free_port()
    env = user_env(MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}")
    env.pop("TF_CPP_MIN_LOG_LEVEL")  # set in this process by stages.lib.tensorflow_setup; a user's shell has none
    with open(server_log, "wb") as stderr:
        server = subprocess.Popen(
            ["mlflow", "models", "serve", "-m", "models:/mnist-dnn@champion", "--env-manager", "local"]
            + ["--host", "127.0.0.1", "--port", str(port)],
            cwd=root,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
    try:
        wait_until_answering(f"http://127.0.0.1:{port}/ping", server, 180, "mlflow models serve")
        yield f"http://127.0.0.1:{port}/invocations", images, expected, model
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def request(url: str, route: str, pixels: np.ndarray) -> tuple[int, dict]:
    """POST `pixels` (n images) by `route`, as a client would write them; (HTTP status, JSON reply)."""
    rows = pixels.reshape(len(pixels), -1)  # a table: one row of 784 pixels per image
    if route == "csv":
        body, content_type = pd.DataFrame(rows).to_csv(index=False), "text/csv"
    else:
        data = {"data": rows.tolist()} if route == "dataframe_split" else pixels.tolist()
        body, content_type = json.dumps({route: data}), "application/json"
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, data=body.encode(), headers={"Content-Type": content_type}), timeout=120
        ) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(io.TextIOWrapper(error))


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("written_as", ["integers", "floats"])
def test_pixels_0_to_255_get_the_keras_models_predictions_by_every_route(served, route, written_as):
    url, images, expected, _ = served
    pixels = images if written_as == "integers" else images.astype(np.float64)  # 7.0: JSON and CSV say 7.0
    status, reply = request(url, route, pixels)
    assert status == 200, reply
    np.testing.assert_allclose(reply["predictions"], expected, rtol=1e-6, atol=1e-7)


def with_pixel(images: np.ndarray, value: float) -> np.ndarray:
    """The images as floats with image 1's pixel at row 3, column 4 set to `value`."""
    changed = images.astype(np.float64)
    changed[1, 3, 4, 0] = value
    return changed


BAD = {
    "scaled to 0-1": (lambda images: images / 255.0, None),
    "a fraction": (lambda images: with_pixel(images, 127.5), f"{RULE}; image 1 has 127.5 at row 3, column 4"),
    "above 255": (lambda images: with_pixel(images, 256), f"{RULE}; image 1 has 256 at row 3, column 4"),
    "negative": (lambda images: with_pixel(images, -1), f"{RULE}; image 1 has -1 at row 3, column 4"),
    "missing (NaN, an empty CSV cell)": (
        lambda images: with_pixel(images, np.nan),
        f"{RULE}; image 1 has nan at row 3, column 4",
    ),
    "a 0/1 image": (
        lambda images: np.where(np.arange(5)[:, None, None, None] == 2, images > 100, images),
        "image 2's brightest pixel is 1: pixels look scaled to 0-1; send raw gray levels 0-255",
    ),
}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("case", BAD.values(), ids=BAD.keys())
def test_anything_but_whole_numbers_0_to_255_is_http_400_with_one_message_by_every_route(served, route, case):
    url, images, _, _ = served
    make, message = case
    pixels = make(images)
    if message is None:  # the first pixel that is not a whole number
        image, row, column, _ = np.argwhere(pixels != np.round(pixels))[0]
        message = f"{RULE}; image {image} has {pixels[image, row, column, 0]:g} at row {row}, column {column}"
    status, reply = request(url, route, pixels)
    assert (status, reply["error_code"], reply["message"]) == (400, "INVALID_PARAMETER_VALUE", message)


@pytest.mark.parametrize(
    "route, pixels, message",
    [
        ("instances", lambda images: images[:, :27], "got shape (5, 27, 28, 1)"),
        ("csv", lambda images: images.reshape(5, -1)[:, :783], "got shape (5, 783)"),
        ("inputs", lambda images: np.array([["7"] * 784]), "pixels must be numbers (gray levels 0-255); got text"),
    ],
    ids=["27 rows", "783 columns", "text"],
)
def test_wrong_shapes_and_text_are_http_400_with_one_message(served, route, pixels, message):
    url, images, _, _ = served
    status, reply = request(url, route, pixels(images))
    assert status == 400 and reply["message"].endswith(message), reply
    assert "\n" not in reply["message"]


def test_the_readmes_ready_request_gives_the_digits_and_its_refusal_word_for_word(served, tmp_path):
    """The README's commands, run as they are (on this test's server and model), and the refusal it shows."""
    if shutil.which("curl") is None:
        pytest.skip("no curl on this machine")
    url, _, _, model = served
    readme = (REPO / "README.md").read_text()
    commands = next(block for block in readme.split("```bash\n")[1:] if "five.json" in block).split("```")[0]
    shown = readme.split(commands + "```\n```\n")[1].split("```")[0].splitlines()
    (tmp_path / "data").symlink_to(REPO / "data")
    port = urllib.parse.urlsplit(url).port
    result = subprocess.run(
        ["bash", "-e", "-c", commands.replace("127.0.0.1:5000", f"127.0.0.1:{port}")],
        cwd=tmp_path,
        env=user_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    digits, refusal = result.stdout.splitlines()
    five = load_idx(REPO / "data/raw/mnist").test.images[:5]
    assert digits == str(np.argmax(model.predict(five, verbose=0), axis=1).tolist())
    assert shown[0] == "[7, 2, 1, 0, 4]" and refusal == shown[1]


def test_the_server_prints_no_tensorflow_warning_or_error(served, server_log):
    """TensorFlow's C++ logs, "failed call to cuInit" on any machine without a GPU among them: nothing a user
    of the server can act on (stages/lib/served_model.py)."""
    url, images, _, _ = served
    assert request(url, "instances", images)[0] == 200  # TensorFlow has run: its devices are set up
    log = server_log.read_text()
    assert "Uvicorn running on" in log  # this is the server's stderr
    assert re.findall(r"^[WEF]\d{4} .*", log, flags=re.MULTILINE) == []
