"""One decode per photo: the validation pass fills the decoded-image cache.

Validation reads every new file anyway (:func:`imgcls.data.images.read_for_checks`, JPEGs at 1/8
DCT scale), and for a large photo that is the same decode the model's input starts from: a
12-megapixel JPEG for a model of up to 189 px is decoded at 1/8 both ways. A
:class:`DecodePrimer`, given to the validation pass as its sink
(:class:`imgcls.data.validation.DecodeSink`), fits each photo to the model's input from that
decode (:func:`imgcls.data.images.load_rgb_reusing`; files that the model decodes at another
scale are read again there) and writes the rows that :class:`imgcls.data.cache.DecodedImages`
would have decoded later, into the same cache entry. The runner's plan uses it
(:func:`imgcls.pipeline.plan.build_plan`); notebooks 02 and 03 then find their splits decoded.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from imgcls.core import paths
from imgcls.data.arrays import NpyStream
from imgcls.data.cache import cache_file, decoded_key, load_cached
from imgcls.data.folders import ImageFolder
from imgcls.data.images import load_rgb_reusing
from imgcls.data.validation import RACY_MTIME_SECONDS, FileStamp, file_stamp

logger = logging.getLogger(__name__)


class DecodePrimer:
    """Writes a split's decoded-image cache entries from the images its validation pass decodes.

    Pass a primer as the ``sink`` of :func:`imgcls.data.folders.scan_image_folder` (or
    :func:`imgcls.data.duplicates.folder_hashes`); once the data version is known, call
    :meth:`publish` (after :meth:`ready`), or :meth:`discard`. Rows are streamed from the
    validation threads into one temporary ``.npy`` per image size (uint8 ``[N, 3, S, S]``,
    never all in memory) in the cache's ``decoded/`` folder; a killed process leaves only such a
    temporary file, which the next run removes.

    A primer publishes only what :class:`~imgcls.data.cache.DecodedImages` would have built:
    every file of the final split decoded in the split's order, and none of them changed (size
    and modification time in ns) between the moment before its decode and :meth:`publish`. A
    pass that decoded part of the split (some files were recorded as validated before), left
    out a bad file, saw a file change, or could not write is discarded, and the split is decoded
    later as before. Nothing here raises into the validation pass: a failure is logged once.
    """

    def __init__(self, image_sizes: Iterable[int]):
        self.sizes = tuple(sorted({int(size) for size in image_sizes}))
        self._streams: dict[int, NpyStream] = {}
        self._files: list[Path] = []
        self._stamps: list[FileStamp | None] = []
        self._made: list[Path] = []
        self._not_before = 0
        self._rows = 0
        self._problem: str | None = None
        self._lock = threading.Lock()

    def start(self, files: list[Path]) -> None:
        """Stamp ``files`` and open one temporary ``[len(files), 3, S, S]`` uint8 file per size."""
        self.discard()
        self._files, self._rows, self._problem = list(files), 0, None
        if not self.sizes:
            return
        # A file written within the timestamp resolution before now could be rewritten again
        # with the same stamp (imgcls.data.validation.RACY_MTIME_SECONDS): not trusted.
        self._not_before = time.time_ns() - int(RACY_MTIME_SECONDS * 1e9)
        self._stamps = [file_stamp(path) for path in self._files]
        folder = paths.cache_dir() / "decoded"
        self._made = [path for path in (folder.parent, folder) if not path.exists()]
        try:
            for size in self.sizes:
                shape = (len(files), 3, size, size)
                self._streams[size] = NpyStream(folder / f"primed-{size}px.npy", shape, np.uint8)
        except Exception as exc:  # disk full, unwritable cache: the split is decoded later
            self._fail(exc)

    def add(self, index: int, path: Path, image: Image.Image) -> None:
        """Write ``files[index]``'s model input, uint8 ``[3, S, S]``, at every image size S.

        Called from a validation thread with the upright RGB image validation decoded. Any
        error (disk full, the file changed and no longer reads) is kept, not raised.
        """
        if self._problem is not None or not self._streams:
            return
        try:
            for size, stream in self._streams.items():
                stream.write(index, load_rgb_reusing(path, image, size).transpose(2, 0, 1)[None])
        except Exception as exc:  # the validation pass must not fail because of the cache
            self._fail(exc)
            return
        with self._lock:
            self._rows += 1

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            if self._problem is None:
                self._problem = str(exc) or type(exc).__name__
                logger.warning("decoded-image cache not filled by validation: %s", self._problem)

    def ready(self, folder: ImageFolder) -> bool:
        """Return whether the pass decoded exactly ``folder.paths``, every row written unchanged.

        False also without image sizes, after a failure, or when a file's (size, mtime_ns) now
        differs from its stamp before the decode or lies within
        :data:`imgcls.data.validation.RACY_MTIME_SECONDS` of the pass.
        """
        if not self._streams or self._problem is not None or self._rows != len(self._files):
            return False
        if self._files != folder.paths:
            return False
        stamps = [file_stamp(path) for path in self._files]
        return stamps == self._stamps and all(
            stamp is not None and stamp[1] < self._not_before for stamp in stamps
        )

    def publish(self, folder: ImageFolder, data_md5: str) -> list[Path]:
        """Rename the finished files onto ``folder``'s decoded-image cache entries; return them.

        ``data_md5`` is the data version the split's reader keys it by
        (:func:`imgcls.data.cache.decoded_key`). Returns the cache files written: none unless
        :meth:`ready`, and none for a size whose entry already exists (it is not replaced). The
        temporary files are removed either way; an OSError renaming them is logged, not raised.
        """
        written = []
        try:
            complete = self.ready(folder)
            for size, stream in self._streams.items():
                target = cache_file("decoded", decoded_key(folder, size, data_md5))
                if complete and load_cached(target) is None:
                    stream.publish(target)
                    written.append(target)
        except OSError as exc:
            logger.warning("decoded-image cache not filled by validation: %s", exc)
        finally:
            self.discard()
        return written

    def discard(self) -> None:
        """Remove the temporary files not published; safe to call more than once.

        The cache folders :meth:`start` created are removed again when they are left empty, so
        a run that stops at a bad file leaves no trace in the cache (``tests/test_faults.py``).
        """
        for stream in self._streams.values():
            stream.discard()
        self._streams = {}
        for path in reversed(self._made):
            with contextlib.suppress(OSError):  # not empty (or already gone): kept
                path.rmdir()
        self._made = []

    def __enter__(self) -> DecodePrimer:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self.discard()
