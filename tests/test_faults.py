"""Failures: kill and resume, Ctrl-C, bad input through the CLI, and HTML escaping / local binding.

The kill-and-resume checks (slow) run one tiny 3-point grid four times into one SQLite store:
Ctrl-C with two workers, SIGKILL with one, Ctrl-C with one, then a run to completion. The bad
input checks (fast) call the CLI's ``main`` and expect exit code 2 before anything is created.
"""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from mlflow.tracking import MlflowClient

import run_experiments
from imgcls.core import paths
from imgcls.core.config import Grid, Strategy
from imgcls.pipeline.distributed import run_on_dask
from imgcls.pipeline.notebooks import NotebookParameterError, check_parameters
from imgcls.pipeline.runner import GridPoint, Plan
from imgcls.reporting.reports import write_index
from tests.conftest import make_image, write_dataset

RUN = paths.REPO_ROOT / "run_experiments.py"
# Fine-tuned for many epochs so that each grid point trains for several seconds: the kills below
# land 3 s after a grid point started and must find it still training.
GRID = """
defaults:
  backbone: resnet18
  weights: none
  freeze_backbone: false
  image_size: 32
  folds: 2
  epochs: 150
  batch_size: 8
strategies:
  s:
    lr: [0.01, 0.02, 0.03]
"""
POINTS = ["s-lr=0.01", "s-lr=0.02", "s-lr=0.03"]
STARTED = r"02_train_cv started"


# --------------------------------------------------------------------------- helpers


def _jpeg_bytes(seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    make_image("sea", np.random.default_rng(seed), 32).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _processes_with(marker: str) -> list[psutil.Process]:
    """Processes (runner, pool workers, papermill kernels) whose environment carries ``marker``."""
    found = []
    for process in psutil.process_iter():
        try:
            if (
                process.environ().get("IMGCLS_TEST_MARKER") == marker
                and process.status() != psutil.STATUS_ZOMBIE
            ):
                found.append(process)
        except (psutil.Error, OSError):
            continue
    return found


def _wait_gone(marker: str, timeout: float = 45.0) -> list[str]:
    """Wait until no process of this test run is left; return the command lines of survivors."""
    deadline = time.monotonic() + timeout
    while _processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    survivors = []
    for process in _processes_with(marker):
        try:
            survivors.append(" ".join(process.cmdline()))
        except psutil.Error:
            continue
    return survivors


class Runner:
    """One run_experiments.py process in its own process group, logging to a file."""

    def __init__(
        self, args: list[str], env: dict[str, str], log: Path, sigint: Any = signal.SIG_DFL
    ):
        """``sigint``: the SIGINT disposition the runner inherits. SIG_DFL is a terminal's;
        SIG_IGN is what a script's ``cmd &`` gives (a shell without job control), and it
        must not stop Ctrl-C from working. Set explicitly, so that the tests do not depend on
        how pytest itself was started."""
        self.log = log
        self._handle = open(log, "w")  # noqa: SIM115 (closed in wait())
        self.process = subprocess.Popen(
            [sys.executable, str(RUN), *args],
            cwd=paths.REPO_ROOT,
            env=env,
            stdout=self._handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, sigint),
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 400.0) -> None:
        """Wait until ``pattern`` occurs ``count`` times in the log; fail if the runner exits."""
        deadline = time.monotonic() + timeout
        while len(re.findall(pattern, self.text())) < count:
            if self.process.poll() is not None:
                pytest.fail(
                    f"runner exited ({self.process.returncode}) early:\n{self.text()[-4000:]}"
                )
            if time.monotonic() > deadline:
                self.signal(signal.SIGKILL)
                pytest.fail(f"timeout waiting for {pattern!r} x{count}:\n{self.text()[-4000:]}")
            time.sleep(0.5)

    def signal(self, sig: int) -> int:
        """Send ``sig`` to the runner's whole process group (like Ctrl-C in a terminal)."""
        os.killpg(self.process.pid, sig)
        return self.wait()

    def wait(self, timeout: float = 600.0) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            self._handle.close()


def _runs(uri: str, experiment: str, kind: str | None = None) -> list:
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    query = f"tags.run_kind = '{kind}'" if kind else ""
    return client.search_runs([found.experiment_id], query, max_results=1000)


def _running(uri: str, experiment: str) -> list[str]:
    return [
        f"{r.data.tags.get('mlflow.runName')} ({r.info.run_id})"
        for r in _runs(uri, experiment)
        if r.info.status == "RUNNING"
    ]


def _complete(uri: str, experiment: str) -> dict[str, list]:
    """Grid point name -> its FINISHED runs tagged pipeline_complete=true."""
    out: dict[str, list] = {}
    for run in _runs(uri, experiment, "grid_point"):
        if run.info.status == "FINISHED" and run.data.tags.get("pipeline_complete") == "true":
            out.setdefault(run.data.tags["grid_point"], []).append(run)
    return out


# --------------------------------------------------------------------------- kill and resume


@pytest.fixture(scope="module")
def interrupted_grid(tmp_path_factory):
    """Interrupt a 3-point grid three ways, then resume it; return what each phase left behind.

    The training split holds two unusable files and every run passes --skip-bad-images, so
    the same runs also show that skipped files are counted in MLflow.
    """
    tmp = tmp_path_factory.mktemp("faults")
    data = tmp / "data"
    write_dataset(data / "train", {"forest": 6, "sea": 6}, seed=1, size=32)
    write_dataset(data / "test", {"forest": 3, "sea": 3}, seed=2, size=32)
    (data / "train" / "sea" / "truncated.jpg").write_bytes(_jpeg_bytes()[:300])
    (data / "train" / "forest" / "empty.jpg").write_bytes(b"")
    grid = tmp / "grid.yaml"
    grid.write_text(GRID)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    marker = str(tmp)
    env = {
        **os.environ,
        "IMGCLS_REPORTS_DIR": str(tmp / "reports"),
        "IMGCLS_ARTIFACT_ROOT": str(tmp / "artifacts"),
        "IMGCLS_CACHE_DIR": str(tmp / "cache"),
        "IMGCLS_TEST_MARKER": marker,
    }
    args = [
        *("--grid", str(grid), "--data-dir", str(data)),
        *("--tracking-uri", uri, "--experiment", "faults", "--skip-bad-images"),
    ]
    phases: dict[str, dict] = {}

    def snapshot(name: str, runner: Runner, rc: int) -> None:
        phases[name] = {
            "rc": rc,
            "log": runner.text(),
            "survivors": _wait_gone(marker),
            "running": _running(uri, "faults"),
            "grid_runs": _runs(uri, "faults", "grid_point"),
            "complete": _complete(uri, "faults"),
        }

    # A: Ctrl-C with two pool workers while two grid points train and the third one waits
    runner = Runner([*args, "--workers", "2"], env, tmp / "a.log")
    runner.wait_for(STARTED, count=2)
    time.sleep(3)
    snapshot("ctrl_c_two_workers", runner, runner.signal(signal.SIGINT))
    # B: SIGKILL (runner and workers die at once) after the first grid point completed
    runner = Runner(args, env, tmp / "b.log")
    runner.wait_for(STARTED, count=2)  # one worker: the second point starts after the first ended
    time.sleep(3)
    snapshot("sigkill", runner, runner.signal(signal.SIGKILL))
    # C: Ctrl-C with one worker while the next grid point trains, to a runner started the way
    # a script's `python run_experiments.py ... &` starts it: with SIGINT ignored
    runner = Runner(args, env, tmp / "c.log", sigint=signal.SIG_IGN)
    runner.wait_for(STARTED)
    time.sleep(3)
    snapshot("ctrl_c_one_worker", runner, runner.signal(signal.SIGINT))
    # D: the same command again, to completion
    runner = Runner(args, env, tmp / "d.log")
    snapshot("resume", runner, runner.wait())
    phases["tmp"] = {"path": tmp, "uri": uri}
    return phases


@pytest.mark.slow
def test_ctrl_c_with_two_workers_stops_at_once_and_leaves_nothing_running(interrupted_grid):
    phase = interrupted_grid["ctrl_c_two_workers"]
    assert phase["rc"] == 130, phase["log"][-3000:]
    assert "interrupted: unfinished runs are marked KILLED" in phase["log"]
    assert phase["running"] == [], phase["log"][-3000:]
    assert phase["survivors"] == []
    # the queued third grid point never started: no third run, no third "started" line
    assert len(re.findall(STARTED, phase["log"])) == 2, phase["log"][-3000:]
    assert sorted(r.info.status for r in phase["grid_runs"]) == ["KILLED", "KILLED"]


@pytest.mark.slow
def test_sigkill_mid_grid_point_is_marked_killed_by_the_next_run(interrupted_grid):
    phase = interrupted_grid["sigkill"]
    assert phase["rc"] == -signal.SIGKILL
    assert phase["survivors"] == [], "papermill kernels must die with their runner"
    assert sorted(phase["complete"]) == ["s-lr=0.01"]
    assert len(phase["running"]) == 1, phase["running"]  # the point that was training
    stale = re.search(
        r"marked (\d+) run\(s\) of dead runners as KILLED: (\w+)",
        interrupted_grid["ctrl_c_one_worker"]["log"],
    )
    assert stale and stale.group(1) == "1", interrupted_grid["ctrl_c_one_worker"]["log"][:3000]
    final = {r.info.run_id: r for r in interrupted_grid["resume"]["grid_runs"]}
    assert final[stale.group(2)].info.status == "KILLED"
    assert "is gone" in final[stale.group(2)].data.tags["killed_reason"]


@pytest.mark.slow
def test_ctrl_c_with_one_worker_exits_130_and_leaves_nothing_running(interrupted_grid):
    phase = interrupted_grid["ctrl_c_one_worker"]
    assert phase["rc"] == 130, phase["log"][-3000:]
    assert "plan: 2 to run, 1 already finished" in phase["log"]
    assert "interrupted: unfinished runs are marked KILLED" in phase["log"]
    assert phase["running"] == []
    assert phase["survivors"] == []


@pytest.mark.slow
def test_resume_completes_each_grid_point_exactly_once(interrupted_grid):
    phase = interrupted_grid["resume"]
    assert phase["rc"] == 0, phase["log"][-4000:]
    assert "plan: 2 to run, 1 already finished" in phase["log"]
    assert {name: len(runs) for name, runs in phase["complete"].items()} == dict.fromkeys(POINTS, 1)
    assert phase["running"] == []
    statuses = sorted(r.info.status for r in phase["grid_runs"])
    assert statuses == ["FINISHED"] * 3 + ["KILLED"] * 4  # 2 + 1 + 1 interrupted attempts
    assert phase["survivors"] == []


@pytest.mark.slow
def test_cache_holds_no_partial_files_after_kills(interrupted_grid):
    cache = Path(interrupted_grid["tmp"]["path"]) / "cache"
    assert not list(cache.rglob("*.tmp"))
    arrays = sorted(cache.rglob("*.npy"))
    assert arrays and {p.parent.name for p in arrays} <= {"decoded", "features"}
    for path in arrays:
        assert np.load(path).size > 0, path


@pytest.mark.slow
def test_skipped_images_are_counted_on_every_grid_point_run(interrupted_grid):
    for runs in interrupted_grid["resume"]["complete"].values():
        assert runs[0].data.metrics["skipped_images_train"] == 2


# --------------------------------------------------------------------------- bad input


@pytest.fixture()
def cli(tmp_path, monkeypatch, capsys):
    """Call run_experiments.main in-process with a throwaway store; return (exit code, stderr)."""
    for name, sub in [
        ("IMGCLS_REPORTS_DIR", "reports"),
        ("IMGCLS_ARTIFACT_ROOT", "artifacts"),
        ("IMGCLS_CACHE_DIR", "cache"),
    ]:
        monkeypatch.setenv(name, str(tmp_path / sub))
    grid = tmp_path / "grid.yaml"
    grid.write_text(GRID.replace("[0.01, 0.02, 0.03]", "0.01"))
    store = tmp_path / "mlflow.db"

    def call(*args: str, data: Path | None = None, grid_file: Path = grid) -> tuple[int, str]:
        argv = ["--grid", str(grid_file), "--tracking-uri", f"sqlite:///{store}", *args]
        if data is not None:
            argv += ["--data-dir", str(data)]
        code = run_experiments.main(argv)
        out = capsys.readouterr()
        # nothing half-done: no MLflow store, no reports, no cache
        for left in (store, tmp_path / "reports", tmp_path / "cache"):
            assert not left.exists(), f"{left} created before validation failed"
        return code, out.err

    return call


def _dataset(root: Path) -> Path:
    write_dataset(root / "train", {"forest": 4, "sea": 4}, seed=1, size=32)
    write_dataset(root / "test", {"forest": 2, "sea": 2}, seed=2, size=32)
    return root


BAD_FILES = {
    "corrupt JPEG": ("bad.jpg", lambda: _jpeg_bytes()[:20] + b"\x00\x13" * 200, "corrupt JPEG"),
    "truncated JPEG": ("cut.jpg", lambda: _jpeg_bytes()[:300], "corrupt or truncated image"),
    "text with .jpg name": ("notes.jpg", lambda: b"shopping list", "not an image file"),
    "non-image extension": ("notes.txt", lambda: b"shopping list", "not an image file"),
    "zero-byte file": ("empty.jpg", lambda: b"", "empty file (0 bytes)"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_in_train_fails_naming_the_path(case, cli, tmp_path):
    data = _dataset(tmp_path / "data")
    name, content, reason = BAD_FILES[case]
    bad = data / "train" / "sea" / name
    bad.write_bytes(content())
    code, err = cli(data=data)
    assert code == 2
    assert f"{bad}: {reason}" in err, err
    assert "--skip-bad-images" in err


@pytest.mark.parametrize("inherited", [signal.SIG_IGN, signal.SIG_DFL], ids=["ignored", "default"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_the_clis_signal_handlers_stop_it_whatever_it_inherited(inherited, sig):
    """Started with SIGINT ignored (a script's `cmd &`), Ctrl-C used to be lost and the runner
    ran its grid to the end. The kind: an inherited disposition decides nothing; SIGINT and
    SIGTERM, each inherited ignored or default, raise KeyboardInterrupt (exit 130)."""
    code = (
        "import time\nfrom imgcls.pipeline import cli\ncli.install_signal_handlers()\n"
        "print('ready', flush=True)\ntry:\n    time.sleep(60)\n"
        "except KeyboardInterrupt:\n    print('interrupted', flush=True)\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=paths.REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(sig, inherited),
    )
    try:
        assert process.stdout.readline().strip() == "ready"
        process.send_signal(sig)
        out, _ = process.communicate(timeout=30)
    finally:
        process.kill()
    assert out.strip() == "interrupted"


def test_bad_file_exit_code_of_the_real_process(tmp_path):
    data = _dataset(tmp_path / "data")
    (data / "train" / "forest" / "empty.jpg").write_bytes(b"")
    grid = tmp_path / "grid.yaml"
    grid.write_text(GRID)
    env = {**os.environ, "IMGCLS_REPORTS_DIR": str(tmp_path / "reports")}
    result = subprocess.run(
        [sys.executable, str(RUN), "--grid", str(grid), "--data-dir", str(data)],
        cwd=paths.REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert "empty.jpg: empty file (0 bytes)" in result.stderr
    assert not (tmp_path / "reports").exists()


def test_empty_class_folder(cli, tmp_path):
    data = _dataset(tmp_path / "data")
    (data / "train" / "lake").mkdir()
    code, err = cli(data=data)
    assert code == 2
    assert f"{data / 'train'}: class folder(s) ['lake'] contain no usable images" in err


def test_only_one_class(cli, tmp_path):
    data = tmp_path / "data"
    write_dataset(data / "train", {"sea": 4}, size=32)
    write_dataset(data / "test", {"sea": 2}, size=32)
    code, err = cli(data=data)
    assert code == 2
    assert "found 1 class folder(s) ['sea']; a classifier needs at least two" in err


def test_test_classes_differ_from_train(cli, tmp_path):
    data = _dataset(tmp_path / "data")
    (data / "test" / "sea").rename(data / "test" / "lake")
    code, err = cli(data=data)
    assert code == 2
    assert f"{data / 'test'}: classes ['forest', 'lake'] differ" in err
    assert "missing: ['sea'], unexpected: ['lake']" in err


def test_missing_default_data_dir_says_dvc_pull(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("IMGCLS_DATA_DIR", str(tmp_path / "data"))  # the default data/, absent
    code, err = cli()
    assert code == 2
    assert f"{tmp_path / 'data' / 'train'}: split folder not found" in err
    assert "`dvc pull`" in err


def test_missing_data_dir_option_names_the_path(cli, tmp_path):
    code, err = cli(data=tmp_path / "nowhere")
    assert code == 2
    assert f"{tmp_path / 'nowhere' / 'train'}: split folder not found" in err
    assert "dvc" not in err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("strategies:\n  s:\n    learning_rate: 0.1\n", "strategies.s.learning_rate: unknown key"),
        ("strategies:\n  s:\n    epochs: '3'\n", "strategies.s.epochs: expected int, got str"),
        ("strategies:\n  s:\n    folds: true\n", "strategies.s.folds: expected int, got bool"),
        ("defaults:\n  lr: fast\nstrategies:\n  s: {}\n", "defaults.lr: expected float"),
        ("strategies:\n  s:\n    lr: [0.1, -0.1]\n", "strategies.s.lr[1]: learning rate must"),
        ("strategies: [s\n", "not valid YAML"),
    ],
)
def test_bad_grid_yaml_names_the_yaml_path(cli, tmp_path, text, expected):
    data = _dataset(tmp_path / "data")
    grid = tmp_path / "bad.yaml"
    grid.write_text(text)
    code, err = cli(data=data, grid_file=grid)
    assert code == 2
    assert f"{grid}:" in err and expected in err, err


def test_unreachable_tracking_server_fails_before_any_work(cli, tmp_path):
    data = _dataset(tmp_path / "data")
    start = time.monotonic()
    code, err = cli("--tracking-uri", "http://127.0.0.1:9", data=data)
    assert code == 2 and "http://127.0.0.1:9: tracking server unreachable" in err
    assert time.monotonic() - start < 60


def test_unknown_notebook_parameter_names_notebook_and_allowed_names():
    with pytest.raises(NotebookParameterError) as error:
        check_parameters("02_train_cv", {"nope": 1})
    message = str(error.value)
    assert "notebooks/02_train_cv.ipynb" in message and "['nope']" in message
    for name in ("strategy", "strategy_name", "parent_run_id", "data_dir", "torch_threads"):
        assert name in message
    assert check_parameters("02_train_cv", {"strategy_name": "s"}) == {"strategy_name": "s"}


# --------------------------------------------------------------------------- security

SCRIPT = "<script>alert(1)</script>"


def test_report_index_escapes_names_from_yaml_and_files(tmp_path):
    strategy = Strategy(name=SCRIPT, extra={"grid_values": {"lr": SCRIPT}})
    grid = Grid(path=Path(f"/tmp/{SCRIPT}.yaml"), strategies=(strategy,))
    point = GridPoint(
        strategy, key=SCRIPT, result={"status": "FAILED", "run_id": None, "error": SCRIPT}
    )
    skipped = GridPoint(Strategy(name=f"{SCRIPT}2"), key="k", action="skip")
    plan = Plan(grid, SCRIPT, SCRIPT, SCRIPT, f"http://h/{SCRIPT}", "1", [point, skipped])
    failed = {"status": "FAILED", "run_id": None, "error": SCRIPT}
    page = write_index(plan, failed, failed, tmp_path / "reports").read_text()
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "/tmp/&lt;script&gt;alert(1)&lt;/script&gt;.yaml" in page


def test_local_dask_cluster_binds_loopback_only(monkeypatch):
    import dask.distributed

    seen: dict = {}

    class FakeCluster:
        def __init__(self, **kwargs):
            seen.update(kwargs)

        def close(self):
            seen["closed"] = True

    class FakeClient:
        def __init__(self, cluster, **kwargs):
            self.scheduler = type("S", (), {"address": "tcp://127.0.0.1:1"})()

        def scheduler_info(self, **kwargs):
            return {"workers": {}}

        def close(self):
            pass

    monkeypatch.setattr(dask.distributed, "LocalCluster", FakeCluster)
    monkeypatch.setattr(dask.distributed, "Client", FakeClient)
    monkeypatch.setattr(dask.distributed, "as_completed", lambda futures: iter(futures))
    assert run_on_dask([], None, 2, 1) == []
    assert seen["host"] == "127.0.0.1" and seen["dashboard_address"] is None
    assert seen["closed"]


def test_makefile_lab_and_ui_bind_loopback_only():
    text = (paths.REPO_ROOT / "Makefile").read_text()
    recipes = {}
    for target in ("lab", "ui"):
        block = re.search(rf"^{target}:.*\n((?:\t.*\n)+)", text, re.MULTILINE)
        assert block, f"Makefile target {target} not found"
        recipes[target] = block.group(1)
    assert "jupyter lab" in recipes["lab"] and "--ip 127.0.0.1" in recipes["lab"]
    assert "mlflow ui" in recipes["ui"] and "--host 127.0.0.1" in recipes["ui"]
    assert "0.0.0.0" not in text


def test_mark_stale_runs_kills_dead_owners_and_their_orphaned_fold_runs(tmp_path):
    import mlflow

    from imgcls import tracking

    previous = mlflow.get_tracking_uri()
    tracking.configure(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        client = MlflowClient()
        experiment = client.create_experiment("stale", (tmp_path / "artifacts").as_uri())
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        host = socket.gethostname()

        def run(owner: str | None, parent: str | None = None) -> str:
            tags = {"run_kind": "grid_point"} if owner else {"run_kind": "fold"}
            if owner:
                tags[tracking.TAG_RUNNER] = owner
            if parent:
                tags["mlflow.parentRunId"] = parent
            return client.create_run(experiment, tags=tags).info.run_id

        gone = run(f"{host}:{dead.pid}")
        gone_fold = run(None, parent=gone)
        me = tracking.runner_identity()
        mine = run(me)
        mine_fold = run(None, parent=mine)
        elsewhere = run(f"another-host:{dead.pid}")  # not ours to judge
        stale = tracking.mark_stale_runs(experiment)
        assert sorted(stale) == sorted([gone, gone_fold])
        assert tracking.mark_stale_runs(experiment, dead_owners={me}) == [mine, mine_fold]
        status = {r: client.get_run(r).info.status for r in (gone, mine, elsewhere)}
        assert status == {gone: "KILLED", mine: "KILLED", elsewhere: "RUNNING"}
        assert client.get_run(gone_fold).data.tags["killed_reason"] == f"parent run {gone} ended"
    finally:
        mlflow.set_tracking_uri(previous)
