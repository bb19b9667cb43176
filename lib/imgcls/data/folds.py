"""Stratified k-fold assignment of an image folder's samples, and the name of an assignment.

Every grid point of a grid, and notebook 01's fold table, take their folds from
:func:`assign_folds` with the same labels, seed and near-duplicate groups, so their fold scores
are paired fold by fold; :func:`fold_assignment_hash` names an assignment so that the comparison
(:mod:`imgcls.selection.comparison`) pairs only runs whose folds are identical.
"""

from __future__ import annotations

import hashlib

import numpy as np

from imgcls.data.folders import DataError


def assign_folds(
    labels: np.ndarray, folds: int, seed: int, groups: np.ndarray | None = None
) -> np.ndarray:
    """Return the fold index (int64, shape [N]) of each of N samples from their labels [N].

    Without ``groups``: scikit-learn's ``StratifiedKFold(n_splits=folds, shuffle=True,
    random_state=seed)``; every fold holds each class to within one sample and fold sizes differ
    by at most one. With ``groups`` [N] (any hashable ids; the near-duplicate groups of
    :func:`imgcls.data.duplicates.fold_groups`, every image with no near-copy a group of its
    own): the same ``StratifiedKFold`` over the groups (one row per group, labelled by its first
    member), and every sample takes its group's fold. A group never straddles two folds, each
    class's count per fold stays within the largest group's size of an even split, and with
    only one-sample groups the assignment is exactly the one without ``groups``.
    (scikit-learn's ``StratifiedGroupKFold`` gives the same guarantee greedily, but loops over
    every group in Python: 1-2 s per call on 949 one-image groups, paid by every grid point.)
    The same inputs always give the same assignment, so every strategy is compared on identical
    splits; :func:`fold_assignment_hash` names it. Raises DataError when ``folds < 2``, when
    ``folds`` exceeds the smallest class size (or, with groups, the number of groups holding
    some class) or a fold would be empty; ValueError when ``groups`` is not one id per label.
    """
    # Imported here: scikit-learn's model_selection takes 2-3 s to import, paid only by callers.
    from sklearn.model_selection import StratifiedKFold

    labels = np.asarray(labels).reshape(-1)
    if folds < 2:
        raise DataError(f"{folds} folds requested; k-fold cross-validation needs folds >= 2")
    smallest = int(np.unique(labels, return_counts=True)[1].min()) if labels.size else 0
    if folds > smallest:
        raise DataError(
            f"{folds} folds requested but the smallest class has {smallest} images; "
            "use folds <= smallest class size"
        )
    assignment = np.full(labels.size, -1, dtype=np.int64)
    if groups is None:
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        split = splitter.split(np.zeros((labels.size, 1)), labels)
    else:
        groups = np.asarray(groups).reshape(-1)
        if groups.size != labels.size:
            raise ValueError(
                f"{groups.size} group ids for {labels.size} labels; pass one group per sample"
            )
        for label in np.unique(labels):
            holding = np.unique(groups[labels == label]).size
            if holding < folds:
                raise DataError(
                    f"{folds} folds requested but class {label.item()} lies in {holding} "
                    "near-duplicate group(s); use folds <= that number"
                )
        # one row per group, in order of first appearance, labelled by its first member
        _, first, member_of = np.unique(groups, return_index=True, return_inverse=True)
        order = np.argsort(first, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size)
        group_labels = labels[first[order]]
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        group_fold = np.full(order.size, -1, dtype=np.int64)
        for fold, (_, held_out) in enumerate(
            splitter.split(np.zeros((order.size, 1)), group_labels)
        ):
            group_fold[held_out] = fold
        assignment = group_fold[rank[member_of.reshape(-1)]]
        split = [(None, np.flatnonzero(assignment == fold)) for fold in range(folds)]
    for fold, (_, held_out) in enumerate(split):
        if held_out.size == 0:
            raise DataError(f"fold {fold} of {folds} got no samples; use fewer folds")
        assignment[held_out] = fold
    return assignment


def fold_assignment_hash(relative_paths: list[str], assignment: np.ndarray) -> str:
    """Return a 12-hex-digit name of a fold assignment: which file is in which fold.

    ``relative_paths`` [N] (POSIX, relative to the split root, as :meth:`ImageFolder.relpaths`)
    and ``assignment`` [N] (fold index per file, :func:`assign_folds`) are paired, the
    ``"<path>\t<fold>"`` lines sorted and joined with newlines, and the first 12 hex digits of
    their SHA-256 returned. Equal hashes mean identical splits, so fold scores may be paired.
    Raises ValueError when the lengths differ or ``assignment`` is not 1-D.
    """
    folds = np.asarray(assignment)
    if folds.ndim != 1 or folds.size != len(relative_paths):
        raise ValueError(
            f"{len(relative_paths)} paths but fold assignment of shape {folds.shape}; "
            "pass one fold index per path"
        )
    lines = sorted(f"{path}\t{int(fold)}" for path, fold in zip(relative_paths, folds, strict=True))
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()[:12]
