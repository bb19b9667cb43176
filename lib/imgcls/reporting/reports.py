"""The report index: ``reports/index.html`` links every executed notebook with status and key metric.

The page is the Jinja2 template ``templates/index.html``; this module only gathers what it shows.
Autoescaping is on (``select_autoescape`` turns it on for ``.html``), so every text that comes from
file names, YAML or MLflow is HTML-escaped by Jinja2, and ``StrictUndefined`` makes a name the
template uses but the code does not pass an error rather than an empty cell.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from mlflow.tracking import MlflowClient

NOTEBOOK_REPORTS = ("02_train_cv", "03_evaluate")  # the pages of one grid point, in its folder


def _metric(value: Any, digits: int = 4) -> str:
    """Jinja2 filter ``metric``: a float with ``digits`` decimals, else the text or ``–``."""
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value or "–")


@functools.cache
def environment() -> Environment:
    """Return the Jinja2 environment for the pages in ``imgcls/reporting/templates``.

    Autoescaping for ``.html`` templates, ``StrictUndefined`` (a missing name raises
    ``jinja2.UndefinedError``) and the ``metric`` filter. Made once per process.
    """
    env = Environment(
        loader=PackageLoader("imgcls.reporting", "templates"),
        autoescape=select_autoescape(),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["metric"] = _metric
    return env


def _link(target: Path, base: Path, label: str) -> dict[str, str | None]:
    """A link to ``target`` relative to ``base``; ``href`` None when the file does not exist."""
    href = os.path.relpath(target, base) if target.is_file() else None
    return {"label": label, "href": href}


def _run_metrics(run_id: str | None) -> dict[str, Any]:
    if not run_id:
        return {}
    run = MlflowClient().get_run(run_id)
    return {
        **run.data.metrics,
        **{f"tag:{k}": v for k, v in run.data.tags.items()},
        "status": run.info.status,
    }


def _row(point: Any, reports: Path) -> dict[str, Any]:
    """The table row of one grid point (its MLflow run read from the active tracking store)."""
    run_id = point.result.get("run_id") or point.existing_run_id
    info = _run_metrics(run_id)
    status = point.result.get("status") or (info.get("status") if point.action == "skip" else "?")
    note = "resumed: finished earlier" if point.action == "skip" else point.result.get("error")
    folder = reports / point.strategy.run_name
    return {
        "name": point.strategy.run_name,
        "champion": info.get("tag:champion") == "true",
        "status": str(status),
        "cv_mean": info.get("cv_accuracy_mean"),
        "cv_std": info.get("cv_accuracy_std"),
        "test": info.get("test_accuracy"),
        "gate": str(info.get("tag:quality_gate", "–")),
        "links": [_link(folder / f"{n}.html", reports, n) for n in NOTEBOOK_REPORTS]
        + (  # written by imgcls.reporting.modelcard for a registered version of this run
            [_link(reports / info["tag:model_card"], reports, "model card")]
            if info.get("tag:model_card")
            else []
        ),
        "run_id": str(run_id),
        "note": str(note or ""),
    }


def _single(result: dict, target: Path, reports: Path, label: str) -> dict[str, Any]:
    """The list item of a once-per-grid notebook (01 or 04)."""
    return {
        "link": _link(target, reports, label),
        "status": result.get("status", "?"),
        "run_id": str(result.get("run_id")),
        "error": result.get("error") or "",
    }


def write_index(plan: Any, data_result: dict, compare: dict, reports: Path) -> Path:
    """Write ``reports/index.html`` for a finished plan and return its path.

    ``plan`` is an ``imgcls.pipeline.plan.Plan`` (typed ``Any``: reporting comes before pipeline
    in the layer order); ``data_result`` and ``compare`` are the outcomes of notebooks 01 and 04
    (``status``, ``run_id``, ``error``). Links are relative to ``reports``; a page that was not
    written is shown as ``(missing)``, not linked. Grid-point metrics are read from the active
    MLflow tracking store (``MlflowException`` if a run id is not in it). Every text from file
    names, YAML or MLflow is HTML-escaped (Jinja2 autoescape). Raises OSError when ``reports``
    cannot be written.
    """
    reports.mkdir(parents=True, exist_ok=True)
    page = (
        environment()
        .get_template("index.html")
        .render(
            grid_id=plan.grid_id,
            grid_path=str(plan.grid.path),
            data_md5=plan.data_md5,
            code_version=plan.code_version,
            tracking_uri=plan.tracking_uri,
            generated=time.strftime("%Y-%m-%d %H:%M:%S"),
            singles=[
                _single(
                    data_result,
                    reports / "data" / "01_data.html",
                    reports,
                    "01 · Data checks and folds",
                ),
                _single(
                    compare,
                    reports / "comparison" / "04_compare_runs.html",
                    reports,
                    "04 · Comparison of all strategies and the champion",
                ),
            ],
            rows=[_row(point, reports) for point in plan.points],
            # the one-file report (imgcls.reporting.summary_page), linked once it is written
            summary=_link(reports / "summary.html", reports, "summary.html"),
        )
    )
    index = reports / "index.html"
    index.write_text(page, encoding="utf-8")
    return index
