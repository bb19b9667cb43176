"""A papermill engine that runs every notebook of a process in one warm kernel.

Starting a kernel and importing torch, timm and MLflow costs 4-5 s per notebook. The
``imgcls-warm`` engine, registered in papermill's engine registry
(``papermill.engines.papermill_engines.register``) and chosen with ``engine_name=``, keeps one
kernel per process and hands it to papermill's own client through nbclient's documented ``km``
argument. (Not through the ``papermill.engine`` entry point: papermill loads those while its
``engines`` module is still importing, which this module imports, a circular import.)
Before each notebook it clears the user namespace with IPython's ``%reset -f``: no variable
survives from one notebook to the next, and each notebook still reads its inputs from MLflow.
What survives the reset's garbage collection is then frozen (``gc.freeze``), so that the next
reset's collection costs milliseconds instead of half a second.
A failed or interrupted notebook discards the kernel (its process is killed directly, never
through the interrupted event loop); the next notebook starts a new one.

``IMGCLS_WARM_KERNEL=0`` selects the ``imgcls-fresh`` engine: papermill's own nbclient engine
(a fresh kernel per notebook); pool and Dask workers set it.

Both engines write the output notebook after each *code* cell completes and at start and end,
not also when every cell starts and every Markdown cell ends as papermill's manager does
(:class:`CodeCellSaves`): 84 writes of a growing notebook per grid point became 28.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
from pathlib import Path
from typing import Any

from papermill.engines import NBClientEngine, NotebookExecutionManager, papermill_engines

from imgcls.core import paths

logger = logging.getLogger(__name__)

ENGINE_NAME = "imgcls-warm"
FRESH_ENGINE_NAME = "imgcls-fresh"
KERNEL_NAME = "python3"

_WARM: dict[str, Any] = {}
atexit.register(lambda: shutdown_kernel())


def warm_kernels_enabled() -> bool:
    """Return False when ``$IMGCLS_WARM_KERNEL`` is 0/false/no (a fresh kernel per notebook)."""
    return os.environ.get("IMGCLS_WARM_KERNEL", "1").lower() not in ("0", "false", "no")


def engine_name() -> str:
    """Register this module's engines with papermill; return the one to use.

    ``imgcls-warm`` (:class:`WarmKernelEngine`), or ``imgcls-fresh`` (:class:`FreshKernelEngine`)
    when :func:`warm_kernels_enabled` is False.
    """
    papermill_engines.register(ENGINE_NAME, WarmKernelEngine)
    papermill_engines.register(FRESH_ENGINE_NAME, FreshKernelEngine)
    return ENGINE_NAME if warm_kernels_enabled() else FRESH_ENGINE_NAME


def _kernel_process(km: Any) -> Any:
    """Return the local kernel's ``Popen`` (None when there is none)."""
    return getattr(getattr(km, "provisioner", None), "process", None)


def shutdown_kernel() -> int | None:
    """Kill this process's warm kernel, if one is running, and remove its connection file.

    Returns the killed kernel's process id, or None when no kernel process was alive. The kernel
    process is killed directly: after an interrupt, jupyter_client's own (async) shutdown would
    run on nbclient's interrupted event loop and can wait forever.
    """
    km = _WARM.pop("km", None)
    client = _WARM.pop("client", None)
    if km is None:
        return None
    process = _kernel_process(km)
    killed = None
    if process is not None and process.poll() is None:
        process.kill()
        process.wait(timeout=30)
        killed = process.pid
    if client is not None:
        with contextlib.suppress(Exception):
            client.stop_channels()
    with contextlib.suppress(OSError, TypeError):
        Path(km.connection_file).unlink(missing_ok=True)
    return killed


def warm_kernel(kernel_name: str = KERNEL_NAME) -> Any:
    """Return this process's running kernel manager, starting (or restarting) the kernel if needed."""
    from jupyter_client.manager import KernelManager

    km = _WARM.get("km")
    process = _kernel_process(km)
    if process is not None and process.poll() is None and km.kernel_name == kernel_name:
        return km
    shutdown_kernel()
    # papermill's client (nbclient) asks the manager for its client: an asynchronous one, so
    # that nbclient's once-a-second "is the kernel alive?" poll runs while it waits for a reply.
    # With the manager's default (blocking) client that wait blocked nbclient's event loop, and
    # a kernel that died in a cell (killed, out of memory) left the runner waiting forever.
    km = KernelManager(
        kernel_name=kernel_name, client_class="jupyter_client.asynchronous.AsyncKernelClient"
    )
    km.start_kernel(cwd=str(paths.notebooks_dir()))
    logger.info("started warm kernel %s (pid %s)", kernel_name, _kernel_process(km).pid)
    _WARM["km"] = km
    return km


# IPython's ``%reset -f`` runs full ``gc.collect()`` passes (``DisplayHook.flush`` before the
# namespace is cleared, the reset magic after it): 0.5 s per notebook in a kernel holding torch,
# timm, MLflow and matplotlib, even with an empty namespace. Our own ``gc.collect()`` after the
# reset makes sure the last notebook's cyclic garbage is gone whatever IPython's version does;
# ``gc.freeze()`` (Python's documented API for long-lived objects,
# https://docs.python.org/3/library/gc.html#gc.freeze) then moves what survived (modules and
# library state) to the permanent generation, so the next reset's collections visit only the
# objects the last notebook made: 0.5 s -> 0.009 s per reset (measured 2026-11-30). The cost: an
# object that survives a reset (a library cache entry, an unclosed figure) and later becomes
# *cyclic* garbage is not freed while the kernel lives; reference-counted garbage always is. A
# notebook's own cycles are collected (tests/test_engine.py).
RESET_CODE = (
    "get_ipython().run_line_magic('reset', '-f'); "
    "__import__('gc').collect(); __import__('gc').freeze()"
)


def reset_namespace(km: Any) -> None:
    """Clear every user variable and cached output of a warm kernel (IPython's ``%reset -f``).

    Then freezes the survivors of the reset's garbage collection (:data:`RESET_CODE`).

    One client per warm kernel is kept open (a new one waits ~0.2 s for the kernel to answer). It
    has its own session, so its replies are never routed to papermill's client or vice versa.
    Its ``parent`` is the kernel manager, so "is the kernel alive?" asks the manager, which
    polls the kernel process (jupyter_client's ``KernelClient.is_alive``). Without a parent it
    would judge by heartbeat, which calls a kernel dead after 1 s without a reply
    (``HBChannel.time_to_dead``): on a loaded machine a starting kernel missed it and the
    notebook failed with "Kernel died before replying to kernel_info".

    Raises:
        RuntimeError: the kernel did not run the reset, or its process exited.
    """
    from jupyter_client.blocking import BlockingKernelClient

    client = _WARM.get("client")
    if client is None:
        # not km.client(): that shares the manager's session, whose id is the shell socket's
        # identity, so the kernel would route this client's replies to papermill's client
        client = BlockingKernelClient(connection_file=km.connection_file, parent=km)
        client.load_connection_file()
        client.start_channels()
        client.wait_for_ready(timeout=120)
        _WARM["client"] = client
    reply = client.execute_interactive(
        RESET_CODE, timeout=120, store_history=False, output_hook=lambda message: None
    )
    if reply["content"]["status"] != "ok":
        raise RuntimeError(f"could not reset the kernel namespace: {reply['content']}")


class CodeCellSaves(NotebookExecutionManager):
    """papermill's execution manager, writing the output notebook only when it gains outputs.

    papermill writes the whole notebook (validated JSON, figures included) when the run starts,
    when every cell starts, when every cell completes and when the run ends: 52 writes for 03's
    25 cells, 0.35 s per grid point with 02's (measured 2026-12-01). Here the writes when a cell
    starts and when a Markdown cell completes are left out; after every code cell the file on
    disk holds its outputs, as before. The final write (``notebook_complete``, also after a
    failure) and papermill's in-cell autosave are unchanged.
    """

    def cell_start(self, cell: Any, cell_index: int | None = None, **kwargs: Any) -> None:
        """Record the cell's start (papermill's metadata and progress) without writing the file."""
        self._skip_save = True
        try:
            super().cell_start(cell, cell_index, **kwargs)
        finally:
            self._skip_save = False

    def cell_complete(self, cell: Any, cell_index: int | None = None, **kwargs: Any) -> None:
        """Finish the cell's metadata; write the file if it is a code cell."""
        self._skip_save = cell.get("cell_type") != "code"
        try:
            super().cell_complete(cell, cell_index, **kwargs)
        finally:
            self._skip_save = False

    def save(self, **kwargs: Any) -> None:
        """Write the notebook to the output path (papermill's save), unless a hook above skips it."""
        if not getattr(self, "_skip_save", False):
            super().save(**kwargs)


class FreshKernelEngine(NBClientEngine):
    """papermill's nbclient engine (a new kernel per notebook) with :class:`CodeCellSaves`."""

    @classmethod
    def execute_notebook(
        cls,
        nb: Any,
        kernel_name: str,
        output_path: str | None = None,
        progress_bar: bool = True,
        log_output: bool = False,
        autosave_cell_every: int = 30,
        **kwargs: Any,
    ) -> Any:
        """papermill's ``Engine.execute_notebook`` with :class:`CodeCellSaves` as the manager."""
        nb_man = CodeCellSaves(
            nb,
            output_path=output_path,
            progress_bar=progress_bar,
            log_output=log_output,
            autosave_cell_every=autosave_cell_every,
        )
        nb_man.notebook_start()
        try:
            cls.execute_managed_notebook(nb_man, kernel_name, log_output=log_output, **kwargs)
        finally:
            nb_man.cleanup_pbar()
            nb_man.notebook_complete()
        return nb_man.nb


class WarmKernelEngine(FreshKernelEngine):
    """:class:`FreshKernelEngine` run in this process's warm kernel after ``%reset -f``."""

    @classmethod
    def execute_managed_notebook(cls, nb_man: Any, kernel_name: str, **kwargs: Any) -> Any:
        """Execute ``nb_man``'s notebook in the warm kernel; discard the kernel on any failure."""
        km = warm_kernel(kernel_name)
        try:
            reset_namespace(km)
            result = super().execute_managed_notebook(nb_man, kernel_name, km=km, **kwargs)
        except BaseException:
            shutdown_kernel()
            raise
        if nb_man.nb.metadata.get("papermill", {}).get("exception"):
            shutdown_kernel()  # a failed cell may leave state (or a busy kernel) behind
        return result
