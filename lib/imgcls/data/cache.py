"""On-disk caches: decoded images and backbone features, written atomically.

JPEG decoding costs more than a small model's forward pass on a small CPU, so each split is
decoded and resized once per (data version, file list, image size) into a uint8 array. Every
cache file is written to a temporary name and renamed, so a killed process never leaves a
half-written file under the real name.

Memory does not grow with the dataset: decoding streams rows into the cache file
(:class:`imgcls.data.arrays.NpyStream`), and cache files are returned as read-only memory maps,
read a batch of rows at a time with :func:`imgcls.data.arrays.take_rows`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from imgcls.core import paths
from imgcls.core.config import stable_hash
from imgcls.data.arrays import NpyStream, writer_is_gone
from imgcls.data.folders import ImageFolder
from imgcls.data.images import load_rgb, usable_cores

# Rows between two progress notifications to a consumer waiting in DecodedImages.wait_for.
_NOTIFY_EVERY = 16


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


def remove_stale_partial_files(
    max_age_seconds: float = 3600.0, cache_root: Path | None = None
) -> list[Path]:
    """Delete the ``.*.tmp`` files a killed writer left in the cache; return what was deleted.

    A temporary file whose writer process (named in the file name, see
    :func:`imgcls.data.arrays.writer_is_gone`) no longer exists is deleted at once; any other
    temporary file is deleted when older than ``max_age_seconds`` (its last write), since a
    living writer keeps writing to it. Younger files of living writers are left alone.
    """
    root = cache_root or paths.cache_dir()
    if not root.is_dir():
        return []
    removed = []
    cutoff = time.time() - max_age_seconds
    for path in root.glob("*/.*.tmp"):
        with contextlib.suppress(OSError):
            if writer_is_gone(path) or path.stat().st_mtime < cutoff:
                path.unlink()
                removed.append(path)
    return removed


def cache_file(kind: str, key: dict, cache_root: Path | None = None) -> Path:
    """Return the path of the cache entry ``<cache>/<kind>/<hash(key)>.npy`` (it may not exist)."""
    return (cache_root or paths.cache_dir()) / kind / f"{stable_hash(key, 24)}.npy"


def load_cached(path: Path) -> np.memmap | None:
    """Return the array at ``path`` as a read-only memory map, or None when missing or unreadable.

    Nothing is read but the header: ``np.load(mmap_mode="r")`` maps the file. A file shorter than
    its header says (truncated) or with a broken header raises ValueError there; such a file is
    removed, to be rebuilt rather than trusted.
    """
    if not path.is_file():
        return None
    try:
        return np.load(path, mmap_mode="r")
    except (ValueError, OSError):
        path.unlink(missing_ok=True)  # unreadable: rebuild rather than fail or trust it
        return None


def cached_array(
    kind: str, key: dict, build: Callable[[], np.ndarray], cache_root: Path | None = None
) -> tuple[np.ndarray, bool]:
    """Return ``(array, hit)``: load ``<cache>/<kind>/<hash(key)>.npy`` or build and store it.

    The array is the stored file as a read-only memory map (:func:`load_cached`), on a hit and on
    a miss alike. ``build`` returns the whole array in memory; for arrays that grow with the
    dataset write an :class:`~imgcls.data.arrays.NpyStream` instead.
    """
    path = cache_file(kind, key, cache_root)
    array = load_cached(path)
    if array is not None:
        return array, True
    built = build()
    atomic_save_npy(path, built)
    stored = load_cached(path)
    return (built if stored is None else stored), False


def decoded_key(folder: ImageFolder, image_size: int, data_md5: str) -> dict:
    """Return the cache key of a split's decoded images: data version, file list, image size."""
    return {
        "data": data_md5,
        "root": folder.root.name,
        "files": stable_hash(folder.relpaths(), 32),
        "size": image_size,
    }


def free_cores(device: str | None = None) -> int:
    """Return the usable cores the forward pass on ``device`` leaves free (may be 0 or less).

    Usable cores (the process's affinity mask, ``os.sched_getaffinity``) minus the CPU threads
    of the forward pass that consumes the images: torch's intra-op thread count when torch is
    loaded and the model runs on the CPU (``device`` None or ``"cpu"``), one thread (the one
    queueing the kernels) for a CUDA device.
    """
    torch = sys.modules.get("torch")
    if device is not None and str(device).startswith("cuda"):
        busy = 1
    else:
        busy = torch.get_num_threads() if torch is not None else 0
    return usable_cores() - busy


def decode_workers(device: str | None = None) -> int:
    """Return how many threads should decode images beside the forward pass: the free cores.

    :func:`free_cores`, at least 1. On the project's 2-core machine with torch on both cores
    this is 1; :func:`imgcls.modeling.features.cached_features` then decodes before the forward
    pass instead of beside it, on every core.
    """
    return max(1, free_cores(device))


class DecodedImages:
    """A split's images as uint8 ``[N, 3, S, S]``: from the cache, or decoded and then cached.

    On a cache miss a background thread hands the files to a pool of ``workers`` decoding
    threads (default :func:`decode_workers` for the ``device`` the images are for), each writing
    its rows straight into a temporary cache file (:class:`~imgcls.data.arrays.NpyStream`),
    which is renamed onto the cache entry when every row is done. Pillow releases the GIL while
    it decodes and resizes, so the threads run in parallel, and a consumer (the backbone's
    forward pass) can read the first rows of :attr:`array` (:meth:`wait_for`) while the rest are
    still being decoded. Row ``i`` is always ``folder.paths[i]``, and the array is the same
    whatever the number of workers. :attr:`array` is a read-only memory map: of the temporary
    file while decoding, of the cache entry once done; the images are never all in memory.
    """

    def __init__(
        self,
        folder: ImageFolder,
        image_size: int,
        data_md5: str,
        progress: bool = False,
        workers: int | None = None,
        device: str | None = None,
    ):
        self.workers = max(1, workers or decode_workers(device))
        self._path = cache_file("decoded", decoded_key(folder, image_size, data_md5))
        self._ready = threading.Condition()
        self._error: BaseException | None = None
        cached = load_cached(self._path)
        self.hit = cached is not None
        if cached is not None:
            self.array, self._done, self._thread = cached, len(cached), None
            return
        self._stream = NpyStream(self._path, (len(folder), 3, image_size, image_size), np.uint8)
        self.array: np.ndarray = self._stream.array
        self._done = 0
        desc = f"decode {folder.root.name} @{image_size}px" if progress else None
        self._thread = threading.Thread(
            target=self._decode, args=(folder.paths, image_size, desc), name="decode", daemon=True
        )
        self._thread.start()

    def _decode_row(self, index: int, path: Path, image_size: int) -> None:
        self._stream.write(index, load_rgb(path, image_size).transpose(2, 0, 1)[None])

    def _decode(self, files: list[Path], image_size: int, desc: str | None) -> None:
        pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="decode")
        try:
            # The pool takes rows in file order; results are collected in file order too, so
            # ``_done`` counts the leading rows that are complete and the first failing row in
            # file order is the error reported.
            size = [image_size] * len(files)
            done = pool.map(self._decode_row, range(len(files)), files, size)
            if desc:
                from tqdm import tqdm

                done = tqdm(done, total=len(files), desc=desc, unit="img", mininterval=3)
            for index, _ in enumerate(done):
                if (index + 1) % _NOTIFY_EVERY == 0 or index + 1 == len(files):
                    with self._ready:
                        self._done = index + 1
                        self._ready.notify_all()
            self.array = self._stream.publish()
        except BaseException as exc:  # handed to the consumer, which re-raises it
            # No worker may still write when the file is closed (its descriptor number could be
            # reused by another file); then the temporary file goes: the cache entry's name
            # never holds a partial file, and the next call decodes again.
            pool.shutdown(wait=True, cancel_futures=True)
            self._stream.discard()
            with self._ready:
                self._error = exc
                self._ready.notify_all()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def wait_for(self, rows: int) -> None:
        """Block until the first ``rows`` images are decoded; re-raise a decoding error."""
        with self._ready:
            self._ready.wait_for(lambda: self._done >= rows or self._error is not None)
        if self._error is not None:
            raise self._error

    def result(self) -> np.ndarray:
        """Return the whole array once every image is decoded and the cache file is written."""
        if self._thread is not None:
            self._thread.join()
        self.wait_for(len(self.array))
        return self.array


def decoded_images(
    folder: ImageFolder, image_size: int, data_md5: str, progress: bool = False
) -> np.ndarray:
    """Return all images of a split as uint8 ``[N, 3, S, S]``, decoded once and cached.

    The array is the cache file as a read-only memory map; read it in row batches with
    :func:`imgcls.data.arrays.take_rows`. Raises :class:`imgcls.data.images.ImageReadError` naming the first file (in file order) that cannot
    be read.
    """
    return DecodedImages(folder, image_size, data_md5, progress).result()
