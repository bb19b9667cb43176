"""Leakage audit: planted near-copies are grouped, kept in one fold, and reported as leaked.

The generated images have structure at every scale (amplitude ~ 1/frequency, like photos), so
pHash tells them apart; the plain stripes of ``conftest.make_image`` are noise-dominated and a
JPEG re-encode alone moves their hash by 10-16 bits.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from imgcls.data import duplicates
from imgcls.data.datacheck import fold_balance, inspect_dataset
from imgcls.data.duplicates import (
    MAX_DISTANCE,
    fold_groups,
    folder_hashes,
    group_ids,
    hash_distance,
    near_duplicates,
    near_pairs,
    test_images_with_train_copies,
)
from imgcls.data.folders import DataError, scan_image_folder
from imgcls.data.folds import assign_folds

SIZE = 96
_ORIENTATION = 0x0112
PAST_NS = 1_600_000_000 * 10**9  # an old mtime, so records are not "racy" (validation.py)


def make_photo(kind: str, rng: np.random.Generator, size: int = SIZE) -> Image.Image:
    """Return a photo-like RGB image: class tint plus random texture at scales size/3..size/24."""
    field = np.zeros((size, size), np.float32)
    for cells in (3, 6, 12, 24):
        grid = rng.random((cells, cells)).astype(np.float32) - 0.5
        smooth = Image.fromarray(grid, mode="F").resize((size, size), Image.Resampling.BICUBIC)
        field += (3 / cells) * np.asarray(smooth)
    tint = np.array((40, 110, 170) if kind == "sea" else (50, 140, 40), np.float32)
    pixels = tint + 110 * field[..., None] + rng.normal(0, 3, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_photos(root: Path, per_class: dict[str, int], seed: int) -> Path:
    """Write ``root/<class>/<class>_<i>.jpg`` (quality 90); return ``root``."""
    rng = np.random.default_rng(seed)
    for name, count in per_class.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            make_photo(name, rng).save(root / name / f"{name}_{i:03d}.jpg", quality=90)
    return root


# planted copy -> its original (paths relative to the dataset root)
PLANTED = {
    "train/forest/copy_resized.jpg": "train/forest/forest_000.jpg",  # 0.6x, bilinear
    "train/forest/copy_q40.jpg": "train/forest/forest_001.jpg",  # re-encoded at quality 40
    "train/sea/copy_brighter.jpg": "train/sea/sea_000.jpg",  # brightness x1.15
    "train/sea/copy_cropped.jpg": "train/sea/sea_001.jpg",  # 2 px cut off the left edge
    "train/sea/copy_sideways.jpg": "train/sea/sea_002.jpg",  # stored rotated, EXIF Orientation 6
    "test/sea/copy_from_train.jpg": "train/sea/sea_003.jpg",  # a training photo in the test set
    "train/forest/copy_mirrored.jpg": "train/forest/forest_002.jpg",  # flipped left-right
    # flipped left-right, resized to 0.7x and re-encoded at quality 60, in the test set
    "test/forest/copy_mirrored_small.jpg": "train/forest/forest_003.jpg",
}
MIRRORED = ("train/forest/copy_mirrored.jpg", "test/forest/copy_mirrored_small.jpg")


def _plant(root: Path) -> None:
    def original(rel: str) -> Image.Image:
        return Image.open(root / PLANTED[rel]).convert("RGB")

    def target(rel: str) -> Path:
        return root / rel

    img = original("train/forest/copy_resized.jpg")
    small = img.resize((round(SIZE * 0.6),) * 2, Image.Resampling.BILINEAR)
    small.save(target("train/forest/copy_resized.jpg"), quality=90)
    original("train/forest/copy_q40.jpg").save(target("train/forest/copy_q40.jpg"), quality=40)
    bright = ImageEnhance.Brightness(original("train/sea/copy_brighter.jpg")).enhance(1.15)
    bright.save(target("train/sea/copy_brighter.jpg"), quality=90)
    img = original("train/sea/copy_cropped.jpg")
    img.crop((2, 0, img.width, img.height)).save(target("train/sea/copy_cropped.jpg"), quality=90)
    # Orientation 6: the viewer turns the stored pixels 90 degrees clockwise to show them.
    stored = original("train/sea/copy_sideways.jpg").transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[_ORIENTATION] = 6
    stored.save(target("train/sea/copy_sideways.jpg"), quality=90, exif=exif)
    original("test/sea/copy_from_train.jpg").save(
        target("test/sea/copy_from_train.jpg"), quality=75
    )
    flip = Image.Transpose.FLIP_LEFT_RIGHT
    mirrored = original("train/forest/copy_mirrored.jpg").transpose(flip)
    mirrored.save(target("train/forest/copy_mirrored.jpg"), quality=90)
    mirrored = original("test/forest/copy_mirrored_small.jpg").transpose(flip)
    small = mirrored.resize((round(SIZE * 0.7),) * 2, Image.Resampling.BICUBIC)
    small.save(target("test/forest/copy_mirrored_small.jpg"), quality=60)


@pytest.fixture()
def leaky_data(tmp_path: Path, isolated_cache: Path) -> Path:
    """train: 10 + 10 photos and 6 planted near-copies; test: 4 + 4 photos and 2 train copies."""
    root = tmp_path / "data"
    write_photos(root / "train", {"forest": 10, "sea": 10}, seed=1)
    write_photos(root / "test", {"forest": 4, "sea": 4}, seed=2)
    _plant(root)
    for path in root.rglob("*.jpg"):  # old enough to be recorded (not within the racy window)
        os.utime(path, ns=(PAST_NS, PAST_NS))
    return root


def _groups_as_sets(table) -> set[frozenset[str]]:
    return {frozenset(group["path"]) for _, group in table.groupby("group")}


def test_planted_copies_are_grouped_with_their_originals_and_nothing_else(leaky_data):
    table = near_duplicates(leaky_data / "train", leaky_data / "test")
    expected = {frozenset({copy, original}) for copy, original in PLANTED.items()}
    assert _groups_as_sets(table) == expected  # every copy found, no generated photo grouped
    assert list(table.columns) == ["group", "split", "path", "class", "distance"]
    assert table["group"].tolist() == sorted(table["group"].tolist())
    for _, group in table.groupby("group"):
        # the representative is the first member: train before test, then by path
        assert group["distance"].iloc[0] == 0 and group["split"].iloc[0] == "train"
        assert group["path"].iloc[0] < group["path"].iloc[1] or group["split"].iloc[1] == "test"
        assert 0 <= group["distance"].iloc[1] <= MAX_DISTANCE
    across = table[table["split"] == "test"]
    assert sorted(across["path"]) == [
        "test/forest/copy_mirrored_small.jpg",
        "test/sea/copy_from_train.jpg",
    ]


def test_generated_photos_are_far_apart_under_phash(leaky_data):
    train = scan_image_folder(leaky_data / "train")
    originals = [i for i, rel in enumerate(train.relpaths()) if "copy_" not in rel]
    hashes = folder_hashes(train)[originals]
    distance = hash_distance(hashes[:, None], hashes[None, :])  # mirror images included
    np.fill_diagonal(distance, 64)
    assert distance.min() > 2 * MAX_DISTANCE  # a margin, not a near miss


def test_mirrored_copies_are_near_only_through_the_mirror_hash(leaky_data):
    """Plain pHash puts a mirrored copy far away; the rule compares with the mirror image too."""
    for copy in MIRRORED:
        pair = np.stack([duplicates.image_phash(leaky_data / copy)])
        original = np.stack([duplicates.image_phash(leaky_data / PLANTED[copy])])
        assert np.bitwise_count(pair[0, 0] ^ original[0, 0]) > 2 * MAX_DISTANCE, copy
        assert hash_distance(pair, original)[0] <= MAX_DISTANCE // 2, copy
        assert hash_distance(original, pair)[0] == hash_distance(pair, original)[0]  # symmetric
        # a plain hash (h, h) has no mirror: the same photo pair is not near
        plain = np.array([[pair[0, 0], pair[0, 0]]], dtype=np.uint64)
        assert hash_distance(plain, original[:, [0, 0]])[0] > 2 * MAX_DISTANCE
    with pytest.raises(ValueError, match=r"pairs of shape \[\.\.\., 2\].*\(3,\)"):
        hash_distance(np.zeros(3, np.uint64), np.zeros((3, 2), np.uint64))


@pytest.mark.parametrize("folds", [2, 3, 4])
def test_every_near_duplicate_group_lands_in_one_fold(leaky_data, folds):
    """StratifiedGroupKFold promises whole groups per fold, and no class-balance bound.

    Asserted: each class's count in each fold is within the largest group's size (2 here) of
    an even split, for several seeds; without groups (StratifiedKFold) planted pairs are split.
    """
    train = scan_image_folder(leaky_data / "train")
    groups = fold_groups(train)
    assert np.bincount(groups).max() == 2 and (np.bincount(groups) == 2).sum() == 6
    mirrored = train.paths.index(leaky_data / MIRRORED[0])
    assert groups[mirrored] == groups[train.paths.index(leaky_data / PLANTED[MIRRORED[0]])]
    split_without_groups = 0
    for seed in (0, 1, 7, 42):
        assignment = assign_folds(train.labels, folds, seed, groups=groups)
        assert set(assignment.tolist()) == set(range(folds))
        for group in np.unique(groups):
            assert np.unique(assignment[groups == group]).size == 1
        for label in np.unique(train.labels):
            per_fold = np.bincount(assignment[train.labels == label], minlength=folds)
            assert np.abs(per_fold - per_fold.sum() / folds).max() <= 2
        assert np.array_equal(assignment, assign_folds(train.labels, folds, seed, groups=groups))
        plain = assign_folds(train.labels, folds, seed)
        split_without_groups += sum(
            np.unique(plain[groups == g]).size > 1 for g in np.flatnonzero(np.bincount(groups) > 1)
        )
    assert split_without_groups > 0


def test_test_copy_of_a_training_photo_is_reported_as_leaked(leaky_data):
    train = scan_image_folder(leaky_data / "train")
    test = scan_image_folder(leaky_data / "test")
    assert test_images_with_train_copies(train, test) == {
        leaky_data / "test/sea/copy_from_train.jpg",
        leaky_data / "test/forest/copy_mirrored_small.jpg",  # mirrored, resized and re-encoded
    }
    report = inspect_dataset(str(leaky_data))
    findings = report.findings()
    across = findings[findings["kind"] == "near-duplicate across splits"]
    assert sorted(across["path"]) == [
        "train/forest/forest_003.jpg, test/forest/copy_mirrored_small.jpg",
        "train/sea/sea_003.jpg, test/sea/copy_from_train.jpg",
    ]
    assert (findings["kind"] == "near-duplicate within split").sum() == 6
    summary = report.leakage_summary()["value"].to_dict()
    assert summary == {
        "near-duplicate groups within train": 6,
        "train images in those groups": 12,
        "test images with a near-copy in train": 2,
        "test images": 10,
    }
    table = fold_balance(report.train, 3, seed=42)  # 01's fold table: the grouped assignment
    assignment = assign_folds(report.train.labels, 3, 42, groups=fold_groups(report.train))
    assert table.to_numpy().sum() == len(report.train)
    assert table["fold 0"].sum() == (assignment == 0).sum()


def test_conflicting_labels_are_named(leaky_data):
    (leaky_data / "train/forest/forest_000.jpg").rename(leaky_data / "train/sea/moved.jpg")
    findings = inspect_dataset(str(leaky_data)).findings()
    conflict = findings[findings["kind"].str.endswith("conflicting labels")]
    assert conflict["path"].tolist() == ["train/forest/copy_resized.jpg, train/sea/moved.jpg"]
    assert "classes ['forest', 'sea']" in conflict["detail"].iloc[0]


def test_hashes_are_recorded_per_file_version(leaky_data):
    train = scan_image_folder(leaky_data / "train")
    first = folder_hashes(train)
    assert duplicates.hash_record_file(train.root).is_file()
    # same size and mtime: the record is trusted (the evidence DVC's state database uses too)
    target = leaky_data / "train/forest/forest_005.jpg"
    replacement = leaky_data / "train/forest/forest_006.jpg"
    data = replacement.read_bytes()
    if len(data) == target.stat().st_size:  # pragma: no cover - sizes of random JPEGs differ
        pytest.skip("pick files of different sizes")
    target.write_bytes(data)
    os.utime(target, ns=(PAST_NS, PAST_NS))
    again = folder_hashes(train)
    index = train.paths.index(target)
    assert not np.array_equal(again[index], first[index])  # size changed: hashed again
    assert np.array_equal(again[index], first[train.paths.index(replacement)])
    fresh = scan_image_folder(leaky_data / "train")
    assert np.array_equal(folder_hashes(fresh), again)


def test_group_ids_are_connected_components_numbered_by_first_member():
    full = np.uint64(2**64 - 1)
    hashes = np.array([full, 0, 0xFF, 0xFFFF, 0x1], dtype=np.uint64)
    # 0 ~ 0xFF (8 bits) ~ 0xFFFF (8 bits from 0xFF, 16 from 0): one chain; 0x1 is 1 bit from 0
    assert group_ids(hashes, 8).tolist() == [0, 1, 1, 1, 1]
    assert group_ids(hashes, 7).tolist() == [0, 1, 1, 2, 1]  # 0xFF ~ 0x1 (7 bits), 0xFFFF alone
    i, j, d = near_pairs(hashes, 8)
    assert list(zip(i.tolist(), j.tolist(), d.tolist(), strict=True)) == [
        (1, 2, 8),
        (1, 4, 1),
        (2, 3, 8),
        (2, 4, 7),
    ]
    for pairs_per_block in (1, 10, 15):  # blocks of 1, 2 (last one ragged) and 3 rows of 5
        blocked = near_pairs(hashes, 8, pairs_per_block=pairs_per_block)
        assert all(np.array_equal(a, b) for a, b in zip(blocked, (i, j, d), strict=True))
    assert group_ids(np.zeros(0, dtype=np.uint64)).tolist() == []


def test_assign_folds_rejects_groups_that_do_not_fit():
    labels = np.array([0] * 6 + [1] * 6)
    with pytest.raises(ValueError, match="11 group ids for 12 labels"):
        assign_folds(labels, 2, 0, groups=np.arange(11))
    groups = np.array([0, 0, 0, 1, 1, 1, 2, 3, 4, 5, 6, 7])  # class 0 lies in two groups
    with pytest.raises(DataError, match="class 0 lies in 2 near-duplicate group"):
        assign_folds(labels, 3, 0, groups=groups)
    assert set(assign_folds(labels, 2, 0, groups=groups).tolist()) == {0, 1}


def test_shipped_data_audit(real_data):
    train = scan_image_folder(real_data / "train")
    test = scan_image_folder(real_data / "test")
    table = near_duplicates(train, test)
    assert _groups_as_sets(table) == {
        frozenset({"train/forest/20916.jpg", "train/forest/22917.jpg"})  # re-encoded, md5 differs
    }
    assert test_images_with_train_copies(train, test) == set()


def test_a_record_from_before_the_mirror_hash_is_not_reused(leaky_data):
    """A format-1 record (no ``mirror`` hashes, older reader identity) is hashed again, not misread."""
    import json

    from imgcls.data import validation

    train = scan_image_folder(leaky_data / "train")
    pairs = folder_hashes(train)
    record = validation.validation_record_file(train.root)
    document = json.loads(record.read_text())
    assert document["reader"].endswith(f"record {validation.RECORD_FORMAT}")
    old = dict(document, reader=document["reader"].rsplit("; record", 1)[0])
    del old["mirror"]
    record.write_text(json.dumps(old))
    assert validation.load_checked(train.root) == {}  # another reader: not reused
    del document["mirror"]  # the current identity but no mirror hashes: unreadable, not half-read
    record.write_text(json.dumps(document))
    assert validation.load_checked(train.root) == {}
    assert np.array_equal(folder_hashes(train), pairs)
    assert set(json.loads(record.read_text())["mirror"]) == set(train.relpaths())
