"""The grid step: ``run_experiments.py`` on a throwaway MLflow store, timed, RSS polled."""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench_config import DONE_LINE, QUICK_GRID, QUICK_TEST_PER_CLASS, REPO_ROOT, RSS_POLL_SECONDS


def _copy_subset(source: Path, target: Path, per_class: int) -> None:
    for class_dir in sorted(p for p in source.iterdir() if p.is_dir()):
        (target / class_dir.name).mkdir(parents=True, exist_ok=True)
        for path in sorted(p for p in class_dir.iterdir() if p.is_file())[:per_class]:
            shutil.copy2(path, target / class_dir.name / path.name)


def tree_rss_bytes(root: Any) -> int:
    """Return the summed RSS of a psutil process and all its descendants (0 once it is gone)."""
    import psutil

    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += process.memory_info().rss
    return total


def stop_tree(root: Any, grace: float = 10.0) -> None:
    """Terminate a psutil process and its descendants; kill what is left after ``grace`` s."""
    import psutil

    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=grace)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def parse_done_lines(lines: list[str]) -> list[dict[str, Any]]:
    """Return ``{run, notebook, seconds}`` for every "<notebook> done" line of the runner log."""
    found = []
    for line in lines:
        match = DONE_LINE.match(line.strip())
        if match:
            seconds, run, notebook = match.groups()
            found.append({"run": run, "notebook": notebook, "seconds": float(seconds)})
    return found


def notebook_cell_seconds(path: Path) -> float | None:
    """Return the summed papermill ``duration`` (s) of an executed notebook's code cells.

    None when the notebook is missing or a code cell has no duration (not executed by papermill).
    """
    import nbformat

    if not path.is_file():
        return None
    cells = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    durations = [c.metadata.get("papermill", {}).get("duration") for c in cells]
    return None if not durations or None in durations else float(sum(durations))


def split_grid_point(metrics: dict[str, float | None], cells: float | None) -> dict[str, Any]:
    """Split a grid point's wall time into training, analysis and orchestration (seconds).

    ``metrics``: the parent run's ``grid_point_seconds``, ``cv_train_seconds``,
    ``refit_seconds``, ``cv_setup_seconds`` and ``seed_repetition_seconds`` (absent: 0, as for
    fine-tuned strategies, which have no seed repetitions); ``cells``: the summed cell durations
    of its 02 and 03 (:func:`notebook_cell_seconds`). Returns

    - ``training_seconds``: CV folds + seed repetitions + refit + cache setup;
    - ``fixed_overhead_seconds``: the wall time minus training (everything else);
    - ``analysis_seconds``: the part of that spent inside the notebooks' cells (evaluation,
      Grad-CAM, latency, figures, MLflow logging from the cells);
    - ``orchestration_seconds``: the part outside any cell (kernel reset, papermill's reading,
      parameter injection and writing, HTML rendering, the runner's MLflow bookkeeping), the
      part one papermill run of an empty notebook measures.

    A part is None when a number it needs is missing.
    """
    seeds = metrics.get("seed_repetition_seconds") or 0.0
    parts = [metrics.get(k) for k in ("cv_train_seconds", "refit_seconds", "cv_setup_seconds")]
    total = metrics.get("grid_point_seconds")
    training = None if None in parts else sum(parts) + seeds
    overhead = None if total is None or training is None else total - training
    orchestration = None if total is None or cells is None else total - cells
    analysis = None if overhead is None or orchestration is None else overhead - orchestration
    return {
        "seed_repetition_seconds": seeds,
        "training_seconds": training,
        "fixed_overhead_seconds": overhead,
        "analysis_seconds": analysis,
        "orchestration_seconds": orchestration,
    }


def grid_point_metrics(
    tracking_uri: str, experiment: str, reports: Path | None = None
) -> list[dict[str, Any]]:
    """Read each grid point's timings from MLflow (and its executed notebooks in ``reports``).

    One dict per grid-point parent run: its timing metrics and :func:`split_grid_point`'s parts
    (the executed notebooks are ``<reports>/<run name>/{02_train_cv,03_evaluate}.ipynb``).
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    runs = client.search_runs(
        [found.experiment_id], filter_string="tags.run_kind = 'grid_point'", max_results=1000
    )
    points = []
    names = (
        "grid_point_seconds",
        "cv_train_seconds",
        "refit_seconds",
        "cv_setup_seconds",
        "seed_repetition_seconds",
        "02_train_cv_seconds",
        "03_evaluate_seconds",
    )
    for run in runs:
        name = run.data.tags.get("mlflow.runName", run.info.run_id)
        metrics = {k: run.data.metrics.get(k) for k in names}
        cells = None
        if reports is not None:
            found_cells = [
                notebook_cell_seconds(reports / name / f"{nb}.ipynb")
                for nb in ("02_train_cv", "03_evaluate")
            ]
            cells = None if None in found_cells else sum(found_cells)
        points.append(
            {
                "run": name,
                "status": run.info.status,
                **metrics,
                "cell_seconds": cells,
                **split_grid_point(metrics, cells),
            }
        )
    return sorted(points, key=lambda p: p["run"])


def _mean(points: list[dict[str, Any]], key: str) -> float | None:
    values = [p[key] for p in points if p.get(key) is not None]
    return sum(values) / len(values) if values else None


def empty_notebook_seconds(tmp: Path, runs: int = 2) -> float:
    """Return the fastest of ``runs`` papermill executions (seconds) of an empty notebook.

    One empty code cell, a fresh ``python3`` kernel each time (kernel start, papermill's
    reading, executing and writing): the unit in which the grid's fixed overhead per grid point
    is judged, measured in the same run so that it moves with the machine.
    """
    import nbformat
    import papermill

    source = tmp / "empty.ipynb"
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell("", metadata={"tags": ["parameters"]})]
    nbformat.write(notebook, source)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        papermill.execute_notebook(
            str(source),
            str(tmp / "empty-out.ipynb"),
            kernel_name="python3",
            progress_bar=False,
            log_output=False,
        )
        times.append(time.perf_counter() - start)
    return min(times)


def step_grid(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run run_experiments.py on a throwaway MLflow store; time it and poll the tree's RSS."""
    import psutil

    tmp = Path(cfg["tmp_dir"]) / "grid"
    tmp.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    experiment = f"bench-{cfg['timestamp']}"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "IMGCLS_REPORTS_DIR": str(tmp / "reports"),
        "IMGCLS_ARTIFACT_ROOT": str(tmp / "mlartifacts"),
        "IMGCLS_RUNS_DIR": str(tmp / "runs"),
        "IMGCLS_CACHE_DIR": str(tmp / "cache"),  # a cold, private cache: no user state involved
        "PYTHONUNBUFFERED": "1",
    }
    grid_file = Path(cfg["grid_file"]) if cfg["grid_file"] else REPO_ROOT / "strategies.yaml"
    command = [sys.executable, "run_experiments.py"]
    if cfg["quick"] and not cfg["grid_file"]:
        data = tmp / "data"
        from imgcls.core import paths

        _copy_subset(paths.data_dir() / "train", data / "train", cfg["per_class"])
        _copy_subset(paths.data_dir() / "test", data / "test", QUICK_TEST_PER_CLASS)
        grid_file = tmp / "quick_grid.yaml"
        grid_file.write_text(QUICK_GRID)
        command += ["--data-dir", str(data)]
    empty_seconds = empty_notebook_seconds(tmp)  # before the grid, on the same machine state
    command += ["--grid", str(grid_file), "--force", "--experiment", experiment]
    command += ["--tracking-uri", uri]
    if cfg["device"]:
        command += ["--device", cfg["device"]]
    print(f"  $ {' '.join(command)}", flush=True)
    lines: list[str] = []
    start = time.perf_counter()
    process = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line.rstrip("\n"))
            print(f"  | {line}", end="", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    root = psutil.Process(process.pid)
    peak = 0
    try:
        while process.poll() is None:
            peak = max(peak, tree_rss_bytes(root))
            time.sleep(RSS_POLL_SECONDS)
    except BaseException:
        stop_tree(root)
        raise
    seconds = time.perf_counter() - start
    reader.join(timeout=10)
    points = grid_point_metrics(uri, experiment, Path(env["IMGCLS_REPORTS_DIR"]))
    mean_overhead = _mean(points, "fixed_overhead_seconds")
    mean_analysis = _mean(points, "analysis_seconds")
    mean_orchestration = _mean(points, "orchestration_seconds")
    children_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    training = sum(p["training_seconds"] or 0 for p in points)
    notes = f"{len(points)} grid points, exit code {process.returncode}"
    if mean_overhead is not None:
        notes += f", per point: fixed overhead {mean_overhead:.1f} s"
    if mean_analysis is not None and mean_orchestration is not None:
        notes += (
            f" = analysis cells {mean_analysis:.1f} s + orchestration {mean_orchestration:.1f} s"
            f" ({mean_orchestration / empty_seconds:.1f}x one empty notebook, "
            f"{empty_seconds:.1f} s)"
        )
    return {
        "seconds": seconds,
        "images": None,
        "images_per_second": None,
        "exit_code": process.returncode,
        "command": command,
        "grid_file": str(grid_file),
        "tree_peak_rss_bytes": peak,
        "largest_child_peak_rss_bytes": children_peak,
        "notebooks": parse_done_lines(lines),
        "grid_points": points,
        "training_seconds": training,
        "mean_fixed_overhead_seconds": mean_overhead,
        "mean_analysis_seconds": mean_analysis,
        "mean_orchestration_seconds": mean_orchestration,
        "empty_notebook_seconds": empty_seconds,
        "notes": notes,
    }
