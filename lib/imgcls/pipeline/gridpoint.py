"""Executing one grid point: ``02_train_cv`` then ``03_evaluate`` into its MLflow parent run.

Runs in the runner process, in a pool worker or on a Dask worker; it never leaves its run
RUNNING. Ctrl-C handling of pool workers and the background thread that renders and uploads
the HTML reports live here too.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from imgcls import tracking
from imgcls.data.folders import data_version
from imgcls.pipeline.notebooks import execute, failed_cell, render_html


def log(message: str, start: float | None = None) -> None:
    """Print one progress line, with the elapsed seconds since ``start`` when given."""
    elapsed = f" [{time.perf_counter() - start:6.1f}s]" if start is not None else ""
    print(f"{time.strftime('%H:%M:%S')}{elapsed} {message}", flush=True)


_STOP_REQUESTED = False  # a worker process saw Ctrl-C: start no further grid point
_IN_GRID_POINT = False


def _on_worker_sigint(signum: int, frame: Any) -> None:
    """SIGINT in a pool worker: interrupt the running grid point once, then only refuse new ones.

    An idle worker must not die (that breaks the pool and SIGTERMs the busy ones mid-clean-up)
    and a second Ctrl-C must not interrupt the clean-up that marks the run KILLED.
    """
    global _STOP_REQUESTED
    first = not _STOP_REQUESTED
    _STOP_REQUESTED = True
    if first and _IN_GRID_POINT:
        raise KeyboardInterrupt


def init_worker() -> None:
    """Set up a pool worker: Ctrl-C stops its grid point once; fresh kernel per notebook."""
    signal.signal(signal.SIGINT, _on_worker_sigint)
    # Pool workers start a fresh kernel per notebook: a warm kernel shared across an interrupt
    # in a worker process is not safe (it can die under Ctrl-C and leave the worker waiting).
    os.environ["IMGCLS_WARM_KERNEL"] = "0"


def execute_grid_point(task: dict[str, Any]) -> dict[str, Any]:
    """Create the parent run of one grid point and execute 02 and 03 into it; return the outcome.

    Runs in the runner, a worker process or a Dask worker. Never leaves the run RUNNING: it
    ends FINISHED (complete), FAILED (a notebook failed, output kept) or KILLED (interrupted).
    """
    global _IN_GRID_POINT
    if _STOP_REQUESTED:
        return {"status": "KILLED", "run_id": None, "seconds": 0.0, "error": "interrupted"}
    _IN_GRID_POINT = True
    try:
        return _execute_grid_point(task)
    finally:
        _IN_GRID_POINT = False


def _execute_grid_point(task: dict[str, Any]) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    if task.get("fresh_kernels"):
        os.environ["IMGCLS_WARM_KERNEL"] = "0"
    start = time.perf_counter()
    tracking.configure(task["tracking_uri"])
    if task.get("expected_data_md5"):
        found = data_version(Path(task["data_dir"]) if task["data_dir"] else None)
        if found != task["expected_data_md5"]:
            return {
                "status": "FAILED",
                "run_id": None,
                "seconds": 0.0,
                "error": f"{socket.gethostname()}: data version {found} differs from the "
                f"runner's {task['expected_data_md5']}; run `dvc pull` there",
            }
    client = MlflowClient()
    tags = {tracking.TAG_RUNNER: tracking.runner_identity()}
    run = client.create_run(task["experiment_id"], run_name=task["run_name"], tags=tags)
    run_id = run.info.run_id
    out_dir = Path(task["out_dir"])
    timings: dict[str, float] = {}
    status, error = "FINISHED", None
    # the notebooks' parameters come from the runner (imgcls.pipeline.runner, checked there
    # against the notebooks); only this run's id is added here
    steps = [
        (name, {**parameters, "parent_run_id": run_id})
        for name, parameters in task["steps"].items()
    ]
    pending: list[Future] = []
    try:
        tracking.log_grid_point_identity(
            run_id, task["params"], task["tags"], tracking.SOURCE_RUNNER
        )
        for name, parameters in steps:
            output = out_dir / f"{name}.ipynb"
            step_start = time.perf_counter()
            log(f"{task['run_name']}: {name} started (run {run_id})")
            try:
                timings[f"{name}_seconds"] = execute(name, output, parameters)
            except Exception as exc:
                status = "FAILED"
                error = failure_line(exc, output)
                log(f"{task['run_name']}: {name} FAILED: {error}", step_start)
                break
            finally:
                # HTML rendering and artifact upload overlap with the next notebook's execution
                pending.append(
                    _publisher().submit(publish_notebook, client, run_id, output, task["run_name"])
                )
            log(f"{task['run_name']}: {name} done", step_start)
        publish_start = time.perf_counter()
        for future in pending:
            try:
                future.result()
            except Exception as exc:  # a report that cannot be rendered must not fail the run
                log(
                    f"{task['run_name']}: could not publish a notebook: {type(exc).__name__}: {exc}"
                )
        timings["publish_wait_seconds"] = time.perf_counter() - publish_start
    except BaseException:
        client.set_terminated(run_id, "KILLED")
        raise
    seconds = time.perf_counter() - start
    metrics = {**timings, "grid_point_seconds": seconds}
    tags_out = {tracking.TAG_COMPLETE: "true"} if status == "FINISHED" else {"error": error or ""}
    tracking.log_batch(run_id, metrics=metrics, tags=tags_out)
    client.set_terminated(run_id, status)
    return {
        "status": status,
        "run_id": run_id,
        "seconds": seconds,
        "error": error,
        "timings": timings,
    }


def failure_line(exc: Exception, output: Path) -> str:
    """Return one line (at most 500 characters) saying why a notebook failed.

    For papermill's ``PapermillExecutionError`` its own fields name the cell: ``cell <index>:
    <exception class>: <message>``; for any other exception the executed notebook's first error
    output (:func:`imgcls.pipeline.notebooks.failed_cell`) or else the exception itself.
    """
    from papermill.exceptions import PapermillExecutionError

    if isinstance(exc, PapermillExecutionError):
        return f"cell {exc.cell_index}: {exc.ename}: {exc.evalue}"[:500]
    return failed_cell(output) or f"{type(exc).__name__}: {exc}"[:500]


_PUBLISHER: list[ThreadPoolExecutor] = []


def _publisher() -> ThreadPoolExecutor:
    """Return this process's single background thread for rendering and uploading reports."""
    if not _PUBLISHER:
        _PUBLISHER.append(ThreadPoolExecutor(max_workers=1, thread_name_prefix="publish"))
    return _PUBLISHER[0]


def publish_notebook(client: Any, run_id: str, notebook: Path, run_name: str) -> None:
    """Render an executed notebook to HTML next to it and log both to the run."""
    if not notebook.is_file():
        return
    html = render_html(
        notebook, notebook.with_suffix(".html"), title=f"{run_name}: {notebook.stem}"
    )
    client.log_artifact(run_id, str(notebook), "notebooks")
    client.log_artifact(run_id, str(html), "notebooks")
