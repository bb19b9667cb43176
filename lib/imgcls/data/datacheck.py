"""What notebook 01 does: summarise and check the dataset, and show the shared fold assignment."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from imgcls.data import duplicates
from imgcls.data.folders import (
    ImageFolder,
    check_same_classes,
    data_version,
    expected_data_md5,
    recorded_md5s,
    require_split,
    scan_image_folder,
)
from imgcls.data.images import image_header, load_rgb


@dataclass
class DatasetReport:
    """Both splits of a dataset, scanned and validated, with the data version."""

    root: Path
    train: ImageFolder
    test: ImageFolder
    data_md5: str
    expected_md5: str | None

    def counts(self) -> pd.DataFrame:
        """Return images per class (rows) and split (columns), with totals."""
        table = pd.DataFrame({"train": self.train.class_counts(), "test": self.test.class_counts()})
        table.loc["total"] = table.sum()
        return table

    def version_table(self) -> pd.DataFrame:
        """Return the data version found on disk next to the one ``data.dvc`` records."""
        match = self.expected_md5 is None or self.expected_md5 == self.data_md5
        return pd.DataFrame(
            {
                "value": [
                    str(self.root),
                    self.data_md5,
                    str(self.expected_md5),
                    "yes" if match else "NO: run `dvc status`",
                ]
            },
            index=["data folder", "content md5", "data.dvc md5", "matches"],
        )

    def findings(self) -> pd.DataFrame:
        """Return every problem found: skipped bad files, duplicates and near-duplicates.

        Exact duplicates are found by md5 of the bytes; near-duplicates (resized, re-encoded,
        brightened or slightly cropped copies) by :func:`imgcls.data.duplicates.near_duplicates`
        (pHash within 8 of 64 bits, a mirrored copy included), one row per group: within one split (kept in one fold by
        cross-validation), across splits (a test image with a near-copy in training), and with
        conflicting labels (the same photo under two classes).
        """
        rows = [
            {"kind": "bad file", "path": str(b.path), "detail": b.reason}
            for b in self.train.skipped + self.test.skipped
        ]
        for digest, members in duplicate_groups([self.train, self.test]).items():
            splits = sorted({m.split("/")[0] for m in members})
            kind = "duplicate across splits" if len(splits) > 1 else "duplicate within split"
            rows.append({"kind": kind, "path": ", ".join(members), "detail": f"md5 {digest}"})
        for _, group in self.near_duplicates().groupby("group", sort=True):
            splits = group["split"].unique()
            kind = (
                "near-duplicate across splits" if len(splits) > 1 else "near-duplicate within split"
            )
            classes = sorted(group["class"].unique())
            detail = (
                f"pHash distance to {group['path'].iloc[0]} <= {int(group['distance'].max())} bits"
            )
            if len(classes) > 1:
                kind += ", conflicting labels"
                detail += f"; classes {classes}"
            rows.append({"kind": kind, "path": ", ".join(group["path"]), "detail": detail})
        return pd.DataFrame(rows, columns=["kind", "path", "detail"])

    def near_duplicates(self) -> pd.DataFrame:
        """Return the near-duplicate groups of both splits, one row per member.

        Columns ``group``, ``split``, ``path``, ``class``, ``distance`` (Hamming bits of the
        64-bit pHash to the group's first member); see
        :func:`imgcls.data.duplicates.near_duplicates`. Hashes are recorded per file version, so
        only the first call on a data version reads the images.
        """
        return duplicates.near_duplicates(self.train, self.test)

    def leakage_summary(self) -> pd.DataFrame:
        """Return counts of the leakage audit: groups within train, test images copied from train.

        Rows: near-duplicate groups in train (size > 1, as the folds see them), their images,
        test images with a near-copy in train
        (:func:`imgcls.data.duplicates.test_images_with_train_copies`), and all test images;
        column ``value``.
        """
        sizes = np.bincount(duplicates.fold_groups(self.train))  # the groups the folds keep whole
        within = sizes[sizes > 1]
        leaked = duplicates.test_images_with_train_copies(self.train, self.test)
        return pd.DataFrame(
            {"value": [len(within), int(within.sum()), len(leaked), len(self.test)]},
            index=[
                "near-duplicate groups within train",
                "train images in those groups",
                "test images with a near-copy in train",
                "test images",
            ],
        )


def inspect_dataset(data_dir: str | None = None, skip_bad_images: bool = False) -> DatasetReport:
    """Scan and validate ``train`` and ``test``; check they have the same classes."""
    root = Path(data_dir) if data_dir else None
    train = scan_image_folder(require_split("train", root), skip_bad=skip_bad_images)
    test = scan_image_folder(require_split("test", root), skip_bad=skip_bad_images)
    check_same_classes(train, test)
    resolved = train.root.parent
    expected = expected_data_md5() if root is None else None
    return DatasetReport(resolved, train, test, data_version(resolved), expected)


def duplicate_groups(folders: list[ImageFolder]) -> dict[str, list[str]]:
    """Return ``md5 -> ["<split>/<class>/<file>", ...]`` for contents that occur more than once.

    md5s come from :func:`imgcls.data.folders.recorded_md5s`: a file unchanged since an earlier
    call (same size and modification time) is not read again. Raises OSError for a file that
    cannot be read.
    """
    groups: dict[str, list[str]] = defaultdict(list)
    for folder in folders:
        for path, digest in zip(
            folder.paths, recorded_md5s(folder.root, folder.paths), strict=True
        ):
            groups[digest].append(f"{folder.root.name}/{path.relative_to(folder.root)}")
    return {k: v for k, v in groups.items() if len(v) > 1}


def image_size_stats(folder: ImageFolder) -> pd.DataFrame:
    """Return width/height statistics (pixels) and colour modes per class."""
    rows = []
    for path, label in zip(folder.paths, folder.labels, strict=True):
        width, height, mode = image_header(path)
        rows.append(
            {"class": folder.classes[label], "width_px": width, "height_px": height, "mode": mode}
        )
    frame = pd.DataFrame(rows)
    stats = frame.groupby("class")[["width_px", "height_px"]].agg(["min", "median", "max"])
    stats["modes"] = frame.groupby("class")["mode"].agg(lambda m: ", ".join(sorted(set(m))))
    return stats


def sample_images(
    folder: ImageFolder, per_class: int, seed: int = 0, size: int = 128
) -> tuple[list[np.ndarray], list[str]]:
    """Return ``per_class`` random images of each class (seeded) and their captions."""
    rng = np.random.default_rng(seed)
    images, captions = [], []
    for label, name in enumerate(folder.classes):
        candidates = np.flatnonzero(folder.labels == label)
        for i in rng.choice(candidates, size=min(per_class, len(candidates)), replace=False):
            images.append(load_rgb(folder.paths[i], size))
            captions.append(f"{name}: {folder.paths[i].name}")
    return images, captions


def fold_balance(folder: ImageFolder, folds: int, seed: int) -> pd.DataFrame:
    """Return images per class (rows) and fold (columns) of the shared fold assignment.

    The assignment cross-validation uses: stratified, with each near-duplicate group of
    :func:`imgcls.data.duplicates.fold_groups` inside one fold.
    """
    assignment = duplicates.split_folds(folder, folds, seed)
    table = pd.crosstab(
        pd.Series([folder.classes[i] for i in folder.labels], name="class"),
        pd.Series(assignment, name="fold"),
    )
    table.columns = [f"fold {c}" for c in table.columns]
    return table
