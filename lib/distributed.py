"""Dask execution: each grid point (its 02 + 03 notebooks) is one task on a Dask cluster.

``scheduler=None`` starts a ``LocalCluster`` (processes bound to 127.0.0.1) with ``workers``
single-threaded workers; otherwise the tasks go to an existing scheduler ``tcp://HOST:PORT``.
Workers must see the same repository checkout and data version (checked per task) and share
an MLflow server.
"""

from __future__ import annotations

from typing import Any


def run_on_dask(
    tasks: list[dict[str, Any]], scheduler: str | None, workers: int, torch_threads: int
) -> list[dict[str, Any]]:
    """Run every task with :func:`lib.gridpoint.execute_grid_point` on Dask; return results in order."""
    from dask.distributed import Client, LocalCluster, as_completed

    from lib.gridpoint import execute_grid_point, log

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
        log(
            f"dask: {client.scheduler.address if hasattr(client, 'scheduler') else scheduler} "
            f"with {len(client.scheduler_info().get('workers', {}))} worker(s)"
        )
        futures = [
            client.submit(
                execute_grid_point,
                task,
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
        return results
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
