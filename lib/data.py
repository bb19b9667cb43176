"""Image-folder datasets: scanning, validation, data version and stratified folds.

Layout: ``<root>/<split>/<class>/<image>``. Classes are the sorted folder names of the split.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, UnidentifiedImageError

from lib import paths

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


# leading bytes of the common formats: such a file that PIL cannot open is corrupt, not foreign
_SIGNATURES = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG", b"GIF8": "GIF"}


def check_image(path: Path) -> BadImage | None:
    """Decode one file fully; return a BadImage (with the reason) or None when it is usable."""
    if path.stat().st_size == 0:
        return BadImage(path, "empty file (0 bytes)")
    try:
        with Image.open(path) as img:
            img.load()
            img.convert("RGB")
    except UnidentifiedImageError:
        with open(path, "rb") as handle:
            head = handle.read(8)
        kind = next((k for sig, k in _SIGNATURES.items() if head.startswith(sig)), None)
        if kind:
            return BadImage(path, f"corrupt {kind} image (header unreadable, PIL cannot open it)")
        return BadImage(path, "not an image file (PIL cannot identify it)")
    except (OSError, SyntaxError, ValueError) as exc:
        return BadImage(path, f"corrupt or truncated image ({exc})")
    return None


def scan_image_folder(
    folder: str | Path, validate: bool = True, skip_bad: bool = False
) -> ImageFolder:
    """Scan ``folder/<class>/*`` into an ImageFolder.

    Every file is decoded when ``validate`` is true. Bad files raise a DataError listing each
    path, unless ``skip_bad`` is true, in which case they are left out and listed in
    ``ImageFolder.skipped``. An empty class, or fewer than two classes, is an error.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found")
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(class_dirs) < 2:
        names = [p.name for p in class_dirs]
        raise DataError(
            f"{folder}: found {len(class_dirs)} class folder(s) {names}; a classifier needs at "
            "least two (one sub-folder per class)"
        )
    classes = [p.name for p in class_dirs]
    files: list[Path] = []
    labels: list[int] = []
    bad: list[BadImage] = []
    for label, class_dir in enumerate(class_dirs):
        candidates = sorted(
            p for p in class_dir.rglob("*") if p.is_file() and not p.name.startswith(".")
        )
        for path in candidates:
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                bad.append(BadImage(path, f"not an image file (extension {path.suffix!r})"))
                continue
            problem = check_image(path) if validate else None
            if problem:
                bad.append(problem)
                continue
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


def directory_md5(root: str | Path) -> str:
    """Return the DVC 3 directory hash (``<md5>.dir``) of every file under ``root``.

    DVC hashes a directory as the md5 of the JSON list of ``{"md5", "relpath"}`` entries sorted
    by relative path, so this equals the md5 recorded in ``data.dvc`` for the same content.
    """
    root = Path(root)
    entries = [
        {"md5": file_md5(p), "relpath": p.relative_to(root).as_posix()}
        for p in sorted(root.rglob("*"), key=lambda p: p.relative_to(root).as_posix())
        if p.is_file()
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


_VERSION_CACHE: dict[tuple[str, float], str] = {}


def data_version(root: str | Path | None = None) -> str:
    """Return the data version (DVC directory md5) of a dataset root.

    For the project's ``data/`` the actual content is hashed and compared with ``data.dvc``;
    a difference is warned about and the real hash is returned (and so recorded in MLflow).
    """
    root = Path(root) if root else paths.data_dir()
    if not root.is_dir():
        raise DataError(f"{root}: dataset not found; fetch it with `dvc pull` (or `make setup`)")
    stamp = max((p.stat().st_mtime for p in root.rglob("*")), default=0.0)
    key = (str(root.resolve()), stamp)
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
