"""Leakage audit, second opinion: near-copies by cosine similarity of a frozen backbone's features.

The perceptual hash of :mod:`imgcls.data.duplicates` (mirror-aware) decides the near-duplicate
groups that cross-validation keeps inside one fold. It misses copies edited beyond a few bits:
crops of 10 % or more, colour shifts. A frozen backbone's pooled features (the vectors the grid's
frozen strategies train their heads on, :func:`imgcls.modeling.features.cached_features`,
cached per data version, so this audit costs nothing when the grid has a frozen strategy) see
content, not pixels. :func:`embedding_near_copies` lists the pairs within train and across
train/test whose cosine similarity is at least :data:`COSINE_THRESHOLD` and that the pHash did
not already group.

**A report only, never used for fold assignment**: the folds must be the same for every strategy
of a data version (their fold scores are compared pairwise), and these features depend on one
strategy's backbone, weights and image size. Notebook 01 shows the table; review the pairs.

**Threshold** (:data:`COSINE_THRESHOLD` = 0.935, cosine of the raw pooled features), calibrated
on the shipped data (984 photos, train and test) with ``efficientnet_lite0`` ImageNet weights at
160 px on the CPU: the nearest-neighbour cosine between distinct photos has median 0.757, 90th
percentile 0.857, 99th 0.903 and maximum 0.930 (two different forest photos, checked by eye);
the one copy on the shipped data (``train/forest/20916.jpg`` and ``22917.jpg``, 2 pHash bits
apart) has 0.945. At 0.935 no distinct shipped pair is flagged. Evidence of what it finds: for
60 edited copies of shipped photos (JPEG quality 70) the cosine to the own photo had median 0.911
for a colour shift (channel gains 1.15/1.0/0.85, +10, contrast 0.85), 0.871 for a 15 % crop,
0.849 for a 12 % crop plus that colour shift and 0.857 for a mirrored 15 % crop (15 of each);
at 0.935 it finds 4 of the 15 colour-shifted copies, 1 mirrored crop and no other crop; at 0.90
it would find 8 colour shifts and 2-3 of 15 crops of each kind, but also flag 7 pairs of distinct
shipped photos (all checked by eye). Pooled ImageNet features
of this backbone are a weak copy detector: the table is a list to review, not a verdict.
Centring the features (subtracting the training mean) did not separate better (distinct
maximum 0.875, the copy 0.902, crops as low).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch

from imgcls.data import duplicates
from imgcls.data.arrays import PAIR_BLOCK, rows_per_block
from imgcls.data.folders import ImageFolder, cache_version
from imgcls.modeling.features import cached_features

COSINE_THRESHOLD = 0.935  # see the module docstring for the calibration

EMBEDDING_PAIR_COLUMNS = ["kind", "path_a", "path_b", "class_a", "class_b", "cosine", "phash_bits"]


def unit_rows(features: np.ndarray) -> np.ndarray:
    """Return float64 ``[N, F]``: each row of ``features`` ``[N, F]`` divided by its L2 norm.

    A row of zeros stays zeros (cosine 0 with everything). Raises ValueError for another rank.
    """
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"features must be [N, F], got shape {features.shape}")
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.where(norms > 0, norms, 1.0)


def cosine_pairs(
    a: np.ndarray,
    b: np.ndarray | None = None,
    threshold: float = COSINE_THRESHOLD,
    pairs_per_block: int = PAIR_BLOCK,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(i, j, cosine)`` ([P] int64, int64, float64) of pairs with cosine >= ``threshold``.

    ``a`` is ``[N, F]``; with ``b`` (``[M, F]``) every pair (row i of a, row j of b), without it
    every pair i < j of ``a``. Cosine similarity of the rows (:func:`unit_rows`), computed
    :func:`imgcls.data.arrays.rows_per_block` rows at a time (a ``[rows, M]`` block of about
    ``pairs_per_block`` values whatever M is); sorted by (i, j). Raises ValueError when the
    feature widths differ.
    """
    left = unit_rows(a)
    right = left if b is None else unit_rows(b)
    if left.shape[1] != right.shape[1]:
        raise ValueError(f"feature widths differ: {left.shape[1]} and {right.shape[1]}")
    block = rows_per_block(len(right), pairs_per_block)
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for start in range(0, len(left), block):
        similarity = left[start : start + block] @ right.T
        i, j = np.nonzero(similarity >= threshold)
        keep = j > i + start if b is None else np.ones(i.size, bool)
        found.append((i[keep] + start, j[keep], similarity[i[keep], j[keep]]))
    if not found:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64)
    i, j, cosine = (np.concatenate(parts) for parts in zip(*found, strict=True))
    return i.astype(np.int64), j.astype(np.int64), cosine.astype(np.float64)


def embedding_near_copies(
    train: ImageFolder,
    test: ImageFolder,
    backbone: str,
    weights: str,
    image_size: int,
    device: str | None = None,
    threshold: float = COSINE_THRESHOLD,
) -> pd.DataFrame:
    """Return the pairs within train and across train/test that only the embedding finds.

    Features: :func:`imgcls.modeling.features.cached_features` of each split for the frozen
    ``backbone`` (``weights``, ``image_size`` px), keyed as the grid keys them
    (:func:`imgcls.data.folders.cache_version`), so these are the cache entries notebooks 02 and
    03 use;
    ``device`` None picks CUDA when available, as training does.
    A pair is listed when its cosine is >= ``threshold`` and the mirror-aware pHash
    (:func:`imgcls.data.duplicates.group_ids` over both splits) did not put it in one
    near-duplicate group. One row per pair, most similar first: ``kind`` ("within train" or
    "across splits"), ``path_a`` (train), ``path_b`` (``<split>/<class>/<file>``), their
    classes, ``cosine`` and ``phash_bits`` (:func:`imgcls.data.duplicates.hash_distance`).
    Raises :class:`imgcls.data.images.ImageReadError` naming an unreadable file.
    """
    target = torch.device(device) if device else None
    spec: dict[str, Any] = {"backbone_name": backbone, "weights": weights, "image_size": image_size}
    train_md5 = cache_version(train, training=True)
    test_md5 = cache_version(test, training=False)
    train_features, _ = cached_features(train, data_md5=train_md5, device=target, **spec)
    test_features, _ = cached_features(test, data_md5=test_md5, device=target, **spec)
    hashes = np.concatenate([duplicates.folder_hashes(train), duplicates.folder_hashes(test)])
    groups = duplicates.group_ids(hashes)
    names = [f"{train.root.name}/{rel}" for rel in train.relpaths()]
    names += [f"{test.root.name}/{rel}" for rel in test.relpaths()]
    classes = [train.classes[k] for k in train.labels] + [test.classes[k] for k in test.labels]
    rows = []
    offset = len(train)
    for kind, (i, j, cosine) in (
        ("within train", cosine_pairs(train_features, None, threshold)),
        ("across splits", cosine_pairs(train_features, test_features, threshold)),
    ):
        j = j + (offset if kind == "across splits" else 0)
        for a, b, value in zip(i.tolist(), j.tolist(), cosine.tolist(), strict=True):
            if groups[a] == groups[b]:
                continue  # the pHash found it: already a near-duplicate group
            bits = int(duplicates.hash_distance(hashes[a], hashes[b]))
            rows.append([kind, names[a], names[b], classes[a], classes[b], value, bits])
    frame = pd.DataFrame(rows, columns=EMBEDDING_PAIR_COLUMNS)
    return frame.sort_values("cosine", ascending=False, kind="stable").reset_index(drop=True)
