"""Executing the pipeline notebooks with papermill and rendering them to HTML.

Which kernel runs them (one warm kernel per process, or a fresh one per notebook) is decided by
:mod:`imgcls.pipeline.engine`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from imgcls.core import paths
from imgcls.pipeline import engine

NOTEBOOK_NAMES = ("01_data", "02_train_cv", "03_evaluate", "04_compare_runs")


class NotebookParameterError(ValueError):
    """A parameter was passed that the notebook's ``parameters`` cell does not define."""


def notebook_path(name: str) -> Path:
    """Return the source path of a pipeline notebook by short name (e.g. ``02_train_cv``)."""
    path = paths.notebooks_dir() / f"{name}.ipynb"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: notebook not found")
    return path


def plain(value: Any) -> Any:
    """Convert a value to the plain types papermill can inject (str, int, float, bool, None, list, dict)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    raise TypeError(f"cannot inject a {type(value).__name__} into a notebook: {value!r}")


def check_parameters(name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    """Refuse names the notebook does not declare; return the parameters as plain types."""
    import papermill

    declared = papermill.inspect_notebook(str(notebook_path(name)))
    unknown = sorted(set(parameters) - set(declared))
    if unknown:
        raise NotebookParameterError(
            f"notebooks/{name}.ipynb has no parameter(s) {unknown}; it declares: "
            f"{', '.join(sorted(declared))}"
        )
    return {k: plain(v) for k, v in parameters.items()}


def execute(name: str, output: Path, parameters: dict[str, Any]) -> float:
    """Run a notebook with papermill into ``output`` (kept even when a cell fails); return seconds.

    The notebook runs in this process's warm kernel (:mod:`imgcls.pipeline.engine`) unless
    ``$IMGCLS_WARM_KERNEL`` is 0. Raises papermill's ``PapermillExecutionError`` (its
    ``cell_index``, ``ename`` and ``evalue`` name the failing cell; the output notebook marks it)
    and :class:`NotebookParameterError` for a parameter the notebook does not declare.
    """
    import papermill

    parameters = check_parameters(name, parameters)
    output.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    papermill.execute_notebook(
        str(notebook_path(name)),
        str(output),
        parameters=parameters,
        engine_name=engine.engine_name(),
        kernel_name=engine.KERNEL_NAME,
        progress_bar=False,
        cwd=str(paths.notebooks_dir()),
        log_output=False,
    )
    return time.perf_counter() - start


def render_html(notebook: Path, html_path: Path, title: str | None = None) -> Path:
    """Render an executed notebook to HTML without code cells; return the HTML path."""
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(str(notebook), as_version=4)
    if title:
        nb.metadata["title"] = title
    exporter = HTMLExporter(
        exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True
    )
    body, _ = exporter.from_notebook_node(nb)
    html_path.parent.mkdir(parents=True, exist_ok=True)
    html_path.write_text(body, encoding="utf-8")
    return html_path


def failed_cell(notebook: Path) -> str | None:
    """Return a short description of the first failing cell of an executed notebook, if any."""
    if not notebook.is_file():
        return None
    data = json.loads(notebook.read_text())
    for index, cell in enumerate(data.get("cells", [])):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                return f"cell {index}: {output.get('ename')}: {output.get('evalue')}"[:500]
    return None
