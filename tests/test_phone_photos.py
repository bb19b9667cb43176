"""Phone-sized photos (issue 14): draft decode parity, cheap and recorded validation, parallel
decoding with the same result, and the shipped data decoded exactly as before."""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps, JpegImagePlugin

from imgcls.core import paths
from imgcls.data import cache as cache_module
from imgcls.data import images as images_module
from imgcls.data.cache import DecodedImages, decode_workers
from imgcls.data.folders import (
    DataError,
    scan_image_folder,
)
from imgcls.data.images import check_image, fit_square, load_rgb, read_image
from imgcls.data.validation import load_validated, validation_record_file
from tests.conftest import make_image, write_dataset

sys.path.insert(0, str(paths.REPO_ROOT / "benchmarks"))

from bench_phone import PHONE_SIZE, phone_photo

PHONE_PIXELS = PHONE_SIZE[0] * PHONE_SIZE[1]  # 12,192,768


def backdate(root: Path, seconds: float = 60.0) -> None:
    """Give every file under ``root`` an mtime ``seconds`` ago (older than the racy window)."""
    stamp = time.time_ns() - int(seconds * 1e9)
    for path in root.rglob("*"):
        if path.is_file():
            os.utime(path, ns=(stamp, stamp))


def count_validations(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Record every file that imgcls.data.images.read_for_checks (the validator) decodes."""
    seen: list[Path] = []
    real = images_module.read_for_checks

    def spy(path: Path) -> Image.Image:
        seen.append(path)
        return real(path)

    monkeypatch.setattr(images_module, "read_for_checks", spy)
    return seen


# --- 1. Draft decoding of 12-MP photos gives the same predictions as a full decode -----------


def _real_photos(real_data: Path) -> tuple[list[Path], np.ndarray, list[Path], np.ndarray]:
    """4 photos per class to compare on, and 32 other photos per class to train a head on."""
    folder = scan_image_folder(real_data / "train", validate=False)
    compare: list[int] = []
    train: list[int] = []
    for label in range(len(folder.classes)):
        members = np.flatnonzero(folder.labels == label)
        compare += list(members[:4])
        train += list(members[4::7][:32])
    pick = lambda rows: ([folder.paths[i] for i in rows], folder.labels[rows])  # noqa: E731
    return *pick(compare), *pick(train)


@pytest.mark.realdata
def test_draft_decoded_12mp_photos_give_the_full_decode_predictions(real_data, tmp_path):
    """8 shipped photos upscaled to 4032x3024 (q90): draft vs full decode at the model's 160 px.

    Frozen efficientnet_lite0 (ImageNet) embeddings and the probabilities of a linear head trained
    on 64 other shipped photos. Measured: cosine >= 0.9993, |delta p| <= 0.001, mean pixel
    difference 0.3 levels. Tolerances: cosine >= 0.995, |delta p| <= 0.01 (a decision can only
    change for a photo already within 0.01 of the 0.5 boundary) and the same predicted class,
    and under one uint8 level on average: the draft decode is a slightly different
    anti-aliasing filter, not a different picture (the 150-px original of the same photo,
    framed differently, is at cosine ~0.84).
    """
    from imgcls.modeling.features import embed_images
    from imgcls.modeling.models import build_backbone

    sources, labels, train_paths, train_labels = _real_photos(real_data)
    phones = []
    for source in sources:
        phones.append(tmp_path / f"{source.parent.name}-{source.stem}.jpg")
        phone_photo(source, phones[-1])
    assert Image.open(phones[0]).size == PHONE_SIZE
    drafted = [read_image(p, target_size=160) for p in phones]
    assert {img.size for img in drafted} == {(504, 378)}  # decoded at 1/8 scale
    draft = np.stack([load_rgb(p, 160).transpose(2, 0, 1) for p in phones])
    full = np.stack([fit_square(read_image(p), 160).transpose(2, 0, 1) for p in phones])
    assert np.abs(draft.astype(int) - full.astype(int)).mean() < 1.0

    torch.manual_seed(0)
    backbone, _, prep = build_backbone("efficientnet_lite0", "imagenet", 160)
    cpu = torch.device("cpu")
    embed_draft = embed_images(backbone, draft, prep, cpu)
    embed_full = embed_images(backbone, full, prep, cpu)
    cosine = (embed_draft * embed_full).sum(1) / (
        np.linalg.norm(embed_draft, axis=1) * np.linalg.norm(embed_full, axis=1)
    )
    assert cosine.min() >= 0.995, cosine

    assert not set(train_paths) & set(sources)
    train = embed_images(
        backbone, np.stack([load_rgb(p, 160).transpose(2, 0, 1) for p in train_paths]), prep, cpu
    )
    head = torch.nn.Linear(train.shape[1], 2)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    x, y = torch.from_numpy(train), torch.from_numpy(train_labels)
    for _ in range(200):
        loss = torch.nn.functional.cross_entropy(head(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        p_draft = torch.softmax(head(torch.from_numpy(embed_draft)), 1).numpy()
        p_full = torch.softmax(head(torch.from_numpy(embed_full)), 1).numpy()
    assert np.abs(p_draft - p_full).max() <= 0.01, (p_draft, p_full)
    assert np.array_equal(p_draft.argmax(1), p_full.argmax(1))
    assert (p_full.argmax(1) == labels).mean() >= 0.75  # the head is a real classifier


# --- 2. Validation: cheap (1/8-scale decode), still catches truncated and corrupt files --------


@pytest.fixture(scope="module")
def phone_jpegs(tmp_path_factory) -> dict[str, bytes]:
    """A 12-MP baseline and a 12-MP progressive JPEG (q90) of a generated photo-like picture."""
    folder = tmp_path_factory.mktemp("phone")
    small = make_image("sea", np.random.default_rng(3), size=96)
    big = small.resize(PHONE_SIZE, Image.Resampling.BICUBIC)
    out = {}
    for kind, options in (("baseline", {}), ("progressive", {"progressive": True})):
        big.save(folder / f"{kind}.jpg", "JPEG", quality=90, **options)
        out[kind] = (folder / f"{kind}.jpg").read_bytes()
    return out


def _corrupt_middle(data: bytes) -> bytes:
    """Overwrite 2,000 bytes in the middle of the entropy-coded data with random bytes."""
    broken = bytearray(data)
    middle = len(data) // 2
    broken[middle : middle + 2000] = np.random.default_rng(0).bytes(2000)
    return bytes(broken)


BROKEN = {
    "cut at 50%": lambda b: b[: len(b) // 2],
    "cut at 99.9% (only the last scan's end is missing)": lambda b: b[: int(len(b) * 0.999)],
    "end-of-image marker missing": lambda b: b[:-2],
    "second half zeroed": lambda b: b[: len(b) // 2] + bytes(len(b) - len(b) // 2),
    "garbage in the middle": _corrupt_middle,
}


@pytest.mark.parametrize("kind", ["baseline", "progressive"])
@pytest.mark.parametrize("damage", list(BROKEN))
def test_draft_validation_catches_truncated_and_corrupt_12mp_jpegs(
    tmp_path, phone_jpegs, kind, damage
):
    """The 1/8-scale validation reads every entropy-coded byte: it fails where a full decode does."""
    path = tmp_path / "IMG_0001.jpg"
    path.write_bytes(BROKEN[damage](phone_jpegs[kind]))
    with pytest.raises(images_module.ImageReadError) as full_decode:
        read_image(path)  # the full decode (no target size) fails ...
    reason = check_image(path)  # ... and so does validation, for the same reason
    assert reason == full_decode.value.reason
    assert reason.startswith("corrupt or truncated image"), reason


def test_validation_decodes_a_12mp_jpeg_at_one_eighth_scale(tmp_path, phone_jpegs, monkeypatch):
    sizes: list[tuple[int, int]] = []
    real_load = JpegImagePlugin.JpegImageFile.load

    def spy(self):
        sizes.append(self.size)
        return real_load(self)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", spy)
    path = tmp_path / "IMG_0002.jpg"
    path.write_bytes(phone_jpegs["baseline"])
    assert check_image(path) is None
    assert sizes[0] == (504, 378)  # 4032x3024 / 8: reduce-on-decode


def test_scan_names_each_truncated_and_corrupt_12mp_photo(image_dataset, phone_jpegs):
    train = image_dataset / "train"
    (train / "sea" / "IMG_cut.jpg").write_bytes(phone_jpegs["baseline"][:-4000])
    (train / "sea" / "IMG_bad.jpg").write_bytes(_corrupt_middle(phone_jpegs["baseline"]))
    (train / "forest" / "IMG_ok.jpg").write_bytes(phone_jpegs["baseline"])
    with pytest.raises(DataError) as error:
        scan_image_folder(train)
    message = str(error.value)
    assert "2 unusable file(s)" in message and "--skip-bad-images" in message
    for name, reason in (("IMG_cut.jpg", "truncated"), ("IMG_bad.jpg", "broken data stream")):
        line = next(line for line in message.splitlines() if name in line)
        assert str(train / "sea" / name) in line and reason in line, line
    kept = scan_image_folder(train, skip_bad=True)
    assert train / "forest" / "IMG_ok.jpg" in kept.paths and len(kept.skipped) == 2


# --- 2b. A validated data version is not validated again --------------------------------------


def test_an_unchanged_data_version_is_validated_once(image_dataset, isolated_cache, monkeypatch):
    train = image_dataset / "train"
    backdate(train)
    seen = count_validations(monkeypatch)
    first = scan_image_folder(train)
    assert len(seen) == 24
    record = validation_record_file(train)
    assert record.parent == isolated_cache / "validated" and record.is_file()
    assert not list(record.parent.glob(".*.tmp"))  # written through a temporary file
    stored = json.loads(record.read_text())
    sea_0 = train / "sea" / "sea_000.jpg"
    info = sea_0.stat()
    assert stored["files"]["sea/sea_000.jpg"] == [info.st_size, info.st_mtime_ns]
    seen.clear()
    again = scan_image_folder(train)
    assert seen == [] and again.paths == first.paths
    assert np.array_equal(again.labels, first.labels)


def test_changed_and_added_files_are_validated_again(image_dataset, isolated_cache, monkeypatch):
    train = image_dataset / "train"
    backdate(train)
    scan_image_folder(train)
    seen = count_validations(monkeypatch)
    changed = train / "sea" / "sea_003.jpg"
    changed.write_bytes(changed.read_bytes()[:300])  # truncated in place: new size and mtime
    added = train / "forest" / "forest_new.jpg"
    make_image("forest", np.random.default_rng(9)).save(added, quality=90)
    with pytest.raises(DataError, match=r"sea_003\.jpg: corrupt or truncated"):
        scan_image_folder(train)
    assert sorted(seen) == sorted([changed, added])


def test_same_size_rewrite_is_caught_by_its_mtime(image_dataset, isolated_cache):
    train = image_dataset / "train"
    backdate(train)
    scan_image_folder(train)
    victim = train / "forest" / "forest_001.jpg"
    original = victim.read_bytes()
    victim.write_bytes(original[:100] + bytes(len(original) - 100))  # same size, now broken
    with pytest.raises(DataError, match=r"forest_001\.jpg: "):
        scan_image_folder(train)


def test_bad_files_are_never_recorded_as_good(image_dataset, isolated_cache, monkeypatch):
    train = image_dataset / "train"
    (train / "sea" / "cut.jpg").write_bytes((train / "sea" / "sea_000.jpg").read_bytes()[:200])
    backdate(train)
    kept = scan_image_folder(train, skip_bad=True)
    assert [b.path.name for b in kept.skipped] == ["cut.jpg"]
    recorded = load_validated(train)
    assert "sea/cut.jpg" not in recorded and len(recorded) == 24
    seen = count_validations(monkeypatch)
    with pytest.raises(DataError, match=r"cut\.jpg: corrupt or truncated"):
        scan_image_folder(train)  # reported again on every scan, by name
    assert seen == [train / "sea" / "cut.jpg"]


def test_recently_modified_files_are_validated_but_not_recorded(image_dataset, isolated_cache):
    """Within the file system's timestamp resolution a rewrite could keep size and mtime."""
    train = image_dataset / "train"
    backdate(train)
    fresh = train / "sea" / "sea_005.jpg"
    os.utime(fresh)  # modified just now
    scan_image_folder(train)
    recorded = load_validated(train)
    assert "sea/sea_005.jpg" not in recorded and len(recorded) == 23


def test_records_of_another_reader_or_unreadable_records_are_not_trusted(
    image_dataset, isolated_cache, monkeypatch
):
    train = image_dataset / "train"
    backdate(train)
    scan_image_folder(train)
    seen = count_validations(monkeypatch)
    monkeypatch.setattr(images_module, "READER_RULES", images_module.READER_RULES + 1)
    scan_image_folder(train)  # the reader's rules changed: everything validated again
    assert len(seen) == 24
    seen.clear()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # a stricter bomb limit: again
    scan_image_folder(train)
    assert len(seen) == 24
    seen.clear()
    validation_record_file(train).write_text('{"files": ')  # a torn or foreign record
    scan_image_folder(train)
    assert len(seen) == 24


def test_validation_runs_on_all_usable_cores_and_keeps_file_order(
    image_dataset, isolated_cache, monkeypatch
):
    train = image_dataset / "train"
    threads: set[str] = set()
    real = images_module.read_for_checks

    def slow(path: Path) -> Image.Image:
        threads.add(threading.current_thread().name)
        time.sleep(0.01)
        return real(path)

    monkeypatch.setattr(images_module, "read_for_checks", slow)
    monkeypatch.setattr(images_module, "usable_cores", lambda: 4)
    serial = scan_image_folder(train, validate=False)
    parallel = scan_image_folder(train)
    assert parallel.paths == serial.paths and len(threads) > 1


def test_orphan_records_of_deleted_folders_are_removed(tmp_path, isolated_cache):
    first = write_dataset(tmp_path / "one", {"forest": 2, "sea": 2})
    backdate(first)
    scan_image_folder(first)
    orphan = validation_record_file(first)
    assert orphan.is_file()
    shutil.rmtree(first)
    second = write_dataset(tmp_path / "two", {"forest": 2, "sea": 2})
    backdate(second)
    scan_image_folder(second)
    assert not orphan.exists() and validation_record_file(second).is_file()


# --- 3. Parallel decoding: same array, same order, same contract -----------------------------


def test_parallel_decode_gives_the_serial_array(image_dataset, isolated_cache, monkeypatch):
    train = image_dataset / "train"
    folder = scan_image_folder(train, validate=False)
    serial = np.stack([load_rgb(p, 40).transpose(2, 0, 1) for p in folder.paths])
    one = DecodedImages(folder, 40, "v-one", workers=1).result()
    many = DecodedImages(folder, 40, "v-many", workers=4)
    assert many.workers == 4
    assert np.array_equal(one, serial) and np.array_equal(many.result(), serial)
    stored = np.load(
        cache_module.cache_file("decoded", cache_module.decoded_key(folder, 40, "v-many"))
    )
    assert np.array_equal(stored, serial)


def test_parallel_decode_fills_leading_rows_before_wait_for_returns(
    image_dataset, isolated_cache, monkeypatch
):
    folder = scan_image_folder(image_dataset / "train", validate=False)
    real = cache_module.load_rgb
    order: list[int] = []

    def slow(path: Path, size: int) -> np.ndarray:
        time.sleep(0.02 if folder.paths.index(path) % 3 == 0 else 0.0)  # rows finish out of order
        order.append(folder.paths.index(path))
        return real(path, size)

    monkeypatch.setattr(cache_module, "load_rgb", slow)
    decoder = DecodedImages(folder, 24, "v-order", workers=3)
    for rows in (16, len(folder)):
        decoder.wait_for(rows)
        for index in range(rows):
            assert np.array_equal(
                decoder.array[index], real(folder.paths[index], 24).transpose(2, 0, 1)
            )
    decoder.result()
    assert order != sorted(order)  # the threads really did finish rows out of order


def test_parallel_decode_reports_the_first_bad_file_in_file_order(image_dataset, isolated_cache):
    folder = scan_image_folder(image_dataset / "train", validate=False)
    folder.paths[5].write_bytes(b"not a jpeg")
    folder.paths[-1].write_bytes(b"")
    decoder = DecodedImages(folder, 24, "v-broken", workers=4)
    with pytest.raises(
        images_module.ImageReadError, match=rf"{folder.paths[5].name}: not an image"
    ):
        decoder.result()
    assert not list((isolated_cache / "decoded").glob("*.npy"))  # nothing cached


def test_decode_workers_leave_the_cores_of_the_forward_pass(monkeypatch):
    monkeypatch.setattr(cache_module, "usable_cores", lambda: 16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        assert decode_workers() == 12 and decode_workers("cpu") == 12
        assert decode_workers("cuda:0") == 15  # the GPU runs the forward pass
        torch.set_num_threads(16)
        assert decode_workers() == 1  # never fewer than one
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(cache_module, "usable_cores", lambda: 2)
    monkeypatch.delitem(sys.modules, "torch")  # a process without torch uses every core
    assert decode_workers() == 2


# --- 5. The shipped 150-px data decodes exactly as before (draft mode never triggers) ---------


def _load_rgb_at_20ea0c0(path: Path, image_size: int) -> np.ndarray:
    """lib/imgcls/data/cache.py's load_rgb at commit 20ea0c0, before the one reader and draft mode."""
    with Image.open(path) as img:
        rgb = img.convert("RGB")
        fitted = ImageOps.fit(rgb, (image_size, image_size), Image.Resampling.BILINEAR)
        return np.asarray(fitted, dtype=np.uint8)


@pytest.mark.realdata
@pytest.mark.parametrize("split", ["train", "test"])
def test_shipped_photos_decode_to_the_same_bytes_as_before(real_data, isolated_cache, split):
    folder = scan_image_folder(real_data / split)
    assert all(Image.open(p).size == (150, 150) for p in folder.paths[::50])
    new = DecodedImages(folder, 160, f"parity-{split}", workers=2).result()
    old = np.stack([_load_rgb_at_20ea0c0(p, 160).transpose(2, 0, 1) for p in folder.paths])
    assert new.shape == (len(folder), 3, 160, 160)
    assert np.array_equal(new, old)
