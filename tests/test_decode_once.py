"""One decode per photo: the validation pass fills the model's decoded-image cache (issue 11).

The kind: "a file is decoded twice where one decode gives both results". Validation reads every
new file (JPEGs at 1/8 scale); for a large photo that is the decode the model's input starts
from, so :func:`imgcls.data.images.load_rgb_reusing` fits the model input from it, and
:class:`imgcls.data.primer.DecodePrimer` writes the rows into the cache entry
:class:`imgcls.data.cache.DecodedImages` would have built. Each test compares with the
independent path (``load_rgb``, ``DecodedImages`` in an empty cache) byte for byte.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgcls.data import images as images_module
from imgcls.data.cache import DecodedImages
from imgcls.data.duplicates import folder_hashes
from imgcls.data.folders import data_version, scan_image_folder
from imgcls.data.images import load_rgb, load_rgb_reusing, read_for_checks
from imgcls.data.primer import DecodePrimer
from imgcls.data.validation import validation_record_file
from tests.conftest import TINY_GRID_DEFAULTS, make_image, write_dataset, write_tiny_data

PHONE = (4032, 3024)  # width, height of a 12-megapixel phone photo
EXIF_ORIENTATION = 0x0112


def _photo(path: Path, size: tuple[int, int], mode: str = "RGB", **save: object) -> Path:
    """Write a generated photo-like picture upscaled to ``size`` (width, height) at ``path``."""
    small = make_image("sea", np.random.default_rng(7), size=96).convert(mode)
    small.resize(size, Image.Resampling.BICUBIC).save(path, **save)
    return path


def _count_rereads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Record each file that load_rgb_reusing has to read again (through images.load_rgb)."""
    seen: list[Path] = []
    real = images_module.load_rgb

    def spy(source, image_size, name=None):
        seen.append(Path(source))
        return real(source, image_size, name)

    monkeypatch.setattr(images_module, "load_rgb", spy)
    return seen


def _sideways(folder: Path) -> Path:
    """Save a 12-MP photo stored sideways with EXIF orientation 6 (rotate 90 degrees to view)."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    return _photo(folder / "e.jpg", (PHONE[1], PHONE[0]), quality=90, exif=exif.tobytes())


def _mpo(folder: Path) -> Path:
    """Save a 12-MP multi-picture JPEG (MPO, as many phones write) with a .jpg name."""
    path = folder / "mpo.jpg"
    big = make_image("forest", np.random.default_rng(8), size=96).resize(PHONE)
    big.save(path, "MPO", save_all=True, append_images=[big.resize((640, 480))], quality=90)
    assert Image.open(path).format == "MPO"
    return path


# (file maker, model image size, decoded from the validation image?)
CASES = {
    "12-MP JPEG, 160 px model (1/8 scale both ways)": (
        lambda p: _photo(p / "a.jpg", PHONE, quality=90),
        160,
        True,
    ),
    "12-MP JPEG stored sideways (EXIF 6)": (_sideways, 160, True),
    "12-MP progressive grayscale JPEG": (
        lambda p: _photo(p / "g.jpg", PHONE, "L", quality=90, progressive=True),
        128,
        True,
    ),
    "PNG (never drafted)": (lambda p: _photo(p / "b.png", (300, 200)), 64, True),
    "MPO from a phone, named .jpg (drafted as a JPEG)": (_mpo, 160, True),
    "JPEG with a 100 px short side (no scale reduction either way)": (
        lambda p: _photo(p / "f.jpg", (133, 100), quality=90),
        48,
        True,
    ),
    "12-MP JPEG, 224 px model (1/4 scale for the model, 1/8 for validation)": (
        lambda p: _photo(p / "c.jpg", PHONE, quality=90),
        224,
        False,
    ),
    "150x150 JPEG like the shipped photos (full for the model, 1/2 for validation)": (
        lambda p: _photo(p / "d.jpg", (150, 150), quality=90),
        64,
        False,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_model_input_from_the_validation_decode_equals_load_rgb(tmp_path, monkeypatch, case):
    make, image_size, reused = CASES[case]
    path = make(tmp_path)
    expected = load_rgb(path, image_size)
    rereads = _count_rereads(monkeypatch)
    got = load_rgb_reusing(path, read_for_checks(path), image_size)
    assert got.dtype == np.uint8 and got.shape == (image_size, image_size, 3)
    np.testing.assert_array_equal(got, expected)
    assert rereads == ([] if reused else [path])


def test_a_file_changed_since_validation_is_read_again_and_named(tmp_path):
    path = _photo(tmp_path / "a.jpg", PHONE, quality=90)
    checked = read_for_checks(path)
    path.write_bytes(b"not an image any more")
    with pytest.raises(images_module.ImageReadError) as error:
        load_rgb_reusing(path, checked, 160)
    assert str(path) in str(error.value)


def _phone_dataset(root: Path, per_class: int = 2) -> Path:
    """``root/<class>/*.jpg``: ``per_class`` 12-MP JPEGs per class, mtimes a minute old."""
    for name in ("forest", "sea"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            _photo(root / name / f"IMG_{i}.jpg", PHONE, quality=90)
    _backdate(root)
    return root


def _backdate(root: Path) -> None:
    """Give ``root`` (a file, or every file under a folder) an mtime a minute ago."""
    stamp = time.time_ns() - 60 * 10**9
    for path in [root, *root.rglob("*")]:
        os.utime(path, ns=(stamp, stamp))


def _count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Record every image decode of the project's one reader (imgcls.data.images._read)."""
    seen: list[Path] = []
    real = images_module._read

    def spy(source, *args, **kwargs):
        seen.append(Path(source))
        return real(source, *args, **kwargs)

    monkeypatch.setattr(images_module, "_read", spy)
    return seen


def _temporary_files(cache: Path) -> list[Path]:
    return sorted(cache.rglob(".*.tmp"))


def _assert_decoded_later(folder, md5: str, cache: Path) -> None:
    """Nothing was primed: notebook 02's DecodedImages misses and decodes; no temporary is left."""
    later = DecodedImages(folder, 32, md5)
    assert not later.hit
    later.result()
    assert _temporary_files(cache) == []


def test_a_12mp_photo_is_decoded_once_from_validation_to_the_models_input(
    tmp_path, isolated_cache, monkeypatch
):
    root = _phone_dataset(tmp_path / "data" / "train")
    decodes = _count_decodes(monkeypatch)
    with DecodePrimer([160, 96]) as primer:
        folder = scan_image_folder(root, sink=primer)
        md5 = data_version(root)
        written = primer.publish(folder, md5)
    assert len(written) == 2 and all(path.is_file() for path in written)
    assert sorted(decodes) == sorted(folder.paths)  # one decode per photo: validation's
    for size in (160, 96):
        primed = DecodedImages(folder, size, md5)
        assert primed.hit  # notebook 02 finds it and decodes nothing
        expected = np.stack([load_rgb(path, size).transpose(2, 0, 1) for path in folder.paths])
        np.testing.assert_array_equal(primed.result(), expected)
    assert _temporary_files(isolated_cache) == []


def _decoded_in_an_empty_cache(folder, size: int, md5: str, cache: Path, monkeypatch) -> np.ndarray:
    monkeypatch.setenv("IMGCLS_CACHE_DIR", str(cache))
    images = DecodedImages(folder, size, md5, workers=1)
    assert not images.hit
    return np.array(images.result())


def test_primed_cache_equals_the_decoded_images_of_the_shipped_kind(
    image_dataset, isolated_cache, tmp_path, monkeypatch
):
    """Small JPEGs (decoded again at the model's scale) through folder_hashes, the other caller."""
    _backdate(image_dataset)
    listed = scan_image_folder(image_dataset / "train", validate=False)
    with DecodePrimer([40]) as primer:
        folder_hashes(listed, sink=primer)
        md5 = data_version(image_dataset)
        assert len(primer.publish(listed, md5)) == 1
    primed = DecodedImages(listed, 40, md5)
    assert primed.hit
    fresh = _decoded_in_an_empty_cache(listed, 40, md5, tmp_path / "other-cache", monkeypatch)
    np.testing.assert_array_equal(primed.result(), fresh)


def test_nothing_is_published_unless_the_pass_decoded_the_whole_split(
    image_dataset, isolated_cache, monkeypatch
):
    train = image_dataset / "train"
    _backdate(image_dataset)
    md5 = data_version(image_dataset)
    # 1. every file validated before: the pass decodes nothing, so there is nothing to publish
    scan_image_folder(train)
    with DecodePrimer([32]) as primer:
        folder = scan_image_folder(train, sink=primer)
        assert primer.publish(folder, md5) == []
    # 2. one added photo: the pass decodes that one only, not the split
    added = train / "sea" / "new.jpg"
    make_image("sea", np.random.default_rng(9)).save(added, quality=90)
    _backdate(added)
    md5 = data_version(image_dataset)
    with DecodePrimer([32]) as primer:
        folder = scan_image_folder(train, sink=primer)
        assert primer.publish(folder, md5) == []
    _assert_decoded_later(folder, md5, isolated_cache)


def test_a_split_with_a_skipped_bad_file_is_decoded_later_as_before(tmp_path, isolated_cache):
    root = write_dataset(tmp_path / "train", {"forest": 4, "sea": 4})
    (root / "sea" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    _backdate(root)
    md5 = data_version(root)
    with DecodePrimer([32]) as primer:
        folder = scan_image_folder(root, skip_bad=True, sink=primer)
        assert len(folder.skipped) == 1
        assert primer.publish(folder, md5) == []  # its rows were for the bad file's split
    _assert_decoded_later(folder, md5, isolated_cache)


def test_an_existing_cache_entry_is_not_replaced(tmp_path, isolated_cache):
    root = write_dataset(tmp_path / "train", {"forest": 4, "sea": 4})
    _backdate(root)
    md5 = data_version(root)
    folder = scan_image_folder(root)
    entry = Path(DecodedImages(folder, 32, md5).result().filename)
    stamp = entry.stat().st_mtime_ns
    validation_record_file(root).unlink()  # e.g. the folder was moved: validated again
    with DecodePrimer([32]) as primer:
        scan_image_folder(root, sink=primer)
        assert primer.publish(folder, md5) == []
    assert entry.stat().st_mtime_ns == stamp
    assert _temporary_files(isolated_cache) == []


def test_an_unwritable_cache_only_costs_the_later_decode(image_dataset, tmp_path, monkeypatch):
    blocked = tmp_path / "cache-is-a-file"
    blocked.write_text("")
    monkeypatch.setenv("IMGCLS_CACHE_DIR", str(blocked))
    train = image_dataset / "train"
    with DecodePrimer([32]) as primer:
        folder = scan_image_folder(train, sink=primer)  # validation itself still succeeds
        assert primer.publish(folder, "md5") == []
    assert len(folder) == 24


def test_a_phone_mpo_is_validated_at_one_eighth_scale(tmp_path, monkeypatch):
    """An MPO is a JPEG to libjpeg: validation drafts it (before READER_RULES 2 it decoded 12 MP)."""
    path = _mpo(tmp_path)
    sizes = []
    real = Image.Image.load

    def spy(self):
        sizes.append(self.size)
        return real(self)

    monkeypatch.setattr(Image.Image, "load", spy)
    read_for_checks(path)
    assert (504, 378) in sizes and PHONE not in sizes


def test_a_photo_rewritten_before_publishing_is_not_published(tmp_path, isolated_cache):
    """The data version is hashed after the pass: a file changed since its decode is caught."""
    root = write_dataset(tmp_path / "train", {"forest": 4, "sea": 4})
    _backdate(root)
    with DecodePrimer([32]) as primer:
        folder = scan_image_folder(root, sink=primer)
        changed = folder.paths[3]
        make_image("sea", np.random.default_rng(5)).save(changed, quality=90)  # new pixels
        _backdate(changed)  # and even an old-looking mtime: the stamp still differs
        md5 = data_version(root)
        assert not primer.ready(folder)
        assert primer.publish(folder, md5) == []
    assert _temporary_files(isolated_cache) == []


def test_a_file_modified_just_before_the_pass_is_not_trusted(tmp_path, isolated_cache):
    root = write_dataset(tmp_path / "train", {"forest": 3, "sea": 3})  # written just now
    with DecodePrimer([32]) as primer:
        folder = scan_image_folder(root, sink=primer)
        assert not primer.ready(folder)  # a rewrite within the racy window keeps its stamp


@pytest.mark.parametrize("problem", [OSError(28, "No space left on device"), RuntimeError("x")])
def test_an_error_in_the_sink_never_fails_validation(
    image_dataset, isolated_cache, monkeypatch, problem
):
    """Disk full, or anything else the model-input fit raises: validation succeeds, no cache."""
    from imgcls.data import primer as primer_module

    def broken(path, image, size):
        raise problem

    monkeypatch.setattr(primer_module, "load_rgb_reusing", broken)
    _backdate(image_dataset)
    with DecodePrimer([32]) as primer:
        folder = scan_image_folder(image_dataset / "train", sink=primer)
        assert len(folder) == 24 and not primer.ready(folder)
        assert primer.publish(folder, data_version(image_dataset)) == []
    assert _temporary_files(isolated_cache) == []


@pytest.mark.parametrize("cores", [1, 4])
def test_primed_rows_are_in_file_order_on_any_number_of_threads(
    image_dataset, isolated_cache, monkeypatch, cores
):
    monkeypatch.setattr(images_module, "usable_cores", lambda: cores)
    _backdate(image_dataset)
    train = image_dataset / "train"
    with DecodePrimer([24]) as primer:
        folder = scan_image_folder(train, sink=primer)
        md5 = data_version(image_dataset)
        assert len(primer.publish(folder, md5)) == 1
    expected = np.stack([load_rgb(path, 24).transpose(2, 0, 1) for path in folder.paths])
    np.testing.assert_array_equal(DecodedImages(folder, 24, md5).result(), expected)


def test_the_runners_plan_primes_every_split_under_the_version_its_reader_uses(
    tmp_path, isolated_cache
):
    """train under the dataset's version (02), test and --eval-dir under their own (03), for
    every image size of the grid; a dry run primes too, so the real run after it decodes nothing."""
    from imgcls.core.config import load_grid
    from imgcls.pipeline.plan import RunnerOptions, _scan_data

    data = write_tiny_data(tmp_path / "data")
    extra = write_dataset(tmp_path / "phone-shots", {"forest": 3, "sea": 3}, seed=4)
    _backdate(tmp_path)
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(TINY_GRID_DEFAULTS + "strategies:\n  a: {}\n  b:\n    image_size: 40\n")
    options = RunnerOptions(
        grid=grid_file, data_dir=str(data), extra_eval_dirs=[str(extra)], dry_run=True
    )
    train, md5 = _scan_data(options, load_grid(grid_file))
    assert md5 == data_version(data)
    test = scan_image_folder(data / "test")
    other = scan_image_folder(extra)
    for folder, version in (
        (train, md5),
        (test, data_version(data / "test")),
        (other, data_version(extra)),
    ):
        for size in (32, 40):
            assert DecodedImages(folder, size, version).hit, (folder.root, size)
    assert _temporary_files(isolated_cache) == []
