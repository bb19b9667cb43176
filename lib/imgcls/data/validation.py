"""Validate a dataset's files once per file version, on every usable core.

A file that read as an image (:func:`imgcls.data.images.check_image`: every byte entropy-decoded, JPEGs
at 1/8 scale) is recorded in ``<cache>/validated/`` under its (relative path, size, modification
time in ns), the evidence DVC's state database uses too, and is not decoded again by later scans
(the runner, then notebooks 01, 02 and 03 each scan the data). A changed or added file is
validated again; a bad file is never recorded. Used by :func:`imgcls.data.folders.scan_image_folder`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import PIL
from PIL import Image

from imgcls.core import paths
from imgcls.data import images

# A file modified this recently is validated but not recorded: a second write within the file
# system's timestamp resolution (2 s on FAT/exFAT drives) could keep the same size and mtime.
RACY_MTIME_SECONDS = 2.0

FileStamp = tuple[int, int]  # (size in bytes, modification time in ns), symbolic links followed


def _file_stamp(path: Path) -> FileStamp | None:
    try:
        info = path.stat()
    except OSError:  # gone since it was listed: validation reports it
        return None
    return info.st_size, info.st_mtime_ns


def validation_record_file(folder: Path) -> Path:
    """Return the file that records the validated files of ``folder`` (it may not exist).

    ``<cache>/validated/<sha256 of the folder's resolved path, 24 hex>.json``.
    """
    digest = hashlib.sha256(str(Path(folder).resolve()).encode()).hexdigest()[:24]
    return paths.cache_dir() / "validated" / f"{digest}.json"


def _reader_identity() -> str:
    """What decides whether a file reads: records made under another reader are not reused."""
    return (
        f"pillow {PIL.__version__}; rules {images.READER_RULES}; "
        f"bomb limit {Image.MAX_IMAGE_PIXELS}"
    )


def load_validated(folder: Path) -> dict[str, FileStamp]:
    """Return ``relative path -> (size, mtime_ns)`` of the files of ``folder`` validated before.

    Empty when nothing was recorded, the record is unreadable, or it was made by another reader
    (Pillow version, :data:`imgcls.data.images.READER_RULES`, decompression-bomb limit).
    """
    record = validation_record_file(folder)
    try:
        document = json.loads(record.read_text())
        if document.get("reader") != _reader_identity():
            return {}
        return {rel: (int(size), int(mtime)) for rel, (size, mtime) in document["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def save_validated(folder: Path, files: dict[str, FileStamp]) -> None:
    """Record ``relative path -> (size, mtime_ns)`` as the validated files of ``folder``.

    Written to a temporary file and renamed, so a reader never sees half a record; concurrent
    writers of the same folder each write a complete record (the last one wins). A cache folder
    that cannot be written only means the files are validated again next time.
    """
    record = validation_record_file(folder)
    document = {
        "folder": str(Path(folder).resolve()),
        "reader": _reader_identity(),
        "files": {rel: list(stamp) for rel, stamp in sorted(files.items())},
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


def _validate_all(files: list[Path]) -> list[str | None]:
    """Validate ``files`` on every usable core (Pillow decodes without the GIL), in order."""
    workers = min(images.usable_cores(), len(files))
    if workers <= 1:
        return [images.check_image(path) for path in files]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="validate") as pool:
        return list(pool.map(images.check_image, files))


def validate_new_files(folder: Path, candidates: list[Path]) -> dict[Path, str]:
    """Validate the candidates not recorded as validated; record the good ones.

    Returns ``path -> reason`` (one phrase from :func:`imgcls.data.images.check_image`) for every bad
    file; good files modified more than :data:`RACY_MTIME_SECONDS` ago are recorded.
    """
    known = load_validated(folder)
    not_before = time.time_ns() - int(RACY_MTIME_SECONDS * 1e9)
    stamps = {path: _file_stamp(path) for path in candidates}
    relpaths = {path: path.relative_to(folder).as_posix() for path in candidates}
    todo = [
        path
        for path in candidates
        if stamps[path] is None or known.get(relpaths[path]) != stamps[path]
    ]
    bad = {}
    for path, problem in zip(todo, _validate_all(todo), strict=True):
        if problem:
            bad[path] = problem
    # the stamp taken before decoding: a file rewritten since then has another mtime
    good = {
        relpaths[path]: stamps[path]
        for path in candidates
        if path not in bad and (stamp := stamps[path]) is not None and stamp[1] < not_before
    }
    if good != known:
        save_validated(folder, good)
    return bad
