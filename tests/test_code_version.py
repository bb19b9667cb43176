"""The run key's code version follows the package's layers, 02/03's code cells and the pins."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import imgcls
from imgcls import tracking
from imgcls.core import paths


@pytest.fixture()
def checkout(tmp_path: Path) -> Path:
    """A copy of the files the code version can read: lib/imgcls, notebooks, requirements."""
    root = tmp_path / "repo"
    shutil.copytree(
        paths.REPO_ROOT / "lib" / "imgcls",
        root / "lib" / "imgcls",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    shutil.copytree(paths.notebooks_dir(), root / "notebooks")
    for name in ("requirements.txt", "requirements-dev.txt"):
        shutil.copy2(paths.REPO_ROOT / name, root / name)
    return root


def _append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


def test_the_copy_has_the_checkouts_code_version(checkout):
    assert tracking.code_version(checkout) == tracking.code_version()


@pytest.mark.parametrize(
    "edited",
    [
        "lib/imgcls/reporting/plots.py",
        "lib/imgcls/pipeline/runner.py",
        "lib/imgcls/serving/predict.py",
        "lib/imgcls/tracking/lineage.py",
        "lib/imgcls/selection/comparison.py",
        "requirements-dev.txt",
        "notebooks/04_compare_runs.ipynb",
    ],
)
def test_editing_code_that_cannot_change_results_reuses_runs(checkout, edited):
    before = tracking.code_version(checkout)
    _append(checkout / edited, "\n# a comment\n" if edited.endswith(".py") else "\n")
    assert tracking.code_version(checkout) == before, f"editing {edited} would re-run every point"


@pytest.mark.parametrize(
    "edited",
    [
        "lib/imgcls/modeling/training.py",
        "lib/imgcls/data/images.py",
        "lib/imgcls/core/config.py",
        "lib/imgcls/evaluation/metrics.py",
    ],
)
def test_editing_a_result_module_changes_the_code_version(checkout, edited):
    before = tracking.code_version(checkout)
    _append(checkout / edited, "\nSTEP_SIZE_FACTOR = 2\n")
    assert tracking.code_version(checkout) != before


def test_a_new_module_in_a_result_layer_changes_the_code_version(checkout):
    before = tracking.code_version(checkout)
    (checkout / "lib" / "imgcls" / "modeling" / "schedules.py").write_text("WARMUP = 3\n")
    assert tracking.code_version(checkout) != before


def test_changing_a_pin_changes_the_code_version_but_a_comment_does_not(checkout):
    requirements = checkout / "requirements.txt"
    before = tracking.code_version(checkout)
    _append(requirements, "# a note about the pins\n")
    assert tracking.code_version(checkout) == before
    requirements.write_text(requirements.read_text().replace("timm==", "timm==0.0.0+"))
    assert tracking.code_version(checkout) != before


def _edit_notebook(path: Path, cell_type: str, text: str) -> None:
    nb = json.loads(path.read_text())
    cell = next(c for c in nb["cells"] if c["cell_type"] == cell_type)
    cell["source"] = [*cell["source"], text]
    path.write_text(json.dumps(nb))


def test_02s_code_changes_the_code_version_its_markdown_does_not(checkout):
    notebook = checkout / "notebooks" / "02_train_cv.ipynb"
    before = tracking.code_version(checkout)
    _edit_notebook(notebook, "markdown", "\nA clearer sentence.")
    assert tracking.code_version(checkout) == before
    _edit_notebook(notebook, "code", "\nprint('extra')")
    assert tracking.code_version(checkout) != before


def test_result_layers_are_layers():
    assert set(imgcls.RESULT_LAYERS) <= set(imgcls.LAYERS)
    assert "reporting" not in imgcls.RESULT_LAYERS and "pipeline" not in imgcls.RESULT_LAYERS
