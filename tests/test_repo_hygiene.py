"""The repository stays clean: notebooks without outputs, consistent pins, no credentials."""

from __future__ import annotations

import json
import os
import re
import subprocess
import tomllib

import pytest
import yaml

from imgcls.core import paths
from imgcls.pipeline.notebooks import NOTEBOOK_NAMES

ROOT = paths.REPO_ROOT


@pytest.mark.parametrize("name", NOTEBOOK_NAMES)
def test_notebooks_are_committed_clean(name):
    nb = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    code_cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(c["outputs"] == [] and c["execution_count"] is None for c in code_cells), (
        f"{name}: strip outputs before committing (Jupyter: Edit > Clear Outputs of All Cells)"
    )
    tagged = [c for c in code_cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{name}: exactly one cell tagged 'parameters'"


def _pins(lines):
    return {
        line.split("==")[0].strip().lower(): line.split("==")[1].strip()
        for line in lines
        if isinstance(line, str) and "==" in line and not line.strip().startswith("#")
    }


def test_pins_live_in_the_requirements_files_only():
    requirements = _pins((ROOT / "requirements.txt").read_text().splitlines())
    dev = _pins((ROOT / "requirements-dev.txt").read_text().splitlines())
    assert requirements["torch"] == "2.14.1" and requirements["torchvision"] == "0.29.1"
    assert {"pydantic", "jinja2", "mlflow"} <= {name.lower() for name in requirements}
    assert not set(requirements) & set(dev), "a package pinned in both requirement files"
    assert all(re.fullmatch(r"[\w.+-]+", v) for v in {**requirements, **dev}.values())
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert pip_section == ["-r requirements.txt", "-r requirements-dev.txt", "-e ."]
    assert "python=3.11" in env["dependencies"]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    dynamic = pyproject["tool"]["setuptools"]["dynamic"]
    assert dynamic["dependencies"] == {"file": ["requirements.txt"]}
    assert dynamic["optional-dependencies"]["dev"] == {"file": ["requirements-dev.txt"]}
    for name in ("pyproject.toml", "environment.yml", "Makefile"):
        text = (ROOT / name).read_text()
        repeated = [
            pkg for pkg, version in {**requirements, **dev}.items() if f"{pkg}=={version}" in text
        ]
        assert not repeated, (
            f"{name} repeats the pins of {repeated}; keep them in requirements*.txt"
        )


def _tracked_files():
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    return [ROOT / f for f in out.stdout.splitlines() if (ROOT / f).is_file()]


SECRET_PATTERNS = [
    re.compile(r"-----BEGIN (RSA |EC |OPENSSH |DSA )?PRIVATE KEY-----"),
    re.compile(r'"type"\s*:\s*"service_account"'),
    re.compile(r'"private_key"\s*:\s*"'),
    re.compile(r"AKIA[0-9A-Z]{16}"),
    re.compile(r"(?i)(secret_access_key|gdrive_client_secret)\s*=\s*\S+"),
]


def test_no_credentials_in_tracked_files():
    offenders = []
    for path in _tracked_files():
        if path.name == "test_repo_hygiene.py":
            continue
        text = path.read_text(errors="ignore")
        offenders += [f"{path}: {p.pattern}" for p in SECRET_PATTERNS if p.search(text)]
    assert not offenders


def test_generated_and_secret_paths_are_ignored():
    probes = [
        "data/train/x.jpg",
        "mlflow.db",
        "mlartifacts/1/a",
        ".cache/features/a.npy",
        "reports/index.html",
        ".venv/bin/python",
        ".dvc/config.local",
        "gcp-credentials.json",
        "my-service-account.json",
        "id.pem",
    ]
    out = subprocess.run(["git", "check-ignore", *probes], cwd=ROOT, capture_output=True, text=True)
    assert sorted(out.stdout.split()) == sorted(probes)


def test_no_images_or_large_files_tracked():
    for path in _tracked_files():
        assert path.suffix.lower() not in {".jpg", ".jpeg", ".png", ".db", ".pt", ".pth", ".npy"}, (
            path
        )
        assert path.stat().st_size < 1_000_000, path


def test_importing_the_package_changes_no_environment_variable():
    import sys

    package = paths.REPO_ROOT / "lib" / "imgcls"
    modules = sorted(
        ".".join(("imgcls", *p.relative_to(package).with_suffix("").parts)).removesuffix(
            ".__init__"
        )
        for p in package.rglob("*.py")
    )
    script = (
        "import importlib, json, os\n"
        "import matplotlib, mlflow, pandas, papermill, sklearn, timm, torch, torchvision\n"
        "before = dict(os.environ)  # after the libraries: only our own changes count\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "changed = {k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)}\n"
        "print(json.dumps(sorted(changed)))\n"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_HTTP")}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=clean, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_notebooks_are_valid_nbformat_with_cell_ids():
    import warnings

    import nbformat

    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # MissingIDFieldWarning: a cell added without an id
            nb = nbformat.read(path, as_version=4)
            nbformat.validate(nb)
        ids = [cell.id for cell in nb.cells]
        assert len(set(ids)) == len(ids), f"{path.name}: duplicate cell ids"
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{path.name}: needs exactly one 'parameters' cell"


def _ignored(path: str) -> bool:
    """True for a path git ignores: an output a command writes (benchmarks/results/...)."""
    # a trailing "/" lets a directory pattern (benchmarks/results/) match a folder not yet made
    candidates = (path, f"{path}/")
    return any(
        subprocess.run(["git", "check-ignore", "-q", "--no-index", c], cwd=ROOT).returncode == 0
        for c in candidates
    )


def test_every_repository_path_named_in_the_docs_exists():
    """README, docs, the grid file and the Makefile name files (lib/imgcls/..., notebooks/...,
    benchmarks/...); a module moved in a restructure must not leave a stale pointer behind."""
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    texts = [
        ROOT / name
        for name in tracked
        if name.endswith((".md", ".yaml", ".yml")) or name in ("Makefile", "pyproject.toml")
    ]
    # a repository-relative path (not /usr/lib/...), without placeholders such as NAME or
    # <date> that stand for a user's value
    pattern = re.compile(
        r"(?<![\w/.])((?:lib|notebooks|benchmarks|tests|docs|\.github)/[\w./-]*\w)"
    )
    missing = set()
    for text in texts:
        content = text.read_text(encoding="utf-8")
        for match in pattern.finditer(content):
            found = match.group(1)
            placeholder = any(part.isupper() for part in re.split(r"[/.]", found)) or content[
                match.end() : match.end() + 2
            ].startswith(("<", "-<"))
            if not placeholder and not (ROOT / found).exists() and not _ignored(found):
                missing.add(f"{text.relative_to(ROOT)}: {found}")
    assert not missing, "paths named in the docs that do not exist:\n" + "\n".join(sorted(missing))
