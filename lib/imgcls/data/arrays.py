"""Row-streamed ``.npy`` files: written row by row, published atomically, read in row batches.

A split's decoded images (uint8 ``[N, 3, S, S]``, 77 kB a row at 160 px) and its features
(float32 ``[N, F]``) never sit whole in a process's memory:

* :class:`NpyStream` writes rows with ``os.pwrite`` into a temporary ``.npy`` file next to the
  final one (header and size laid out by ``numpy.lib.format.open_memmap``) and renames it onto
  the final name when every row is there, so the final name only ever holds a complete file.
* Readers get a read-only ``np.memmap`` (``np.load(..., mmap_mode="r")``), and copy the rows of
  one batch with :func:`take_rows`, which then drops the pages from the process's mapping
  (``madvise(MADV_DONTNEED)``): the data stays in the kernel's page cache, shared by every
  process reading the file and reclaimable, but is not counted in this process's resident set.
  Without that, every page a training epoch touches would stay mapped and the resident set would
  grow to the file's size (Linux counts mapped file pages in RSS, ``RssFile`` in
  ``/proc/<pid>/status``; proc(5)). Linux only.

A temporary file is named ``.<final>.<host>-<pid>.<random>.tmp``: a writer that dies by SIGKILL
leaves it behind, and :func:`writer_is_gone` tells the cache cleanup that its writer is dead.
Files of a writer that exits normally (Ctrl-C included) are removed at interpreter exit.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import mmap
import os
import re
import socket
import tempfile
import threading
from pathlib import Path

import numpy as np

_OPEN: set[Path] = set()  # temporary files of this process's unfinished streams
_OPEN_LOCK = threading.Lock()
_TAG = re.compile(r"\.([0-9a-f]{8})-(\d+)\.[^.]*\.tmp$")


def _host() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def writer_is_gone(path: Path) -> bool:
    """Return True when the temporary file ``path`` names a writer of this host that has exited.

    The name carries a hash of the host name and the writer's process id (see the module
    docstring); False for other names, other hosts' files and living (or reused) process ids.
    """
    match = _TAG.search(path.name)
    if not match or match.group(1) != _host():
        return False
    try:
        os.kill(int(match.group(2)), 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: the process exists under another user
        return False
    return False


@atexit.register
def _remove_unfinished() -> None:
    with _OPEN_LOCK:
        for path in list(_OPEN):
            path.unlink(missing_ok=True)
        _OPEN.clear()


# A forked child (multiprocessing's fork start method) must not remove its parent's files at exit.
os.register_at_fork(after_in_child=_OPEN.clear)


class NpyStream:
    """A ``.npy`` file at ``path`` of ``shape`` and ``dtype``, written in row blocks by any thread.

    Use as a context manager: leaving it with an exception removes the temporary file. Rows are
    written with :meth:`write` (thread-safe for disjoint rows); :attr:`array` is a read-only
    memory map of the temporary file where written rows can be read at once; :meth:`publish`
    renames the file onto ``path`` and returns it as a read-only memory map. Raises OSError
    naming the cache file when the disk is full or the folder is not writable.
    """

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype | type):
        self.path = path
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(dtype)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.{_host()}-{os.getpid()}.", suffix=".tmp"
        )
        os.close(handle)
        self.tmp = Path(name)
        with _OPEN_LOCK:
            _OPEN.add(self.tmp)
        try:
            # open_memmap writes the .npy header and sizes the file (sparse: no data written yet)
            layout = np.lib.format.open_memmap(self.tmp, "w+", self.dtype, self.shape)
            self.offset = int(layout.offset)
            del layout
            self._fd = os.open(self.tmp, os.O_RDWR)
            self.array = np.memmap(self.tmp, self.dtype, "r", self.offset, self.shape)
        except BaseException as exc:
            self.discard()
            raise _cache_error(exc, path) from exc

    def __enter__(self) -> NpyStream:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            self.discard()

    def write(self, start: int, rows: np.ndarray) -> None:
        """Write ``rows`` (shape ``[k, *shape[1:]]``, cast to the file's dtype) at row ``start``."""
        rows = np.ascontiguousarray(rows, dtype=self.dtype)  # one block: at most a batch of rows
        if rows.shape[1:] != self.shape[1:] or not 0 <= start <= self.shape[0] - len(rows):
            raise ValueError(
                f"{self.path}: rows {start}..{start + len(rows)} of shape {rows.shape} do not fit "
                f"an array of shape {self.shape}"
            )
        view = memoryview(rows.reshape(-1).view(np.uint8))
        position = self.offset + start * self.row_bytes
        try:
            while view:
                written = os.pwrite(self._fd, view, position)
                view, position = view[written:], position + written
        except OSError as exc:
            raise _cache_error(exc, self.path) from exc

    def publish(self, path: Path | None = None) -> np.memmap:
        """Rename the finished file onto ``path`` (default :attr:`path`); return it memory-mapped.

        ``path`` is for a stream whose final name was not known when it began (its key needed
        what the stream's own pass found); it should be in the same folder as :attr:`path`, so
        the rename stays atomic. The memory map is read-only.
        """
        if path is not None:
            self.path = path
        os.close(self._fd)
        self._fd = -1
        try:
            os.replace(self.tmp, self.path)
        except OSError as exc:
            self.discard()
            raise _cache_error(exc, self.path) from exc
        with _OPEN_LOCK:
            _OPEN.discard(self.tmp)
        return np.load(self.path, mmap_mode="r")

    def discard(self) -> None:
        """Remove the temporary file (the final name is never touched); safe to call twice."""
        if getattr(self, "_fd", -1) >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
        self.tmp.unlink(missing_ok=True)
        with _OPEN_LOCK:
            _OPEN.discard(self.tmp)


def _cache_error(exc: BaseException, path: Path) -> BaseException:
    if not isinstance(exc, OSError):
        return exc
    return OSError(
        exc.errno,
        f"{path}: cannot write the cache file ({exc.strerror or exc}); free disk space there or "
        "point IMGCLS_CACHE_DIR at a writable folder with room for it",
    )


PAIR_BLOCK = 1 << 22  # elements of one pairwise block: 32 MiB per 8-byte temporary


def rows_per_block(columns: int, elements: int = PAIR_BLOCK) -> int:
    """Return how many rows of a pairwise comparison against ``columns`` items to take at once.

    ``elements // columns``, at least 1: every ``[rows, columns]`` temporary of a blocked
    all-pairs search (near-duplicate hashes, embedding cosines) then holds about ``elements``
    values whatever the dataset's size. A fixed row count made them grow with N (2048 rows of
    int64 distances held +644 MB at 15,184 images, ~4 GB at 100,000).
    """
    return max(1, elements // max(1, columns))


def release(array: np.ndarray) -> None:
    """Drop the pages of ``array``'s memory map from this process (a no-op for other arrays).

    ``madvise(MADV_DONTNEED)`` over the whole mapping (madvise(2)): for a shared file mapping
    the data stays in the page cache and the next access maps it again; it costs about 2 us on
    a mapping with few resident pages.
    """
    base = array
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None)
    if base is not None and not base.closed:
        base.madvise(mmap.MADV_DONTNEED)


def take_rows(array: np.ndarray, rows: slice | np.ndarray) -> np.ndarray:
    """Return a new in-memory copy of ``array[rows]`` (rows: a slice or int64 indices ``[B]``).

    For a memory-mapped ``array`` the pages read are then dropped from this process's mapping
    (:func:`release`), so reading every row of a file batch by batch keeps the resident set at
    about one batch. The copy is C-contiguous and writable, whatever ``array`` is.
    """
    if isinstance(rows, slice):
        batch = np.array(array[rows], copy=True, order="C")
    else:
        batch = array[np.asarray(rows, dtype=np.int64)]  # integer indexing always copies
    release(array)
    return batch.view(np.ndarray) if isinstance(batch, np.memmap) else batch
