"""The one way to read an image: every caller (validation, caches, evaluation, predict, serving).

:func:`read_image` opens a file or in-memory bytes and returns an 8-bit RGB PIL image the way a
photo viewer shows it:

- **EXIF orientation** is applied (``ImageOps.exif_transpose``), so a phone photo stored sideways
  with Orientation=6 is trained on and served upright.
- **Every Pillow mode becomes 8-bit RGB by one rule** (:func:`to_rgb`): 16-bit grayscale
  (``I;16*``) is scaled by 255/65535, 32-bit integer (``I``) likewise when its values lie in the
  16-bit range and min-max scaled otherwise, 32-bit float (``F``) is scaled from [0, 1] (or
  min-max when outside it); palette images are expanded; any alpha channel (RGBA, LA, PA, a
  palette's transparency) is composited onto white; CMYK, YCbCr, LAB, HSV and 1-bit are converted
  by Pillow. Multi-frame files (GIF, TIFF, WebP) give their first frame.
- **Oversized images are bad images**: a file with more pixels than Pillow's decompression-bomb
  limit (``PIL.Image.MAX_IMAGE_PIXELS``, 89,478,485 by default) is refused before its pixels are
  decoded, with an :class:`ImageReadError` that names the file.
- **Every failure names the file and the reason** (:class:`ImageReadError`).

:func:`load_rgb` adds the model's geometry (short side resized, centre crop to a square, bilinear;
``ImageOps.fit``), and JPEGs much larger than that size are decoded at 1/2 to 1/8 scale in the
DCT (Pillow's draft mode), which gives the same size and orientation at a fraction of the cost.

:func:`check_image` (validation) decodes a JPEG at 1/8 scale (:func:`read_for_checks`; less
reduction only where 1/8 would leave a side under 64 px): libjpeg's scaled decoding shrinks
the inverse DCT, upsampling and colour conversion, but still Huffman-decodes every entropy-coded
byte of every scan, so a truncated or corrupt file fails exactly as it does in a full decode
(``tests/test_phone_photos.py`` checks this on 12-megapixel files), at about a fifth of the cost.
The same decoded image gives the perceptual hash (:mod:`imgcls.data.validation`), so one decode
per file version validates and hashes it.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin, UnidentifiedImageError

ImageSource = str | Path | bytes | bytearray | memoryview

# Leading bytes of common formats: a file with one of them that Pillow cannot open is corrupt.
_SIGNATURES = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG", b"GIF8": "GIF"}

# Draft decoding keeps at least this factor of the target size before the final resize, as
# Pillow's own ``Image.thumbnail(reducing_gap=2.0)`` does, so the resampling filter still averages
# over several source pixels.
DRAFT_REDUCING_GAP = 2

# What validation decodes a JPEG to: Pillow's draft picks the largest DCT reduction (1/8, 1/4,
# 1/2) that keeps both sides at least this size (only the entropy decoding is full-size). 64 px is
# DRAFT_REDUCING_GAP x the 32 px that the perceptual hash resizes to
# (imgcls.data.validation.HASH_READ_SIZE), so the validation decode is exactly the image
# read_image(path, target_size=32) gives and hashes to the same bits; any photo of 512 px or more
# on its short side is still decoded at 1/8.
_VALIDATION_DRAFT = (64, 64)

# Bump when the rules that decide whether a file is a readable image change (formats, limits,
# what counts as corrupt, how it is decoded): validation results recorded under another value
# are not reused. 2: MPO files (multi-picture JPEGs from phones) are drafted like JPEGs.
READER_RULES = 2

_WHITE = (255, 255, 255)

# What Pillow raises for a file it cannot read: truncated data as OSError, bad headers as
# SyntaxError/ValueError, malformed EXIF or tile tables as EOFError/IndexError/KeyError.
_PILLOW_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError)


class ImageReadError(ValueError):
    """An image could not be read; ``source`` names the file (or input) and ``reason`` says why."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


def _describe(source: ImageSource, name: str | None) -> str:
    if name:
        return name
    if isinstance(source, str | Path):
        return str(source)
    return f"<{len(source)} bytes>"


def _open(source: ImageSource) -> Image.Image:
    if isinstance(source, bytes | bytearray | memoryview):
        return Image.open(io.BytesIO(bytes(source)))
    return Image.open(source)


def _corrupt_or_foreign(source: ImageSource) -> str:
    if isinstance(source, bytes | bytearray | memoryview):
        head = bytes(source[:8])
    else:
        with open(source, "rb") as handle:
            head = handle.read(8)
    if not head:
        return "empty file (0 bytes)"
    kind = next((k for sig, k in _SIGNATURES.items() if head.startswith(sig)), None)
    if kind:
        return f"corrupt {kind} image (header unreadable, Pillow cannot open it)"
    return "not an image file (Pillow cannot identify it)"


def _scale_to_uint8(values: np.ndarray, full_scale: float | None) -> np.ndarray:
    """Map values to 0..255: by ``full_scale`` when given, else min-max over the image."""
    values = values.astype(np.float64)
    if full_scale is None:
        low, high = float(values.min()), float(values.max())
        values = (values - low) / (high - low) if high > low else np.zeros_like(values)
    else:
        values = values / full_scale
    return np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8)


def _flatten_alpha(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Return ``img`` as an 8-bit RGB image by the module's one rule for each Pillow mode.

    16-bit grayscale is scaled (value * 255 / 65535), not clipped at 255; 32-bit integer images
    whose values lie in 0..65535 are treated as 16-bit, others are min-max scaled; float images in
    [0, 1] are multiplied by 255, others min-max scaled. Alpha (and palette transparency) is
    composited onto white. Everything else uses Pillow's own conversion (ITU-R 601-2 luma for
    grayscale, Pillow's CMYK/YCbCr/LAB/HSV matrices).
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode == "I" or mode == "F":
        values = np.asarray(img)
        if mode.startswith("I;16"):
            scale: float | None = 65535.0
        elif mode == "I":
            scale = 65535.0 if values.min() >= 0 and values.max() <= 65535 else None
        else:
            finite = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
            values = finite
            scale = 1.0 if finite.min() >= 0.0 and finite.max() <= 1.0 else None
        return Image.fromarray(_scale_to_uint8(values, scale), mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode == "P" and "transparency" in img.info
    )
    if mode == "L" and "transparency" in img.info:
        has_alpha = True
    if has_alpha:
        return _flatten_alpha(img)
    return img.convert("RGB")


def _bomb_reason(pixels: int, limit: int | None) -> str:
    return (
        f"{pixels:,} pixels exceeds Pillow's decompression-bomb limit of {limit:,} pixels "
        "(PIL.Image.MAX_IMAGE_PIXELS); downscale the file or raise that limit"
    )


def read_image(
    source: ImageSource, name: str | None = None, target_size: int | None = None
) -> Image.Image:
    """Read one image (a path or its bytes) as an upright 8-bit RGB PIL image.

    ``name`` is what errors call the input (default: the path, or ``<N bytes>``). With
    ``target_size`` (pixels of the square the model needs), a JPEG whose short side is at least
    ``4 * target_size`` is decoded in Pillow's draft mode at the largest 1/2, 1/4 or 1/8 scale that
    keeps both sides at or above ``2 * target_size`` (:data:`DRAFT_REDUCING_GAP`); the caller then
    resizes as usual. EXIF orientation is applied after the (scaled) decode. A 4032x3024 photo for
    a 160-px model is decoded at 504x378; a 150x150 photo is never drafted.

    Raises :class:`ImageReadError` naming the input for: an empty, foreign, corrupt or truncated
    file; more pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` (decompression-bomb limit); and a
    missing or unreadable file (the OS reason is given).
    """
    draft, min_short_side = _model_draft(target_size)
    return _read(source, _describe(source, name), draft, min_short_side)


def _model_draft(target_size: int | None) -> tuple[tuple[int, int] | None, int]:
    """Return ``(draft box, minimum short side to draft)`` of :func:`read_image` for a model size."""
    if not target_size:
        return None, 0
    draft = draft_box(target_size)
    return draft, DRAFT_REDUCING_GAP * draft[0]


def draft_box(target_size: int) -> tuple[int, int]:
    """Return the ``(width, height)`` in pixels :func:`read_image` asks Pillow's ``draft`` for.

    ``DRAFT_REDUCING_GAP * target_size`` on both sides: the DCT scale libjpeg picks keeps both
    sides at or above it (a JPEG with a short side under twice that is not drafted at all).
    """
    wanted = DRAFT_REDUCING_GAP * target_size
    return wanted, wanted


def _read(
    source: ImageSource, label: str, draft: tuple[int, int] | None, min_short_side: int = 0
) -> Image.Image:
    """Decode ``source``; a JPEG whose short side is >= ``min_short_side`` is drafted to ``draft``."""
    try:
        with _open(source) as img:
            limit = Image.MAX_IMAGE_PIXELS
            if limit and img.width * img.height > limit:
                raise ImageReadError(label, _bomb_reason(img.width * img.height, limit))
            img.seek(0)  # multi-frame files: the first frame
            _apply_draft(img, draft, min_short_side)
            img.load()
            upright = ImageOps.exif_transpose(img)
            return to_rgb(upright).copy()
    except ImageReadError:
        raise
    except Image.DecompressionBombError as exc:
        # raised by Image.open itself above twice the limit: "Image size (N pixels) exceeds ..."
        found = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = int(found.group(1)) if found else 0
        raise ImageReadError(label, _bomb_reason(pixels, Image.MAX_IMAGE_PIXELS)) from exc
    except UnidentifiedImageError as exc:
        raise ImageReadError(label, _corrupt_or_foreign(source)) from exc
    except FileNotFoundError as exc:
        raise ImageReadError(label, "file not found") from exc
    except _PILLOW_ERRORS as exc:
        reason = str(exc) or type(exc).__name__
        raise ImageReadError(label, f"corrupt or truncated image ({reason})") from exc


def _apply_draft(img: Image.Image, draft: tuple[int, int] | None, min_short_side: int) -> None:
    """Ask Pillow to decode a JPEG whose short side is >= ``min_short_side`` at ``draft``'s scale.

    The one place the draft rule is applied: :func:`_read` before decoding, and
    :func:`_decode_size` on a header only. Pillow's ``JpegImageFile.draft`` picks the largest
    of 1/8, 1/4, 1/2 (else 1/1) that keeps both sides >= the box. JPEG includes MPO, the
    multi-picture JPEG many phones write (Pillow's ``MpoImageFile`` is a ``JpegImageFile``; its
    first picture is what is read); other formats are untouched.
    """
    if draft and isinstance(img, JpegImagePlugin.JpegImageFile) and min(img.size) >= min_short_side:
        img.draft(None, draft)


def _decode_size(path: Path, draft: tuple[int, int] | None, min_short_side: int) -> tuple[int, int]:
    """Return the (width, height) :func:`_read` decodes ``path`` to, before EXIF orientation.

    Reads the header only (Pillow's ``draft`` sets the DCT scale without decoding).
    """
    with Image.open(path) as img:
        _apply_draft(img, draft, min_short_side)
        return img.size


def load_rgb_reusing(path: Path, checked: Image.Image, image_size: int) -> np.ndarray:
    """Return exactly ``load_rgb(path, image_size)``, from the validation decode where it can.

    ``checked`` is the image :func:`read_for_checks` returned for ``path``. When
    :func:`read_image` would decode the file at the same size (same DCT scale: a 12-megapixel
    JPEG for a model of up to 189 px is decoded at 1/8 both ways; a PNG in full both ways), the
    model input is fitted from ``checked`` and the file is not decoded again; otherwise it is
    read again at the model's scale. Either way the result is the uint8 ``[S, S, 3]`` array
    :func:`load_rgb` gives (``tests/test_decode_once.py`` checks equality). Two header reads
    (about 0.1 ms each) decide. Raises :class:`ImageReadError` naming the file when it must be
    read again and no longer reads.
    """
    draft, min_short_side = _model_draft(image_size)
    try:
        same = _decode_size(path, draft, min_short_side) == _decode_size(path, _VALIDATION_DRAFT, 0)
    except _PILLOW_ERRORS:  # changed since it was checked: load_rgb names the file and reason
        same = False
    if same:
        return fit_square(checked, image_size)
    return load_rgb(path, image_size)


def fit_square(img: Image.Image, image_size: int) -> np.ndarray:
    """Resize the short side to ``image_size``, centre-crop; return uint8 ``[S, S, 3]`` (HWC).

    Bilinear resampling with Pillow's antialiasing (``ImageOps.fit``); ``img`` must be RGB.
    """
    fitted = ImageOps.fit(img, (image_size, image_size), Image.Resampling.BILINEAR)
    return np.asarray(fitted, dtype=np.uint8)


def load_rgb(source: ImageSource, image_size: int, name: str | None = None) -> np.ndarray:
    """Read an image (:func:`read_image`) and fit it to uint8 ``[S, S, 3]`` with S = image_size.

    This is the model's input geometry for training, evaluation, prediction and the served model.
    Raises :class:`ImageReadError` naming the input.
    """
    return fit_square(read_image(source, name, target_size=image_size), image_size)


def read_for_checks(path: Path) -> Image.Image:
    """Decode ``path`` as validation does and return the upright 8-bit RGB image.

    The same reader and rules as :func:`read_image` (bomb limit, EXIF, modes), but a JPEG is
    decoded at the largest DCT reduction (1/8, 1/4, 1/2) that keeps both sides >= 64 px
    (:data:`_VALIDATION_DRAFT`): 1/8 for any photo of 512 px or more. Every entropy-coded byte is
    still read and Huffman-decoded, so truncation and corrupt data are found as by a full decode,
    for about 15 ms instead of 80-140 ms on a 12-megapixel photo. Other formats are decoded
    fully. The result equals ``read_image(path, target_size=32)`` (what the perceptual hash
    needs). Raises :class:`ImageReadError` naming the file.
    """
    return _read(path, str(path), _VALIDATION_DRAFT)


def check_image(path: Path) -> str | None:
    """Return why ``path`` cannot be used as an image (one phrase), or None when it reads fully.

    Decodes with :func:`read_for_checks` (JPEGs at 1/8 scale, every byte entropy-decoded).
    """
    try:
        read_for_checks(path)
    except ImageReadError as exc:
        return exc.reason
    return None


def usable_cores() -> int:
    """Return how many CPU cores this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


# EXIF Orientation values 5-8 store the picture rotated by 90 degrees (width and height swapped).
_EXIF_ORIENTATION_TAG = 0x0112
_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}


def image_header(path: Path) -> tuple[int, int, str]:
    """Return ``(width_px, height_px, mode)`` as displayed (EXIF orientation applied).

    Reads the header only (no pixel decoding). Raises :class:`ImageReadError` naming the file.
    """
    try:
        with Image.open(path) as img:
            width, height = img.size
            if img.getexif().get(_EXIF_ORIENTATION_TAG) in _TRANSPOSED_ORIENTATIONS:
                width, height = height, width
            return width, height, img.mode
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageReadError(str(path), f"header unreadable ({exc})") from exc
