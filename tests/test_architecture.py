"""The package's layers: imports flow one way (README, "Architecture"), every module in a layer."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import imgcls
from imgcls import LAYERS

PACKAGE = Path(imgcls.__file__).parent


def _layer_of(module: str) -> str:
    """``imgcls.data.cache`` -> ``data``; ``imgcls.tracking`` -> ``tracking``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every ``imgcls...`` module imported anywhere in the file (lazy imports included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "imgcls":
                found += [(node.lineno, f"imgcls.{alias.name}") for alias in node.names]
            elif node.module.startswith("imgcls."):
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("imgcls.")]
    return found


def test_every_module_belongs_to_a_declared_layer():
    modules = sorted(PACKAGE.rglob("*.py"))
    assert modules
    for path in modules:
        relative = path.relative_to(PACKAGE)
        if relative == Path("__init__.py"):
            continue
        layer = relative.parts[0].removesuffix(".py")
        assert layer in LAYERS, f"{relative}: not in a layer of {LAYERS}"


def test_imports_flow_one_way():
    rank = {name: i for i, name in enumerate(LAYERS)}
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative == Path("__init__.py"):
            continue
        own = relative.parts[0].removesuffix(".py")
        for line, module in _imports(path):
            target = _layer_of(module)
            if target in rank and rank[target] > rank[own]:
                wrong.append(f"{relative}:{line} ({own}) imports {module} ({target})")
    assert not wrong, (
        "imports against the layer order " + " <- ".join(LAYERS) + ":\n" + "\n".join(wrong)
    )


def test_readme_architecture_section_lists_the_layers_in_order():
    readme = (PACKAGE.parents[1] / "README.md").read_text()
    section = readme.split("## Architecture", 1)[1].split("\n## ", 1)[0]
    block = section.split("```", 2)[1]
    drawn = [line.split()[0] for line in block.splitlines() if re.match(r"^[a-z]+\s{2,}\S", line)]
    assert tuple(drawn) == LAYERS, f"README draws {drawn}, the package declares {LAYERS}"


def test_every_layer_exists():
    for layer in LAYERS:
        assert (PACKAGE / layer).is_dir() or (PACKAGE / f"{layer}.py").is_file(), layer


# What the runner process may not import: it sits beside every kernel for the whole grid, so
# whatever it holds adds to the grid's peak memory (torch alone: ~490 MB of RSS, 1.8 s of start-up).
TRAINING_LIBRARIES = ("torch", "torchvision", "timm")
KERNEL_ONLY_MODULES = (*TRAINING_LIBRARIES, "matplotlib", "sklearn")


def test_runner_plans_a_grid_without_importing_training_libraries(tmp_path):
    """A dry run (plan, data scan, notebook checks, promotion plan) leaves torch & co. unloaded."""
    import json
    import os
    import subprocess
    import sys

    from imgcls.core import paths
    from tests.conftest import write_dataset

    write_dataset(tmp_path / "data" / "train", {"forest": 6, "sea": 6}, seed=1, size=32)
    write_dataset(tmp_path / "data" / "test", {"forest": 2, "sea": 2}, seed=2, size=32)
    script = (
        "import json, sys, contextlib, io\n"
        "import run_experiments\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    code = run_experiments.main(['--dry-run', '--data-dir', {str(tmp_path / 'data')!r},"
        f" '--tracking-uri', {'sqlite:///' + str(tmp_path / 'm.db')!r}])\n"
        "print(json.dumps([code, sorted({m.split('.')[0] for m in sys.modules})]))\n"
    )
    env = {**os.environ, "IMGCLS_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=paths.REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    code, loaded = json.loads(result.stdout.splitlines()[-1])
    assert code == 0, result.stderr[-3000:]
    assert not set(KERNEL_ONLY_MODULES) & set(loaded), (
        "the runner imported "
        f"{sorted(set(KERNEL_ONLY_MODULES) & set(loaded))}; run "
        "`python -X importtime run_experiments.py --dry-run` to find the import chain"
    )


def test_summary_page_and_selection_load_without_torch():
    """The runner renders the summary page and plans promotion: neither may pull torch in."""
    import json
    import subprocess
    import sys

    script = (
        "import json, sys\n"
        "import imgcls.selection.comparison, imgcls.selection.incumbent\n"
        "import imgcls.selection.promotion, imgcls.reporting.summary_page\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = set(json.loads(result.stdout.splitlines()[-1]))
    assert not loaded & set(TRAINING_LIBRARIES), sorted(loaded & set(TRAINING_LIBRARIES))
