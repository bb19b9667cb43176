"""Peak memory and time per image of a cold frozen-feature extraction at N and 4N images.

Usage: ``.venv/bin/python benchmarks/bench_memory.py [--n 500] [--size 160]``

Issue 13, item 1: memory must not grow with the dataset. The benchmark writes ``n`` and ``4 n``
generated JPEGs (200x200 px, two classes, every image different) to a temporary folder, then,
for each set, in a fresh Python process with an empty cache (``IMGCLS_CACHE_DIR`` in the
temporary folder), times one :func:`imgcls.modeling.features.cached_features` call: decoding
every image to ``size`` px (streamed into the decoded-image cache file) and one frozen-backbone
feature extraction over them (streamed into the feature cache file). Libraries are imported and
the backbone is built once before the clock starts, so the time is the per-image work.

Peak RSS is the process's ``ru_maxrss`` (getrusage(2): KiB on Linux), which counts anonymous
memory and mapped file pages alike. The table shows it, the RSS after the imports (the floor
every process pays), and the size the decoded images would take in memory. Targets (issue 13,
"A scale table"): peak RSS at 4N within 1.5x of N, time per image at 4N within 1.2x of N.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RSS_TARGET = 1.5  # peak RSS ratio 4N / N, at most (issue 13)
TIME_TARGET = 1.2  # time-per-image ratio 4N / N, at most (issue 13)
SOURCE_PX = 200  # generated JPEGs are 200x200, resized (downscaled) to --size when decoded


def write_images(root: Path, count: int, seed: int) -> Path:
    """Write ``count`` distinct JPEGs (quality 90) to ``root/<sea|forest>/``; return ``root``.

    Each image is a smooth colour gradient with class-dependent bands plus Gaussian noise
    (numpy's default_rng(seed)), so no two images are identical and JPEG decoding does real work.
    """
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    axis = np.linspace(0, 6 * np.pi, SOURCE_PX, dtype=np.float32)
    for index in range(count):
        kind = ("sea", "forest")[index % 2]
        (root / kind).mkdir(parents=True, exist_ok=True)
        phase = rng.uniform(0, 6, 3).astype(np.float32)
        bands = np.sin(axis[:, None] + phase[0]) if kind == "sea" else np.sin(axis[None, :] * 1.5)
        base = np.empty((SOURCE_PX, SOURCE_PX, 3), np.float32)
        base[..., 0] = 60 + 40 * np.sin(axis[None, :] + phase[1])
        base[..., 1] = 110 + 60 * bands
        base[..., 2] = 120 + 50 * np.sin(axis[:, None] * 0.5 + phase[2])
        base += rng.normal(0, 12, base.shape).astype(np.float32)
        image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
        image.save(root / kind / f"{kind}_{index:06d}.jpg", quality=90)
    return root


def measure(folder_root: Path, size: int, backbone: str, weights: str) -> dict:
    """Run in the child process: time one cold ``cached_features``; return the numbers."""
    import torch

    from imgcls.data.folders import scan_image_folder
    from imgcls.modeling.features import cached_features
    from imgcls.modeling.models import build_backbone

    build_backbone(backbone, weights, size)  # imports and weight files warm, off the clock
    folder = scan_image_folder(folder_root, validate=False)
    floor_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    features, hit = cached_features(
        folder, backbone, weights, size, f"bench-memory-{len(folder)}", torch.device("cpu")
    )
    seconds = time.perf_counter() - start
    assert not hit and features.shape[0] == len(folder)
    return {
        "images": len(folder),
        "seconds": seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "floor_rss_mb": floor_kib / 1024,
        "decoded_mb": len(folder) * 3 * size * size / 2**20,
        "torch_threads": torch.get_num_threads(),
    }


def run_case(folder: Path, cache: Path, args: argparse.Namespace) -> dict:
    """Measure one image set in a fresh process (its own ``ru_maxrss``) with an empty cache."""
    command = [sys.executable, __file__, "--measure", str(folder), "--size", str(args.size)]
    command += ["--backbone", args.backbone, "--weights", args.weights]
    env = {**os.environ, "IMGCLS_CACHE_DIR": str(cache)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"measuring {folder} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def verdict(ratio: float, target: float) -> str:
    """Return ``met`` when ``ratio <= target``, else ``not met``."""
    return "met" if ratio <= target else "not met"


def report(small: dict, large: dict) -> str:
    """Return the printed table: one row per image set, then the 4N/N ratios and verdicts."""
    lines = [
        "| images | seconds | ms/image | peak RSS MB | RSS after imports MB | decoded images MB |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for case in (small, large):
        lines.append(
            f"| {case['images']} | {case['seconds']:.1f} | "
            f"{1000 * case['seconds'] / case['images']:.1f} | {case['peak_rss_mb']:.0f} | "
            f"{case['floor_rss_mb']:.0f} | {case['decoded_mb']:.0f} |"
        )
    rss = large["peak_rss_mb"] / small["peak_rss_mb"]
    per_image = (large["seconds"] / large["images"]) / (small["seconds"] / small["images"])
    growth = (large["peak_rss_mb"] - large["floor_rss_mb"]) / max(
        small["peak_rss_mb"] - small["floor_rss_mb"], 1e-9
    )
    lines += [
        "",
        f"peak RSS 4N/N: {rss:.2f} (target <= {RSS_TARGET}): {verdict(rss, RSS_TARGET)}",
        f"time per image 4N/N: {per_image:.2f} (target <= {TIME_TARGET}): "
        f"{verdict(per_image, TIME_TARGET)}",
        f"peak RSS above the imports 4N/N: {growth:.2f} (for information: the decoded images "
        f"grow {large['decoded_mb'] / small['decoded_mb']:.1f}x)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse the options; in the parent build the sets and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500, help="images of the small set (default 500)")
    parser.add_argument("--size", type=int, default=160, help="decoded image size in px")
    parser.add_argument("--backbone", default="resnet18", help="frozen backbone (resnet18)")
    parser.add_argument("--weights", default="none", help="backbone weights (none: no file)")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure is not None:
        print(json.dumps(measure(args.measure, args.size, args.backbone, args.weights)))
        return 0
    if args.n < 1:
        parser.error(f"--n must be at least 1, got {args.n}")
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        root = Path(tmp)
        cases = []
        for count in (args.n, 4 * args.n):
            folder = write_images(root / f"images-{count}", count, seed=count)
            print(f"{count} images: measuring decode + {args.backbone} features...", flush=True)
            cases.append(run_case(folder, root / f"cache-{count}", args))
    print(
        f"\n{args.backbone} ({args.weights}) at {args.size} px, CPU, "
        f"{cases[0]['torch_threads']} torch threads\n"
    )
    print(report(*cases))
    return 0


if __name__ == "__main__":
    sys.exit(main())
