"""Validate and hash a dataset's files once per file version, on every usable core.

A file that read as an image (:func:`imgcls.data.images.read_for_checks`: every byte
entropy-decoded, JPEGs at 1/8 scale) is recorded in ``<cache>/validated/`` under its (relative
path, size, modification time in ns), the evidence DVC's state database uses too, and is not
decoded again by later scans (the runner, then notebooks 01, 02 and 03 each scan the data). The
same decode gives the file's 64-bit perceptual hash and that of its left-right mirror image
(:func:`phash_pair`, for the leakage audit of :mod:`imgcls.data.duplicates`), stored in the same
record, so one pass validates and hashes. A
changed or added file is validated again; a bad file is never recorded. Used by
:func:`imgcls.data.folders.scan_image_folder` and :func:`imgcls.data.duplicates.folder_hashes`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import PIL
from PIL import Image

from imgcls.core import paths
from imgcls.data import images

logger = logging.getLogger(__name__)

# A file modified this recently is validated but not recorded: a second write within the file
# system's timestamp resolution (2 s on FAT/exFAT drives) could keep the same size and mtime.
RACY_MTIME_SECONDS = 2.0

FileStamp = tuple[int, int]  # (size in bytes, modification time in ns), symbolic links followed
HashPair = tuple[int, int]  # (64-bit pHash, 64-bit pHash of the left-right mirrored image)
# (size in bytes, modification time in ns, pHash, pHash of the mirror image)
Checked = tuple[int, int, int, int]

HASH_SIZE = 8  # imagehash.phash(hash_size=8): 8x8 DCT coefficients -> 64 bits
# imagehash.phash resizes to hash_size * highfreq_factor (4) = 32 px; the validation decode keeps
# at least twice that (imgcls.data.images._VALIDATION_DRAFT = 64 px), so the LANCZOS resize
# still averages over several source pixels and the hash equals that of
# read_image(path, target_size=HASH_READ_SIZE).
HASH_READ_SIZE = 4 * HASH_SIZE
# Part of the reader identity: version 2 records also hold the mirror image's pHash ("mirror"),
# so a record written before it (no "mirror") is not reused: its files are hashed again.
RECORD_FORMAT = 2


class DecodeSink(Protocol):
    """Receives the images a validation pass decodes, so that nothing decodes them again.

    :class:`imgcls.data.primer.DecodePrimer` fills the model's decoded-image cache from them.
    """

    def start(self, files: list[Path]) -> None:
        """Called before the pass decodes anything, with the files it will decode, in order.

        Not called at all when the pass has nothing to decode (every file was recorded).
        """

    def add(self, index: int, path: Path, image: Image.Image) -> None:
        """Called from a decoding thread for ``files[index]`` once it read and hashed as an image.

        ``image`` is :func:`imgcls.data.images.read_for_checks`' upright RGB image (mode "RGB",
        any size); it must not be modified. Bad files are never added. An exception raised here
        fails the validation of the whole pass, so a sink keeps its own errors.
        """


def file_stamp(path: Path) -> FileStamp | None:
    """Return ``(size in bytes, modification time in ns)`` of ``path`` (links followed), or None.

    None when the file is gone. The evidence that a file is unchanged, as DVC's state database
    uses it.
    """
    try:
        info = path.stat()
    except OSError:  # gone since it was listed: validation reports it
        return None
    return info.st_size, info.st_mtime_ns


def relative_posix(root: Path, path: Path) -> str:
    """Return ``path.relative_to(root).as_posix()``, by string slicing when ``root`` is a prefix.

    Pathlib's version costs about 50 us a file (Python 3.11), which dominated re-checking an
    unchanged dataset. Raises ValueError when ``path`` is not under ``root``.
    """
    prefix, text = f"{root}{os.sep}", str(path)
    if text.startswith(prefix):
        return text[len(prefix) :].replace(os.sep, "/")
    return path.relative_to(root).as_posix()


def validation_record_file(folder: Path) -> Path:
    """Return the file that records the validated files of ``folder`` (it may not exist).

    ``<cache>/validated/<sha256 of the folder's resolved path, 24 hex>.json``.
    """
    digest = hashlib.sha256(str(Path(folder).resolve()).encode()).hexdigest()[:24]
    return paths.cache_dir() / "validated" / f"{digest}.json"


def _reader_identity() -> str:
    """What decides whether a file reads and how it hashes: other records are not reused."""
    return (
        f"pillow {PIL.__version__}; rules {images.READER_RULES}; "
        f"bomb limit {Image.MAX_IMAGE_PIXELS}; draft {images._VALIDATION_DRAFT}; "
        f"imagehash {importlib.metadata.version('ImageHash')} phash {HASH_SIZE}; "
        f"record {RECORD_FORMAT}"
    )


def phash_pair(img: Image.Image) -> HashPair:
    """Return the 64-bit pHashes of an RGB image and of its left-right mirror, as Python ints.

    ``imagehash.phash(hash_size=8)`` (bit 63 = first DCT bit): grayscale, LANCZOS resize to
    32x32, 2-D DCT, the 8x8 lowest frequencies compared with their median (see
    :mod:`imgcls.data.duplicates`). The grayscale 32x32 image is made once, as ImageHash makes it
    (``convert("L").resize((32, 32), LANCZOS)``; given that image, ImageHash's own convert and
    resize return a copy, so the first hash is exactly ``imagehash.phash(img)``), and the mirror
    hash is the pHash of that small image flipped left-right: one more 32x32 DCT, no second
    decode or resize. A mirrored copy of a photo differs from it in about half of its pHash bits
    (odd horizontal DCT frequencies change sign), so without the mirror hash it is not found.
    ImageHash (and its SciPy/PyWavelets imports) loads on first use: the served model imports
    this module through the decoded-image cache but never hashes.
    """
    import imagehash

    side = HASH_SIZE * 4  # imagehash.phash's highfreq_factor = 4
    small = img.convert("L").resize((side, side), Image.Resampling.LANCZOS)
    mirror = small.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return (
        int(str(imagehash.phash(small, hash_size=HASH_SIZE)), 16),
        int(str(imagehash.phash(mirror, hash_size=HASH_SIZE)), 16),
    )


def check_and_hash(
    path: Path, sink: DecodeSink | None = None, index: int = 0
) -> tuple[str | None, HashPair | None]:
    """Decode ``path`` once (:func:`imgcls.data.images.read_for_checks`); return (reason, hashes).

    ``(None, (pHash, mirror pHash))`` (:func:`phash_pair`) for a readable image,
    ``(reason, None)`` (one phrase naming the problem) for a file that cannot be used as an image.
    A readable image is also handed to ``sink`` as row ``index`` (:meth:`DecodeSink.add`).
    """
    try:
        img = images.read_for_checks(path)
    except images.ImageReadError as exc:
        return exc.reason, None
    hashes = phash_pair(img)
    if sink is not None:
        sink.add(index, path, img)
    return None, hashes


def load_checked(folder: Path) -> dict[str, Checked]:
    """Return ``relative path -> (size, mtime_ns, phash, mirror phash)`` of files checked before.

    Empty when nothing was recorded, the record is unreadable, or it was made by another reader
    (Pillow version, :data:`imgcls.data.images.READER_RULES`, decompression-bomb limit, the
    validation draft size, ImageHash version, :data:`RECORD_FORMAT`: a record from before the
    mirror hash is not reused, and one that lacks a file's mirror hash is unreadable).
    """
    record = validation_record_file(folder)
    try:
        document = json.loads(record.read_text())
        if document.get("reader") != _reader_identity():
            return {}
        hashes, mirrors = document["phash"], document["mirror"]
        return {
            rel: (int(size), int(mtime), int(hashes[rel], 16), int(mirrors[rel], 16))
            for rel, (size, mtime) in document["files"].items()
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def load_validated(folder: Path) -> dict[str, FileStamp]:
    """Return ``relative path -> (size, mtime_ns)`` of the files of ``folder`` validated before.

    The stamps of :func:`load_checked` (empty for a missing, unreadable or foreign record).
    """
    return {rel: (size, mtime) for rel, (size, mtime, _, _) in load_checked(folder).items()}


def save_checked(folder: Path, files: dict[str, Checked]) -> None:
    """Record ``relative path -> (size, mtime_ns, phash, mirror phash)`` for ``folder``.

    One JSON document: ``files`` maps each path to ``[size, mtime_ns]``, ``phash`` and
    ``mirror`` to its hash and its mirror image's hash as 16 hex digits. Written by :func:`write_record` (atomic; the last concurrent writer wins;
    an unwritable cache folder only means the files are checked again next time).
    """
    record = validation_record_file(folder)
    ordered = sorted(files.items())
    document = {
        "folder": str(Path(folder).resolve()),
        "reader": _reader_identity(),
        "files": {rel: [size, mtime] for rel, (size, mtime, _, _) in ordered},
        "phash": {rel: f"{value:016x}" for rel, (_, _, value, _) in ordered},
        "mirror": {rel: f"{value:016x}" for rel, (_, _, _, value) in ordered},
    }
    write_record(record, document)


def write_record(record: Path, document: dict) -> None:
    """Write a per-folder JSON record atomically (temporary file, then rename).

    The one writer of the records keyed by file version (validation here, perceptual hashes in
    :mod:`imgcls.data.duplicates`): a reader never sees half a record, the last of concurrent
    writers wins, records of folders that no longer exist are removed when a new record is
    first made, and a cache folder that cannot be written is not an error (the work is simply
    done again next time).
    """
    with contextlib.suppress(OSError):
        if not record.exists():
            _remove_orphan_records(record.parent)
        record.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=record.parent, prefix=f".{record.name}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "w") as stream:
                json.dump(document, stream, separators=(",", ":"))
            os.replace(tmp, record)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _remove_orphan_records(records: Path) -> None:
    """Delete the validation records of folders that no longer exist (e.g. old temp folders)."""
    for record in records.glob("*.json") if records.is_dir() else []:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):
            if not Path(json.loads(record.read_text())["folder"]).is_dir():
                record.unlink()


def _check_all(
    files: list[Path], sink: DecodeSink | None = None
) -> list[tuple[str | None, HashPair | None]]:
    """Validate and hash ``files`` on every usable core (Pillow decodes without the GIL), in order.

    With a ``sink``, :meth:`DecodeSink.start` is told the files first and each readable image is
    handed to it (row = its position in ``files``).
    """
    if sink is not None:
        sink.start(files)
    workers = min(images.usable_cores(), len(files))
    sinks, rows = [sink] * len(files), range(len(files))
    if workers <= 1:
        return list(map(check_and_hash, files, sinks, rows))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="validate") as pool:
        return list(pool.map(check_and_hash, files, sinks, rows))


def _check_new(
    folder: Path, candidates: list[Path], keep_others: bool, sink: DecodeSink | None = None
) -> tuple[dict[Path, str], dict[Path, HashPair]]:
    """Check the candidates not recorded; record the good ones; return (bad, hashes).

    The files decoded here (those not recorded) go to ``sink`` (:func:`_check_all`) as well.

    ``bad`` maps each unusable file to its reason, ``hashes`` each good file to its pHash pair
    (:func:`phash_pair`; from the record or from this decode). Good files modified more than :data:`RACY_MTIME_SECONDS`
    ago are recorded with the stamp taken before decoding (a file rewritten since then has
    another mtime). With ``keep_others`` the record keeps the entries of files that are not
    candidates (a caller that looks at part of the folder); without, it holds the candidates only.
    """
    known = load_checked(folder)
    not_before = time.time_ns() - int(RACY_MTIME_SECONDS * 1e9)
    stamps = {path: file_stamp(path) for path in candidates}
    relpaths = {path: relative_posix(folder, path) for path in candidates}
    hashes: dict[Path, HashPair] = {}
    todo = []
    for path in candidates:
        entry, stamp = known.get(relpaths[path]), stamps[path]
        if stamp is not None and entry is not None and entry[:2] == stamp:
            hashes[path] = (entry[2], entry[3])
        else:
            todo.append(path)
    bad = {}
    if todo:
        start = time.perf_counter()
        for path, (problem, value) in zip(todo, _check_all(todo, sink), strict=True):
            if problem or value is None:
                bad[path] = problem or "unreadable"
            else:
                hashes[path] = value
        logger.info(
            "validated and hashed %d file(s) of %s in %.2fs",
            len(todo),
            folder,
            time.perf_counter() - start,
        )
    good: dict[str, Checked] = {}
    if keep_others:
        listed = set(relpaths.values())
        good = {rel: entry for rel, entry in known.items() if rel not in listed}
    for path, value in hashes.items():
        stamp = stamps[path]
        if stamp is not None and stamp[1] < not_before:
            good[relpaths[path]] = (stamp[0], stamp[1], *value)
    if good != known:
        save_checked(folder, good)
    return bad, hashes


def validate_new_files(
    folder: Path, candidates: list[Path], sink: DecodeSink | None = None
) -> dict[Path, str]:
    """Validate (and hash) the candidates not recorded as validated; record the good ones.

    Returns ``path -> reason`` (one phrase from :func:`check_and_hash`) for every bad file; good
    files modified more than :data:`RACY_MTIME_SECONDS` ago are recorded with their pHash. The
    record then holds exactly the good candidates. The images decoded (candidates not recorded
    before) also go to ``sink`` when one is given (:class:`DecodeSink`).
    """
    return _check_new(folder, candidates, keep_others=False, sink=sink)[0]


def recorded_hashes(
    folder: Path, files: list[Path], sink: DecodeSink | None = None
) -> list[HashPair]:
    """Return the (pHash, mirror pHash) pair (:func:`phash_pair`) of each of ``files``, in order.

    Read from the validation record where a file's (relative path, size, mtime) match; the other
    files are validated and hashed in one decode each (on every usable core) and recorded, and
    the record keeps its entries of files not asked about; the images decoded go to ``sink``
    when one is given (:class:`DecodeSink`). Raises
    :class:`imgcls.data.images.ImageReadError` naming the first file that cannot be read.
    """
    folder = Path(folder)
    bad, hashes = _check_new(folder, files, keep_others=True, sink=sink)
    if bad:
        path, reason = next(iter(bad.items()))
        raise images.ImageReadError(str(path), reason)
    return [hashes[path] for path in files]
