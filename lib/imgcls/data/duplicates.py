"""Leakage audit: near-duplicate images within and across splits, by perceptual hash.

A near-duplicate is a resized, re-encoded, slightly brightened or slightly cropped copy of a
photo. Scored as validation or test data it measures memory, not generalisation, so:

- :func:`fold_groups` gives every training image the id of its near-duplicate group, and
  :func:`imgcls.data.folders.assign_folds` keeps each group inside one fold;
- :func:`near_duplicates` lists the groups of both splits (notebook 01), and
  :func:`test_images_with_train_copies` names the test images with a near-copy in training, so
  test accuracy can be reported with and without them (notebook 03).

**Hash.** ``imagehash.phash`` (ImageHash, the maintained pHash implementation for Pillow; BSD-2):
grayscale, resized to 32x32 (LANCZOS), 2-D DCT, the 8x8 lowest frequencies compared with their
median: 64 bits. It ignores aspect ratio, JPEG artefacts and global brightness, unlike md5 (exact
copies only) or dHash (on the shipped data dHash puts 120 pairs of distinct sea/forest photos
within 8 bits, pHash one). Images are read by the project's one reader, in the decode that
validates them (:func:`imgcls.data.images.read_for_checks`: EXIF orientation applied, JPEGs
drafted to >= 64 px, the same image as ``read_image(path, target_size=32)``).

**Threshold.** Two images are near-duplicates when their hashes differ in at most
:data:`MAX_DISTANCE` = 8 of 64 bits (Hamming distance). The planted copies of
``tests/test_leakage.py`` (0.6x resize, JPEG quality 40, +15 % brightness, 4-px crop) move the
hash by 0-6 bits; on the shipped data (984 photos) the only pair within 8 bits is a re-encoded
copy at distance 2 and the next-closest distinct photos are 10 bits apart.

**Groups** are the connected components of the graph "distance <= threshold" (single linkage,
scipy's ``connected_components``), numbered by their first member, so the same hashes always give
the same ids. A chain A~B~C forms one group even when A and C are farther apart.

Hashes are computed by the same decode that validates a file and stored in the same
validate-once record (``<cache>/validated/``, under each file's relative path, size and
modification time in ns; :mod:`imgcls.data.validation`), so an unchanged data version is decoded
once for both.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from imgcls.data import images, validation
from imgcls.data.folders import ImageFolder, assign_folds, scan_image_folder

# defined next to the decode that hashes (validation); re-exported as part of this module's API
from imgcls.data.validation import HASH_READ_SIZE, HASH_SIZE  # noqa: F401

MAX_DISTANCE = 8  # Hamming distance (bits of 64) at or below which two images are near-copies

NEAR_DUPLICATE_COLUMNS = ["group", "split", "path", "class", "distance"]


def image_phash(path: Path) -> int:
    """Return the 64-bit pHash of one image file as a Python int (bit 63 = first DCT bit).

    Decoded as validation decodes it (:func:`imgcls.data.images.read_for_checks`, the same image
    as ``read_image(path, target_size=32)``), hashed with ``imagehash.phash(hash_size=8)``; not
    recorded. Raises :class:`imgcls.data.images.ImageReadError` naming the file when it cannot
    be read.
    """
    reason, value = validation.check_and_hash(Path(path))
    if reason or value is None:
        raise images.ImageReadError(str(path), reason or "unreadable")
    return value


def hash_record_file(folder: Path) -> Path:
    """Return the record that holds the hashes of a split folder (it may not exist).

    The validate-once record (:func:`imgcls.data.validation.validation_record_file`): one decode
    per file version validates and hashes it.
    """
    return validation.validation_record_file(folder)


def folder_hashes(folder: ImageFolder) -> np.ndarray:
    """Return the pHash (uint64, shape [N]) of each of the N images of ``folder``, in order.

    Files whose (relative path, size, mtime) match the validation record (usually written by
    the scan that listed them) are not read again; the others are validated and hashed in one
    decode each on every usable core and recorded (files modified in the last
    :data:`imgcls.data.validation.RACY_MTIME_SECONDS` are hashed but not recorded). Raises
    :class:`imgcls.data.images.ImageReadError` naming a file that cannot be read.
    """
    values = validation.recorded_hashes(Path(folder.root), list(folder.paths))
    return np.array(values, dtype=np.uint64)


def near_pairs(
    hashes: np.ndarray, max_distance: int = MAX_DISTANCE, block: int = 2048
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(i, j, distance)`` (int64, each [P]) of every pair i < j within ``max_distance``.

    ``hashes`` is uint64 [N]; distance is the Hamming distance in bits (popcount of the XOR).
    Compared ``block`` rows at a time, so memory stays O(block * N). Sorted by (i, j).
    """
    hashes = np.asarray(hashes, dtype=np.uint64).reshape(-1)
    found_i, found_j, found_d = [], [], []
    for start in range(0, hashes.size, block):
        rows = hashes[start : start + block]
        distance = np.bitwise_count(rows[:, None] ^ hashes[None, :]).astype(np.int64)
        i, j = np.nonzero(distance <= max_distance)
        i = i + start
        keep = j > i
        found_i.append(i[keep])
        found_j.append(j[keep])
        found_d.append(distance[i[keep] - start, j[keep]])
    if not found_i:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    return np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_d)


def group_ids(hashes: np.ndarray, max_distance: int = MAX_DISTANCE) -> np.ndarray:
    """Return the near-duplicate group (int64, shape [N]) of each of N hashes (uint64 [N]).

    Groups are the connected components of "Hamming distance <= ``max_distance``" (scipy's
    ``connected_components``); an image with no near-copy is a group of its own. Ids are
    0..G-1 in the order of each group's first member, so they depend only on the hashes.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = int(np.asarray(hashes).size)
    i, j, _ = near_pairs(hashes, max_distance)
    graph = coo_matrix((np.ones(i.size, dtype=np.int8), (i, j)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    _, first = np.unique(labels, return_index=True)  # first member of each component
    renumber = np.empty(first.size, dtype=np.int64)
    renumber[np.argsort(first, kind="stable")] = np.arange(first.size)
    return renumber[labels]


def fold_groups(folder: ImageFolder, max_distance: int = MAX_DISTANCE) -> np.ndarray:
    """Return the near-duplicate group (int64, shape [N]) of each image of a training split.

    What :func:`imgcls.data.folders.assign_folds` takes as ``groups`` so that every near-copy
    of an image is in the same fold. Hashes come from :func:`folder_hashes` (recorded).
    """
    return group_ids(folder_hashes(folder), max_distance)


def split_folds(folder: ImageFolder, folds: int, seed: int) -> np.ndarray:
    """Return the fold (int64, shape [N]) of each image of a training split: the one rule.

    Stratified group k-fold with every near-duplicate group of :func:`fold_groups` inside one
    fold (:func:`imgcls.data.folders.assign_folds`). Cross-validation, notebook 01's fold
    table and the plan's incumbent check all call this, so they always agree. Raises DataError
    as ``assign_folds`` does (more folds than a class has groups).
    """
    return assign_folds(folder.labels, folds, seed, groups=fold_groups(folder))


def _as_folder(folder: ImageFolder | str | Path) -> ImageFolder:
    return folder if isinstance(folder, ImageFolder) else scan_image_folder(folder)


def near_duplicates(
    train: ImageFolder | str | Path,
    test: ImageFolder | str | Path | None = None,
    max_distance: int = MAX_DISTANCE,
) -> pd.DataFrame:
    """Return every near-duplicate group of size > 1 within and across the splits.

    One row per member: ``group`` (0..G-1), ``split`` (the split folder's name), ``path``
    (``<split>/<class>/<file>``), ``class`` and ``distance`` (Hamming bits to the group's
    representative, its first member: train before test, then by path). Folders given as paths
    are scanned (:func:`imgcls.data.folders.scan_image_folder`, which raises DataError).
    """
    folders = [_as_folder(train)] + ([_as_folder(test)] if test is not None else [])
    rows = []
    for folder in folders:
        split = folder.root.name
        for rel, label in zip(folder.relpaths(), folder.labels, strict=True):
            rows.append({"split": split, "path": f"{split}/{rel}", "class": folder.classes[label]})
    hashes = np.concatenate([folder_hashes(f) for f in folders])
    groups = group_ids(hashes, max_distance)
    frame = pd.DataFrame(rows, columns=["split", "path", "class"])
    frame.insert(0, "group", groups)
    sizes = np.bincount(groups)
    keep = sizes[groups] > 1
    first = {}
    for index in np.flatnonzero(keep):
        first.setdefault(int(groups[index]), index)
    representative = np.array([first.get(int(g), i) for i, g in enumerate(groups)])
    frame["distance"] = np.bitwise_count(hashes ^ hashes[representative]).astype(np.int64)
    frame = frame[keep].sort_values("group", kind="stable")
    frame["group"] = pd.factorize(frame["group"])[0]
    return frame.reset_index(drop=True)[NEAR_DUPLICATE_COLUMNS]


def test_images_with_train_copies(
    train: ImageFolder | str | Path,
    test: ImageFolder | str | Path,
    max_distance: int = MAX_DISTANCE,
) -> set[Path]:
    """Return the paths (as in ``test.paths``) of test images with a near-copy in training.

    A test image counts when it is within ``max_distance`` bits of at least one training image
    (directly, not through a chain of test images). Folders given as paths are scanned.
    """
    train, test = _as_folder(train), _as_folder(test)
    train_hashes, test_hashes = folder_hashes(train), folder_hashes(test)
    leaked = set()
    for index, value in enumerate(test_hashes):
        if np.bitwise_count(train_hashes ^ value).min(initial=64) <= max_distance:
            leaked.add(test.paths[index])
    return leaked


test_images_with_train_copies.__test__ = False  # a library function, not a pytest test
