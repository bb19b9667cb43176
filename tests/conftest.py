"""Fixtures: small generated image datasets (two learnable classes) and helpers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgcls.core import paths


def make_image(kind: str, rng: np.random.Generator, size: int = 48) -> Image.Image:
    """Return a synthetic photo-like image: 'sea' is blue with horizontal bands, 'forest' green."""
    base = np.zeros((size, size, 3), dtype=np.float32)
    rows = np.linspace(0, 6 * np.pi, size)[:, None]
    cols = np.linspace(0, 6 * np.pi, size)[None, :]
    if kind == "sea":
        base[..., 2] = 160 + 60 * np.sin(rows + rng.uniform(0, 6))
        base[..., 1] = 90 + 20 * rng.random((size, size))
        base[..., 0] = 30
    else:
        base[..., 1] = 120 + 60 * np.sin(cols * rng.uniform(0.5, 2))
        base[..., 0] = 40 + 30 * rng.random((size, size))
        base[..., 2] = 25
    base += rng.normal(0, 12, base.shape)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def write_dataset(root: Path, per_class: dict[str, int], seed: int = 0, size: int = 48) -> Path:
    """Write ``root/<class>/<i>.jpg`` images; return ``root``."""
    rng = np.random.default_rng(seed)
    for name, count in per_class.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            make_image(name, rng, size).save(root / name / f"{name}_{i:03d}.jpg", quality=90)
    return root


# The smallest grid that trains for real in seconds: a random ResNet18 on 32 px images.
TINY_GRID_DEFAULTS = """\
defaults:
  backbone: resnet18
  weights: none
  image_size: 32
  folds: 2
  epochs: 2
  batch_size: 8
"""


def write_notebook(path: Path, *sources: str) -> Path:
    """Write a notebook of code cells ``sources`` (kernelspec ``python3``) to ``path``."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.cells = [nbformat.v4.new_code_cell(source) for source in sources]
    nbformat.write(nb, path)
    return path


def write_tiny_data(root: Path) -> Path:
    """Write ``root/train`` (10 + 10 images) and ``root/test`` (4 + 4); return ``root``."""
    write_dataset(root / "train", {"forest": 10, "sea": 10}, seed=1)
    write_dataset(root / "test", {"forest": 4, "sea": 4}, seed=2)
    return root


@pytest.fixture()
def image_dataset(tmp_path: Path) -> Path:
    """A dataset root with train (12+12) and test (4+4) generated images."""
    write_dataset(tmp_path / "data" / "train", {"forest": 12, "sea": 12}, seed=1)
    write_dataset(tmp_path / "data" / "test", {"forest": 4, "sea": 4}, seed=2)
    return tmp_path / "data"


@pytest.fixture()
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the decoded-image and feature caches at a temporary folder."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("IMGCLS_CACHE_DIR", str(cache))
    return cache


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The DVC dataset in data/ (``make setup`` pulls it); skip the test when absent."""
    root = paths.data_dir()
    if not (root / "train").is_dir():
        if os.environ.get("CI"):
            pytest.fail("real dataset missing in CI: `make setup` must `dvc pull` it")
        pytest.skip("real dataset not present: run `dvc pull`")
    return root
