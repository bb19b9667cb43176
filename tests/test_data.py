"""Scanning and validating image folders, the data version and the shared folds."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgcls.core import paths
from imgcls.data.cache import (
    DecodedImages,
    cache_file,
    decoded_images,
    decoded_key,
    remove_stale_partial_files,
)
from imgcls.data.folders import (
    DataError,
    check_same_classes,
    data_version,
    directory_md5,
    expected_data_md5,
    is_ignored,
    require_split,
    scan_image_folder,
)
from imgcls.data.folds import assign_folds, fold_assignment_hash
from imgcls.data.images import ImageReadError, load_rgb
from imgcls.modeling.features import cached_features
from tests.conftest import make_image, write_dataset


def test_scan_sorts_classes_and_labels_files(image_dataset):
    folder = scan_image_folder(image_dataset / "train")
    assert folder.classes == ["forest", "sea"]
    assert folder.class_counts() == {"forest": 12, "sea": 12}
    assert all(
        folder.classes[label] == path.parent.name
        for path, label in zip(folder.paths, folder.labels, strict=True)
    )


def _write_bad_files(train):
    good = next((train / "sea").glob("*.jpg")).read_bytes()
    (train / "sea" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (train / "sea" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"garbage" * 50)
    (train / "sea" / "empty.jpg").write_bytes(b"")
    (train / "forest" / "notes.txt").write_text("not an image")
    (train / "forest" / "fake.png").write_text("plain text with a png name")


def test_bad_files_are_reported_by_path(image_dataset):
    train = image_dataset / "train"
    _write_bad_files(train)
    with pytest.raises(DataError) as error:
        scan_image_folder(train)
    message = str(error.value)
    assert "5 unusable file(s)" in message
    for name, reason in [
        ("truncated.jpg", "truncated"),
        ("corrupt.jpg", "image"),
        ("empty.jpg", "0 bytes"),
        ("notes.txt", "not an image"),
        ("fake.png", "not an image"),
    ]:
        line = next(line for line in message.splitlines() if name in line)
        assert reason in line, line
        assert str(train) in line
    assert "--skip-bad-images" in message


def test_bad_files_can_be_skipped_explicitly_and_are_counted(image_dataset):
    train = image_dataset / "train"
    _write_bad_files(train)
    folder = scan_image_folder(train, skip_bad=True)
    assert len(folder) == 24
    assert len(folder.skipped) == 5


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "I;16"])
def test_other_colour_modes_and_png_are_converted(image_dataset, isolated_cache, mode):
    train = image_dataset / "train"
    rgb = Image.open(next((train / "sea").glob("*.jpg"))).convert("RGB")
    converted = rgb.convert(mode) if mode != "I;16" else rgb.convert("L").convert("I;16")
    ext = "jpg" if mode in ("L", "CMYK") else "png"
    converted.save(train / "sea" / f"odd.{ext}")
    folder = scan_image_folder(train)
    assert len(folder) == 25
    images = decoded_images(folder, 32, data_version(image_dataset))
    assert images.shape == (25, 3, 32, 32) and images.dtype == np.uint8


def test_empty_class_single_class_and_mismatched_classes(image_dataset):
    train = image_dataset / "train"
    (train / "mountain").mkdir()
    with pytest.raises(DataError, match=r"\['mountain'\] contain no usable images"):
        scan_image_folder(train)
    (train / "mountain").rmdir()
    shutil.rmtree(train / "sea")
    with pytest.raises(DataError, match="at least two"):
        scan_image_folder(train)
    other = image_dataset / "other"
    for name in ("forest", "desert"):
        shutil.copytree(image_dataset / "test" / "forest", other / name)
    with pytest.raises(DataError, match="missing: \\['sea'\\], unexpected: \\['desert'\\]"):
        check_same_classes(scan_image_folder(image_dataset / "test"), scan_image_folder(other))


def test_missing_data_names_dvc_pull(tmp_path, monkeypatch):
    monkeypatch.setenv("IMGCLS_DATA_DIR", str(tmp_path / "data"))
    with pytest.raises(DataError, match="dvc pull"):
        require_split("train")
    with pytest.raises(DataError, match="dvc pull"):
        data_version()


def test_directory_md5_follows_dvc_and_changes_with_content(image_dataset):
    first = directory_md5(image_dataset)
    assert first.endswith(".dir") and first == directory_md5(image_dataset)
    Image.new("RGB", (8, 8)).save(image_dataset / "train" / "sea" / "new.jpg")
    assert directory_md5(image_dataset) != first


def test_data_differing_from_data_dvc_warns_and_records_real_hash(image_dataset, monkeypatch):
    monkeypatch.setenv("IMGCLS_DATA_DIR", str(image_dataset))
    with pytest.warns(UserWarning, match="differs from data.dvc"):
        version = data_version()
    assert version == directory_md5(image_dataset)
    assert version != expected_data_md5()


@pytest.mark.realdata
def test_real_data_matches_data_dvc(real_data):
    assert expected_data_md5() == "44f106a2f74236e45f5d73b1491bd2b5.dir"
    assert directory_md5(real_data) == expected_data_md5()
    train = scan_image_folder(real_data / "train")
    test = scan_image_folder(real_data / "test")
    assert train.class_counts() == {"forest": 454, "sea": 495}
    assert test.class_counts() == {"forest": 20, "sea": 15}


def test_folds_are_stratified_seeded_and_reproducible():
    labels = np.array([0] * 30 + [1] * 20)
    folds = assign_folds(labels, 5, seed=7)
    assert np.array_equal(folds, assign_folds(labels, 5, seed=7))
    assert not np.array_equal(folds, assign_folds(labels, 5, seed=8))
    for k in range(5):
        assert np.bincount(labels[folds == k]).tolist() == [6, 4]
    uneven = np.array([0] * 7 + [1] * 6 + [2] * 5)  # 18 samples in 4 folds
    folds = assign_folds(uneven, 4, seed=1)
    assert sorted(np.bincount(folds).tolist()) == [4, 4, 5, 5]
    for label in range(3):
        per_fold = np.bincount(folds[uneven == label], minlength=4)
        assert per_fold.max() - per_fold.min() <= 1
    with pytest.raises(DataError, match="smallest class has 20"):
        assign_folds(labels, 21, seed=0)
    with pytest.raises(DataError, match="folds >= 2"):
        assign_folds(labels, 1, seed=0)


@pytest.mark.parametrize(
    ("counts", "folds"), [((454, 495), 5), ((454, 495), 3), ((7, 6, 5), 4), ((2, 9, 31, 4), 2)]
)
def test_folds_partition_every_class_evenly(counts, folds):
    """The real train split's class sizes (454 forest, 495 sea) and uneven multi-class ones."""
    labels = np.repeat(np.arange(len(counts)), counts)
    np.random.default_rng(3).shuffle(labels)
    assignment = assign_folds(labels, folds, seed=42)
    assert assignment.dtype == np.int64 and assignment.shape == labels.shape
    assert set(assignment.tolist()) == set(range(folds))  # every sample in exactly one fold
    sizes = np.bincount(assignment, minlength=folds)
    assert sizes.max() - sizes.min() <= 1
    for label, count in enumerate(counts):
        per_fold = np.bincount(assignment[labels == label], minlength=folds)
        assert per_fold.sum() == count
        assert per_fold.max() - per_fold.min() <= 1
    assert np.array_equal(assignment, assign_folds(labels.copy(), folds, seed=42))


@pytest.mark.parametrize(
    ("counts", "folds"), [((454, 495), 5), ((454, 495), 3), ((7, 6, 5), 4), ((2, 9, 31, 4), 2)]
)
def test_grouped_folds_with_no_near_copies_stay_stratified(counts, folds):
    """Every sample its own group (StratifiedGroupKFold): as balanced as StratifiedKFold.

    Not the same assignment, so a grid scored with groups has another fold_assignment hash.
    """
    labels = np.repeat(np.arange(len(counts)), counts)
    np.random.default_rng(3).shuffle(labels)
    singletons = np.arange(labels.size)
    assignment = assign_folds(labels, folds, seed=42, groups=singletons)
    assert assignment.dtype == np.int64 and set(assignment.tolist()) == set(range(folds))
    sizes = np.bincount(assignment, minlength=folds)
    assert sizes.max() - sizes.min() <= 1
    for label in range(len(counts)):
        per_fold = np.bincount(assignment[labels == label], minlength=folds)
        assert per_fold.max() - per_fold.min() <= 1
    assert np.array_equal(assignment, assign_folds(labels, folds, seed=42, groups=singletons))
    assert not np.array_equal(assignment, assign_folds(labels, folds, seed=43, groups=singletons))
    # without groups: exactly scikit-learn's StratifiedKFold
    from sklearn.model_selection import StratifiedKFold

    before = np.empty(labels.size, dtype=np.int64)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=42)
    for fold, (_, held_out) in enumerate(splitter.split(labels[:, None], labels)):
        before[held_out] = fold
    assert np.array_equal(assign_folds(labels, folds, seed=42, groups=None), before)
    # one-image groups only (no near-copies): the grouped rule gives the same folds
    assert np.array_equal(assignment, before)


def test_fold_assignment_hash_names_which_file_is_in_which_fold():
    paths_ = ["sea/b.jpg", "forest/a.jpg", "sea/c.jpg"]
    folds = np.array([1, 0, 1])
    name = fold_assignment_hash(paths_, folds)
    lines = "forest/a.jpg\t0\nsea/b.jpg\t1\nsea/c.jpg\t1"
    assert name == hashlib.sha256(lines.encode()).hexdigest()[:12]
    assert len(name) == 12 and int(name, 16) >= 0
    order = [2, 0, 1]  # the listing order does not matter, only the pairs
    assert fold_assignment_hash([paths_[i] for i in order], folds[order]) == name
    assert fold_assignment_hash(paths_, np.array([1, 0, 0])) != name  # one file moved
    assert fold_assignment_hash(["sea/x.jpg", *paths_[1:]], folds) != name  # one file renamed
    with pytest.raises(ValueError, match="3 paths"):
        fold_assignment_hash(paths_, folds[:2])


def test_fold_assignment_hash_of_a_scanned_folder_follows_the_seed(image_dataset):
    folder = scan_image_folder(image_dataset / "train")
    first = fold_assignment_hash(folder.relpaths(), assign_folds(folder.labels, 3, seed=0))
    again = fold_assignment_hash(folder.relpaths(), assign_folds(folder.labels, 3, seed=0))
    other = fold_assignment_hash(folder.relpaths(), assign_folds(folder.labels, 3, seed=1))
    assert first == again != other


def test_decoded_cache_is_written_atomically_and_reused(image_dataset, isolated_cache):
    folder = scan_image_folder(image_dataset / "train")
    md5 = data_version(image_dataset)
    first = decoded_images(folder, 32, md5)
    files = list((isolated_cache / "decoded").glob("*.npy"))
    assert len(files) == 1
    assert not list((isolated_cache / "decoded").glob(".*tmp"))
    mtime = files[0].stat().st_mtime_ns
    assert np.array_equal(first, decoded_images(folder, 32, md5))
    assert files[0].stat().st_mtime_ns == mtime
    assert decoded_images(folder, 40, md5).shape[-1] == 40


def test_background_decoder_fills_rows_in_file_order(image_dataset, isolated_cache):
    folder = scan_image_folder(image_dataset / "train")
    decoder = DecodedImages(folder, 24, data_version(image_dataset))
    decoder.wait_for(1)
    assert np.array_equal(decoder.array[0], load_rgb(folder.paths[0], 24).transpose(2, 0, 1))
    whole = decoder.result()
    for index, path in enumerate(folder.paths):
        assert np.array_equal(whole[index], load_rgb(path, 24).transpose(2, 0, 1))


def test_background_decoder_hands_a_decoding_error_to_the_consumer(image_dataset, isolated_cache):
    folder = scan_image_folder(image_dataset / "train")
    folder.paths[-1].write_bytes(b"not a jpeg any more")  # broken after the scan validated it
    decoder = DecodedImages(folder, 24, data_version(image_dataset))
    with pytest.raises(ImageReadError, match=r"sea_011\.jpg: not an image file"):
        decoder.result()


def test_cold_feature_cache_also_stores_the_decoded_images(image_dataset, isolated_cache):
    folder = scan_image_folder(image_dataset / "train")
    md5 = data_version(image_dataset)
    features, hit = cached_features(folder, "resnet18", "none", 32, md5)
    assert not hit and features.shape == (len(folder), 512)
    stored = np.load(cache_file("decoded", decoded_key(folder, 32, md5)))
    assert np.array_equal(stored, decoded_images(folder, 32, md5))
    again, hit = cached_features(folder, "resnet18", "none", 32, md5)
    assert hit and np.array_equal(again, features)


def test_decoding_first_or_beside_the_forward_pass_gives_the_same_features(
    image_dataset, isolated_cache, tmp_path, monkeypatch
):
    import torch

    import imgcls.modeling.features as features_module
    from imgcls.data.cache import DecodedImages, decode_workers, free_cores
    from imgcls.data.images import usable_cores

    decoders: list[int] = []  # the decode threads each cold cached_features call started

    class RecordingDecodedImages(DecodedImages):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            decoders.append(self.workers)

    monkeypatch.setattr(features_module, "DecodedImages", RecordingDecodedImages)
    folder = scan_image_folder(image_dataset / "train")
    md5 = data_version(image_dataset)
    cpu = torch.device("cpu")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(usable_cores())  # torch on every core: no core free, decode first
        assert free_cores("cpu") == 0 and decode_workers("cpu") == 1
        assert free_cores("cuda") == usable_cores() - 1  # one thread queues the CUDA kernels
        first, hit = cached_features(folder, "resnet18", "none", 32, md5, device=cpu)
        assert not hit
        monkeypatch.setenv("IMGCLS_CACHE_DIR", str(tmp_path / "other-cache"))
        torch.set_num_threads(1)  # a core free wherever there are two: decode beside
        beside, hit = cached_features(folder, "resnet18", "none", 32, md5, device=cpu)
        assert not hit
        free = free_cores("cpu")
    finally:
        torch.set_num_threads(threads)
    # decode first: every core decodes; beside: only the cores the forward pass leaves free
    assert decoders == [usable_cores(), free if free >= 1 else usable_cores()]
    np.testing.assert_allclose(first, beside, rtol=0, atol=1e-5)  # thread counts may reorder sums


def test_corrupt_cache_file_is_rebuilt_not_trusted(image_dataset, isolated_cache):
    folder = scan_image_folder(image_dataset / "train")
    md5 = data_version(image_dataset)
    # An in-memory copy: the cache is memory-mapped, and reading a mapping of a file truncated in
    # place beyond its new end is SIGBUS (mmap(2)); the project only ever replaces cache files.
    good = np.array(decoded_images(folder, 32, md5))
    path = next((isolated_cache / "decoded").glob("*.npy"))
    path.write_bytes(path.read_bytes()[:100])
    assert np.array_equal(decoded_images(folder, 32, md5), good)


def test_dvc_config_points_at_shared_remote():
    config = (paths.REPO_ROOT / ".dvc" / "config").read_text()
    assert "remote = storage" in config
    assert "../../shared/dvc-remote" in config
    assert (
        json.dumps("44f106a2f74236e45f5d73b1491bd2b5.dir")[1:-1]
        in (paths.REPO_ROOT / "data.dvc").read_text()
    )


def test_only_stale_partial_cache_files_are_removed(isolated_cache):
    (isolated_cache / "decoded").mkdir(parents=True)
    stale = isolated_cache / "decoded" / ".abc.npy.x1.tmp"
    fresh = isolated_cache / "decoded" / ".def.npy.x2.tmp"
    entry = isolated_cache / "decoded" / "abc.npy"
    for path in (stale, fresh, entry):
        path.write_bytes(b"partial")
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    os.utime(entry, (two_hours_ago, two_hours_ago))
    assert remove_stale_partial_files() == [stale]
    assert not stale.exists() and fresh.exists() and entry.exists()


# --- The one listing rule: hidden files/folders and OS metadata are not data; links followed ---


def _jupyter_and_os_litter(class_dir: Path, photo: Path) -> None:
    """What JupyterLab, macOS and Windows leave in a folder a user opened or copied."""
    checkpoints = class_dir / ".ipynb_checkpoints"
    checkpoints.mkdir()
    (checkpoints / "notes-checkpoint.ipynb").write_text('{"cells": []}')
    shutil.copy(photo, checkpoints / f"{photo.stem}-checkpoint.jpg")  # an image copy: a leak
    (class_dir / f"._{photo.name}").write_bytes(b"\x00\x05\x16\x07" + b"\x00" * 60)
    (class_dir / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (class_dir / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (class_dir / "desktop.ini").write_text("[.ShellClassInfo]\n")


def test_notebook_checkpoints_and_os_files_are_not_part_of_the_dataset(image_dataset):
    train = image_dataset / "train"
    before = scan_image_folder(train)
    version_before = directory_md5(image_dataset)
    _jupyter_and_os_litter(train / "sea", before.paths[-1])
    after = scan_image_folder(train)  # no DataError for the notebook, no copy trained on
    assert after.paths == before.paths and after.skipped == []
    assert directory_md5(image_dataset) == version_before


def test_macos_zip_folder_and_hidden_folders_at_any_depth_are_ignored(image_dataset):
    train = image_dataset / "train"
    before = scan_image_folder(train)
    macosx = train / "__MACOSX" / "sea"
    macosx.mkdir(parents=True)
    shutil.copy(before.paths[0], macosx / "._x.jpg")
    nested = train / "forest" / "album" / ".thumbnails"
    nested.mkdir(parents=True)
    shutil.copy(before.paths[0], nested / "thumb.jpg")
    (train / ".trash").mkdir()
    shutil.copy(before.paths[0], train / ".trash" / "old.jpg")
    (train / "sea" / ".git").mkdir()
    (train / "sea" / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    after = scan_image_folder(train)
    assert after.classes == ["forest", "sea"] and after.paths == before.paths


def test_symlinked_class_folder_is_followed_and_versioned_by_its_content(image_dataset, tmp_path):
    elsewhere = tmp_path / "elsewhere" / "sea"
    shutil.move(str(image_dataset / "train" / "sea"), elsewhere)
    (image_dataset / "train" / "sea").symlink_to(elsewhere, target_is_directory=True)
    nested = tmp_path / "more-sea"
    nested.mkdir()
    photos = sorted(elsewhere.glob("*.jpg"))
    shutil.copy(photos[0], nested / "extra.jpg")
    (elsewhere / "more").symlink_to(nested, target_is_directory=True)  # a link inside a link
    folder = scan_image_folder(image_dataset / "train")
    assert image_dataset / "train" / "sea" / "more" / "extra.jpg" in folder.paths
    assert folder.class_counts()["sea"] == 13
    version = data_version(image_dataset)
    # replacing the file behind a link changes the data version (and so every cache key)
    target = nested / "extra.jpg"
    shutil.copy(photos[-1], target)
    os.utime(target, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    assert data_version(image_dataset) != version


def test_symlink_loop_and_broken_link_are_refused_by_name(image_dataset):
    sea = image_dataset / "train" / "sea"
    (sea / "loop").symlink_to(sea, target_is_directory=True)
    with pytest.raises(DataError, match=r"sea/loop: symbolic link loops back"):
        scan_image_folder(image_dataset / "train")
    (sea / "loop").unlink()
    (sea / "gone.jpg").symlink_to(sea / "deleted.jpg")
    with pytest.raises(DataError, match=r"sea/gone\.jpg: broken symbolic link"):
        scan_image_folder(image_dataset / "train")
    with pytest.raises(DataError, match=r"gone\.jpg: broken symbolic link"):
        data_version(image_dataset)


def test_is_ignored_rule():
    for name in (".ipynb_checkpoints", "._IMG_1.jpg", ".DS_Store", "Thumbs.db", "DESKTOP.INI"):
        assert is_ignored(name), name
    for name in ("__MACOSX", "__macosx"):
        assert is_ignored(name)
    for name in ("IMG_1.jpg", "sea (coast)", "_private", "thumbs.db.jpg"):
        assert not is_ignored(name), name


def test_dataset_listing_rule_matches_dvcignore(real_data):
    """DVC hashes what the pipeline lists: the data version equals data.dvc's md5."""
    assert data_version(real_data) == expected_data_md5()
    patterns = (paths.REPO_ROOT / ".dvcignore").read_text().split()
    assert ".*" in patterns and "__MACOSX/" in patterns and "Thumbs.db" in patterns


def test_cache_version_keys_train_by_the_dataset_and_other_splits_by_their_own(tmp_path):
    """One rule for every cache writer and reader (validation priming, 02, 03, the embedding
    audit): train under the dataset's version, test and an --eval-dir under their own."""
    from imgcls.data.folders import cache_version, data_version, scan_image_folder

    root = tmp_path / "data"
    write_dataset(root / "train", {"forest": 3, "sea": 3}, seed=1, size=24)
    write_dataset(root / "test", {"forest": 2, "sea": 2}, seed=2, size=24)
    write_dataset(tmp_path / "phone", {"forest": 2, "sea": 2}, seed=3, size=24)
    train = scan_image_folder(root / "train")
    test = scan_image_folder(root / "test")
    extra = scan_image_folder(tmp_path / "phone")
    assert cache_version(train, training=True) == data_version(root)
    assert cache_version(test, training=False) == data_version(root / "test")
    assert cache_version(extra, training=False) == data_version(tmp_path / "phone")
    # a new test photo changes the training split's key (the run key changes too) ...
    before_train = cache_version(train, training=True)
    before_test = cache_version(test, training=False)
    make_image("sea", np.random.default_rng(9), 24).save(root / "test" / "sea" / "new.jpg")
    assert cache_version(train, training=True) != before_train
    assert cache_version(test, training=False) != before_test
    # ... and a new training photo leaves the other splits' keys alone
    after_test = cache_version(test, training=False)
    make_image("sea", np.random.default_rng(8), 24).save(root / "train" / "sea" / "new.jpg")
    assert cache_version(test, training=False) == after_test
    assert cache_version(extra, training=False) == data_version(tmp_path / "phone")
