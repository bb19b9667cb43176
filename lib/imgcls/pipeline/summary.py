"""The end of a grid run: the summary lines per grid point, and the champion's quality gate."""

from __future__ import annotations

import time
from pathlib import Path

from imgcls import tracking
from imgcls.pipeline.gridpoint import log
from imgcls.pipeline.plan import Plan, RunnerOptions


def _scores(run_id: str | None) -> str:
    """Return ``CV 0.9900 ± 0.0040 [folds ...] test 0.9714`` for a finished grid-point run."""
    if not run_id:
        return ""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    metrics = client.get_run(run_id).data.metrics
    folds = sorted(client.get_metric_history(run_id, "fold_val_accuracy"), key=lambda m: m.step)
    fold_text = " ".join(f"{m.value:.3f}" for m in folds)
    return (
        f"CV {metrics.get('cv_accuracy_mean', float('nan')):.4f} ± "
        f"{metrics.get('cv_accuracy_std', float('nan')):.4f} [folds {fold_text}]  "
        f"test {metrics.get('test_accuracy', float('nan')):.4f}"
    )


def summarise(
    plan: Plan, options: RunnerOptions, data_result: dict, compare: dict, index: Path, start: float
) -> int:
    """Log one line per grid point (status, seconds, CV and test scores, run id) and where the
    reports and the MLflow store are; return the exit code.

    The exit code is 0 when everything finished, 1 when a grid point or notebook 01/04 failed,
    and with ``--gate`` at least 3 when the champion failed its quality gate
    (:func:`check_gate`). ``start`` is the ``time.perf_counter()`` value at the start of the run
    (the total is logged in seconds). Reads the runs from the active MLflow tracking store.
    """
    failed = [p for p in plan.points if p.result.get("status") == "FAILED"]
    log("summary (CV = mean ± std of validation accuracy over folds, then each fold):")
    for point in plan.points:
        if point.action == "skip":
            log(
                f"  {point.strategy.run_name:<32} skipped (finished earlier)  "
                f"{_scores(point.existing_run_id)}  run {point.existing_run_id}"
            )
        else:
            r = point.result
            detail = f" error: {r.get('error')}" if r.get("status") != "FINISHED" else ""
            scores = _scores(r.get("run_id")) if r.get("status") == "FINISHED" else ""
            log(
                f"  {point.strategy.run_name:<32} {r.get('status')} in {r.get('seconds', 0):.1f}s  "
                f"{scores}  run {r.get('run_id')}{detail}"
            )
    for label, result in (("01_data", data_result), ("04_compare_runs", compare)):
        if result["status"] != "FINISHED":
            failed.append(label)
            log(f"  {label} FAILED: {result['error']}")
    log(f"reports: {index}")
    ui = tracking.ui_url(plan.experiment_id, plan.tracking_uri)
    how = "" if ui.startswith(plan.tracking_uri) else " after `make ui`"
    log(
        f"MLflow: {plan.tracking_uri} (experiment {options.experiment!r}, grid id {plan.grid_id}); "
        f"runs at {ui}{how}"
    )
    exit_code = 1 if failed else 0
    if options.gate:
        exit_code = max(exit_code, check_gate(plan, options))
    log(f"done in {time.perf_counter() - start:.1f}s, exit code {exit_code}", None)
    return exit_code


def check_gate(plan: Plan, options: RunnerOptions) -> int:
    """Log the champion's quality-gate result (tags ``quality_gate`` and
    ``quality_gate_message`` set by notebook 03); return 0 when it passed, else 3.

    Raises tracking.TrackingError (from ``GridComparison.load``) when the experiment or the
    grid's finished runs are not in the store.
    """
    from imgcls.selection.comparison import GridComparison

    comparison = GridComparison.load(
        options.experiment, plan.grid_id, plan.tracking_uri, plan.member_keys
    )
    champion = comparison.champion()
    row = comparison.runs.loc[champion]
    message = row.get("tags.quality_gate_message") or "no quality gate result"
    passed = row.get("tags.quality_gate") == "passed"
    log(f"quality gate for champion {champion}: {message}")
    return 0 if passed else 3
