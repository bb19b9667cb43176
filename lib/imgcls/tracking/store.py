"""The MLflow store: URI, experiment, batched logging, run lookup and clean-up of dead runs."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import (
    MLFLOW_PARENT_RUN_ID,
)

from imgcls.core import paths

DEFAULT_EXPERIMENT = "sea-vs-forest"
TAG_GRID_ID = "grid_id"
TAG_RUN_KEY = "run_key"
TAG_STRATEGY = "strategy"
TAG_GRID_POINT = "grid_point"
TAG_COMPLETE = "pipeline_complete"
TAG_RUNNER = "runner"  # host:pid of the process that owns a RUNNING run
TAG_KIND = "run_kind"  # grid_point | fold | data | comparison
# Runner-only tags: who owns a RUNNING run, and "the runner finished both notebooks".
RUNNER_TAGS = (TAG_RUNNER, TAG_COMPLETE)
MODEL_NAME = "model"  # the refit pyfunc model's name inside its grid-point run

# MLflow 3's UI opens an experiment on its runs (not the GenAI overview) when it carries this
# tag. Key and value are the UI's: mlflow/server/js (ExperimentKind.CUSTOM_MODEL_DEVELOPMENT =
# "custom_model_development", read from tag "mlflow.experimentKind"); MLflow's own demo data sets
# the tag the same way (mlflow/demo/generators/traces.py).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# Where a grid point's identity was written from: (mlflow.source.name, mlflow.source.type).
SOURCE_RUNNER = ("run_experiments.py", "LOCAL")
SOURCE_NOTEBOOK = ("notebooks/02_train_cv.ipynb", "NOTEBOOK")

logger = logging.getLogger(__name__)

# A tracking server that does not answer should fail a run in seconds, not after MLflow's
# default of 7 retries with 120 s timeouts. Applied by configure(), unless the user set them.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    # Progress bars of artifact downloads clutter notebook reports; the pipeline prints its own.
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


class TrackingError(RuntimeError):
    """The tracking server or store cannot be used; the message names the URI."""


def configure(tracking_uri: str | None = None) -> str:
    """Point MLflow at ``tracking_uri`` (default: ``$MLFLOW_TRACKING_URI`` or the repo's SQLite file)."""
    uri = tracking_uri or paths.default_tracking_uri()
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    mlflow.set_tracking_uri(uri)
    return uri


def ui_url(experiment_id: str, tracking_uri: str, local_ui: str = "http://127.0.0.1:5000") -> str:
    """Return the MLflow UI address of an experiment's runs table.

    For a server URI it is the server itself; for a local store it is ``local_ui`` (where
    ``make ui`` serves it). ``?workflowType=machine_learning`` opens MLflow 3.17's
    model-training view: its UI picks the GenAI or the model-training view from that URL
    parameter (or the browser's last choice), not from the experiment's
    ``mlflow.experimentKind`` tag (read in mlflow/server/js, checked in headless Chromium).
    """
    base = (
        tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else local_ui
    )
    return f"{base}/#/experiments/{experiment_id}?workflowType=machine_learning"


def is_local_store(uri: str) -> bool:
    """Return True for stores only this machine can reach (SQLite files, file paths)."""
    return uri.startswith(("sqlite:", "file:", "/")) or "://" not in uri


def check_reachable(uri: str, timeout: float = 10.0) -> None:
    """Fail fast (before any training) when an HTTP tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            if response.status != 200:
                raise TrackingError(f"{uri}: tracking server answered HTTP {response.status}")
    except (urllib.error.URLError, OSError) as exc:
        raise TrackingError(
            f"{uri}: tracking server unreachable ({exc}); start it (see README: MLflow server) "
            "or drop --tracking-uri to use the local SQLite store"
        ) from exc


def _store_error(exc: BaseException) -> bool:
    """Return True for errors that mean the store cannot be used (bad URI, unopenable file)."""
    if isinstance(exc, (mlflow.exceptions.MlflowException, OSError)):
        return True
    try:
        from sqlalchemy.exc import OperationalError
    except ImportError:  # pragma: no cover - MLflow depends on SQLAlchemy
        return False
    return isinstance(exc, OperationalError)


def get_experiment_id(name: str = DEFAULT_EXPERIMENT) -> str:
    """Return the id of experiment ``name``, creating it (local artifact folder for SQLite).

    The experiment carries :data:`EXPERIMENT_KIND_TAG` = :data:`EXPERIMENT_KIND` (added to an
    older experiment that lacks it), so ``mlflow ui`` shows it as a model-training experiment.
    Raises TrackingError, naming the tracking URI, when the store cannot be opened (unknown URI
    scheme, a SQLite file or folder that cannot be created, an MLflow server error) or when the
    experiment exists but is deleted.
    """
    uri = mlflow.get_tracking_uri()
    kind = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
    try:
        client = MlflowClient()
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            location = None
            if uri.startswith("sqlite:"):
                location = paths.default_artifact_root().as_uri()
            try:
                return client.create_experiment(name, artifact_location=location, tags=kind)
            except mlflow.exceptions.MlflowException:
                experiment = client.get_experiment_by_name(name)  # created by another worker?
                if experiment is None:
                    raise
        if experiment.lifecycle_stage != "deleted" and EXPERIMENT_KIND_TAG not in experiment.tags:
            client.set_experiment_tag(
                experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND
            )
    except Exception as exc:
        if not _store_error(exc):
            raise
        reason = " ".join(str(exc).split())[:300]
        raise TrackingError(f"{uri}: cannot use this MLflow store ({reason})") from exc
    if experiment.lifecycle_stage == "deleted":
        raise TrackingError(
            f"{uri}: experiment {name!r} is deleted; restore it (`mlflow experiments restore "
            f"--experiment-id {experiment.experiment_id}`) or pass another --experiment"
        )
    return experiment.experiment_id


def runner_identity() -> str:
    """Return ``host:pid`` of this process, stored on runs it owns."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _owner_alive(identity: str) -> bool:
    host, _, pid = identity.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True  # another machine's run: not ours to judge
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def mark_stale_runs(experiment_id: str, dead_owners: Collection[str] = ()) -> list[str]:
    """Mark runs whose owning runner process is gone as KILLED; return their ids.

    Covers runs left RUNNING by a SIGKILL and grid points that never completed; ``dead_owners``
    (``host:pid``) are treated as gone (an interrupted runner passes its own identity). Fold
    runs (no owner tag) still RUNNING under a parent that is no longer RUNNING are KILLED too.
    """
    client = MlflowClient()
    stale = []
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.{TAG_RUNNER} != ''", max_results=5000
    )
    for run in runs:
        owner = run.data.tags.get(TAG_RUNNER, "")
        complete = run.data.tags.get(TAG_COMPLETE) == "true"
        if (
            (
                run.info.status in ("RUNNING", "SCHEDULED")
                or (
                    not complete
                    and run.info.status == "FINISHED"
                    and run.data.tags.get(TAG_KIND) == "grid_point"
                )
            )
            and owner
            and (owner in dead_owners or not _owner_alive(owner))
        ):
            client.set_tag(run.info.run_id, "killed_reason", f"runner {owner} is gone")
            client.set_terminated(run.info.run_id, "KILLED")
            stale.append(run.info.run_id)
    orphans = client.search_runs(
        [experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=5000
    )
    for run in orphans:
        parent = run.data.tags.get(MLFLOW_PARENT_RUN_ID)
        orphaned = parent and TAG_RUNNER not in run.data.tags
        if orphaned and client.get_run(parent).info.status != "RUNNING":
            client.set_tag(run.info.run_id, "killed_reason", f"parent run {parent} ended")
            client.set_terminated(run.info.run_id, "KILLED")
            stale.append(run.info.run_id)
    return stale


def find_completed_run(experiment_id: str, key: str) -> str | None:
    """Return the id of a FINISHED, complete grid-point run with run key ``key``, if any."""
    runs = MlflowClient().search_runs(
        [experiment_id],
        filter_string=(
            f"tags.{TAG_RUN_KEY} = '{key}' and tags.{TAG_COMPLETE} = 'true' "
            "and attributes.status = 'FINISHED'"
        ),
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    return runs[0].info.run_id if runs else None


def latest_run(experiment_name: str, filter_string: str = "") -> str:
    """Return the newest FINISHED run of an experiment that matches a filter (by-hand notebooks)."""
    experiment = MlflowClient().get_experiment_by_name(experiment_name)
    if experiment is None:
        raise TrackingError(
            f"experiment {experiment_name!r} not found at {mlflow.get_tracking_uri()}"
        )
    query = "attributes.status = 'FINISHED'" + (f" and {filter_string}" if filter_string else "")
    runs = MlflowClient().search_runs(
        [experiment.experiment_id],
        filter_string=query,
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    if not runs:
        raise TrackingError(
            f"no finished run matching {filter_string!r} in experiment {experiment_name!r}; "
            "run notebooks/02_train_cv.ipynb (or run_experiments.py) first"
        )
    return runs[0].info.run_id


def log_batch(
    run_id: str,
    metrics: dict[str, float] | None = None,
    params: dict[str, Any] | None = None,
    tags: dict[str, Any] | None = None,
    step: int = 0,
) -> None:
    """Log metrics, params and tags of one run in as few requests as MLflow allows.

    ``MlflowClient.log_batch`` splits them into the store's limits itself (100 params/tags and
    1000 entities per request: ``mlflow.tracking._tracking_service.client.TrackingServiceClient
    .log_batch`` with ``mlflow.utils.validation.MAX_PARAMS_TAGS_PER_BATCH``). Metric timestamps
    are milliseconds since the epoch; raises MlflowException when the store refuses a value.
    """
    now = int(time.time() * 1000)
    MlflowClient().log_batch(
        run_id,
        metrics=[Metric(k, float(v), now, step) for k, v in (metrics or {}).items()],
        params=[Param(k, str(v)) for k, v in (params or {}).items()],
        tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()],
    )


def log_history(run_id: str, history: list[dict[str, float]]) -> None:
    """Log per-epoch metrics of one fold with ``step`` = epoch (MLflow batches the requests)."""
    now = int(time.time() * 1000)
    metrics = [
        Metric(name, float(value), now, int(record["epoch"]))
        for record in history
        for name, value in record.items()
        if name != "epoch"
    ]
    MlflowClient().log_batch(run_id, metrics=metrics)


@contextlib.contextmanager
def active_run(run_id: str, managed: bool) -> Iterator[mlflow.ActiveRun]:
    """Make an existing run the active one for a notebook.

    When ``managed`` (the runner owns the run) the status is left RUNNING for the runner to
    finish; otherwise the run ends FINISHED, or FAILED if the block raises.
    """
    run = mlflow.start_run(run_id=run_id)
    try:
        yield run
    except BaseException:
        mlflow.end_run("RUNNING" if managed else "FAILED")
        raise
    mlflow.end_run("RUNNING" if managed else "FINISHED")


def download_artifact(run_id: str, artifact_path: str, dst: Path | None = None) -> Path:
    """Download one artifact of a run and return its local path."""
    local = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path=artifact_path, dst_path=str(dst) if dst else None
    )
    return Path(local)
