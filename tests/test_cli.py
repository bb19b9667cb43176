"""The command lines: ``run_experiments.py`` (a shim) and the ``imgcls-run`` console script agree."""

from __future__ import annotations

import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from imgcls.core import paths

SCRIPTS = tomllib.loads((paths.REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def _console_script(tmp_path: Path, name: str) -> Path:
    """Write the wrapper pip writes for a ``[project.scripts]`` entry (pip's ``ScriptMaker``)."""
    module, _, function = SCRIPTS[name].partition(":")
    script = tmp_path / name
    script.write_text(
        f"import sys\nfrom {module} import {function}\n"
        f"if __name__ == '__main__':\n    sys.exit({function}())\n"
    )
    return script


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_console_scripts_name_a_main_that_returns_an_exit_code(name):
    module, _, function = SCRIPTS[name].partition(":")
    main = getattr(importlib.import_module(module), function)
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0


def test_shim_and_console_script_give_the_same_exit_code_and_error_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("strategies:\n  s:\n    lr: -1\n")
    script = _console_script(tmp_path, "imgcls-run")
    for args, expected in [
        (["--workers", "0"], "error: --workers 0: must be >= 1 (see --help)"),
        (["--grid", str(bad)], f"error: {bad}:"),  # then the grid file's own message
    ]:
        shim, console = (
            subprocess.run(
                [sys.executable, str(program), *args],
                capture_output=True,
                text=True,
                timeout=120,
                cwd=tmp_path,
            )
            for program in (paths.REPO_ROOT / "run_experiments.py", script)
        )
        assert (shim.returncode, shim.stderr, shim.stdout) == (
            console.returncode,
            console.stderr,
            console.stdout,
        )
        assert shim.returncode == 2 and shim.stdout == ""
        assert shim.stderr.startswith(expected) and shim.stderr.count("\n") == 1, shim.stderr
