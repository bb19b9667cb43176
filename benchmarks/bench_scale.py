#!/usr/bin/env python
"""The scale table (issue 13): time per image and peak RSS at 1x, 4x and 16x the shipped photos.

For each size (datasets of :mod:`bench_scale_data`, made once and reused) every measurement runs
in a fresh Python process (this script re-invoked with ``--step NAME``), so its peak RSS is its
own (``ru_maxrss`` of the process, or of its largest child for the notebook and the runner):

- ``frozen_cold``: ``imgcls.modeling.crossval.cross_validate`` of the frozen strategy with an
  empty cache (validation, hashing, decoding, embedding, head training);
- ``frozen_warm``: the same call again on the caches it filled;
- ``finetune_epoch``: one fine-tuning epoch of fold 0 (``imgcls.modeling.training.train_rows``,
  validation pass included; ``prepare_inputs`` before the clock);
- ``data_notebook``: ``notebooks/01_data.ipynb`` through papermill (a fresh kernel) on the
  validated data, as ``make run`` runs it after the plan;
- ``dry_run_cold``: ``run_experiments.py --dry-run`` with an empty cache (every file validated,
  hashed and md5-summed once);
- ``dry_run``: the same command again on the unchanged dataset (a stat per file).

Time per image is the step's seconds over the images it covers (the training split; both splits
for the notebook and the runner). Targets, each size against the smallest: time per image within
1.2x and peak RSS within 1.5x. The table is printed and written to
``benchmarks/results/scale-<timestamp>.md`` and ``.json`` (git-ignored).

Example: ``python benchmarks/bench_scale.py`` (1x, 4x, 16x; long), ``--sizes 0.25,1 --quick``
(a smoke test of a few minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_config import FULL_FOLDS, QUICK_FOLDS, REPO_ROOT, RESULTS_DIR
from bench_scale_data import build_scaled_set, check_factor, size_label
from bench_steps import default_threads, import_libraries, ours_frozen, rate, setup_torch, sync

SIZES = (1.0, 4.0, 16.0)
MEASUREMENTS = (
    "frozen_cold",
    "frozen_warm",
    "finetune_epoch",
    "data_notebook",
    "dry_run_cold",
    "dry_run",
)
TARGET_TIME_RATIO = 1.2  # time per image at N x within 1.2x of the smallest size's
TARGET_RSS_RATIO = 1.5  # peak RSS at N x within 1.5x of the smallest size's
PROBE_REPEATS = 8  # speed_probe: about 1 s on 2 threads of this machine
QUICK_FINETUNE_IMAGES = 256  # --quick: the fine-tuning epoch sees at most this many images


def _peak_rss(children: bool = False) -> int:
    """Return this process's peak RSS in bytes, or that of its largest waited-for child."""
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss * 1024  # KiB on Linux


def _train_folder(cfg: dict[str, Any]) -> Any:
    from imgcls.data.folders import scan_image_folder

    return scan_image_folder(Path(cfg["root"]) / "train", validate=False)


def step_frozen(cfg: dict[str, Any]) -> dict[str, Any]:
    """Cross-validate the frozen strategy (cold or warm per the cache the config names)."""
    folder = _train_folder(cfg)
    result = ours_frozen(
        cfg, cfg["step"] == "frozen_warm", folder, cfg["data_md5"], validated=False
    )
    return {**result, "images": len(folder)}


def step_finetune_epoch(cfg: dict[str, Any]) -> dict[str, Any]:
    """One fine-tuning epoch on fold 0 (train_rows; validation pass included)."""
    os.environ["IMGCLS_CACHE_DIR"] = cfg["cache_dir"]
    import_libraries()
    import numpy as np
    import torch
    from bench_steps import _strategy

    from imgcls.data.duplicates import split_folds
    from imgcls.modeling.crossval import prepare_inputs
    from imgcls.modeling.training import train_rows

    device = setup_torch(cfg)
    folder = _train_folder(cfg)
    strategy = _strategy(cfg, frozen=False)  # 1 epoch (bench_config.FINETUNE)
    inputs, setup_seconds = prepare_inputs(strategy, folder, cfg["data_md5"], str(device))
    assignment = split_folds(folder, strategy.folds, strategy.seed)
    train_idx = np.flatnonzero(assignment != 0)
    val_idx = np.flatnonzero(assignment == 0)
    if cfg["quick"]:
        rng = np.random.default_rng(0)
        share = QUICK_FINETUNE_IMAGES / len(folder)
        train_idx = np.sort(rng.permutation(train_idx)[: max(1, round(share * len(train_idx)))])
        val_idx = np.sort(rng.permutation(val_idx)[: max(1, round(share * len(val_idx)))])
    start = time.perf_counter()
    train_rows(inputs, torch.from_numpy(train_idx), torch.from_numpy(val_idx), strategy.seed, 1)
    sync(device)
    seconds = time.perf_counter() - start
    images = len(train_idx) + len(val_idx)
    return {
        "seconds": seconds,
        "images": images,
        "images_per_second": rate(images, seconds),
        "notes": f"{len(train_idx)} train + {len(val_idx)} val images; prepare_inputs "
        f"{setup_seconds:.1f} s before the clock",
    }


def step_data_notebook(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run notebooks/01_data.ipynb with papermill in a fresh kernel (a child of this process)."""
    os.environ["IMGCLS_CACHE_DIR"] = cfg["cache_dir"]
    os.environ["IMGCLS_WARM_KERNEL"] = "0"
    from imgcls.pipeline.notebooks import execute

    output = Path(cfg["tmp_dir"]) / "01_data.ipynb"
    parameters = {"data_dir": cfg["root"], "folds": cfg["folds"], "seed": 42}
    parameters["skip_bad_images"] = False
    seconds = execute("01_data", output, parameters)
    return {
        "seconds": seconds,
        "images": cfg["images_both_splits"],
        "images_per_second": rate(cfg["images_both_splits"], seconds),
        "child_peak_rss_bytes": _peak_rss(children=True),
        "notes": "papermill, fresh kernel (its peak RSS is reported)",
    }


def step_dry_run(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run ``run_experiments.py --dry-run`` on the set as a child process; wall time."""
    tmp = Path(cfg["tmp_dir"])
    command = [sys.executable, "run_experiments.py", "--grid", "strategies.yaml", "--dry-run"]
    command += ["--data-dir", cfg["root"], "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}"]
    command += ["--experiment", "scale", "--no-register"]
    env = {**os.environ, "IMGCLS_CACHE_DIR": cfg["cache_dir"]}
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}:\n{done.stdout[-2000:]}")
    return {
        "seconds": seconds,
        "images": cfg["images_both_splits"],
        "images_per_second": rate(cfg["images_both_splits"], seconds),
        "child_peak_rss_bytes": _peak_rss(children=True),
        "notes": "whole command, interpreter start and imports included",
    }


STEP_FUNCTIONS = {
    "frozen_cold": step_frozen,
    "frozen_warm": step_frozen,
    "finetune_epoch": step_finetune_epoch,
    "data_notebook": step_data_notebook,
    "dry_run_cold": step_dry_run,
    "dry_run": step_dry_run,
}


def run_step(name: str, config: Path, out: Path) -> int:
    """Run one measurement in this process and write its result, with peak RSS, to ``out``."""
    cfg = {**json.loads(config.read_text()), "step": name}
    result = STEP_FUNCTIONS[name](cfg)
    result["peak_rss_bytes"] = max(_peak_rss(), result.get("child_peak_rss_bytes") or 0)
    out.write_text(json.dumps(result, indent=2, default=str))
    return 0


def speed_probe(threads: int, repeats: int = PROBE_REPEATS) -> float:
    """Return the seconds of a fixed CPU workload now: the machine's speed at this moment.

    ``repeats`` float32 3x3 convolutions of a ``[16, 64, 80, 80]`` tensor with 64 filters (one
    of EfficientNet-Lite0's middle layers at 160 px, batch 16) on ``threads`` torch threads,
    after one untimed warm-up; the fastest of 3 timings. Run before and after every measurement,
    so the table can show how far the shared machine's speed drifted between the smallest size
    and a larger one (the step itself runs in another process).
    """
    import torch

    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(16, 64, 80, 80, generator=generator)
    w = torch.randn(64, 64, 3, 3, generator=generator)
    torch.nn.functional.conv2d(x, w, padding=1)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            torch.nn.functional.conv2d(x, w, padding=1)
        best = min(best, time.perf_counter() - start)
    return best


def measure(name: str, cfg: dict[str, Any], tmp: Path) -> dict[str, Any]:
    """Run measurement ``name`` in a fresh process; return its result or ``{"error": ...}``.

    The result carries ``probe_seconds``: the mean of :func:`speed_probe` just before and just
    after the step.
    """
    config = tmp / f"{name}.config.json"
    config.write_text(json.dumps(cfg, indent=2))
    out = tmp / f"{name}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--step", name]
    command += ["--config", str(config), "--out", str(out)]
    before = speed_probe(cfg["threads"])
    process = subprocess.run(command, cwd=REPO_ROOT, check=False)
    after = speed_probe(cfg["threads"])
    if process.returncode != 0 or not out.is_file():
        return {"error": f"step process exited with code {process.returncode}"}
    return {**json.loads(out.read_text()), "probe_seconds": (before + after) / 2}


def judge(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add per-image time, ratios to the smallest size and met / not met to every row.

    ``rows`` hold ``measurement``, ``factor``, ``seconds``, ``images`` and ``peak_rss_bytes``
    (or ``error``). The smallest factor of each measurement is its base (ratio 1, no verdict).
    """
    for row in rows:
        ok = "error" not in row and row.get("images")
        row["ms_per_image"] = row["seconds"] * 1000 / row["images"] if ok else None
    for row in rows:
        same = [r for r in rows if r["measurement"] == row["measurement"]]
        base = min(same, key=lambda r: r["factor"])
        row["base"] = base["factor"]
        row["time_ratio"] = row["rss_ratio"] = row["speed_ratio"] = row["adjusted_ratio"] = None
        row["time_status"] = row["rss_status"] = "base" if row is base else "n/a"
        if row is base or row["ms_per_image"] is None or base["ms_per_image"] is None:
            continue
        row["time_ratio"] = row["ms_per_image"] / base["ms_per_image"]
        row["rss_ratio"] = row["peak_rss_bytes"] / base["peak_rss_bytes"]
        row["time_status"] = "met" if row["time_ratio"] <= TARGET_TIME_RATIO else "not met"
        if row.get("probe_seconds") and base.get("probe_seconds"):
            row["speed_ratio"] = row["probe_seconds"] / base["probe_seconds"]
            row["adjusted_ratio"] = row["time_ratio"] / row["speed_ratio"]
        row["rss_status"] = "met" if row["rss_ratio"] <= TARGET_RSS_RATIO else "not met"
    return rows


def render(report: dict[str, Any]) -> str:
    """Return the scale table as Markdown."""
    lines = [
        f"# Scale table ({report['mode']} mode, {report['created']})",
        "",
        f"{report['environment']}. Targets against the smallest size: time per image "
        f"<= {TARGET_TIME_RATIO}x, peak RSS <= {TARGET_RSS_RATIO}x.",
        "",
        "The probe is a fixed convolution workload timed just before and after each step "
        "(`speed_probe`); `probe vs base` above 1 means the shared machine ran slower than "
        "during the smallest size's step, and `drift-adjusted` divides the time ratio by it. "
        "Targets are judged on the unadjusted ratio.",
        "",
        "| measurement | size | images | seconds | ms/image | peak RSS (MB) | time/image vs "
        "base | time target | RSS vs base | RSS target | probe vs base | drift-adjusted |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- | ---: | ---: |",
    ]
    for row in report["rows"]:
        size = size_label(row["factor"])
        if "error" in row:
            lines.append(
                f"| {row['measurement']} | {size} | - | - | - | - | - | FAILED: "
                f"{row['error']} | - | - | - | - |"
            )
            continue

        def ratio(value: float | None) -> str:
            return "-" if value is None else f"{value:.2f}x"

        lines.append(
            f"| {row['measurement']} | {size} | {row['images']:,} | {row['seconds']:,.1f} | "
            f"{row['ms_per_image']:,.2f} | {row['peak_rss_bytes'] / 1e6:,.0f} | "
            f"{ratio(row['time_ratio'])} | {row['time_status']} | {ratio(row['rss_ratio'])} | "
            f"{row['rss_status']} | {ratio(row.get('speed_ratio'))} | "
            f"{ratio(row.get('adjusted_ratio'))} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        default=",".join(f"{s:g}" for s in SIZES),
        help="comma-separated multiples of the shipped photos (default 1,4,16); below 1 for a "
        "smoke test (0.25: copy 0 of a quarter of each class)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_FOLDS} folds instead of {FULL_FOLDS}, and the fine-tuning epoch on "
        f"{QUICK_FINETUNE_IMAGES} images at every size (a smoke test; targets are for full runs)",
    )
    parser.add_argument("--only", action="append", choices=MEASUREMENTS, metavar="MEASUREMENT")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--keep-tmp", action="store_true", help="keep caches and MLflow stores")
    parser.add_argument("--step", choices=MEASUREMENTS, help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        args.sizes = sorted({check_factor(float(s)) for s in args.sizes.split(",") if s.strip()})
    except ValueError as exc:
        parser.error(f"--sizes {args.sizes!r}: {exc}")
    return args


def measure_size(args: argparse.Namespace, factor: float, tmp: Path) -> list[dict[str, Any]]:
    """Build (or reuse) one size and run every selected measurement on it; return the rows."""
    from imgcls.data.folders import data_version, scan_image_folder

    root = build_scaled_set(factor)
    work = tmp / size_label(factor)
    work.mkdir(parents=True)
    train = scan_image_folder(root / "train", validate=False)
    test = scan_image_folder(root / "test", validate=False)
    base = {
        "root": str(root),
        "data_md5": data_version(root),
        "folds": QUICK_FOLDS if args.quick else FULL_FOLDS,
        "quick": args.quick,
        "device": args.device,
        "threads": args.threads,
        "images_both_splits": len(train) + len(test),
        "timestamp": time.strftime("%Y%m%d-%H%M%S"),
    }
    caches = {"main": work / "cache", "dry": work / "cache-dry-run"}
    rows = []
    for name in [m for m in MEASUREMENTS if m in (args.only or MEASUREMENTS)]:
        cache = caches["dry" if name.startswith("dry_run") else "main"]
        step_tmp = work / ("dry-run" if name.startswith("dry_run") else name)
        step_tmp.mkdir(exist_ok=True)
        cfg = {**base, "cache_dir": str(cache), "tmp_dir": str(step_tmp)}
        print(f"{size_label(factor)} {name} ...", flush=True)
        result = measure(name, cfg, work)
        row = {"measurement": name, "factor": factor, **result}
        if "error" in row:
            print(f"  FAILED ({row['error']})", flush=True)
        else:
            print(
                f"  {row['seconds']:.1f} s, {row['images']} images, peak RSS "
                f"{row['peak_rss_bytes'] / 1e6:,.0f} MB",
                flush=True,
            )
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Measure every size, print the table, write scale-<timestamp>.{md,json}; 1 if a step failed."""
    args = parse_args(argv)
    if args.step:
        return run_step(args.step, args.config, args.out)
    import torch

    tmp = Path(tempfile.mkdtemp(prefix="imgcls-bench-scale-"))
    rows: list[dict[str, Any]] = []
    try:
        for factor in args.sizes:
            rows += measure_size(args, factor, tmp)
    finally:
        if args.keep_tmp:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    report = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "mode": "quick" if args.quick else "full",
        "command": [Path(sys.executable).name, *sys.argv],
        "environment": f"{device}, {args.threads} torch threads of {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, Python {platform.python_version()}",
        "sizes": args.sizes,
        "rows": judge(rows),
    }
    markdown = render(report)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    stem = args.output_dir / f"scale-{time.strftime('%Y%m%d-%H%M%S')}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    stem.with_suffix(".md").write_text(markdown)
    print()
    print(markdown, end="")
    print(f"\nwritten: {stem.with_suffix('.md')}, {stem.with_suffix('.json')}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
