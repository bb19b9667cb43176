"""The report index: ``reports/index.html`` links every executed notebook with status and key metric."""

from __future__ import annotations

import html
import os
import time
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; width: 100%; margin: 1rem 0; }
th, td { border-bottom: 1px solid #ddd; padding: .4rem .6rem; text-align: left; }
th { background: #f4f4f4; } .FINISHED { color: #176f2c; } .FAILED, .KILLED { color: #b00020; }
.skip { color: #666; } code { background: #f4f4f4; padding: 0 .2rem; }
"""


def _link(target: Path, base: Path, label: str) -> str:
    if not target.is_file():
        return f'<span class="skip">{html.escape(label)} (missing)</span>'
    href = os.path.relpath(target, base)
    return f'<a href="{html.escape(href)}">{html.escape(label)}</a>'


def _run_metrics(run_id: str | None) -> dict[str, Any]:
    if not run_id:
        return {}
    run = MlflowClient().get_run(run_id)
    return {
        **run.data.metrics,
        **{f"tag:{k}": v for k, v in run.data.tags.items()},
        "status": run.info.status,
    }


def _fmt(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) else html.escape(str(value or "–"))


def write_index(plan: Any, data_result: dict, compare: dict, reports: Path) -> Path:
    """Write ``reports/index.html`` for a finished plan and return its path.

    Every text that comes from file names, YAML or MLflow is HTML-escaped.
    """
    reports.mkdir(parents=True, exist_ok=True)
    rows = []
    for point in plan.points:
        run_id = point.result.get("run_id") or point.existing_run_id
        info = _run_metrics(run_id)
        status = point.result.get("status") or (
            info.get("status") if point.action == "skip" else "?"
        )
        note = (
            "resumed: finished earlier"
            if point.action == "skip"
            else (point.result.get("error") or "")
        )
        folder = reports / point.strategy.run_name
        links = " · ".join(
            _link(folder / f"{n}.html", reports, n) for n in ("02_train_cv", "03_evaluate")
        )
        champion = " ★ champion" if info.get("tag:champion") == "true" else ""
        rows.append(
            f"<tr><td>{html.escape(point.strategy.run_name)}{champion}</td>"
            f'<td class="{html.escape(str(status))}">{html.escape(str(status))}</td>'
            f"<td>{_fmt(info.get('cv_accuracy_mean'))} ± {_fmt(info.get('cv_accuracy_std'))}</td>"
            f"<td>{_fmt(info.get('test_accuracy'))}</td>"
            f"<td>{html.escape(str(info.get('tag:quality_gate', '–')))}</td>"
            f"<td>{links}</td><td><code>{html.escape(str(run_id))}</code></td>"
            f"<td>{html.escape(str(note))}</td></tr>"
        )

    def single(result: dict, folder: str, name: str, label: str) -> str:
        status = html.escape(result.get("status", "?"))
        return (
            f"<li>{_link(reports / folder / f'{name}.html', reports, label)} "
            f'<span class="{status}">{status}</span> '
            f"<code>{html.escape(str(result.get('run_id')))}</code> "
            f"{html.escape(result.get('error') or '')}</li>"
        )

    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Experiment reports: grid {html.escape(plan.grid_id)}</title>
<style>{STYLE}</style></head><body>
<h1>Sea vs Forest: experiment reports</h1>
<p>Grid <code>{html.escape(str(plan.grid.path))}</code> (id <code>{html.escape(plan.grid_id)}</code>),
data version <code>{html.escape(plan.data_md5)}</code>, code version <code>{html.escape(plan.code_version)}</code>,
tracking <code>{html.escape(plan.tracking_uri)}</code>. Generated {time.strftime("%Y-%m-%d %H:%M:%S")}.</p>
<ul>
{single(data_result, "data", "01_data", "01 · Data checks and folds")}
{single(compare, "comparison", "04_compare_runs", "04 · Comparison of all strategies and the champion")}
</ul>
<h2>Grid points</h2>
<table><thead><tr><th>grid point</th><th>status</th><th>CV accuracy (mean ± std)</th>
<th>test accuracy</th><th>quality gate</th><th>reports</th><th>MLflow run</th><th>note</th></tr></thead>
<tbody>
{"".join(rows)}
</tbody></table>
</body></html>
"""
    index = reports / "index.html"
    index.write_text(page, encoding="utf-8")
    return index
