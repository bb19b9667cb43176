"""The one image reader: EXIF orientation, every Pillow mode, oversized and broken files, parity."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgcls.data.cache import DecodedImages
from imgcls.data.folders import DataError, scan_image_folder
from imgcls.data.images import ImageReadError, load_rgb, read_image
from imgcls.modeling.features import to_model_input
from imgcls.modeling.models import Preprocessing
from imgcls.serving.pyfunc import file_value, images_to_batch
from tests.conftest import write_dataset

EXIF_ORIENTATION = 0x0112


def asymmetric_picture(width: int = 60, height: int = 40) -> Image.Image:
    """An upright picture whose every rotation and mirror differs: red top-left, blue bottom."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[: height // 2, : width // 3] = (220, 30, 30)
    pixels[height // 2 :, :] = (20, 40, 200)
    pixels[: height // 2, width // 3 :] = (30, 180, 40)
    return Image.fromarray(pixels)


# How a camera stores an upright picture for each EXIF orientation (the inverse of what
# viewers apply): Pillow's transpose of the upright picture.
STORED_AS = {
    3: Image.Transpose.ROTATE_180,
    6: Image.Transpose.ROTATE_90,  # viewer rotates 90 degrees clockwise to show it
    8: Image.Transpose.ROTATE_270,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
}


def save_with_orientation(path: Path, orientation: int) -> None:
    stored = asymmetric_picture().transpose(STORED_AS[orientation])
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    stored.save(path, exif=exif)


@pytest.mark.parametrize("orientation", [6, 3, 8, 2])
def test_exif_orientation_is_applied_like_a_photo_viewer(tmp_path, orientation):
    upright = tmp_path / "upright.png"
    asymmetric_picture().save(upright)
    tagged = tmp_path / f"tagged-{orientation}.png"
    save_with_orientation(tagged, orientation)
    assert Image.open(tagged).size != (60, 40) or orientation in (2, 3)
    shown = np.asarray(read_image(tagged))
    assert shown.shape == (40, 60, 3)
    assert np.array_equal(shown, np.asarray(read_image(upright)))
    assert np.array_equal(load_rgb(tagged, 32), load_rgb(upright, 32))


def test_sideways_phone_jpeg_reads_upright(tmp_path):
    """The issue's example: a JPEG stored sideways with Orientation=6."""
    upright, tagged = tmp_path / "upright.jpg", tmp_path / "sideways.jpg"
    asymmetric_picture().save(upright, quality=95)
    stored = asymmetric_picture().transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    stored.save(tagged, quality=95, exif=exif)
    difference = np.abs(load_rgb(tagged, 32).astype(int) - load_rgb(upright, 32).astype(int)).mean()
    assert difference < 4  # JPEG noise only; ignoring the tag gives a rotated picture (> 60)


def test_training_and_serving_give_the_same_input_tensor(tmp_path, monkeypatch):
    """One file (EXIF-rotated, palette-free JPEG) through both paths: identical model input."""
    root = tmp_path / "data" / "train"
    write_dataset(root, {"forest": 2, "sea": 2}, size=70)
    photo = root / "sea" / "sea_000.jpg"
    stored = Image.open(photo).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    stored.save(photo, quality=92, exif=exif)
    folder = scan_image_folder(root)
    prep = Preprocessing(48, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    index = folder.paths.index(photo)
    monkeypatch.setenv("IMGCLS_CACHE_DIR", str(tmp_path / "cache"))
    decoded = DecodedImages(folder, 48, "test-version").result()
    training = to_model_input(
        torch.from_numpy(decoded[index : index + 1]), prep, torch.device("cpu"), False
    )
    serving = images_to_batch([file_value(photo)], prep)
    assert training.shape == serving.shape == (1, 3, 48, 48)
    assert torch.equal(training, serving)


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 64, 32896, 65535]], dtype=np.uint16).repeat(4, axis=0)
    path = tmp_path / "depth.png"
    Image.fromarray(values).save(path)
    rgb = np.asarray(read_image(path))
    assert rgb.dtype == np.uint8 and rgb.shape == (4, 4, 3)
    assert list(rgb[0, :, 0]) == [0, 64, 128, 255]  # clipping would give [0, 255, 255, 255]


def test_32_bit_integer_and_float_grayscale_are_scaled(tmp_path):
    ints = np.array([[0, 16448, 65535]], dtype=np.int32).repeat(3, axis=0)
    Image.fromarray(ints, mode="I").save(tmp_path / "int32.tif")
    assert list(np.asarray(read_image(tmp_path / "int32.tif"))[0, :, 1]) == [0, 64, 255]
    floats = np.array([[0.0, 0.5, 1.0]], dtype=np.float32).repeat(3, axis=0)
    Image.fromarray(floats, mode="F").save(tmp_path / "float32.tif")
    assert list(np.asarray(read_image(tmp_path / "float32.tif"))[0, :, 2]) == [0, 128, 255]


def test_alpha_and_palette_transparency_are_flattened_onto_white(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)  # black, fully transparent
    rgba[:2, :, :] = (200, 10, 10, 255)  # top half opaque red
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "cutout.png")
    rgb = np.asarray(read_image(tmp_path / "cutout.png"))
    assert tuple(rgb[0, 0]) == (200, 10, 10) and tuple(rgb[3, 3]) == (255, 255, 255)
    palette = Image.fromarray(rgba[..., :3]).convert("P", palette=Image.Palette.ADAPTIVE)
    transparent_index = palette.getpixel((3, 3))
    palette.save(tmp_path / "icon.gif", transparency=transparent_index)
    flat = np.asarray(read_image(tmp_path / "icon.gif"))
    assert tuple(flat[3, 3]) == (255, 255, 255)
    la = Image.fromarray(np.dstack([np.full((4, 4), 40, np.uint8), rgba[..., 3]]), mode="LA")
    la.save(tmp_path / "gray-alpha.png")
    assert tuple(np.asarray(read_image(tmp_path / "gray-alpha.png"))[3, 3]) == (255, 255, 255)


def test_cmyk_one_bit_and_first_frame_of_multi_frame_files(tmp_path):
    asymmetric_picture().convert("CMYK").save(tmp_path / "print.jpg", quality=95)
    cmyk = np.asarray(read_image(tmp_path / "print.jpg")).astype(int)
    assert np.abs(cmyk - np.asarray(asymmetric_picture()).astype(int)).mean() < 8
    Image.new("1", (8, 8), 1).save(tmp_path / "bits.png")
    assert np.asarray(read_image(tmp_path / "bits.png")).min() == 255
    frames = [Image.new("RGB", (8, 8), c) for c in ((250, 0, 0), (0, 250, 0), (0, 0, 250))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    frames[0].save(tmp_path / "pages.tif", save_all=True, append_images=frames[1:])
    for name in ("anim.gif", "pages.tif"):
        first = np.asarray(read_image(tmp_path / name))
        assert first[..., 0].mean() > 200 and first[..., 1].mean() < 20, name


def one_bit_png(path: Path, side: int) -> None:
    """Write a real ``side`` x ``side`` 1-bit black PNG without holding its pixels in memory."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = b"\x00" + b"\x00" * ((side + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    compressed = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", compressed)
        + chunk(b"IEND", b"")
    )


def test_decompression_bomb_is_a_bad_image_that_names_the_file(image_dataset):
    bomb = image_dataset / "train" / "sea" / "scan.png"
    one_bit_png(bomb, 13400)  # 180 Mpx in ~22 kB: over twice Pillow's limit
    assert bomb.stat().st_size < 40_000
    with pytest.raises(ImageReadError, match=r"scan\.png: 179,560,000 pixels exceeds"):
        read_image(bomb)
    with pytest.raises(DataError, match=r"scan\.png: 179,560,000 pixels exceeds"):
        scan_image_folder(image_dataset / "train")
    kept = scan_image_folder(image_dataset / "train", skip_bad=True)
    assert [b.path for b in kept.skipped] == [bomb] and bomb not in kept.paths


def test_image_between_one_and_two_times_the_bomb_limit_is_refused_too(tmp_path, monkeypatch):
    """Pillow only warns between 1x and 2x its limit; the reader refuses the file anyway."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.new("RGB", (40, 40)).save(tmp_path / "big.png")  # 1600 px: 1.6x the limit
    with pytest.raises(ImageReadError, match=r"big\.png: 1,600 pixels exceeds"):
        read_image(tmp_path / "big.png")


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "empty file"),
        (b"hello, not a picture", "not an image file"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 30, "corrupt PNG"),
    ],
)
def test_unreadable_bytes_name_the_file_and_reason(tmp_path, content, reason):
    path = tmp_path / "photo.png"
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match=rf"photo\.png: {reason}"):
        read_image(path)
    with pytest.raises(ImageReadError, match=rf"upload-7: {reason}"):
        read_image(content, name="upload-7")


def test_truncated_jpeg_names_the_file(tmp_path):
    asymmetric_picture(300, 200).save(tmp_path / "full.jpg", quality=90)
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "full.jpg").read_bytes()[:900])
    with pytest.raises(ImageReadError, match=r"cut\.jpg: corrupt or truncated image"):
        load_rgb(tmp_path / "cut.jpg", 32)


def test_large_jpeg_decoded_in_draft_mode_matches_the_full_decode(tmp_path):
    """Reduce-on-decode gives the same size and orientation, and nearly the same pixels."""
    rng = np.random.default_rng(0)
    base = np.asarray(asymmetric_picture(120, 80).resize((2400, 1600)), dtype=np.float32)
    noisy = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
    stored = Image.fromarray(noisy).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    stored.save(tmp_path / "phone.jpg", quality=90, exif=exif)
    drafted = load_rgb(tmp_path / "phone.jpg", 160)
    full = np.asarray(
        Image.fromarray(np.asarray(read_image(tmp_path / "phone.jpg"))).resize(
            (240, 160), Image.Resampling.BILINEAR
        )
    )[:, 40:200]
    assert drafted.shape == (160, 160, 3)
    assert np.abs(drafted.astype(int) - full.astype(int)).mean() < 3


def test_evaluation_and_serving_give_the_same_probabilities_on_a_folder(tmp_path, monkeypatch):
    """Test-set evaluation (decoded cache, batches) and the served model: one preprocessing."""
    from imgcls.evaluation.evaluate import predict_folder
    from imgcls.modeling.models import build_classifier
    from imgcls.serving.pyfunc import predict_images

    root = tmp_path / "data" / "test"
    write_dataset(root, {"forest": 3, "sea": 3}, size=90)
    wide = root / "sea" / "sea_000.jpg"
    Image.open(wide).resize((150, 90)).save(wide, quality=90)  # the centre crop matters too
    monkeypatch.setenv("IMGCLS_CACHE_DIR", str(tmp_path / "cache"))
    folder = scan_image_folder(root)
    model, prep = build_classifier("resnet18", "none", 64, 2, 0.0, seed=3)
    evaluated = predict_folder(model, prep, folder, "parity-version", device="cpu", batch_size=4)
    served = predict_images(model, folder.classes, prep, [file_value(p) for p in folder.paths])
    columns = [f"prob_{name}" for name in folder.classes]
    assert evaluated.shape == (6, 2)
    np.testing.assert_allclose(served[columns].to_numpy(), evaluated, rtol=0, atol=1e-6)
