"""Test-session isolation, loaded for tests/ and for the notebooks run by nbval.

Set before any kernel starts, so papermill/nbval kernels inherit it: tests never write to the
user's mlflow.db, mlartifacts/ or reports/. The decoded-image and feature caches are shared
with normal runs on purpose (they are keyed by content, and make the suite fast).
"""

import os
import tempfile
from pathlib import Path

_SANDBOX = Path(tempfile.mkdtemp(prefix="seaforest-tests-"))
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_SANDBOX / 'mlflow.db'}"
os.environ["IMGCLS_ARTIFACT_ROOT"] = str(_SANDBOX / "mlartifacts")
os.environ["IMGCLS_REPORTS_DIR"] = str(_SANDBOX / "reports")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
