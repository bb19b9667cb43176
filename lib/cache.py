"""On-disk caches: decoded images and backbone features, written atomically.

JPEG decoding costs more than a small model's forward pass on a small CPU, so each split is
decoded and resized once per (data version, file list, image size) into a uint8 array. Every
cache file is written to a temporary name and renamed, so a killed process never leaves a
half-written file under the real name.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from lib import paths
from lib.config import stable_hash
from lib.data import ImageFolder


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` (.npy) through a temporary file and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            np.save(stream, array)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_rgb(path: str | Path, image_size: int) -> np.ndarray:
    """Decode one image to RGB, resize the short side and centre-crop to a square uint8 HWC array."""
    with Image.open(path) as img:
        rgb = img.convert("RGB")
        fitted = ImageOps.fit(rgb, (image_size, image_size), Image.Resampling.BILINEAR)
        return np.asarray(fitted, dtype=np.uint8)


def cached_array(
    kind: str, key: dict, build: Callable[[], np.ndarray], cache_root: Path | None = None
) -> tuple[np.ndarray, bool]:
    """Return ``(array, hit)``: load ``<cache>/<kind>/<hash(key)>.npy`` or build and store it."""
    folder = (cache_root or paths.cache_dir()) / kind
    path = folder / f"{stable_hash(key, 24)}.npy"
    if path.is_file():
        try:
            return np.load(path), True
        except (ValueError, OSError):
            path.unlink(missing_ok=True)  # unreadable: rebuild rather than fail or trust it
    array = build()
    atomic_save_npy(path, array)
    return array, False


def decoded_images(
    folder: ImageFolder, image_size: int, data_md5: str, progress: bool = False
) -> np.ndarray:
    """Return all images of a split as uint8 ``[N, 3, S, S]``, decoded once and cached."""
    key = {
        "data": data_md5,
        "root": folder.root.name,
        "files": stable_hash(folder.relpaths(), 32),
        "size": image_size,
    }

    def build() -> np.ndarray:
        items = folder.paths
        if progress:
            from tqdm import tqdm

            items = tqdm(
                items, desc=f"decode {folder.root.name} @{image_size}px", unit="img", mininterval=3
            )
        out = np.empty((len(folder), 3, image_size, image_size), dtype=np.uint8)
        for i, path in enumerate(items):
            out[i] = load_rgb(path, image_size).transpose(2, 0, 1)
        return out

    array, _ = cached_array("decoded", key, build)
    return array
