"""The logged pyfunc model: images in, classes out; the predict CLI; a real `mlflow models serve`."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from lib import paths, tracking
from lib.checkpoint import save_checkpoint
from lib.config import Strategy
from lib.data import data_version, scan_image_folder
from lib.serving import log_pyfunc_model
from lib.training import cross_validate, refit
from tests.conftest import write_dataset


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """Train a tiny model, log it as a pyfunc to a throwaway store and alias it `champion`."""
    tmp = tmp_path_factory.mktemp("serving")
    data = tmp / "data"
    write_dataset(data / "train", {"forest": 10, "sea": 10}, seed=3)
    write_dataset(data / "test", {"forest": 5, "sea": 5}, seed=4)
    os.environ["IMGCLS_CACHE_DIR"] = str(tmp / "cache")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    tracking.configure(uri)
    experiment = MlflowClient().create_experiment(
        "serving", artifact_location=(tmp / "art").as_uri()
    )
    strategy = Strategy(
        backbone="resnet18", weights="none", image_size=32, folds=2, epochs=3, lr=0.01, batch_size=8
    )
    folder = scan_image_folder(data / "train")
    md5 = data_version(data)
    cv = cross_validate(strategy, folder, md5, progress=False)
    model, _, _ = refit(strategy, folder, md5, cv.refit_epochs())
    checkpoint = save_checkpoint(
        tmp / "refit.pt", model, folder.classes, cv.preprocessing, strategy.backbone
    )
    with mlflow.start_run(experiment_id=experiment):
        info = log_pyfunc_model(checkpoint, folder.paths[0])
    version = mlflow.register_model(info.model_uri, "serving-classifier")
    MlflowClient().set_registered_model_alias("serving-classifier", "champion", version.version)
    os.environ.pop("IMGCLS_CACHE_DIR")
    files = sorted((data / "test").glob("*/*.jpg"))
    venv_bin = os.path.dirname(sys.executable)  # `mlflow models serve` runs uvicorn from PATH
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    yield {"uri": uri, "files": files, "env": env, "tmp": tmp, "data": data}


def _accuracy(predicted, files):
    return sum(p == f.parent.name for p, f in zip(predicted, files, strict=True)) / len(files)


def test_pyfunc_accepts_paths_bytes_and_base64(registered):
    model = mlflow.pyfunc.load_model("models:/serving-classifier@champion")
    files = registered["files"]
    by_path = model.predict(pd.DataFrame({"image": [str(f) for f in files]}))
    by_b64 = model.predict(
        pd.DataFrame({"image": [base64.b64encode(f.read_bytes()).decode() for f in files]})
    )
    assert list(by_path["predicted_class"]) == list(by_b64["predicted_class"])
    assert by_path[["prob_forest", "prob_sea"]].sum(axis=1).round(5).eq(1.0).all()
    assert _accuracy(by_path["predicted_class"], files) >= 0.5


def test_predict_cli_prints_one_line_per_image_and_writes_csv(registered):
    out = registered["tmp"] / "predictions.csv"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lib.predict",
            str(registered["data"] / "test"),
            "--model",
            "models:/serving-classifier@champion",
            "--csv",
            str(out),
        ],
        cwd=paths.REPO_ROOT,
        env=registered["env"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if "\t" in line]
    assert len(lines) == len(registered["files"])
    frame = pd.read_csv(out)
    assert list(frame.columns[:3]) == ["path", "predicted_class", "confidence"]
    assert len(frame) == len(registered["files"])
    missing = subprocess.run(
        [sys.executable, "-m", "lib.predict", "/no/such/file.jpg"],
        cwd=paths.REPO_ROOT,
        env=registered["env"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2 and "/no/such/file.jpg: no such file" in missing.stderr


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_mlflow_models_serve_answers_http_with_correct_predictions(registered):
    port = _free_port()
    mlflow_bin = os.path.join(os.path.dirname(sys.executable), "mlflow")
    server = subprocess.Popen(
        [
            mlflow_bin,
            "models",
            "serve",
            "-m",
            "models:/serving-classifier@champion",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        env=registered["env"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                time.sleep(1)
            assert server.poll() is None, server.stdout.read().decode()[-3000:]
        files = registered["files"]
        payload = {
            "dataframe_split": {
                "columns": ["image"],
                "data": [[base64.b64encode(f.read_bytes()).decode()] for f in files],
            }
        }
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as answer:
            predictions = json.loads(answer.read())["predictions"]
        served = [row["predicted_class"] for row in predictions]
        local = mlflow.pyfunc.load_model("models:/serving-classifier@champion").predict(
            pd.DataFrame({"image": [str(f) for f in files]})
        )
        assert served == list(local["predicted_class"])
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
