"""Checks that scale (issue 13): one decode per file version validates and hashes it, and an
unchanged dataset is checked again by a stat per file (no image decoded, no byte hashed)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import imagehash
import numpy as np
import pytest
from PIL import Image

from imgcls.data import folders, validation
from imgcls.data import images as images_module
from imgcls.data.duplicates import folder_hashes, image_phash
from imgcls.data.folders import ImageFolder, data_version, scan_image_folder
from imgcls.data.images import read_image
from tests.conftest import make_image


def backdate(root: Path, seconds: float = 60.0) -> None:
    """Give every file under ``root`` an mtime ``seconds`` ago (older than the racy window)."""
    stamp = time.time_ns() - int(seconds * 1e9)
    for path in root.rglob("*"):
        if path.is_file():
            os.utime(path, ns=(stamp, stamp))


def old_phash(path: Path) -> int:
    """The hash as the leakage audit computed it before issue 13: a second, separate read."""
    return old_phash_of(read_image(path, target_size=32))


def old_phash_of(img: Image.Image) -> int:
    """``imagehash.phash(img, hash_size=8)`` as a Python int."""
    return int(str(imagehash.phash(img, hash_size=8)), 16)


def count_calls(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list[Path]:
    """Record the first argument of every call of ``module.name``."""
    seen: list[Path] = []
    real = getattr(module, name)

    def spy(path: Path, *args: object) -> object:
        seen.append(path)
        return real(path, *args)

    monkeypatch.setattr(module, name, spy)
    return seen


def test_the_validation_decode_hashes_the_shipped_photos_as_before(real_data):
    files = sorted(p for p in (real_data / "train").rglob("*.jpg"))[::4]
    assert len(files) > 200
    for path in files:
        reason, value = validation.check_and_hash(path)
        assert reason is None and value is not None and value[0] == old_phash(path), path


@pytest.mark.parametrize(
    ("size", "fmt"),
    [((1600, 1200), "JPEG"), ((700, 500), "JPEG"), ((90, 70), "JPEG"), ((300, 200), "PNG")],
)
def test_the_validation_decode_hashes_any_size_as_before(tmp_path, size, fmt):
    """1/8 drafts (1600 and 700 px), smaller drafts and none (90 px), and other formats."""
    rng = np.random.default_rng(3)
    img = make_image("sea", rng, size=64).resize(size, Image.Resampling.BICUBIC)
    path = tmp_path / f"photo.{fmt.lower()}"
    img.save(path, fmt)
    value = validation.check_and_hash(path)[1]
    assert value is not None and value[0] == old_phash(path) == image_phash(path)[0]
    mirrored = read_image(path, target_size=32).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    # the mirror hash is that of the mirror image (up to LANCZOS rounding: within 4 bits)
    assert np.bitwise_count(np.uint64(value[1]) ^ np.uint64(old_phash_of(mirrored))) <= 4


def test_one_decode_per_file_validates_and_hashes(image_dataset, isolated_cache, monkeypatch):
    train = image_dataset / "train"
    backdate(train)
    decoded = count_calls(monkeypatch, images_module, "read_for_checks")
    scanned = scan_image_folder(train)
    assert sorted(decoded) == sorted(scanned.paths)  # the scan decodes each file once
    decoded.clear()
    hashes = folder_hashes(scanned)
    assert decoded == []  # the hashes came with the validation
    assert hashes[:, 0].tolist() == [old_phash(p) for p in scanned.paths]
    record = json.loads(validation.validation_record_file(train).read_text())
    assert set(record["phash"]) == set(record["mirror"]) == set(record["files"])
    assert set(record["files"]) == set(scanned.relpaths())
    assert not (isolated_cache / "phash").exists()
    again = scan_image_folder(train)
    assert np.array_equal(folder_hashes(again), hashes) and decoded == []


def test_hashing_part_of_a_folder_keeps_the_rest_of_the_record(image_dataset, isolated_cache):
    train = image_dataset / "train"
    backdate(train)
    whole = scan_image_folder(train, validate=False)
    part = ImageFolder(whole.root, whole.classes, whole.paths[:5], whole.labels[:5])
    first = folder_hashes(part)  # nothing recorded yet: these five are validated and hashed
    assert len(validation.load_validated(train)) == 5
    scan_image_folder(train)
    folder_hashes(part)
    assert len(validation.load_validated(train)) == len(whole)
    assert np.array_equal(folder_hashes(part), first)


def test_a_bad_file_is_named_when_hashed(image_dataset, isolated_cache):
    train = image_dataset / "train"
    cut = train / "sea" / "cut.jpg"
    cut.write_bytes((train / "sea" / "sea_000.jpg").read_bytes()[:200])
    folder = scan_image_folder(train, validate=False)
    with pytest.raises(images_module.ImageReadError, match=r"cut\.jpg: corrupt or truncated"):
        folder_hashes(folder)


def test_the_data_version_reads_each_file_once_per_file_version(
    image_dataset, isolated_cache, monkeypatch
):
    backdate(image_dataset)
    monkeypatch.setattr(folders, "_VERSION_CACHE", {})
    read = count_calls(monkeypatch, folders, "file_md5")
    first = data_version(image_dataset)
    files = folders.dataset_files(image_dataset)
    assert sorted(read) == sorted(files)
    # DVC's directory hash, computed here from the bytes
    entries = [
        {
            "md5": hashlib.md5(p.read_bytes()).hexdigest(),
            "relpath": p.relative_to(image_dataset).as_posix(),
        }
        for p in files
    ]
    assert first == hashlib.md5(json.dumps(entries).encode()).hexdigest() + ".dir"
    read.clear()
    monkeypatch.setattr(folders, "_VERSION_CACHE", {})  # another process: only the record is left
    assert data_version(image_dataset) == first and read == []
    changed = image_dataset / "train" / "sea" / "sea_001.jpg"
    make_image("forest", np.random.default_rng(7)).save(changed, quality=70)
    past = time.time_ns() - 60 * 10**9
    os.utime(changed, ns=(past, past))  # not "racy", so it is recorded again
    monkeypatch.setattr(folders, "_VERSION_CACHE", {})
    assert data_version(image_dataset) != first and read == [changed]


def test_an_unchanged_dataset_is_checked_by_stat_alone(image_dataset, isolated_cache, monkeypatch):
    """What ``--dry-run`` does with the data: scan both splits, hash, data version."""
    backdate(image_dataset)

    def checks() -> tuple[str, list[int]]:
        monkeypatch.setattr(folders, "_VERSION_CACHE", {})
        train = scan_image_folder(image_dataset / "train")
        scan_image_folder(image_dataset / "test")
        return data_version(image_dataset), folder_hashes(train).tolist()

    first = checks()
    decoded = count_calls(monkeypatch, images_module, "read_for_checks")
    read = count_calls(monkeypatch, folders, "file_md5")
    assert checks() == first
    assert decoded == [] and read == []


def test_notebook_01s_exact_duplicate_check_reads_an_unchanged_dataset_once(
    image_dataset, isolated_cache, monkeypatch
):
    """01's byte-identical-copy table uses the same per-file-version md5 records."""
    from imgcls.data.datacheck import duplicate_groups

    copy = image_dataset / "test" / "forest" / "copy_of_train.jpg"
    copy.write_bytes((image_dataset / "train" / "forest" / "forest_000.jpg").read_bytes())
    backdate(image_dataset)
    splits = [scan_image_folder(image_dataset / s) for s in ("train", "test")]
    read = count_calls(monkeypatch, folders, "file_md5")
    groups = duplicate_groups(splits)
    assert list(groups.values()) == [
        ["train/forest/forest_000.jpg", "test/forest/copy_of_train.jpg"]
    ]
    assert len(read) == sum(len(s.paths) for s in splits)
    read.clear()
    assert duplicate_groups(splits) == groups and read == []
