"""Image-folder datasets: scanning, validation and data version (folds: :mod:`imgcls.data.folds`).

Layout: ``<root>/<split>/<class>/<image>``. Classes are the sorted folder names of the split.

Validation is done once per file version (:mod:`imgcls.data.validation`): a changed or added file is
validated again; a bad file is never recorded.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from imgcls.core import paths
from imgcls.data import images, validation

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
    """Validate one file with :func:`imgcls.data.images.check_image`; return a BadImage or None.

    Every byte is read and entropy-decoded (JPEGs at 1/8 scale in the DCT), so truncated and
    corrupt files are found.
    """
    reason = images.check_image(path)
    return BadImage(path, reason) if reason else None


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
    found: list[tuple[str, Path]] = []  # (relative POSIX path, path): sorted without pathlib

    def walk(folder: Path, rel: str, ancestors: frozenset[Path]) -> None:
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if is_ignored(entry.name):
                continue
            path = Path(entry.path)
            if entry.is_dir(follow_symlinks=True):
                real = path.resolve()
                if real in ancestors:
                    raise DataError(f"{path}: symbolic link loops back to {real}; remove the link")
                walk(path, f"{rel}{entry.name}/", ancestors | {real})
            elif entry.is_file(follow_symlinks=True):
                found.append((f"{rel}{entry.name}", path))
            elif entry.is_symlink():
                raise DataError(
                    f"{path}: broken symbolic link (target {os.readlink(path)!r} not found); "
                    "remove it or restore its target"
                )

    walk(root, "", frozenset({root.resolve()}))
    return [path for _, path in sorted(found, key=lambda item: item[0])]


_relpath = validation.relative_posix


def scan_image_folder(
    folder: str | Path,
    validate: bool = True,
    skip_bad: bool = False,
    sink: validation.DecodeSink | None = None,
) -> ImageFolder:
    """Scan ``folder/<class>/*`` into an ImageFolder.

    When ``validate`` is true every file not validated before (see :func:`load_validated`) is
    read in full and entropy-decoded (:func:`check_image`, on all usable cores), and the files
    that read are recorded, so an unchanged data version is validated once. Bad files raise a
    DataError listing each path and reason, unless ``skip_bad`` is true, in which case they are
    left out and listed in ``ImageFolder.skipped``. An empty class, or fewer than two classes,
    is an error (DataError). The images validation decodes also go to ``sink``
    (:class:`imgcls.data.validation.DecodeSink`; see :class:`imgcls.data.primer.DecodePrimer`).
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
        todo = [p for p, _ in listed if p not in problems]
        problems.update(
            {
                p: BadImage(p, r)
                for p, r in validation.validate_new_files(folder, todo, sink).items()
            }
        )
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


def md5_record_file(root: Path) -> Path:
    """Return the file that records the md5 of every file under ``root`` (it may not exist).

    ``<cache>/md5/<sha256 of the root's resolved path, 24 hex>.json``.
    """
    digest = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:24]
    return paths.cache_dir() / "md5" / f"{digest}.json"


def recorded_md5s(root: Path, files: list[Path]) -> list[str]:
    """Return the md5 hex digest of each of ``files`` (under ``root``), in order.

    A file whose (relative path, size, modification time in ns) matches the record of an
    earlier call is not read again: the evidence DVC's own state database keeps per file for
    the same purpose. The others are read and recorded (files modified in the last
    :data:`imgcls.data.validation.RACY_MTIME_SECONDS` are hashed but not recorded); the record
    then holds exactly ``files``. Raises OSError for a file that cannot be read.
    """
    root = Path(root)
    record = md5_record_file(root)
    try:
        known = json.loads(record.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        known = {}
    not_before = time.time_ns() - int(validation.RACY_MTIME_SECONDS * 1e9)
    found: dict[str, list] = {}
    digests = []
    for path in files:
        rel = _relpath(root, path)
        info = path.stat()
        entry = known.get(rel) if isinstance(known, dict) else None
        if isinstance(entry, list) and entry[:2] == [info.st_size, info.st_mtime_ns]:
            digest = str(entry[2])
        else:
            digest = file_md5(path)
        digests.append(digest)
        if info.st_mtime_ns < not_before:
            found[rel] = [info.st_size, info.st_mtime_ns, digest]
    if found != known:
        validation.write_record(record, {"folder": str(root.resolve()), "files": found})
    return digests


def directory_md5(root: str | Path) -> str:
    """Return the DVC 3 directory hash (``<md5>.dir``) of every file under ``root``.

    DVC hashes a directory as the md5 of the JSON list of ``{"md5", "relpath"}`` entries sorted
    by relative path, so this equals the md5 recorded in ``data.dvc`` for the same content. Each
    file's md5 is recorded per file version (:func:`recorded_md5s`), so an unchanged dataset
    costs a stat per file, not a read of every byte.
    """
    return _directory_md5(Path(root), dataset_files(root))


def _directory_md5(root: Path, files: list[Path]) -> str:
    digests = recorded_md5s(root, files)
    entries = [
        {"md5": digest, "relpath": _relpath(root, p)}
        for p, digest in zip(files, digests, strict=True)
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
    return _listing_stamp(Path(root), dataset_files(root))


def _listing_stamp(root: Path, files: list[Path]) -> str:
    digest = hashlib.md5()
    for path in files:
        info = path.stat()
        digest.update(f"{_relpath(root, path)}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def data_version(root: str | Path | None = None) -> str:
    """Return the data version (DVC directory md5) of a dataset root.

    For the project's ``data/`` the actual content is hashed and compared with ``data.dvc``;
    a difference is warned about and the real hash is returned (and so recorded in MLflow).
    """
    root = Path(root) if root else paths.data_dir()
    if not root.is_dir():
        raise DataError(f"{root}: dataset not found; fetch it with `dvc pull` (or `make setup`)")
    files = dataset_files(root)  # listed once for the stamp and the hash
    key = (str(root.resolve()), _listing_stamp(root, files))
    if key not in _VERSION_CACHE:
        _VERSION_CACHE[key] = _directory_md5(root, files)
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


def cache_version(split: ImageFolder, *, training: bool) -> str:
    """Return the data version a split's caches (decoded images, frozen features) are keyed by.

    The one rule every cache writer and reader follows: the training split is keyed by the
    dataset's version (:func:`data_version` of its parent folder, which holds ``train`` and
    ``test``; the data version of the run key, which notebook 02 uses), any other split (``test``,
    an ``--eval-dir``) by its own version (what notebook 03 logs as that dataset's digest).
    Raises :class:`DataError` when the folder is gone.
    """
    return data_version(split.root.parent if training else split.root)
