"""Leakage audit: near-duplicate images within and across splits, by perceptual hash.

A near-duplicate is a resized, re-encoded, slightly brightened, slightly cropped or left-right
mirrored copy of a photo. Scored as validation or test data it measures memory, not generalisation, so:

- :func:`fold_groups` gives every training image the id of its near-duplicate group, and
  :func:`imgcls.data.folds.assign_folds` keeps each group inside one fold;
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

**Mirrors.** A mirrored copy differs from its photo in about half of the pHash bits (22-40 of 64,
median 32, between each shipped photo and its own mirror image), so every file also records the
pHash of its left-right mirror image (:func:`imgcls.data.validation.phash_pair`, from the same
decode: one more 32x32 DCT). The one rule, :func:`hash_distance`, used by every caller here:
``min(d(a, b), d(a, mirror(b)), d(mirror(a), b))`` (the third term makes it symmetric: pHash is
not exactly flip-equivariant, as the median of the flipped DCT coefficients changes).

**Threshold.** Two images are near-duplicates when their :func:`hash_distance` is at most
:data:`MAX_DISTANCE` = 8 of 64 bits (Hamming distance). The planted copies of
``tests/test_leakage.py`` (0.6x resize, JPEG quality 40, +15 % brightness, 4-px crop) move the
hash by 0-6 bits; on the shipped data (984 photos) the only pair within 8 bits is a re-encoded
copy at distance 2 and the next-closest distinct photos are 10 bits apart. Counting mirrors adds
no pair within 8 bits on the shipped data; the closest mirror-only pair, 10 bits, is a forest
photo and a sea photo, and the eleven pairs within 12 bits (five of them mirror-only) are all
distinct photos (checked by eye). A planted mirrored copy (also resized to 0.7x and re-encoded
at JPEG quality 60) is 0-2 bits from its photo (32 bits by plain pHash).

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
from imgcls.data.arrays import PAIR_BLOCK, rows_per_block
from imgcls.data.folders import ImageFolder, scan_image_folder
from imgcls.data.folds import assign_folds

# defined next to the decode that hashes (validation); re-exported as part of this module's API
from imgcls.data.validation import HASH_READ_SIZE, HASH_SIZE  # noqa: F401

MAX_DISTANCE = 8  # Hamming distance (bits of 64) at or below which two images are near-copies

NEAR_DUPLICATE_COLUMNS = ["group", "split", "path", "class", "distance"]


def image_phash(path: Path) -> tuple[int, int]:
    """Return the 64-bit pHashes of one image file and of its mirror image, as Python ints.

    :func:`imgcls.data.validation.phash_pair` (bit 63 = first DCT bit). Decoded as validation
    decodes it (:func:`imgcls.data.images.read_for_checks`, the same image
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


def folder_hashes(folder: ImageFolder, sink: validation.DecodeSink | None = None) -> np.ndarray:
    """Return the pHash pairs (uint64, shape [N, 2]) of the N images of ``folder``, in order.

    Column 0 is each image's pHash, column 1 that of its left-right mirror image
    (:func:`imgcls.data.validation.phash_pair`); compare them with :func:`hash_distance`.

    Files whose (relative path, size, mtime) match the validation record (usually written by
    the scan that listed them) are not read again; the others are validated and hashed in one
    decode each on every usable core and recorded (files modified in the last
    :data:`imgcls.data.validation.RACY_MTIME_SECONDS` are hashed but not recorded). Raises
    :class:`imgcls.data.images.ImageReadError` naming a file that cannot be read. The images
    decoded also go to ``sink`` (:class:`imgcls.data.validation.DecodeSink`).
    """
    values = validation.recorded_hashes(Path(folder.root), list(folder.paths), sink)
    return np.array(values, dtype=np.uint64).reshape(-1, 2)


def hash_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Return the near-duplicate distance (int64, bits) between hashes ``a`` and ``b``: the rule.

    ``a`` and ``b`` are uint64 pHash pairs of shape ``[..., 2]`` (column 0 the image, column 1 its
    mirror image, as :func:`folder_hashes` gives them), broadcast against each other; the result
    has their broadcast shape without the last axis and is
    ``min(d(a, b), d(a, mirror(b)), d(mirror(a), b))``, ``d`` the Hamming distance (popcount of
    the XOR). A hash pair ``(h, h)`` (see :func:`as_pairs`) compares as the plain hash ``h``.
    Raises ValueError naming the shapes when either last axis is not 2.
    """
    a, b = np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64)
    if a.ndim == 0 or b.ndim == 0 or a.shape[-1] != 2 or b.shape[-1] != 2:
        raise ValueError(
            f"hash_distance needs pHash pairs of shape [..., 2] (image, mirror image), got "
            f"shapes {a.shape} and {b.shape}; use folder_hashes() or as_pairs()"
        )
    plain = np.bitwise_count(a[..., 0] ^ b[..., 0])
    mirrored = np.minimum(
        np.bitwise_count(a[..., 0] ^ b[..., 1]), np.bitwise_count(a[..., 1] ^ b[..., 0])
    )
    return np.minimum(plain, mirrored).astype(np.int64)


def as_pairs(hashes: np.ndarray) -> np.ndarray:
    """Return uint64 pHash pairs ``[N, 2]`` from pairs ``[N, 2]`` or plain hashes ``[N]``.

    A plain hash ``h`` becomes ``(h, h)``, for which :func:`hash_distance` is the plain Hamming
    distance (no mirror known). Raises ValueError naming the shape for any other shape.
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    if hashes.ndim == 1:
        return np.stack([hashes, hashes], axis=1)
    if hashes.ndim == 2 and hashes.shape[1] == 2:
        return hashes
    raise ValueError(f"expected pHashes of shape [N] or pairs [N, 2], got shape {hashes.shape}")


def near_pairs(
    hashes: np.ndarray, max_distance: int = MAX_DISTANCE, pairs_per_block: int = PAIR_BLOCK
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(i, j, distance)`` (int64, each [P]) of every pair i < j within ``max_distance``.

    ``hashes`` is uint64 pHash pairs [N, 2] (:func:`folder_hashes`) or plain hashes [N]
    (:func:`as_pairs`); distance is :func:`hash_distance` in bits. Rows are compared against all
    N hashes :func:`imgcls.data.arrays.rows_per_block` rows at a time, so the temporaries hold
    about ``pairs_per_block`` values whatever N is. The time is O(N^2). Sorted by (i, j).
    """
    hashes = as_pairs(hashes)
    block = rows_per_block(len(hashes), pairs_per_block)
    found_i, found_j, found_d = [], [], []
    for start in range(0, len(hashes), block):
        rows = hashes[start : start + block]
        distance = hash_distance(rows[:, None], hashes[None, :])
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
    """Return the near-duplicate group (int64, shape [N]) of each of N hashes.

    ``hashes``: uint64 pHash pairs [N, 2] or plain hashes [N] (as :func:`near_pairs`). Groups
    are the connected components of ":func:`hash_distance` <= ``max_distance``" (scipy's
    ``connected_components``); an image with no near-copy is a group of its own. Ids are
    0..G-1 in the order of each group's first member, so they depend only on the hashes.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(as_pairs(hashes))
    i, j, _ = near_pairs(hashes, max_distance)
    graph = coo_matrix((np.ones(i.size, dtype=np.int8), (i, j)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    _, first = np.unique(labels, return_index=True)  # first member of each component
    renumber = np.empty(first.size, dtype=np.int64)
    renumber[np.argsort(first, kind="stable")] = np.arange(first.size)
    return renumber[labels]


def fold_groups(folder: ImageFolder, max_distance: int = MAX_DISTANCE) -> np.ndarray:
    """Return the near-duplicate group (int64, shape [N]) of each image of a training split.

    What :func:`imgcls.data.folds.assign_folds` takes as ``groups`` so that every near-copy
    of an image is in the same fold. Hashes come from :func:`folder_hashes` (recorded).
    """
    return group_ids(folder_hashes(folder), max_distance)


def split_folds(folder: ImageFolder, folds: int, seed: int) -> np.ndarray:
    """Return the fold (int64, shape [N]) of each image of a training split: the one rule.

    Stratified group k-fold with every near-duplicate group of :func:`fold_groups` inside one
    fold (:func:`imgcls.data.folds.assign_folds`). Cross-validation, notebook 01's fold
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
    (``<split>/<class>/<file>``), ``class`` and ``distance`` (:func:`hash_distance` in bits, so
    a mirrored copy counts as near, to the group's representative, its first member: train before test, then by path). Folders given as paths
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
    frame["distance"] = hash_distance(hashes, hashes[representative])
    frame = frame[keep].sort_values("group", kind="stable")
    frame["group"] = pd.factorize(frame["group"])[0]
    return frame.reset_index(drop=True)[NEAR_DUPLICATE_COLUMNS]


def test_images_with_train_copies(
    train: ImageFolder | str | Path,
    test: ImageFolder | str | Path,
    max_distance: int = MAX_DISTANCE,
) -> set[Path]:
    """Return the paths (as in ``test.paths``) of test images with a near-copy in training.

    A test image counts when it is within ``max_distance`` bits (:func:`hash_distance`, so a
    mirrored copy counts) of at least one training image (directly, not through a chain of test
    images). Folders given as paths are scanned.
    """
    train, test = _as_folder(train), _as_folder(test)
    train_hashes, test_hashes = folder_hashes(train), folder_hashes(test)
    leaked = set()
    for index, value in enumerate(test_hashes):
        if hash_distance(train_hashes, value[None]).min(initial=64) <= max_distance:
            leaked.add(test.paths[index])
    return leaked


test_images_with_train_copies.__test__ = False  # a library function, not a pytest test
