"""The code version in every run key: a hash of the code that decides a grid point's numbers."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import imgcls
from imgcls.core import paths

RESULT_NOTEBOOKS = ("02_train_cv.ipynb", "03_evaluate.ipynb")


def result_code_files(root: Path | None = None) -> list[Path]:
    """Return the files whose content decides a grid point's results, in a stable order.

    These are every ``.py`` file of the layers in :data:`imgcls.RESULT_LAYERS` (the source tree
    itself decides, not a hand-kept list), the notebooks in :data:`RESULT_NOTEBOOKS`, and
    ``requirements.txt`` (the pinned library versions). ``root`` is a repository checkout
    (default: this one).
    """
    root = root or paths.REPO_ROOT
    package = root / "lib" / "imgcls"
    files = [
        path
        for layer in imgcls.RESULT_LAYERS
        for path in sorted((package / layer).rglob("*.py"))
        if "__pycache__" not in path.parts
    ]
    files += [root / "notebooks" / name for name in RESULT_NOTEBOOKS]
    return [*files, root / "requirements.txt"]


def _result_content(path: Path) -> bytes:
    """The part of a file that can change results: a notebook's code cells, pins without comments."""
    if path.suffix == ".ipynb":
        cells = json.loads(path.read_text())["cells"]
        code = ["".join(cell["source"]) for cell in cells if cell["cell_type"] == "code"]
        return "\n# cell\n".join(code).encode()
    if path.name == "requirements.txt":
        lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
        return "\n".join(sorted(line.lower() for line in lines if line)).encode()
    return path.read_bytes()


def code_version(root: Path | None = None) -> str:
    """Return a 12-hex-digit SHA-256 of the code that produces results (:func:`result_code_files`).

    Editing a plot, the runner, a report or a notebook's markdown or outputs leaves it unchanged,
    so finished grid points are reused; editing a training module, 02/03's code or a pin changes
    it, so they re-run. ``root`` is a repository checkout (default: this one).
    """
    root = root or paths.REPO_ROOT
    package = root / "lib" / "imgcls"
    digest = hashlib.sha256()
    for path in result_code_files(root):
        name = path.relative_to(package) if path.is_relative_to(package) else Path(path.name)
        digest.update(name.as_posix().encode() + b"\0")
        digest.update(_result_content(path) + b"\0")
    return digest.hexdigest()[:12]
