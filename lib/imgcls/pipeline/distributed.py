"""Dask execution: each grid point (its 02 + 03 notebooks) is one task on a Dask cluster.

``scheduler=None`` starts a ``LocalCluster`` (processes bound to 127.0.0.1) with ``workers``
single-threaded workers; otherwise the tasks go to an existing scheduler ``tcp://HOST:PORT``.
Workers must see the same repository checkout and data version (checked per task) and share
an MLflow server. Each task sets its torch threads on the machine that runs it (its cores
shared among the Dask worker threads there). A worker that dies mid-task (Dask runs the task
again elsewhere) leaves its runs RUNNING: once the grid is done they are marked KILLED.
"""

from __future__ import annotations

from typing import Any


def run_on_dask(
    tasks: list[dict[str, Any]], scheduler: str | None, workers: int, torch_threads: int
) -> list[dict[str, Any]]:
    """Run every task with :func:`imgcls.pipeline.gridpoint.execute_grid_point` on Dask; return results in order."""
    from dask.distributed import Client, LocalCluster, as_completed

    from imgcls.pipeline.gridpoint import log

    cluster = None
    if scheduler is None:
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
        )
        client = Client(cluster)
    else:
        client = Client(scheduler, timeout="20s")
    try:
        info = client.scheduler_info(n_workers=-1).get("workers", {})
        log(
            f"dask: {client.scheduler.address if hasattr(client, 'scheduler') else scheduler} "
            f"with {len(info)} worker(s)"
        )
        threads_by_host: dict[str, int] = {}
        for worker in info.values():
            host = worker.get("host", "")
            threads_by_host[host] = threads_by_host.get(host, 0) + int(worker.get("nthreads", 1))
        futures = [
            client.submit(
                execute_on_worker,
                task,
                threads_by_host,
                key=f"grid-point-{task['tags']['run_key']}",
                pure=False,
                retries=0,
            )
            for task in tasks
        ]
        index = {f.key: i for i, f in enumerate(futures)}
        results: list[dict[str, Any]] = [{} for _ in tasks]
        for future in as_completed(futures):
            i = index[future.key]
            try:
                results[i] = future.result()
            except Exception as exc:  # a worker died or the task raised
                results[i] = {
                    "status": "FAILED",
                    "run_id": None,
                    "seconds": 0.0,
                    "error": f"dask task failed: {type(exc).__name__}: {exc}",
                }
        if tasks:
            try:
                lost = mark_runs_of_lost_workers(client, tasks)
            except Exception as exc:  # the grid's results stand; the next run cleans up
                log(f"could not look for runs of lost Dask workers: {type(exc).__name__}: {exc}")
                lost = []
            if lost:
                log(f"marked {len(lost)} run(s) of lost Dask workers as KILLED: {', '.join(lost)}")
        return results
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def execute_on_worker(task: dict[str, Any], threads_by_host: dict[str, int]) -> dict[str, Any]:
    """Run one grid point on a Dask worker with torch threads = this machine's cores / Dask threads.

    ``threads_by_host`` (host -> Dask worker threads on it) comes from the scheduler when the
    grid was submitted; a worker that joined later counts its own threads.
    """
    import os

    from distributed import get_worker
    from distributed.comm import get_address_host

    from imgcls.pipeline.gridpoint import execute_grid_point

    worker = get_worker()
    here = threads_by_host.get(get_address_host(worker.address)) or worker.state.nthreads
    threads = max(1, (os.cpu_count() or 1) // max(1, here))
    steps = {name: {**params, "torch_threads": threads} for name, params in task["steps"].items()}
    task = {**task, "steps": steps}
    return execute_grid_point(task)


def mark_runs_of_lost_workers(client: Any, tasks: list[dict[str, Any]]) -> list[str]:
    """Mark the runs that workers gone from the cluster left RUNNING as KILLED; return their ids.

    Called when every task of the grid is done: a grid-point run of this grid still RUNNING is
    owned (tag ``runner``) by a worker process that died mid-task, on any machine. Runs owned by
    workers still in the cluster are left alone. Their fold runs are KILLED with them.
    """
    from mlflow.tracking import MlflowClient

    from imgcls import tracking

    alive = set(client.run(tracking.runner_identity, on_error="ignore").values())
    experiment_id = tasks[0]["experiment_id"]
    grid_id = tasks[0]["tags"][tracking.TAG_GRID_ID]
    keys = {task["tags"][tracking.TAG_RUN_KEY] for task in tasks}
    running = MlflowClient(tasks[0]["tracking_uri"]).search_runs(
        [experiment_id],
        filter_string=(
            f"tags.{tracking.TAG_GRID_ID} = '{grid_id}' and "
            f"tags.{tracking.TAG_KIND} = 'grid_point' and attributes.status = 'RUNNING'"
        ),
        max_results=5000,
    )
    lost = {
        run.data.tags.get(tracking.TAG_RUNNER, "")
        for run in running
        if run.data.tags.get(tracking.TAG_RUN_KEY) in keys
    } - alive
    lost.discard("")
    return tracking.mark_stale_runs(experiment_id, dead_owners=lost) if lost else []
