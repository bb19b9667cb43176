"""Beyond one laptop: a real MLflow server, parallel worker processes, a Dask cluster, SQLite.

Each scenario runs the same tiny 3-point grid and then checks the store exactly: one FINISHED,
complete parent run per grid point, ``folds`` child runs each, every metric logged once (no
duplicates from retries or races) and every artifact and logged model present once. Run with
``-s`` to see the wall time of each scenario.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from imgcls import tracking
from imgcls.core import paths
from tests.conftest import write_dataset

RUN = paths.REPO_ROOT / "run_experiments.py"
FOLDS, EPOCHS = 2, 2
GRID = f"""
defaults:
  backbone: resnet18
  weights: none
  image_size: 32
  folds: {FOLDS}
  epochs: {EPOCHS}
  batch_size: 8
strategies:
  s:
    lr: [0.01, 0.02, 0.03]
"""
POINTS = ["s-lr=0.01", "s-lr=0.02", "s-lr=0.03"]
NOTEBOOKS = {
    f"notebooks/{n}.{e}" for n in ("02_train_cv", "03_evaluate") for e in ("ipynb", "html")
}
CHECKPOINTS = {f"checkpoints/fold{k}.pt" for k in range(FOLDS)} | {"checkpoints/refit.pt"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _stop_group(process: subprocess.Popen) -> None:
    """Terminate a process started with start_new_session=True, its group and its children."""
    try:
        children = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.send_signal(sig)
        _, alive = psutil.wait_procs(children, timeout=wait)
        try:
            process.wait(wait)
        except subprocess.TimeoutExpired:
            continue
        if not alive:
            return


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` on a free local port with its own SQLite store and artifacts."""
    tmp = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp / "server.log"
    with open(log, "w") as handle:
        server = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "mlflow"),
                "server",
                *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
                *("--backend-store-uri", f"sqlite:///{tmp / 'server.db'}"),
                *("--artifacts-destination", str(tmp / "artifacts")),
            ],
            cwd=tmp,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 180
        while not _healthy(url):
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        _stop_group(server)
    assert server.poll() is not None


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The dataset and grid every scenario runs (the decoded/feature cache is shared)."""
    tmp = tmp_path_factory.mktemp("distributed")
    write_dataset(tmp / "data" / "train", {"forest": 6, "sea": 6}, seed=1, size=32)
    write_dataset(tmp / "data" / "test", {"forest": 3, "sea": 3}, seed=2, size=32)
    (tmp / "grid.yaml").write_text(GRID)
    return tmp


def run_grid(workspace: Path, scenario: str, *args: str) -> tuple[str, float]:
    """Run the grid CLI for one scenario; return its stdout and wall time, fail on exit != 0."""
    env = {
        **os.environ,
        "IMGCLS_REPORTS_DIR": str(workspace / scenario / "reports"),
        "IMGCLS_ARTIFACT_ROOT": str(workspace / scenario / "artifacts"),
        "IMGCLS_CACHE_DIR": str(workspace / "cache"),
    }
    command = [
        sys.executable,
        str(RUN),
        *("--grid", str(workspace / "grid.yaml"), "--data-dir", str(workspace / "data")),
        *("--experiment", scenario, *args),
    ]
    start = time.perf_counter()
    result = subprocess.run(
        command, cwd=paths.REPO_ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    seconds = time.perf_counter() - start
    output = result.stdout + result.stderr
    print(f"\n[wall time] {scenario} ({' '.join(args)}): {seconds:.1f}s")
    assert result.returncode == 0, output[-5000:]
    assert "database is locked" not in output
    return result.stdout, seconds


def check_store(uri: str, experiment: str) -> None:
    """Exactly the runs, metrics, artifacts and models one clean grid execution produces."""
    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([experiment_id], max_results=1000)
    assert [r.info.run_id for r in runs if r.info.status != "FINISHED"] == []
    kinds = sorted(r.data.tags.get("run_kind", "?") for r in runs)
    assert kinds == ["comparison", "data"] + ["fold"] * (FOLDS * 3) + ["grid_point"] * 3
    parents = [r for r in runs if r.data.tags["run_kind"] == "grid_point"]
    assert sorted(r.data.tags["grid_point"] for r in parents) == POINTS
    for run in parents:
        run_id = run.info.run_id
        assert run.data.tags["pipeline_complete"] == "true", run.data.tags
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == run_id]
        assert sorted(c.data.tags["fold"] for c in children) == [str(k) for k in range(FOLDS)]
        for child in children:
            history = client.get_metric_history(child.info.run_id, "val_accuracy")
            assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1))
        for key in run.data.metrics:
            steps = sorted(m.step for m in client.get_metric_history(run_id, key))
            expected = list(range(FOLDS)) if key.startswith("fold_") else [0]
            assert steps == expected, (run.data.tags["grid_point"], key, steps)
        assert "fold_val_accuracy" in run.data.metrics and "test_accuracy" in run.data.metrics
        listed = [a.path for a in client.list_artifacts(run_id, "notebooks")]
        assert sorted(listed) == sorted(NOTEBOOKS)
        assert {a.path for a in client.list_artifacts(run_id, "checkpoints")} == CHECKPOINTS
        models = client.search_logged_models(
            [experiment_id], filter_string=f"source_run_id = '{run_id}'"
        )
        assert len(models) == 1, [m.model_id for m in models]
        assert str(models[0].status).endswith("READY")
        assert models[0].name == tracking.MODEL_NAME  # what tracking.logged_model looks up
        files = {a.path for a in client.list_logged_model_artifacts(models[0].model_id)}
        assert "MLmodel" in files


@pytest.mark.slow
def test_server_with_two_local_worker_processes(mlflow_server, workspace):
    run_grid(workspace, "server-local", "--tracking-uri", mlflow_server, "--workers", "2")
    check_store(mlflow_server, "server-local")


@pytest.mark.slow
def test_server_with_dask_local_cluster(mlflow_server, workspace):
    out, _ = run_grid(
        workspace,
        "server-dask",
        *("--tracking-uri", mlflow_server, "--executor", "dask", "--workers", "2"),
    )
    assert "dask: tcp://127.0.0.1:" in out and "with 2 worker(s)" in out
    check_store(mlflow_server, "server-dask")


@pytest.mark.slow
def test_sqlite_with_two_local_worker_processes(workspace):
    uri = f"sqlite:///{workspace / 'sqlite' / 'mlflow.db'}"
    (workspace / "sqlite").mkdir(exist_ok=True)
    run_grid(workspace, "sqlite", "--tracking-uri", uri, "--workers", "2")
    check_store(uri, "sqlite")


def test_remote_dask_scheduler_needs_a_shared_tracking_server(tmp_path):
    write_dataset(tmp_path / "data" / "train", {"forest": 3, "sea": 3}, size=32)
    write_dataset(tmp_path / "data" / "test", {"forest": 1, "sea": 1}, size=32)
    (tmp_path / "grid.yaml").write_text(GRID)
    store = tmp_path / "mlflow.db"
    result = subprocess.run(
        [
            sys.executable,
            str(RUN),
            *("--grid", str(tmp_path / "grid.yaml"), "--data-dir", str(tmp_path / "data")),
            *("--tracking-uri", f"sqlite:///{store}"),
            *("--executor", "dask", "--scheduler", "tcp://127.0.0.1:1"),
        ],
        cwd=paths.REPO_ROOT,
        env={**os.environ, "IMGCLS_REPORTS_DIR": str(tmp_path / "reports")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"sqlite:///{store}: a remote Dask cluster needs a shared MLflow server" in (
        result.stderr
    )
    assert "--tracking-uri http://HOST:PORT" in result.stderr
    assert not (tmp_path / "reports").exists() and not store.exists()
