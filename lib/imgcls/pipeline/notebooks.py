"""Executing the pipeline notebooks with papermill and rendering them to HTML.

Starting a kernel and importing torch, timm and MLflow costs 4-5 s per notebook, so by default a
process keeps one warm kernel and reuses it for every notebook it runs, clearing the user
namespace (``%reset -f``) before each one: no variable survives from one notebook to the next,
and each notebook still reads its inputs from MLflow. An interrupt or a failed notebook discards
the warm kernel (its process is killed directly, never through the interrupted event loop).
``IMGCLS_WARM_KERNEL=0`` starts a fresh kernel per notebook (pool and Dask workers set it).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

from imgcls.core import paths

NOTEBOOK_NAMES = ("01_data", "02_train_cv", "03_evaluate", "04_compare_runs")
KERNEL_NAME = "python3"


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


_WARM: dict[str, Any] = {}
atexit.register(lambda: shutdown_kernel())


def _fresh_kernels() -> bool:
    """Return True when every notebook gets its own kernel instead of this process's warm one."""
    return os.environ.get("IMGCLS_WARM_KERNEL", "1").lower() in ("0", "false", "no")


def _kernel_process(km: Any) -> Any:
    """Return the local kernel's ``Popen`` (None when there is none)."""
    return getattr(getattr(km, "provisioner", None), "process", None)


def shutdown_kernel() -> None:
    """Kill this process's warm kernel, if one is running, and remove its connection file.

    The kernel process is killed directly: after an interrupt, jupyter_client's own (async)
    shutdown would run on nbclient's interrupted event loop and can wait forever.
    """
    km = _WARM.pop("km", None)
    client = _WARM.pop("client", None)
    if km is None:
        return
    process = _kernel_process(km)
    if process is not None and process.poll() is None:
        process.kill()
        process.wait(timeout=30)
    if client is not None:
        with contextlib.suppress(Exception):
            client.stop_channels()
    with contextlib.suppress(OSError, TypeError):
        Path(km.connection_file).unlink(missing_ok=True)


def warm_kernel() -> Any:
    """Return this process's running kernel manager, starting (or restarting) the kernel if needed."""
    from jupyter_client.manager import KernelManager

    km = _WARM.get("km")
    process = _kernel_process(km)
    if process is not None and process.poll() is None:
        return km
    shutdown_kernel()
    km = KernelManager(kernel_name=KERNEL_NAME)
    km.start_kernel(cwd=str(paths.notebooks_dir()))
    _WARM["km"] = km
    return km


# IPython's reset() runs a full garbage collection (0.3-0.4 s over the torch/timm/MLflow heaps);
# reference counting already frees the notebook's objects, and Python's own gc collects cycles.
_RESET_CODE = """\
def _imgcls_reset(shell=get_ipython()):
    import gc
    collect = gc.collect
    gc.collect = lambda generation=2: 0
    try:
        shell.reset(new_session=False)
    finally:
        gc.collect = collect
_imgcls_reset()
"""


def _reset_namespace(km: Any) -> None:
    """Clear every user variable and cached output of a warm kernel before its next notebook.

    One client per warm kernel is kept open (a new one waits ~0.2 s for the kernel to answer). It
    has its own session, so its replies are never routed to papermill's client or vice versa.
    """
    from jupyter_client.blocking import BlockingKernelClient

    client = _WARM.get("client")
    if client is None:
        client = BlockingKernelClient(connection_file=km.connection_file)
        client.load_connection_file()
        client.start_channels()
        client.wait_for_ready(timeout=120)
        _WARM["client"] = client
    reply = client.execute_interactive(
        _RESET_CODE, timeout=120, store_history=False, output_hook=lambda message: None
    )
    if reply["content"]["status"] != "ok":
        raise RuntimeError(f"could not reset the kernel namespace: {reply['content']}")


def execute(name: str, output: Path, parameters: dict[str, Any]) -> float:
    """Run a notebook with papermill into ``output`` (kept even when a cell fails); return seconds.

    Raises papermill's ``PapermillExecutionError`` (the output notebook marks the failing cell).
    """
    import papermill

    parameters = check_parameters(name, parameters)
    output.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    env_before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(paths.REPO_ROOT / "lib"), env_before])
    )
    try:
        warm: dict[str, Any] = {}
        if not _fresh_kernels():
            km = warm_kernel()
            _reset_namespace(km)
            warm["km"] = km
        papermill.execute_notebook(
            str(notebook_path(name)),
            str(output),
            parameters=parameters,
            kernel_name=KERNEL_NAME,
            progress_bar=False,
            cwd=str(paths.notebooks_dir()),
            log_output=False,
            **warm,
        )
    except BaseException:
        # a failed or interrupted notebook may leave the kernel busy or broken: never reuse it
        shutdown_kernel()
        raise
    finally:
        if env_before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = env_before
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
