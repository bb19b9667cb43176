"""The README's team setup, run for real: PostgreSQL, an MLflow server on it, a Dask cluster.

One module fixture starts what the README's "Parallel and distributed runs" section shows, with
the same commands and flags, every server on 127.0.0.1 and a free port, everything in temporary
folders: PostgreSQL (Debian's package; ``initdb`` refuses root, so as root it runs as the
``postgres`` user or ``nobody``), ``mlflow server`` on it with proxied artifacts, ``dask
scheduler`` and two ``dask worker`` processes started from the repository root with the venv.

* ``test_grid_through_the_team_setup_arrives_exactly_once``: the 3-point grid of
  tests/test_distributed.py through the cluster; every run, metric, artifact and logged model
  arrives once (its ``check_store``), the rows are in PostgreSQL, the artifact files on the
  server's disk, and exactly one registered version carries the ``champion`` alias.
* ``test_killed_worker_mid_grid_loses_and_duplicates_nothing``: a second, slower grid; one
  worker (its nanny, worker process and notebook kernel at once) is SIGKILLed once its grid
  point has started training. Dask runs that point again on the other worker and the same
  runner invocation finishes: one FINISHED, complete parent per run key with all its metrics and
  artifacts, the dead worker's runs KILLED, none left RUNNING, one registered version.

Teardown stops every process started here (postgres, server, scheduler, workers), also on
failure. Run with ``-s`` to see the timings.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from imgcls import tracking
from imgcls.core import names, paths
from tests.conftest import write_dataset
from tests.test_distributed import (
    CHECKPOINTS,
    FOLDS,
    GRID,
    NOTEBOOKS,
    _free_port,
    _healthy,
    _stop_group,
    check_store,
    run_grid,
)
from tests.test_faults import Runner

BIN = Path(sys.executable).parent  # the venv's mlflow and dask
DB_USER, DB_NAME = "mlflow", "mlflow"
# The grid of the kill test: fine-tuned for every epoch (no early stopping), so that a grid
# point trains for seconds (2 folds and the refit) and is caught training, like the kills of
# tests/test_faults.py. Fold runs are logged once cross-validation is done.
KILL_EPOCHS = 20
KILL_GRID = f"""
defaults:
  backbone: resnet18
  weights: none
  freeze_backbone: false
  image_size: 32
  folds: {FOLDS}
  epochs: {KILL_EPOCHS}
  patience: 0
  batch_size: 8
strategies:
  k:
    lr: [0.01, 0.02]
"""
KILL_POINTS = ["k-lr=0.01", "k-lr=0.02"]


# --------------------------------------------------------------------------- processes


def _postgres_bin() -> Path | None:
    """Return the folder with Debian's PostgreSQL server binaries (newest version), if any."""
    candidates = [
        Path(found).resolve().parent
        for found in (shutil.which(tool) for tool in ("initdb", "pg_ctl", "postgres"))
        if found
    ]
    versions = Path("/usr/lib/postgresql").glob("*/bin")
    candidates += sorted(
        versions, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, reverse=True
    )
    for folder in candidates:
        if all((folder / tool).is_file() for tool in ("initdb", "postgres", "createdb")):
            return folder
    return None


def _db_account() -> pwd.struct_passwd | None:
    """Return the unprivileged account PostgreSQL runs as when this test runs as root."""
    if os.geteuid() != 0:
        return None  # run as ourselves
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    pytest.fail("running as root and neither a 'postgres' nor a 'nobody' account exists")


def _tree(process: subprocess.Popen | psutil.Process) -> list[psutil.Process]:
    """Return a process and all its descendants that are still there."""
    try:
        root = psutil.Process(process.pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


@dataclass
class Services:
    """The processes this module started, by name, each in its own session and logging to a file."""

    logs: Path
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, name: str, command: list[str], **popen) -> subprocess.Popen:
        """Start ``command`` as service ``name`` (stdout and stderr to ``<logs>/<name>.log``)."""
        with open(self.logs / f"{name}.log", "w") as handle:
            process = subprocess.Popen(
                command, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True, **popen
            )
        self.processes[name] = process
        return process

    def log(self, name: str) -> str:
        """Return what service ``name`` printed so far."""
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def wait_for(self, name: str, pattern: str, timeout: float = 120.0) -> None:
        """Wait until ``pattern`` appears in the log of ``name``; fail if it exits first."""
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.log(name)):
            if self.processes[name].poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{name}: no {pattern!r} in its log:\n{self.log(name)[-3000:]}")
            time.sleep(0.5)

    def listening(self) -> set[tuple[str, str, int]]:
        """Return (service, address, port) of every listening socket of every process tree."""
        found = set()
        for name, process in self.processes.items():
            for member in _tree(process):
                with contextlib.suppress(psutil.Error):
                    for conn in member.net_connections(kind="inet"):
                        if conn.status == psutil.CONN_LISTEN:
                            found.add((name, conn.laddr.ip, conn.laddr.port))
        return found

    def stop(self, name: str) -> None:
        """Stop service ``name`` and every process it started (SIGTERM, then SIGKILL)."""
        process = self.processes[name]
        if name == "postgres" and process.poll() is None:
            process.send_signal(signal.SIGINT)  # "fast" shutdown: disconnect clients, checkpoint
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(60)
        _stop_group(process)

    def stop_all(self) -> None:
        """Stop every service, the last started first; never raises before all were tried."""
        for name in reversed(list(self.processes)):
            with contextlib.suppress(Exception):
                self.stop(name)


@dataclass
class Team:
    """The running team setup: addresses, folders and the services behind them."""

    services: Services
    workspace: Path
    tracking_uri: str
    scheduler: str
    database_uri: str
    artifacts: Path
    env: dict[str, str]


def _start_postgres(services: Services, folder: Path) -> str:
    """Create a cluster in ``folder``, start it on 127.0.0.1, create the MLflow database.

    Return the libpq URI ``postgresql://mlflow:PASSWORD@127.0.0.1:PORT/mlflow``.
    """
    pg_bin = _postgres_bin()
    if pg_bin is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL server binaries not found (Debian package postgresql)")
        pytest.skip("PostgreSQL server binaries not found (Debian package postgresql)")
    account = _db_account()
    password = secrets.token_hex(16)
    data, password_file = folder / "data", folder / "password"
    password_file.write_text(password + "\n")
    as_user: dict = {"cwd": folder}
    if account is not None:
        for path in (folder, password_file):
            os.chown(path, account.pw_uid, account.pw_gid)
        as_user |= {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
    # initdb -D DB-DIR -U mlflow --pwfile PASSWORD-FILE --auth-local trust \
    #     --auth-host scram-sha-256 -E UTF8 --no-locale
    initdb = subprocess.run(
        [
            str(pg_bin / "initdb"),
            *("-D", str(data), "-U", DB_USER, "--pwfile", str(password_file)),
            *("--auth-local", "trust", "--auth-host", "scram-sha-256"),
            *("-E", "UTF8", "--no-locale"),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        **as_user,
    )
    assert initdb.returncode == 0, initdb.stdout + initdb.stderr
    port = _free_port()
    # postgres -D DB-DIR -h DB-HOST -p 5432 -k SOCKET-DIR
    services.start(
        "postgres",
        [
            *(str(pg_bin / "postgres"), "-D", str(data)),
            *("-h", "127.0.0.1", "-p", str(port), "-k", str(folder)),
        ],
        **as_user,
    )
    services.wait_for("postgres", "database system is ready to accept connections", 120)
    # PGPASSWORD=PASSWORD createdb -h DB-HOST -p 5432 -U mlflow mlflow
    createdb = subprocess.run(
        [str(pg_bin / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", DB_USER, DB_NAME],
        env={**os.environ, "PGPASSWORD": password},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert createdb.returncode == 0, createdb.stdout + createdb.stderr
    return f"postgresql://{DB_USER}:{password}@127.0.0.1:{port}/{DB_NAME}"


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    """Start PostgreSQL, the MLflow server, the Dask scheduler and two workers; stop them after."""
    workspace = tmp_path_factory.mktemp("team")
    write_dataset(workspace / "data" / "train", {"forest": 6, "sea": 6}, seed=1, size=32)
    write_dataset(workspace / "data" / "test", {"forest": 3, "sea": 3}, seed=2, size=32)
    (workspace / "grid.yaml").write_text(GRID)
    (workspace / "kill-grid.yaml").write_text(KILL_GRID)
    # PostgreSQL's account must reach its folder: pytest's base folder is private to us
    pg_folder = Path(tempfile.mkdtemp(prefix="team-postgres-"))
    services = Services(workspace)
    env = {
        **os.environ,
        "IMGCLS_CACHE_DIR": str(workspace / "cache"),
        "IMGCLS_REPORTS_DIR": str(workspace / "reports"),
        "IMGCLS_ARTIFACT_ROOT": str(workspace / "artifacts"),
        "DASK_TEMPORARY_DIRECTORY": str(workspace / "dask"),
    }
    start = time.perf_counter()
    try:
        database_uri = _start_postgres(services, pg_folder)
        artifacts = workspace / "server-artifacts"
        port = _free_port()
        tracking_uri = f"http://127.0.0.1:{port}"
        # mlflow server --host TRACKING-HOST --port 5000 \
        #     --backend-store-uri postgresql+psycopg2://mlflow:PASSWORD@DB-HOST:5432/mlflow \
        #     --artifacts-destination ARTIFACT-DIR
        services.start(
            "mlflow",
            [
                str(BIN / "mlflow"),
                "server",
                *("--host", "127.0.0.1", "--port", str(port)),
                # SQLAlchemy >= 2.1 reads postgresql:// as psycopg 3: name the driver installed
                *(
                    "--backend-store-uri",
                    database_uri.replace("postgresql:", "postgresql+psycopg2:"),
                ),
                *("--artifacts-destination", str(artifacts)),
            ],
            cwd=workspace,
            env=env,
        )
        # while the server migrates the new database and starts its workers: the Dask cluster
        scheduler_port = _free_port()
        scheduler = f"tcp://127.0.0.1:{scheduler_port}"
        # dask scheduler --host SCHEDULER --port 8786 --dashboard-address SCHEDULER:8787
        services.start(
            "scheduler",
            [
                str(BIN / "dask"),
                "scheduler",
                *("--host", "127.0.0.1", "--port", str(scheduler_port)),
                *("--dashboard-address", f"127.0.0.1:{_free_port()}"),
            ],
            cwd=paths.REPO_ROOT,
            env=env,
        )
        services.wait_for("scheduler", r"Scheduler at:\s+" + re.escape(scheduler))
        # dask worker tcp://SCHEDULER:8786 --host WORKER-HOST --dashboard-address WORKER-HOST:0 \
        #     --nworkers 1 --nthreads 1
        for worker in ("worker-1", "worker-2"):
            services.start(
                worker,
                [
                    str(BIN / "dask"),
                    "worker",
                    scheduler,
                    *("--host", "127.0.0.1", "--dashboard-address", "127.0.0.1:0"),
                    *("--nworkers", "1", "--nthreads", "1"),
                ],
                cwd=paths.REPO_ROOT,
                env=env,
            )
        deadline = time.monotonic() + 240
        while not _healthy(tracking_uri):
            if services.processes["mlflow"].poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not come up:\n{services.log('mlflow')[-3000:]}")
            time.sleep(1)
        for worker in ("worker-1", "worker-2"):
            services.wait_for(worker, r"Registered to:\s+" + re.escape(scheduler))
        print(f"\n[wall time] team setup started in {time.perf_counter() - start:.1f}s")
        yield Team(services, workspace, tracking_uri, scheduler, database_uri, artifacts, env)
    finally:
        services.stop_all()
        shutil.rmtree(pg_folder, ignore_errors=True)
    left = {n: p.pid for n, p in services.processes.items() if p.poll() is None or _tree(p)}
    assert left == {}, f"still running after teardown: {left}"


# --------------------------------------------------------------------------- checks


def _experiment_id(client: MlflowClient, name: str) -> str:
    return client.get_experiment_by_name(name).experiment_id


def check_registry(client: MlflowClient, experiment: str, run_ids: set[str]) -> None:
    """Exactly one registered version, with alias ``champion``, of one of ``run_ids``."""
    name = names.registered_model_name(experiment)
    versions = client.search_model_versions(f"name = '{name}'")
    assert [v.version for v in versions] == ["1"], [(v.version, v.run_id) for v in versions]
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.version == "1"
    assert champion.run_id in run_ids
    assert client.get_run(champion.run_id).data.tags.get("champion") == "true"


def check_in_postgres(team: Team, experiment_id: str, runs: int) -> None:
    """The runs are rows of PostgreSQL's ``runs`` table (the server's store, not a file)."""
    import psycopg2

    with contextlib.closing(psycopg2.connect(team.database_uri)) as connection:
        cursor = connection.cursor()
        cursor.execute("SELECT count(*) FROM runs WHERE experiment_id = %s", (int(experiment_id),))
        assert cursor.fetchone()[0] == runs


def check_finished_point(client: MlflowClient, experiment_id: str, run, epochs: int) -> None:
    """One complete grid point: its folds, metrics once each, notebooks, checkpoints, model."""
    run_id = run.info.run_id
    assert run.info.status == "FINISHED" and run.data.tags["pipeline_complete"] == "true"
    children = client.search_runs(
        [experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}'", max_results=100
    )
    assert sorted(c.data.tags["fold"] for c in children) == [str(k) for k in range(FOLDS)]
    assert {c.info.status for c in children} == {"FINISHED"}
    for child in children:
        history = client.get_metric_history(child.info.run_id, "val_accuracy")
        assert sorted(m.step for m in history) == list(range(1, epochs + 1))
    for key in run.data.metrics:
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert steps == (list(range(FOLDS)) if key.startswith("fold_") else [0]), (key, steps)
    assert {a.path for a in client.list_artifacts(run_id, "notebooks")} == NOTEBOOKS
    assert {a.path for a in client.list_artifacts(run_id, "checkpoints")} == CHECKPOINTS
    models = client.search_logged_models([experiment_id], f"source_run_id = '{run_id}'")
    assert len(models) == 1 and str(models[0].status).endswith("READY")
    assert "model_uri" not in run.data.tags  # the LoggedModel is the link, not a tag
    assert models[0].name == tracking.MODEL_NAME  # what tracking.logged_model looks up


# --------------------------------------------------------------------------- tests


@pytest.mark.slow
def test_grid_through_the_team_setup_arrives_exactly_once(team):
    listening = team.services.listening()
    assert {service for service, _, _ in listening} == set(team.services.processes)
    assert {ip for _, ip, _ in listening} == {"127.0.0.1"}, listening
    # python run_experiments.py --grid strategies.yaml --executor dask \
    #     --scheduler tcp://SCHEDULER:8786 --tracking-uri http://TRACKING-HOST:5000
    out, _ = run_grid(
        team.workspace,
        "team",
        *("--executor", "dask", "--scheduler", team.scheduler),
        *("--tracking-uri", team.tracking_uri),
    )
    assert f"dask: {team.scheduler} with 2 worker(s)" in out
    check_store(team.tracking_uri, "team")
    client = MlflowClient(team.tracking_uri)
    experiment_id = _experiment_id(client, "team")
    runs = client.search_runs([experiment_id], max_results=1000)
    check_in_postgres(team, experiment_id, len(runs))
    parents = {r.info.run_id for r in runs if r.data.tags["run_kind"] == "grid_point"}
    check_registry(client, "team", parents)
    # the server stored every artifact once, on its own disk (proxied uploads)
    for run_id in parents:
        stored = team.artifacts / experiment_id / run_id / "artifacts"
        assert {str(p.relative_to(stored)) for p in stored.rglob("*.pt")} == CHECKPOINTS
    # the grid points ran on both workers (their runs carry the worker process as owner)
    owners = {r.data.tags["runner"] for r in runs if r.data.tags["run_kind"] == "grid_point"}
    assert len(owners) == 2, owners


@pytest.mark.slow
def test_killed_worker_mid_grid_loses_and_duplicates_nothing(team):
    env = {**team.env, "IMGCLS_REPORTS_DIR": str(team.workspace / "team-kill" / "reports")}
    runner = Runner(
        [
            *("--grid", str(team.workspace / "kill-grid.yaml")),
            *("--data-dir", str(team.workspace / "data"), "--experiment", "team-kill"),
            *("--executor", "dask", "--scheduler", team.scheduler),
            *("--tracking-uri", team.tracking_uri),
        ],
        env,
        team.workspace / "team-kill.log",
    )
    client = MlflowClient(team.tracking_uri)
    start = time.perf_counter()
    try:
        # catch a grid point in the act: RUNNING, its training session open (02 logs the class
        # names when it starts training), its refit checkpoint not logged yet
        deadline = time.monotonic() + 400
        training: list = []
        while not training:
            if runner.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"no grid point caught training:\n{runner.text()[-4000:]}")
            time.sleep(0.25)
            experiment = client.get_experiment_by_name("team-kill")
            if experiment is not None:
                experiment_id = experiment.experiment_id
                training = client.search_runs(
                    [experiment_id],
                    "tags.run_kind = 'grid_point' and attributes.status = 'RUNNING' "
                    "and tags.classes != ''",
                )
        killed_parent = training[0]
        assert "checkpoints/refit.pt" not in {
            a.path for a in client.list_artifacts(killed_parent.info.run_id, "checkpoints")
        }
        owner_pid = int(killed_parent.data.tags["runner"].rpartition(":")[2])
        victim = next(
            (
                name
                for name in ("worker-1", "worker-2")
                if owner_pid in {p.pid for p in _tree(team.services.processes[name])}
            ),
            None,
        )
        assert victim, f"grid point {killed_parent.info.run_id} runs in no worker of ours"
        # the whole worker dies at once, like its machine: nanny, worker process, kernel
        doomed = _tree(team.services.processes[victim])
        assert len(doomed) >= 3, doomed  # nanny, worker, kernel
        for process in doomed:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        folds_at_kill = client.search_runs(
            [experiment_id], f"tags.`mlflow.parentRunId` = '{killed_parent.info.run_id}'"
        )
        _, alive = psutil.wait_procs(doomed, timeout=30)
        assert alive == []
        team.services.processes[victim].wait(30)
        print(
            f"\n[kill] {victim} (pid {owner_pid}) at {time.perf_counter() - start:.1f}s, "
            f"{len(folds_at_kill)} fold run(s) logged"
        )
        listening = team.services.listening()  # now with the other worker's kernel too
        assert {ip for _, ip, _ in listening} == {"127.0.0.1"}, listening
        rc = runner.wait(600)
    finally:
        if runner.process.poll() is None:
            runner.signal(signal.SIGKILL)
    seconds = time.perf_counter() - start
    print(f"[wall time] killed-worker grid: {seconds:.1f}s")
    log = runner.text()
    assert rc == 0, log[-5000:]
    assert re.search(r"marked [1-9]\d* run\(s\) of lost Dask workers as KILLED", log), log[-3000:]
    for point in KILL_POINTS:
        assert re.search(rf"{re.escape(point)}\s+FINISHED", log), log[-3000:]

    runs = client.search_runs([experiment_id], max_results=1000)
    assert [r.info.run_id for r in runs if r.info.status == "RUNNING"] == []
    parents = [r for r in runs if r.data.tags.get("run_kind") == "grid_point"]
    finished = [r for r in parents if r.info.status == "FINISHED"]
    by_key: dict[str, list[str]] = {}
    for run in finished:
        by_key.setdefault(run.data.tags["run_key"], []).append(run.data.tags["grid_point"])
    assert sorted(by_key.values()) == [[p] for p in KILL_POINTS], by_key
    for run in finished:
        check_finished_point(client, experiment_id, run, KILL_EPOCHS)
    # the dead worker's grid point and its folds are KILLED, not RUNNING, not counted
    dead = client.get_run(killed_parent.info.run_id)
    assert dead.info.status == "KILLED", dead.info.status
    assert "is gone" in dead.data.tags.get("killed_reason", ""), dead.data.tags
    assert [r.info.run_id for r in parents if r.info.status != "FINISHED"] == [dead.info.run_id]
    orphans = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == dead.info.run_id]
    statuses = sorted((r.data.tags["fold"], r.info.status) for r in orphans)
    print(f"[kill] fold runs of the dead grid point: {statuses}")
    assert {status for _, status in statuses} <= {"KILLED", "FINISHED"}, statuses
    check_registry(client, "team-kill", {r.info.run_id for r in finished})
    check_in_postgres(team, experiment_id, len(runs))
