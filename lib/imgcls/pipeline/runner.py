"""The grid runner: validate everything, print the plan, execute notebooks per grid point, resume.

``01_data`` runs once, ``02_train_cv`` + ``03_evaluate`` once per grid point (each grid point
is an MLflow parent run), ``04_compare_runs`` once at the end. Finished grid points (same run
key = same params, data version and code version) are skipped unless forced.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import traceback
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from imgcls import tracking
from imgcls.core import names, paths
from imgcls.core.config import (
    ConfigError,
    Grid,
    Strategy,
    check_against_data,
    load_grid,
    run_key,
    stable_hash,
)
from imgcls.data.folders import check_same_classes, data_version, require_split, scan_image_folder
from imgcls.pipeline.gridpoint import execute_grid_point, init_worker, log, publish_notebook
from imgcls.pipeline.notebooks import check_parameters, execute, failed_cell


@dataclass
class RunnerOptions:
    """Everything the command line can set."""

    grid: Path
    only: list[str] | None = None
    dry_run: bool = False
    force: bool = False
    tracking_uri: str | None = None
    experiment: str = tracking.DEFAULT_EXPERIMENT
    workers: int = 1
    executor: str = "local"
    scheduler: str | None = None
    data_dir: str | None = None
    skip_bad_images: bool = False
    extra_eval_dirs: list[str] = field(default_factory=list)
    gate: bool = False
    register: bool = True
    model_name: str | None = None
    device: str | None = None


@dataclass
class GridPoint:
    """One grid point in the plan: its strategy, run key and what the runner will do with it."""

    strategy: Strategy
    key: str
    action: str = "run"  # run | skip
    existing_run_id: str | None = None
    result: dict[str, Any] = field(default_factory=dict)


@dataclass
class Plan:
    """A validated plan: grid id, data version, tracking target and grid points."""

    grid: Grid
    grid_id: str
    data_md5: str
    code_version: str
    tracking_uri: str
    experiment_id: str
    points: list[GridPoint]
    model_name: str | None = None  # the registered model name; None with --no-register


def _load_grid(path: Path, only: list[str] | None = None) -> Grid:
    try:
        return load_grid(path, only)
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})"
        ) from exc


def _model_name(options: RunnerOptions) -> str | None:
    """Return the name the champion will be registered under (None with --no-register).

    A ``--model-name`` is checked even with ``--no-register``: it was typed, so it is meant.
    """
    if not options.register and options.model_name is None:
        return None
    name = names.registered_model_name(options.experiment, options.model_name)
    return name if options.register else None


def build_plan(options: RunnerOptions) -> Plan:
    """Validate grid, data and tracking target before anything runs; decide run or skip per point.

    Every name that reaches MLflow is checked here (lib/imgcls/core/names.py): the experiment name, the
    registered model name (default or ``--model-name``), the class folder names and the
    ``--eval-dir`` names (metric keys). Raises ConfigError, DataError, InvalidNameError or
    TrackingError, whose messages name the file, folder or option.
    """
    names.check_experiment_name(options.experiment)
    model_name = _model_name(options)
    full_grid = _load_grid(options.grid)
    grid = _load_grid(options.grid, options.only) if options.only else full_grid
    root = Path(options.data_dir) if options.data_dir else None
    train = scan_image_folder(require_split("train", root), skip_bad=options.skip_bad_images)
    names.check_metric_names(train.classes, str(train.root), options.extra_eval_dirs)
    test = scan_image_folder(require_split("test", root), skip_bad=options.skip_bad_images)
    check_same_classes(train, test)
    for extra in options.extra_eval_dirs:
        check_same_classes(train, scan_image_folder(extra, skip_bad=options.skip_bad_images))
    for strategy in full_grid.strategies:
        check_against_data(
            strategy, train.class_counts(), f"{options.grid}:strategies.{strategy.name}"
        )
    md5 = data_version(train.root.parent)
    code = tracking.code_version()
    uri = tracking.configure(options.tracking_uri)
    if options.executor == "dask" and options.scheduler and tracking.is_local_store(uri):
        raise tracking.TrackingError(
            f"{uri}: a remote Dask cluster needs a shared MLflow server; pass --tracking-uri "
            "http://HOST:PORT (see README: MLflow server)"
        )
    tracking.check_reachable(uri)
    experiment_id = tracking.get_experiment_id(options.experiment)
    grid_id = stable_hash(sorted(run_key(s, md5, code) for s in full_grid.strategies), 10)
    points = []
    for strategy in grid.strategies:
        key = run_key(strategy, md5, code)
        existing = None if options.force else tracking.find_completed_run(experiment_id, key)
        points.append(GridPoint(strategy, key, "skip" if existing else "run", existing))
    return Plan(grid, grid_id, md5, code, uri, experiment_id, points, model_name)


def print_plan(plan: Plan) -> None:
    """Print the plan: one line per grid point with its action."""
    todo = sum(p.action == "run" for p in plan.points)
    log(
        f"grid {plan.grid.path} -> grid id {plan.grid_id}, data {plan.data_md5}, "
        f"code {plan.code_version}, tracking {plan.tracking_uri}"
    )
    for i, point in enumerate(plan.points, 1):
        what = "run" if point.action == "run" else f"skip (finished run {point.existing_run_id})"
        deltas = point.strategy.extra.get("grid_values") or {}
        log(f"  {i:2d}. {point.strategy.run_name:<40} key {point.key}  {what} {deltas or ''}")
    if plan.model_name:
        log(f"champion will be registered as models:/{plan.model_name}@champion")
    else:
        log("champion will not be registered (--no-register)")
    log(f"plan: {todo} to run, {len(plan.points) - todo} already finished")


def _notebook_parameters(plan: Plan, options: RunnerOptions, torch_threads: int) -> dict[str, Any]:
    return {
        "experiment_name": options.experiment,
        "tracking_uri": plan.tracking_uri,
        "data_dir": options.data_dir,
        "torch_threads": torch_threads,
        "skip_bad_images": options.skip_bad_images,
        "device": options.device,
    }


def run_single_notebook(
    plan: Plan,
    options: RunnerOptions,
    name: str,
    kind: str,
    parameters: dict[str, Any],
    out_dir: Path,
) -> dict[str, Any]:
    """Execute a once-per-grid notebook (01 or 04) into its own MLflow run; return the outcome."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    run = client.create_run(
        plan.experiment_id,
        tags={
            tracking.TAG_KIND: kind,
            tracking.TAG_GRID_ID: plan.grid_id,
            "data_md5": plan.data_md5,
            tracking.TAG_RUNNER: tracking.runner_identity(),
            "mlflow.runName": f"{kind}-{plan.grid_id}",
            **tracking.git_info(),
        },
    )
    output = out_dir / f"{name}.ipynb"
    start = time.perf_counter()
    log(f"{name} started (run {run.info.run_id})")
    status, error = "FINISHED", None
    try:
        execute(name, output, parameters)
        log(f"{name} done", start)
    except Exception as exc:
        status, error = "FAILED", failed_cell(output) or f"{type(exc).__name__}: {exc}"[:500]
        log(f"{name} FAILED: {error}", start)
    except BaseException:
        client.set_terminated(run.info.run_id, "KILLED")
        raise
    publish_notebook(client, run.info.run_id, output, kind)
    client.set_terminated(run.info.run_id, status)
    return {
        "status": status,
        "run_id": run.info.run_id,
        "error": error,
        "seconds": time.perf_counter() - start,
    }


def _task(plan: Plan, options: RunnerOptions, point: GridPoint, threads: int) -> dict[str, Any]:
    strategy = point.strategy
    tags = tracking.lineage_tags(strategy, plan.data_md5, plan.grid_id)
    deltas = {k: v for k, v in strategy.params().items() if k != "name"}
    return {
        "tracking_uri": plan.tracking_uri,
        "experiment_id": plan.experiment_id,
        "tags": tags,
        "params": strategy.params(),
        "strategy": deltas,
        "name": strategy.name,
        "run_name": strategy.run_name,
        "out_dir": str(paths.reports_dir() / strategy.run_name),
        "common": _notebook_parameters(plan, options, threads),
        "data_dir": options.data_dir,
        "extra_eval_dirs": list(options.extra_eval_dirs),
        "expected_data_md5": plan.data_md5 if options.executor == "dask" else None,
        "fresh_kernels": options.executor == "dask" or options.workers > 1,
    }


def run_grid(options: RunnerOptions) -> int:
    """Run the whole pipeline for a grid; print where everything went; return the exit code."""
    start = time.perf_counter()
    plan = build_plan(options)
    print_plan(plan)
    for name, params in [
        ("02_train_cv", {"strategy": {}, "strategy_name": "x", "parent_run_id": None}),
        ("01_data", {"folds": 5}),
        ("04_compare_runs", {"grid_id": None}),
    ]:
        check_parameters(name, params)  # the notebooks still declare what the runner injects
    if options.dry_run:
        log("dry run: nothing executed")
        return 0
    stale = tracking.mark_stale_runs(plan.experiment_id)
    if stale:
        log(f"marked {len(stale)} run(s) of dead runners as KILLED: {', '.join(stale)}")
    from imgcls.data.cache import remove_stale_partial_files

    partial = remove_stale_partial_files()
    if partial:
        log(f"removed {len(partial)} partial cache file(s) left by killed processes")
    try:
        return _execute_plan(plan, options, start)
    except KeyboardInterrupt:
        log("interrupted: unfinished runs are marked KILLED; re-run the same command to resume")
        # this process and its pool workers are done: their RUNNING runs are stale too
        tracking.mark_stale_runs(plan.experiment_id, dead_owners={tracking.runner_identity()})
        return 130


def _execute_plan(plan: Plan, options: RunnerOptions, start: float) -> int:
    reports = paths.reports_dir()
    cpu = os.cpu_count() or 1
    workers = max(1, min(options.workers, sum(p.action == "run" for p in plan.points) or 1))
    threads = max(1, cpu // workers)
    first = plan.points[0].strategy if plan.points else Strategy()
    data_result = run_single_notebook(
        plan,
        options,
        "01_data",
        "data",
        {
            "data_dir": options.data_dir,
            "folds": first.folds,
            "seed": first.seed,
            "skip_bad_images": options.skip_bad_images,
        },
        reports / "data",
    )
    todo = [p for p in plan.points if p.action == "run"]
    log(
        f"executing {len(todo)} grid point(s) with {workers} worker(s) x {threads} torch thread(s)"
        f" ({options.executor})"
    )
    _dispatch(plan, options, todo, workers, threads)
    compare = run_single_notebook(
        plan,
        options,
        "04_compare_runs",
        "comparison",
        {
            "grid_id": plan.grid_id,
            "experiment_name": options.experiment,
            "tracking_uri": plan.tracking_uri,
            "model_name": plan.model_name,
            "register": options.register,
        },
        reports / "comparison",
    )
    from imgcls.reporting.reports import write_index

    index = write_index(plan, data_result, compare, reports)
    return _summarise(plan, options, data_result, compare, index, start)


def _dispatch(
    plan: Plan, options: RunnerOptions, todo: list[GridPoint], workers: int, threads: int
) -> None:
    tasks = {id(p): _task(plan, options, p, threads) for p in todo}
    if options.executor == "dask":
        from imgcls.pipeline.distributed import run_on_dask

        results = run_on_dask([tasks[id(p)] for p in todo], options.scheduler, workers, threads)
        for point, result in zip(todo, results, strict=True):
            point.result = result
        return
    if workers == 1:
        for point in todo:
            point.result = _safe(execute_grid_point, tasks[id(point)])
        return
    with ProcessPoolExecutor(
        max_workers=workers, mp_context=get_context("spawn"), initializer=init_worker
    ) as pool:
        futures: dict[Future, GridPoint] = {
            pool.submit(execute_grid_point, tasks[id(p)]): p for p in todo
        }
        try:
            for future in as_completed(futures):
                point = futures[future]
                try:
                    point.result = future.result()
                except Exception as exc:
                    point.result = {
                        "status": "FAILED",
                        "error": f"{type(exc).__name__}: {exc}",
                        "run_id": None,
                        "seconds": 0.0,
                    }
        except KeyboardInterrupt:
            # Ctrl-C reaches the workers too (same process group); `kill -INT <runner>` does
            # not: pass it on so that they stop their grid point and start no queued one.
            processes = list((getattr(pool, "_processes", None) or {}).values())
            for process in processes:
                with contextlib.suppress(OSError):
                    os.kill(process.pid, signal.SIGINT)
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _safe(function: Any, task: dict[str, Any]) -> dict[str, Any]:
    try:
        return function(task)
    except Exception as exc:
        traceback.print_exc()
        return {
            "status": "FAILED",
            "error": f"{type(exc).__name__}: {exc}",
            "run_id": None,
            "seconds": 0.0,
        }


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


def _summarise(
    plan: Plan, options: RunnerOptions, data_result: dict, compare: dict, index: Path, start: float
) -> int:
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
    log(
        f"MLflow: {plan.tracking_uri} (experiment {options.experiment!r}, grid id {plan.grid_id}); "
        "browse with `make ui`"
    )
    exit_code = 1 if failed else 0
    if options.gate:
        exit_code = max(exit_code, _check_gate(plan, options))
    log(f"done in {time.perf_counter() - start:.1f}s, exit code {exit_code}", None)
    return exit_code


def _check_gate(plan: Plan, options: RunnerOptions) -> int:
    from imgcls.evaluation.comparison import GridComparison

    comparison = GridComparison.load(options.experiment, plan.grid_id, plan.tracking_uri)
    champion = comparison.champion()
    row = comparison.runs.loc[champion]
    message = row.get("tags.quality_gate_message") or "no quality gate result"
    passed = row.get("tags.quality_gate") == "passed"
    log(f"quality gate for champion {champion}: {message}")
    return 0 if passed else 3
