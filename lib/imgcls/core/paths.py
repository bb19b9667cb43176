"""Project paths, resolved from the repository root, never from the working directory.

Papermill, nbval and JupyterLab start kernels in different folders; every path the project
writes or reads is derived from :data:`REPO_ROOT` so that data, caches, the MLflow store and
reports land in the same place whichever tool started the code. Environment variables can
move the writable locations (tests use them to stay out of the user's files).
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT: Path = Path(__file__).resolve().parents[3]  # lib/imgcls/core/paths.py


def _env_path(name: str, default: Path) -> Path:
    value = os.environ.get(name)
    return Path(value).expanduser().resolve() if value else default


def data_dir() -> Path:
    """Return the dataset folder (``data/`` or ``$IMGCLS_DATA_DIR``)."""
    return _env_path("IMGCLS_DATA_DIR", REPO_ROOT / "data")


def cache_dir() -> Path:
    """Return the cache folder for decoded images and features (``.cache/`` or ``$IMGCLS_CACHE_DIR``)."""
    return _env_path("IMGCLS_CACHE_DIR", REPO_ROOT / ".cache")


def reports_dir() -> Path:
    """Return the folder where HTML reports are written (``reports/`` or ``$IMGCLS_REPORTS_DIR``)."""
    return _env_path("IMGCLS_REPORTS_DIR", REPO_ROOT / "reports")


def notebooks_dir() -> Path:
    """Return the folder holding the four pipeline notebooks."""
    return REPO_ROOT / "notebooks"


def data_dvc_file() -> Path:
    """Return the DVC pointer file that records the expected data version."""
    return REPO_ROOT / "data.dvc"


def default_tracking_uri() -> str:
    """Return ``$MLFLOW_TRACKING_URI`` or the repository's SQLite store ``sqlite:///<root>/mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{REPO_ROOT / 'mlflow.db'}"


def default_artifact_root() -> Path:
    """Return the local artifact folder used with the default SQLite store."""
    return _env_path("IMGCLS_ARTIFACT_ROOT", REPO_ROOT / "mlartifacts")
