"""Lineage: git and source tags, one writer of a grid point's identity, datasets, logged models."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow.data.sources import LocalArtifactDatasetSource
from mlflow.entities import Dataset, DatasetInput, InputTag, LoggedModel
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import (
    MLFLOW_DATASET_CONTEXT,
    MLFLOW_GIT_COMMIT,
    MLFLOW_SOURCE_NAME,
    MLFLOW_SOURCE_TYPE,
)

from imgcls.core import paths
from imgcls.core.config import Strategy, run_key
from imgcls.tracking.codeversion import code_version
from imgcls.tracking.store import (
    MODEL_NAME,
    SOURCE_NOTEBOOK,
    TAG_GRID_ID,
    TAG_GRID_POINT,
    TAG_KIND,
    TAG_RUN_KEY,
    TAG_STRATEGY,
    TrackingError,
    log_batch,
)


def git_info() -> dict[str, str]:
    """Return the repository's commit and dirty flag as run tags ("unknown" outside git).

    Keys: ``git_commit``, ``git_dirty`` (ours) and MLflow's own ``mlflow.source.git.commit``
    (:data:`mlflow.utils.mlflow_tags.MLFLOW_GIT_COMMIT`), which the run page shows as "Source".
    """

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=paths.REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (subprocess.CalledProcessError, FileNotFoundError):
        commit, dirty_flag = "unknown", "unknown"
    else:
        dirty_flag = str(dirty).lower()
    return {"git_commit": commit, "git_dirty": dirty_flag, MLFLOW_GIT_COMMIT: commit}


# Notebooks whose code computes a grid point's numbers (01 audits the data, 04 compares runs).


def lineage_tags(
    strategy: Strategy, data_md5: str, grid_id: str = "by-hand", code: str | None = None
) -> dict[str, str]:
    """Return the tags every grid-point run carries: grid id, run key, strategy, git, data md5.

    ``code`` is the :func:`code_version` the run key is computed with (default: this checkout's).
    The run name is not a tag here: it is given to ``MlflowClient.create_run(run_name=...)``.
    (Here rather than in imgcls.pipeline.session so that the runner never imports torch: 0.5 GB
    of RSS.)
    """
    code = code or code_version()
    return {
        TAG_GRID_ID: grid_id,
        TAG_RUN_KEY: run_key(strategy, data_md5, code),
        TAG_STRATEGY: strategy.name,
        TAG_GRID_POINT: strategy.run_name,
        TAG_KIND: "grid_point",
        "code_version": code,
        "data_md5": data_md5,
        **git_info(),
    }


IDENTITY_TAGS = (
    TAG_GRID_ID,
    TAG_RUN_KEY,
    TAG_STRATEGY,
    TAG_GRID_POINT,
    TAG_KIND,
    "code_version",
    "data_md5",
    "git_commit",
    "git_dirty",
    MLFLOW_GIT_COMMIT,
)


def log_grid_point_identity(
    run_id: str,
    params: Mapping[str, Any],
    tags: Mapping[str, str],
    source: tuple[str, str] = SOURCE_NOTEBOOK,
) -> None:
    """Write a grid-point run's params and lineage tags: the one writer, once per run.

    ``params`` is ``Strategy.params()``, ``tags`` is :func:`lineage_tags` of the same strategy;
    ``source`` is ``(mlflow.source.name, mlflow.source.type)``: :data:`SOURCE_RUNNER` when the
    runner created the run, :data:`SOURCE_NOTEBOOK` when notebook 02 was opened by hand. Raises
    ValueError naming the missing keys when ``tags`` lacks one of :data:`IDENTITY_TAGS`.
    """
    missing = [key for key in IDENTITY_TAGS if key not in tags]
    if missing:
        raise ValueError(
            f"run {run_id}: lineage tags {missing} missing; build them with "
            "imgcls.tracking.lineage_tags(strategy, data_md5, grid_id)"
        )
    log_batch(run_id, params=dict(params), tags={**tags, **source_tags(source)})


def source_tags(source: tuple[str, str]) -> dict[str, str]:
    """Return MLflow's ``mlflow.source.name`` / ``mlflow.source.type`` tags for ``(name, type)``.

    ``type`` is an :class:`mlflow.entities.SourceType` name (NOTEBOOK, JOB, PROJECT, LOCAL).
    """
    name, kind = source
    return {MLFLOW_SOURCE_NAME: name, MLFLOW_SOURCE_TYPE: kind}


def split_dataset(name: str, folder: str | Path, digest: str) -> Dataset:
    """Return the MLflow dataset of one labelled folder (a split such as train or test).

    ``digest`` is its data version (:func:`imgcls.data.folders.data_version` of the folder: the
    DVC directory md5, 36 characters, the store's limit); the source is the folder's absolute
    path (source type ``local``). Only metadata is recorded, never the images.
    """
    source = LocalArtifactDatasetSource(str(Path(folder).resolve()))
    return Dataset(name=name, digest=digest, source_type="local", source=source.to_json())


def log_datasets(run_id: str, datasets: list[Dataset], context: str) -> None:
    """Record datasets as inputs of a run, with ``mlflow.data.context`` = ``context``.

    ``context`` is ``training`` for the data a model was fitted on, ``evaluation`` for data it
    was scored on. Logging the same (name, digest) to a run again adds nothing.
    """
    tag = [InputTag(MLFLOW_DATASET_CONTEXT, context)]
    inputs = [DatasetInput(dataset, tag) for dataset in datasets]
    MlflowClient().log_inputs(run_id, datasets=inputs)


def logged_model(run_id: str, name: str = MODEL_NAME) -> LoggedModel:
    """Return the LoggedModel ``name`` that run ``run_id`` logged (the newest, if several).

    Looked up with ``MlflowClient.search_logged_models`` (``source_run_id`` and ``name``), so
    no hand-written tag is needed. Raises TrackingError naming the run when it logged none.
    """
    client = MlflowClient()
    run = client.get_run(run_id)
    models = client.search_logged_models(
        [run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{name}'",
        order_by=[{"field_name": "creation_time", "ascending": False}],
        max_results=1,
    )
    if not models:
        raise TrackingError(
            f"run {run_id} has no logged model {name!r}; its training (notebook 02's refit) "
            "did not finish: re-run the grid point"
        )
    return models[0]
