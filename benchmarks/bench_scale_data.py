"""The scale table's datasets: 1x, 4x, 16x ... the shipped photos, made once and reused.

Every photo of ``data/train`` and ``data/test`` gets ``copies`` variants, each a random resized
crop (75-100 % of the area, aspect ratio 3:4 to 4:3, resized back to the photo's size, bicubic),
a horizontal flip with probability 1/2 and a colour jitter (brightness, contrast and saturation
each times a factor in [0.8, 1.2]), saved as JPEG quality 90. The randomness of copy ``j`` of a
photo is seeded by (its relative path, ``j``), so copy ``j`` is the same file in every build and
a 4x set holds the first four copies of each photo that the 16x set holds. A set below 1x (for
smoke tests) keeps copy 0 of the first photos of each class.

Copies are made once into ``benchmarks/results/scale-sets/pool/`` (git-ignored); each size is a
folder ``x<factor>/{train,test}/<class>/`` of hard links into the pool (copies where the file
system has no hard links), so 1x + 4x + 16x cost the disk of 16x (~300 MB). A ``recipe.json``
records the recipe and the source files' sizes and modification times; the pool and the sets are
rebuilt when either changes. No two files of a set have the same bytes (checked after building).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench_config import RESULTS_DIR

SCALE_DIR = RESULTS_DIR / "scale-sets"
RECIPE_VERSION = 1
CROP_AREA = (0.75, 1.0)  # fraction of the photo's area kept by the random crop
CROP_ASPECT = (3 / 4, 4 / 3)  # width / height of the crop
JITTER = 0.2  # brightness, contrast and saturation factors in [1 - JITTER, 1 + JITTER]
QUALITY = 90
SPLITS = ("train", "test")


def _rng(relpath: str, copy: int) -> Any:
    import numpy as np

    return np.random.default_rng([zlib.crc32(relpath.encode()), copy, RECIPE_VERSION])


def make_variant(source: Path, target: Path, relpath: str, copy: int) -> None:
    """Write copy ``copy`` of ``source`` (crop, flip, colour jitter; seeded) as JPEG at ``target``."""
    from PIL import Image, ImageEnhance, ImageOps

    from imgcls.data.images import read_image

    rng = _rng(relpath, copy)
    img = read_image(source)
    width, height = img.size
    area = width * height * rng.uniform(*CROP_AREA)
    aspect = math.exp(rng.uniform(math.log(CROP_ASPECT[0]), math.log(CROP_ASPECT[1])))
    crop_w = max(1, min(width, round(math.sqrt(area * aspect))))
    crop_h = max(1, min(height, round(math.sqrt(area / aspect))))
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    out = img.crop((left, top, left + crop_w, top + crop_h))
    out = out.resize((width, height), Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        out = ImageOps.mirror(out)
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        out = enhancer(out).enhance(rng.uniform(1 - JITTER, 1 + JITTER))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    out.save(tmp, "JPEG", quality=QUALITY)
    os.replace(tmp, target)


def _sources(data_root: Path) -> dict[str, list[Path]]:
    """Return ``split -> photos`` of the shipped data, by the dataset listing rule."""
    from imgcls.data.folders import require_split, scan_image_folder

    return {
        split: list(scan_image_folder(require_split(split, data_root), validate=False).paths)
        for split in SPLITS
    }


def _recipe(data_root: Path, sources: dict[str, list[Path]]) -> dict[str, Any]:
    return {
        "version": RECIPE_VERSION,
        "crop_area": list(CROP_AREA),
        "crop_aspect": list(CROP_ASPECT),
        "jitter": JITTER,
        "quality": QUALITY,
        "sources": [
            [p.relative_to(data_root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns]
            for split in SPLITS
            for p in sources[split]
        ],
    }


def _pool_path(pool: Path, relpath: str, copy: int) -> Path:
    stem, _, _ = relpath.rpartition(".")
    return pool / f"{stem}-{copy:02d}.jpg"


def _chosen(sources: list[Path], split_root: Path, factor: float) -> list[tuple[Path, int]]:
    """Return (photo, copy) pairs of a set of ``factor`` x the photos of one split."""
    if factor >= 1:
        return [(p, j) for p in sources for j in range(int(factor))]
    by_class: dict[str, list[Path]] = {}
    for path in sources:
        by_class.setdefault(path.relative_to(split_root).parts[0], []).append(path)
    return [
        (p, 0)
        for members in by_class.values()
        for p in members[: max(2, round(factor * len(members)))]
    ]


def check_factor(factor: float) -> float:
    """Return ``factor`` if it is a whole number >= 1 or in (0, 1); raise ValueError otherwise."""
    if factor <= 0 or (factor > 1 and factor != int(factor)):
        raise ValueError(
            f"size {factor:g}: give a whole number of copies (1, 4, 16) or a fraction below 1 "
            "for a smoke test (0.25)"
        )
    return factor


def size_label(factor: float) -> str:
    """Return the name of a size: ``16x``, ``0.25x``."""
    return f"{factor:g}x"


def build_scaled_set(factor: float, root: Path = SCALE_DIR) -> Path:
    """Return the dataset root (``train/`` and ``test/``) of ``factor`` x the shipped photos.

    Made from the pool (built on first use, on all usable cores) and kept; rebuilt when the
    recipe or the shipped photos change. Raises ValueError for an unusable factor and
    RuntimeError if two files of the set have the same bytes.
    """
    from imgcls.core import paths
    from imgcls.data.images import usable_cores

    check_factor(factor)
    data_root = paths.data_dir()
    sources = _sources(data_root)
    recipe = _recipe(data_root, sources)
    pool = root / "pool"
    if (
        not (pool / "recipe.json").is_file()
        or json.loads((pool / "recipe.json").read_text()) != recipe
    ):
        shutil.rmtree(root, ignore_errors=True)
        pool.mkdir(parents=True)
        (pool / "recipe.json").write_text(json.dumps(recipe))
    target = root / f"x{factor:g}"
    stamp = target / "recipe.json"
    wanted = {**recipe, "factor": factor}
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return target
    start = time.perf_counter()
    pairs = [
        (split, source, copy)
        for split in SPLITS
        for source, copy in _chosen(sources[split], data_root / split, factor)
    ]
    missing = []
    for _, source, copy in pairs:
        rel = source.relative_to(data_root).as_posix()
        if not _pool_path(pool, rel, copy).is_file():
            missing.append((source, _pool_path(pool, rel, copy), rel, copy))
    print(
        f"building the {size_label(factor)} set ({len(pairs)} photos, {len(missing)} new) "
        f"in {target} ...",
        flush=True,
    )
    if missing:
        with ThreadPoolExecutor(max_workers=usable_cores()) as workers:
            list(workers.map(lambda m: make_variant(*m), missing))
    building = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(building, ignore_errors=True)
    digests: set[str] = set()
    try:
        for _, source, copy in pairs:
            rel = source.relative_to(data_root).as_posix()
            made = _pool_path(pool, rel, copy)
            link = building / made.relative_to(pool)
            link.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(made, link)
            except OSError:
                shutil.copy2(made, link)
            digests.add(hashlib.md5(made.read_bytes()).hexdigest())
        if len(digests) != len(pairs):
            raise RuntimeError(
                f"{target}: {len(pairs) - len(digests)} file(s) repeat another's bytes; "
                "raise RECIPE_VERSION and rebuild"
            )
        stamp_file = building / "recipe.json"
        stamp_file.write_text(json.dumps(wanted))
        shutil.rmtree(target, ignore_errors=True)
        building.rename(target)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    print(f"  built in {time.perf_counter() - start:.1f} s", flush=True)
    return target
