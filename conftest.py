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

# Each pipeline notebook passes nbval on its own (`pytest --nbval notebooks/03_evaluate.ipynb`):
# a notebook whose inputs come from an earlier one (03 evaluates 02's model, 04 compares what 02
# and 03 logged) gets those run first with papermill, unless they already ran in this session.
_PREREQUISITES = {
    "03_evaluate": ("02_train_cv",),
    "04_compare_runs": ("02_train_cv", "03_evaluate"),
}
_NOTEBOOKS_RAN: set[str] = set()


def pytest_runtest_setup(item):
    """Before a notebook's first cell, run the notebooks it reads from (if not run yet)."""
    path = Path(str(item.fspath))
    if path.suffix != ".ipynb" or path.parent.name != "notebooks" or path.stem in _NOTEBOOKS_RAN:
        return
    from imgcls.pipeline import notebooks

    for name in _PREREQUISITES.get(path.stem, ()):
        if name not in _NOTEBOOKS_RAN:
            output = _SANDBOX / "prerequisites" / f"{name}.ipynb"
            print(f"\n{path.name} reads from {name}: running it first into {output}")
            notebooks.execute(name, output, {})
            _NOTEBOOKS_RAN.add(name)
    _NOTEBOOKS_RAN.add(path.stem)
