"""The warm-kernel papermill engine: one kernel per process, nothing shared between notebooks."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import nbformat
import papermill
import pytest

from imgcls.pipeline import engine
from tests.conftest import write_notebook


def _run(source: Path, output: Path) -> dict:
    """Execute with the warm engine; return the JSON the notebook's last cell printed."""
    papermill.execute_notebook(
        str(source), str(output), engine_name=engine.engine_name(), progress_bar=False
    )
    cells = nbformat.read(output, as_version=4).cells
    return json.loads(cells[-1].outputs[-1]["text"])


REPORT = "import json, os\nprint(json.dumps({'pid': os.getpid(), 'names': sorted(n for n in globals() if n.startswith('secret'))}))"


@pytest.fixture
def warm(monkeypatch):
    monkeypatch.setenv("IMGCLS_WARM_KERNEL", "1")
    yield
    engine.shutdown_kernel()


def test_papermill_resolves_the_engine_name_to_the_warm_engine(monkeypatch):
    from papermill.engines import papermill_engines

    monkeypatch.setenv("IMGCLS_WARM_KERNEL", "1")
    assert papermill_engines.get_engine(engine.engine_name()) is engine.WarmKernelEngine


def test_second_notebook_reuses_the_kernel_but_sees_no_variable_of_the_first(tmp_path, warm):
    first = write_notebook(tmp_path / "a.ipynb", "secret_value = 41", REPORT)
    second = write_notebook(tmp_path / "b.ipynb", REPORT)
    one = _run(first, tmp_path / "a_out.ipynb")
    two = _run(second, tmp_path / "b_out.ipynb")
    assert one["names"] == ["secret_value"]
    assert two["names"] == [], "a variable survived into the next notebook"
    assert one["pid"] == two["pid"], "the warm kernel was not reused"


def test_a_notebooks_cyclic_garbage_is_collected_by_the_next_reset(tmp_path, warm):
    """The frozen generation holds only what survived a reset: a notebook's cycles still go."""
    first = write_notebook(
        tmp_path / "a.ipynb",
        "import sys, weakref\n"
        "class Node:\n    pass\n"
        "secret_node = Node()\nsecret_node.me = secret_node  # a cycle: refcounting cannot free it\n"
        "sys.imgcls_probe = weakref.ref(secret_node)",
        REPORT,
    )
    second = write_notebook(
        tmp_path / "b.ipynb",
        "import json, sys\nprint(json.dumps({'alive': sys.imgcls_probe() is not None}))",
    )
    third = write_notebook(
        tmp_path / "c.ipynb",
        "secret_node = type('Node', (), {})()\nsecret_node.me = secret_node\n"
        "import sys, weakref\nsys.imgcls_probe = weakref.ref(secret_node)",
        REPORT,
    )
    _run(first, tmp_path / "a_out.ipynb")
    assert _run(second, tmp_path / "b_out.ipynb") == {"alive": False}
    _run(third, tmp_path / "c_out.ipynb")  # made after a freeze: collected by the next reset too
    assert _run(second, tmp_path / "d_out.ipynb") == {"alive": False}


def test_a_failed_notebook_discards_the_kernel_and_names_the_cell(tmp_path, warm):
    before = _run(write_notebook(tmp_path / "a.ipynb", REPORT), tmp_path / "a_out.ipynb")
    failing = write_notebook(tmp_path / "bad.ipynb", "x = 1", "raise KeyError('no such class')")
    with pytest.raises(papermill.PapermillExecutionError) as failure:
        papermill.execute_notebook(
            str(failing),
            str(tmp_path / "bad_out.ipynb"),
            engine_name=engine.engine_name(),
            progress_bar=False,
        )
    assert failure.value.ename == "KeyError" and "no such class" in failure.value.evalue
    assert failure.value.cell_index == 1
    after = _run(write_notebook(tmp_path / "c.ipynb", REPORT), tmp_path / "c_out.ipynb")
    assert after["pid"] != before["pid"], "a kernel that ran a failed notebook was reused"


def test_fresh_kernels_use_papermills_nbclient_engine_with_code_cell_saves(monkeypatch):
    from papermill.engines import NBClientEngine, papermill_engines

    monkeypatch.setenv("IMGCLS_WARM_KERNEL", "0")
    assert engine.engine_name() == engine.FRESH_ENGINE_NAME
    fresh = papermill_engines.get_engine(engine.FRESH_ENGINE_NAME)
    assert issubclass(fresh, NBClientEngine) and not issubclass(fresh, engine.WarmKernelEngine)
    monkeypatch.setenv("IMGCLS_WARM_KERNEL", "1")
    assert engine.engine_name() == engine.ENGINE_NAME


def _mixed_notebook(path: Path, *code: str) -> Path:
    """A notebook alternating Markdown and the given code cells."""
    nb = nbformat.read(write_notebook(path, *code), as_version=4)
    cells = []
    for cell in nb.cells:
        cells += [nbformat.v4.new_markdown_cell("Some words."), cell]
    nb.cells = cells
    nbformat.write(nb, path)
    return path


@pytest.mark.parametrize("warm_kernel", ["1", "0"], ids=["warm", "fresh"])
def test_the_output_notebook_is_written_after_each_code_cell_and_no_more(
    tmp_path, monkeypatch, warm_kernel
):
    """While a later cell runs, the file on disk already holds every finished cell's outputs;
    writes: one at the start, one per code cell, one at the end (papermill: 2 per cell + 2)."""
    import papermill.engines

    monkeypatch.setenv("IMGCLS_WARM_KERNEL", warm_kernel)
    writes = []
    real_write = papermill.engines.write_ipynb

    def counting_write(nb, path):
        writes.append(path)
        real_write(nb, path)

    monkeypatch.setattr(papermill.engines, "write_ipynb", counting_write)
    source = _mixed_notebook(
        tmp_path / "in.ipynb", "print('first done')", "import time\ntime.sleep(6)", "print(3)"
    )
    output = tmp_path / "out.ipynb"
    seen: dict[str, str] = {}

    def look_while_the_sleep_runs():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "first done" not in seen.get("text", ""):
            time.sleep(0.2)
            if output.is_file():
                with contextlib.suppress(OSError, ValueError):
                    seen["text"] = output.read_text()
        seen["at"] = time.monotonic()

    watcher = threading.Thread(target=look_while_the_sleep_runs, daemon=True)
    watcher.start()
    papermill.execute_notebook(
        str(source), str(output), engine_name=engine.engine_name(), progress_bar=False
    )
    finished = time.monotonic()
    watcher.join(timeout=5)
    engine.shutdown_kernel()
    assert "first done" in seen.get("text", ""), "the first cell's output never reached the disk"
    assert seen["at"] < finished - 3, "it reached the disk only at the end, not before the sleep"
    assert len(writes) == 3 + 2, writes
    cells = nbformat.read(output, as_version=4).cells
    assert [c.metadata.papermill["status"] for c in cells] == ["completed"] * len(cells)
    assert cells[-1].outputs[0]["text"] == "3\n"


def test_a_kernel_too_busy_to_answer_its_heartbeat_is_not_taken_for_dead(warm):
    """On a loaded machine a kernel can miss its 1-second heartbeat while it starts; the reset
    client must wait for it (the process is alive), not fail the notebook with "Kernel died
    before replying to kernel_info"."""
    km = engine.warm_kernel()
    pid = engine._kernel_process(km).pid
    os.kill(pid, signal.SIGSTOP)  # the kernel answers nothing (heartbeat included) for 3 s
    resume = threading.Timer(3.0, os.kill, (pid, signal.SIGCONT))
    resume.start()
    try:
        engine.reset_namespace(km)  # the first reset connects its client and waits for ready
    finally:
        resume.join()
        os.kill(pid, signal.SIGCONT)
    assert engine._WARM["client"].is_alive()


SLOW_CELLS = (
    "import os, pathlib, time\n"
    "pathlib.Path(os.environ['IMGCLS_TEST_STARTED']).write_text(str(os.getpid()))\n"
    "time.sleep(20)",
    "import os, pathlib\npathlib.Path(os.environ['IMGCLS_TEST_FINISHED']).write_text('ran')",
)


@pytest.mark.parametrize("death", ["killed", "exits"])
@pytest.mark.parametrize("warm_kernel", ["1", "0"], ids=["warm", "fresh"])
def test_a_kernel_that_dies_in_a_cell_fails_the_notebook_instead_of_hanging(
    tmp_path, monkeypatch, warm_kernel, death
):
    """The kernel dies while a cell runs: killed from outside (out of memory, `kill -9`) or
    ending its own process (`os._exit` in a library). papermill's client must notice within
    nbclient's 1-s liveness poll. With the warm kernel's blocking client the runner waited for
    the reply forever."""
    monkeypatch.setenv("IMGCLS_WARM_KERNEL", warm_kernel)
    monkeypatch.setenv("IMGCLS_TEST_STARTED", str(tmp_path / "started"))
    monkeypatch.setenv("IMGCLS_TEST_FINISHED", str(tmp_path / "finished"))
    cells = SLOW_CELLS
    if death == "exits":  # the kernel's own process ends in the cell; nobody kills it
        cells = (SLOW_CELLS[0].replace("time.sleep(20)", "time.sleep(1)\nos._exit(3)"),)
        cells += SLOW_CELLS[1:]
    source = write_notebook(tmp_path / "slow.ipynb", *cells)

    def kill_kernel() -> None:
        marker = tmp_path / "started"
        deadline = time.monotonic() + 120
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if marker.exists() and death == "killed":
            time.sleep(0.5)
            os.kill(int(marker.read_text()), signal.SIGKILL)

    killer = threading.Thread(target=kill_kernel, daemon=True)
    killer.start()
    outcome: dict[str, BaseException] = {}

    def execute() -> None:
        try:
            papermill.execute_notebook(
                str(source),
                str(tmp_path / "out.ipynb"),
                engine_name=engine.engine_name(),
                progress_bar=False,
            )
        except BaseException as exc:  # handed to the test below
            outcome["error"] = exc

    # on a thread, so that a hang (what the blocking client did) fails the test, not CI
    runner = threading.Thread(target=execute, daemon=True)
    runner.start()
    runner.join(timeout=60)
    killer.join()
    hung = runner.is_alive()
    engine.shutdown_kernel()
    assert not hung, "papermill still waits for the killed kernel's reply after 60 s"
    assert re.search(r"(?i)dead|died", repr(outcome.get("error"))), outcome
    assert not (tmp_path / "finished").exists()
    # the next notebook gets a new kernel
    assert (
        _run(write_notebook(tmp_path / "b.ipynb", REPORT), tmp_path / "b_out.ipynb")["names"] == []
    )
    engine.shutdown_kernel()
