"""Image-folder datasets: scanning, validation, data version and stratified folds.

Layout: ``<root>/<split>/<class>/<image>``. Classes are the sorted folder names of the split.

Validation is done once per file version: a file that read as an image is recorded in
``<cache>/validated/`` under its (relative path, size, modification time in ns), the evidence
DVC's state database uses too, and is not decoded again by later scans (the runner, then
notebooks 01, 02 and 03 each scan the data). A changed or added file is validated again; a bad
file is never recorded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL
import yaml
from PIL import Image

from lib import images, paths

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class DataError(ValueError):
    """The dataset is missing or invalid; the message names the path and the fix."""


@dataclass(frozen=True)
class BadImage:
    """A file that could not be used as an image, with the reason."""

    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass
class ImageFolder:
    """The images of one split: sorted class names, file paths and integer labels."""

    root: Path
    classes: list[str]
    paths: list[Path]
    labels: np.ndarray
    skipped: list[BadImage] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def class_counts(self) -> dict[str, int]:
        """Return the number of images per class name."""
        counts = np.bincount(self.labels, minlength=len(self.classes))
        return {c: int(n) for c, n in zip(self.classes, counts, strict=True)}

    def relpaths(self) -> list[str]:
        """Return the image paths relative to the split root, as POSIX strings."""
        return [p.relative_to(self.root).as_posix() for p in self.paths]


def require_split(split: str, root: Path | None = None) -> Path:
    """Return ``<data root>/<split>`` or raise a DataError that says how to fetch the data."""
    root = Path(root) if root else paths.data_dir()
    folder = root / split
    if not folder.is_dir():
        hint = (
            "fetch the dataset with `dvc pull` (or `make setup`)"
            if root == paths.data_dir()
            else "expected <root>/<split>/<class>/<images>"
        )
        raise DataError(f"{folder}: split folder not found; {hint}")
    return folder


def check_image(path: Path) -> BadImage | None:
    """Validate one file with :func:`lib.images.check_image`; return a BadImage or None.

    Every byte is read and entropy-decoded (JPEGs at 1/8 scale in the DCT), so truncated and
    corrupt files are found.
    """
    reason = images.check_image(path)
    return BadImage(path, reason) if reason else None


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
    (Pillow version, :data:`lib.images.READER_RULES`, decompression-bomb limit).
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


def _validate_all(files: list[Path]) -> list[BadImage | None]:
    """Validate ``files`` on every usable core (Pillow decodes without the GIL), in order."""
    workers = min(images.usable_cores(), len(files))
    if workers <= 1:
        return [check_image(path) for path in files]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="validate") as pool:
        return list(pool.map(check_image, files))


# OS metadata that is never part of a dataset (besides hidden names, which start with "."):
# Windows thumbnails and folder settings, and the resource-fork folder of macOS zip archives.
OS_METADATA_NAMES = frozenset({"thumbs.db", "desktop.ini", "__macosx"})


def is_ignored(name: str) -> bool:
    """Return whether a file or folder name is outside any dataset, by the one listing rule.

    Ignored: hidden names (starting with ``.``: ``.ipynb_checkpoints``, ``.DS_Store``, and macOS
    AppleDouble files ``._*``) and OS metadata (``Thumbs.db``, ``desktop.ini``, ``__MACOSX``,
    any case). A folder that is ignored hides everything inside it. ``.dvcignore`` holds the
    same patterns, so ``dvc add`` hashes exactly the files this rule lists.
    """
    return name.startswith(".") or name.lower() in OS_METADATA_NAMES


def dataset_files(root: str | Path) -> list[Path]:
    """List every file under ``root`` that belongs to the dataset, sorted by relative path.

    The one listing rule for train, test, ``--eval-dir``, the data version and predict:
    :func:`is_ignored` names are skipped at any depth, and symbolic links to files and folders
    are followed (the data version then hashes the content actually read). A link that points
    back into a folder being walked (a cycle) or that is broken raises a DataError naming it.
    Paths keep ``root`` as prefix (links are not resolved in the returned paths).
    """
    root = Path(root)
    found: list[Path] = []

    def walk(folder: Path, ancestors: frozenset[Path]) -> None:
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if is_ignored(entry.name):
                continue
            path = Path(entry.path)
            if entry.is_dir(follow_symlinks=True):
                real = path.resolve()
                if real in ancestors:
                    raise DataError(f"{path}: symbolic link loops back to {real}; remove the link")
                walk(path, ancestors | {real})
            elif entry.is_file(follow_symlinks=True):
                found.append(path)
            elif entry.is_symlink():
                raise DataError(
                    f"{path}: broken symbolic link (target {os.readlink(path)!r} not found); "
                    "remove it or restore its target"
                )

    walk(root, frozenset({root.resolve()}))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def scan_image_folder(
    folder: str | Path, validate: bool = True, skip_bad: bool = False
) -> ImageFolder:
    """Scan ``folder/<class>/*`` into an ImageFolder.

    When ``validate`` is true every file not validated before (see :func:`load_validated`) is
    read in full and entropy-decoded (:func:`check_image`, on all usable cores), and the files
    that read are recorded, so an unchanged data version is validated once. Bad files raise a
    DataError listing each path and reason, unless ``skip_bad`` is true, in which case they are
    left out and listed in ``ImageFolder.skipped``. An empty class, or fewer than two classes,
    is an error (DataError).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found")
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not is_ignored(p.name))
    if len(class_dirs) < 2:
        names = [p.name for p in class_dirs]
        raise DataError(
            f"{folder}: found {len(class_dirs)} class folder(s) {names}; a classifier needs at "
            "least two (one sub-folder per class)"
        )
    classes = [p.name for p in class_dirs]
    listed: list[tuple[Path, int]] = []
    problems: dict[Path, BadImage] = {}
    for label, class_dir in enumerate(class_dirs):
        for path in dataset_files(class_dir):
            listed.append((path, label))
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                problems[path] = BadImage(path, f"not an image file (extension {path.suffix!r})")
    if validate:
        problems.update(_validate_new_files(folder, [p for p, _ in listed if p not in problems]))
    files: list[Path] = []
    labels: list[int] = []
    bad: list[BadImage] = []
    for path, label in listed:
        if path in problems:
            bad.append(problems[path])
        else:
            files.append(path)
            labels.append(label)
    if bad and not skip_bad:
        listing = "\n  ".join(str(b) for b in bad[:20])
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise DataError(
            f"{folder}: {len(bad)} unusable file(s); fix or remove them, or skip them "
            f"explicitly (skip_bad_images=True / --skip-bad-images):\n  {listing}{more}"
        )
    result = ImageFolder(folder, classes, files, np.asarray(labels, dtype=np.int64), bad)
    empty = [c for c, n in result.class_counts().items() if n == 0]
    if empty:
        raise DataError(
            f"{folder}: class folder(s) {empty} contain no usable images; remove the folder "
            "or add images"
        )
    return result


def _validate_new_files(folder: Path, candidates: list[Path]) -> dict[Path, BadImage]:
    """Validate the candidates not recorded as validated; record the good ones; return the bad."""
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


def check_same_classes(reference: ImageFolder, other: ImageFolder) -> None:
    """Raise a DataError when two splits do not have exactly the same class names."""
    if reference.classes != other.classes:
        only_ref = sorted(set(reference.classes) - set(other.classes))
        only_other = sorted(set(other.classes) - set(reference.classes))
        raise DataError(
            f"{other.root}: classes {other.classes} differ from {reference.root}: "
            f"{reference.classes} (missing: {only_ref}, unexpected: {only_other})"
        )


def file_md5(path: Path) -> str:
    """Return the md5 hex digest of a file's bytes."""
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def directory_md5(root: str | Path) -> str:
    """Return the DVC 3 directory hash (``<md5>.dir``) of every file under ``root``.

    DVC hashes a directory as the md5 of the JSON list of ``{"md5", "relpath"}`` entries sorted
    by relative path, so this equals the md5 recorded in ``data.dvc`` for the same content.
    """
    root = Path(root)
    entries = [
        {"md5": file_md5(p), "relpath": p.relative_to(root).as_posix()} for p in dataset_files(root)
    ]
    return hashlib.md5(json.dumps(entries).encode()).hexdigest() + ".dir"


def expected_data_md5(dvc_file: Path | None = None) -> str | None:
    """Return the md5 that ``data.dvc`` records for ``data/``, or None if there is no pointer."""
    dvc_file = dvc_file or paths.data_dvc_file()
    if not dvc_file.is_file():
        return None
    document = yaml.safe_load(dvc_file.read_text())
    outs = document.get("outs") or []
    return str(outs[0]["md5"]) if outs else None


_VERSION_CACHE: dict[tuple[str, str], str] = {}


def listing_stamp(root: Path) -> str:
    """Return a digest of (relative path, size, modification time) of every dataset file.

    Stat follows symbolic links, so replacing the file behind a link changes the stamp. This is
    the same evidence DVC's own state database uses to decide that a file is unchanged.
    """
    digest = hashlib.md5()
    for path in dataset_files(root):
        info = path.stat()
        digest.update(
            f"{path.relative_to(root).as_posix()}\0{info.st_size}\0{info.st_mtime_ns}\n".encode()
        )
    return digest.hexdigest()


def data_version(root: str | Path | None = None) -> str:
    """Return the data version (DVC directory md5) of a dataset root.

    For the project's ``data/`` the actual content is hashed and compared with ``data.dvc``;
    a difference is warned about and the real hash is returned (and so recorded in MLflow).
    """
    root = Path(root) if root else paths.data_dir()
    if not root.is_dir():
        raise DataError(f"{root}: dataset not found; fetch it with `dvc pull` (or `make setup`)")
    key = (str(root.resolve()), listing_stamp(root))
    if key not in _VERSION_CACHE:
        _VERSION_CACHE[key] = directory_md5(root)
    actual = _VERSION_CACHE[key]
    if root.resolve() == paths.data_dir().resolve():
        expected = expected_data_md5()
        if expected and expected != actual:
            warnings.warn(
                f"{root}: content hash {actual} differs from data.dvc ({expected}); "
                "recording the real hash. Run `dvc status` / `dvc checkout` to compare.",
                stacklevel=2,
            )
    return actual


def assign_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Return a fold index per sample: stratified, shuffled with ``seed``, reproducible.

    Each class's samples are shuffled and dealt to the folds in turn, continuing where the
    previous class stopped, so every fold holds each class to within one sample and the fold
    sizes differ by at most one. The same labels (the sorted file list of a data version), k and
    seed always give the same assignment, so every strategy is compared on identical splits.
    (Plain numpy: importing scikit-learn for this cost 2.3 s in every training process.)
    """
    labels = np.asarray(labels)
    smallest = int(np.bincount(labels).min())
    if folds > smallest:
        raise DataError(
            f"{folds} folds requested but the smallest class has {smallest} images; "
            "use folds <= smallest class size"
        )
    rng = np.random.default_rng(seed)
    assignment = np.full(len(labels), -1, dtype=np.int64)
    offset = 0
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        assignment[members] = (offset + np.arange(len(members))) % folds
        offset = (offset + len(members)) % folds
    return assignment
