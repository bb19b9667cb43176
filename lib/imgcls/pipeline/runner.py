"""The grid runner: execute the plan's notebooks per grid point, in-process, in a pool or on Dask.

``01_data`` runs once, ``02_train_cv`` + ``03_evaluate`` once per grid point (each grid point
is an MLflow parent run), ``04_compare_runs`` once at the end. Finished grid points (same run
key = same params, data version and code version) are skipped unless forced. Building and
printing the plan is :mod:`imgcls.pipeline.plan`; the summary and the gate
:mod:`imgcls.pipeline.summary`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import traceback
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from imgcls import tracking
from imgcls.core import paths
from imgcls.core.config import Strategy
from imgcls.pipeline.engine import shutdown_kernel
from imgcls.pipeline.gridpoint import (
    execute_grid_point,
    failure_line,
    init_worker,
    log,
    publish_notebook,
)
from imgcls.pipeline.notebooks import check_parameters, execute
from imgcls.pipeline.plan import GridPoint, Plan, RunnerOptions, build_plan, print_plan
from imgcls.pipeline.summary import summarise


def _notebook_parameters(plan: Plan, options: RunnerOptions, torch_threads: int) -> dict[str, Any]:
    return {
        "experiment_name": options.experiment,
        "tracking_uri": plan.tracking_uri,
        "data_dir": options.data_dir,
        "torch_threads": torch_threads,
        "skip_bad_images": options.skip_bad_images,
        "device": options.device,
    }


def _promotion_parameters(plan: Plan) -> dict[str, Any]:
    """The grid file's ``promotion:`` settings, every field, as notebook 04's ``promotion``."""
    return {"promotion": plan.grid.promotion.model_dump()}


def run_single_notebook(
    plan: Plan,
    options: RunnerOptions,
    name: str,
    kind: str,
    parameters: dict[str, Any],
    out_dir: Path,
    run_id_parameter: str | None = None,
) -> dict[str, Any]:
    """Execute a once-per-grid notebook (01 or 04) into its own MLflow run; return the outcome.

    With ``run_id_parameter``, the notebook gets that run's id as that parameter (04 writes the
    promotion verdict to it).
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    run = client.create_run(
        plan.experiment_id,
        run_name=f"{kind}-{plan.grid_id}",
        tags={
            tracking.TAG_KIND: kind,
            tracking.TAG_GRID_ID: plan.grid_id,
            "data_md5": plan.data_md5,
            tracking.TAG_RUNNER: tracking.runner_identity(),
            **tracking.git_info(),
            **tracking.source_tags(tracking.SOURCE_RUNNER),
        },
    )
    if run_id_parameter:
        parameters = {**parameters, run_id_parameter: run.info.run_id}
    output = out_dir / f"{name}.ipynb"
    start = time.perf_counter()
    log(f"{name} started (run {run.info.run_id})")
    status, error = "FINISHED", None
    try:
        execute(name, output, parameters)
        log(f"{name} done", start)
    except Exception as exc:
        status, error = "FAILED", failure_line(exc, output)
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
    tags = tracking.lineage_tags(strategy, plan.data_md5, plan.grid_id, code=plan.code_version)
    tags.update(point.tags)  # the incumbent point says which registered version it re-trains
    return {
        "tracking_uri": plan.tracking_uri,
        "experiment_id": plan.experiment_id,
        "tags": tags,
        "params": strategy.params(),
        "run_name": strategy.run_name,
        "out_dir": str(paths.reports_dir() / strategy.run_name),
        "steps": _grid_point_parameters(plan, options, point, threads),
        "data_dir": options.data_dir,
        "expected_data_md5": plan.data_md5 if options.executor == "dask" else None,
        "fresh_kernels": options.executor == "dask" or options.workers > 1,
    }


def _grid_point_parameters(
    plan: Plan, options: RunnerOptions, point: GridPoint, threads: int
) -> dict[str, dict[str, Any]]:
    """The parameters of a grid point's notebooks 02 and 03, except ``parent_run_id``.

    The grid point's run is created when it executes (:mod:`imgcls.pipeline.gridpoint` adds
    its id). Built here only, and checked against the notebooks by :func:`check_notebooks`.
    """
    common = _notebook_parameters(plan, options, threads)
    strategy = point.strategy
    return {
        "02_train_cv": {
            **common,
            "strategy": {k: v for k, v in strategy.params().items() if k != "name"},
            "strategy_name": strategy.run_name,
        },
        "03_evaluate": {**common, "extra_eval_dirs": list(options.extra_eval_dirs)},
    }


def _embedding_backbone(plan: Plan) -> dict[str, Any] | None:
    """The backbone of the grid's first frozen strategy with cached features, for 01's audit.

    ``{"backbone", "weights", "image_size"}``: notebook 01's embedding audit
    (:mod:`imgcls.evaluation.embedding_audit`) reads the same cached features that strategy's
    heads train on. None when no grid point trains a head on cached frozen features.
    """
    for point in plan.points:
        strategy = point.strategy
        if strategy.freeze_backbone and strategy.use_feature_cache:
            return {
                "backbone": strategy.backbone,
                "weights": strategy.weights,
                "image_size": strategy.image_size,
            }
    return None


def _data_parameters(plan: Plan, options: RunnerOptions) -> dict[str, Any]:
    """The parameters of notebook 01: the grid's first point's folds and seed, its frozen backbone."""
    first = plan.points[0].strategy if plan.points else Strategy()
    return {
        "data_dir": options.data_dir,
        "folds": first.folds,
        "seed": first.seed,
        "skip_bad_images": options.skip_bad_images,
        "embedding_backbone": _embedding_backbone(plan),
        "device": options.device,
    }


def _compare_parameters(plan: Plan, options: RunnerOptions) -> dict[str, Any]:
    """The parameters of notebook 04, except ``comparison_run_id`` (its run, made when it runs)."""
    return {
        "grid_id": plan.grid_id,
        "grid_run_keys": list(plan.member_keys),
        "experiment_name": options.experiment,
        "tracking_uri": plan.tracking_uri,
        "model_name": plan.model_name,
        "register": options.register,
        **_promotion_parameters(plan),
    }


def check_notebooks(plan: Plan, options: RunnerOptions) -> None:
    """Check every parameter the runner will inject against the notebooks' parameters cells.

    The exact dicts the run uses (01, 04, and 02/03 of every grid point), so a parameter renamed
    in a notebook fails ``--dry-run`` before anything runs. Raises
    :class:`imgcls.pipeline.notebooks.NotebookParameterError` naming the notebook and parameter.
    """
    check_parameters("01_data", _data_parameters(plan, options))
    check_parameters(
        "04_compare_runs", {**_compare_parameters(plan, options), "comparison_run_id": None}
    )
    for point in plan.points:
        for name, parameters in _grid_point_parameters(plan, options, point, 1).items():
            check_parameters(name, {**parameters, "parent_run_id": None})


def run_grid(options: RunnerOptions) -> int:
    """Run the whole pipeline for a grid; print where everything went; return the exit code."""
    start = time.perf_counter()
    plan = build_plan(options)
    print_plan(plan)
    check_notebooks(plan, options)  # the notebooks still declare what the runner injects
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
    data_result = run_single_notebook(
        plan, options, "01_data", "data", _data_parameters(plan, options), reports / "data"
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
        _compare_parameters(plan, options),
        reports / "comparison",
        run_id_parameter="comparison_run_id",
    )
    # 04 was the last notebook: the warm kernel (all notebooks' imports and allocator pools,
    # 2.3-2.9 GB after fine-tuning) goes before the runner renders the summary page.
    kernel = shutdown_kernel()
    if kernel is not None:
        log(f"stopped the notebooks' warm kernel (pid {kernel}): no notebook is left to run")
    from imgcls.reporting.reports import write_index
    from imgcls.reporting.summary_page import write_summary

    # the index and the summary link each other, and each links only pages that exist
    write_index(plan, data_result, compare, reports)
    summary = write_summary(
        reports,
        options.experiment,
        plan.grid_id,
        model_name=plan.model_name,
        comparison_run_id=compare.get("run_id"),
        grid_points=[point.strategy.run_name for point in plan.points],
        run_keys=plan.member_keys,
        tracking_uri=plan.tracking_uri,
    )
    log(f"one-file summary (self-contained, to send): {summary}")
    index = write_index(plan, data_result, compare, reports)
    return summarise(plan, options, data_result, compare, index, start)


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
