#!/usr/bin/env python
"""Benchmark training against hardware floors and the upstream approach, in one run.

Each step runs in its own subprocess (this script re-invoked with ``--step NAME``) so that its
peak RSS is its own. The table is printed and written to ``benchmarks/results/latest.{json,md}``.

Example: ``python benchmarks/run_benchmarks.py`` (full) or ``--quick --no-grid`` (smoke test);
``--phone-only`` runs only the 12-megapixel photo rows (``make bench BENCH_ARGS=--phone-only``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_config import (
    DEPENDS,
    FULL_FOLDS,
    FULL_REPEAT,
    FULL_TRAIN_STEPS,
    IMAGE_SIZE,
    PHONE_STEPS,
    QUICK_FOLDS,
    QUICK_PER_CLASS,
    QUICK_TRAIN_STEPS,
    REPO_ROOT,
    RESULTS_DIR,
    RUN_ONCE,
    STEPS,
)
from bench_phone import (
    PHONE_PER_CLASS,
    PHONE_STEP_FUNCTIONS,
    QUICK_PHONE_PER_CLASS,
    build_phone_set,
)
from bench_report import compute_targets, fmt_mb, fmt_number, render_markdown
from bench_steps import STEP_FUNCTIONS, default_threads, run_step, subset_indices


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: {QUICK_PER_CLASS} images per class, {QUICK_FOLDS} folds, "
        f"{QUICK_TRAIN_STEPS} floor train steps; the grid is off unless --grid",
    )
    parser.add_argument(
        "--grid",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the experiment grid through run_experiments.py (default: on, off with --quick)",
    )
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--threads",
        type=int,
        default=default_threads(),
        help="torch threads of every step (default: all cores; the grid runner sets its own)",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=STEPS,
        metavar="STEP",
        help=f"run only this step (repeatable; dependencies are added): {', '.join(STEPS)}",
    )
    parser.add_argument(
        "--phone",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"run the 12-MP photo steps ({', '.join(PHONE_STEPS)}) on {PHONE_PER_CLASS} shipped "
        f"photos per class upscaled to 4032x3024, built once (quick: {QUICK_PHONE_PER_CLASS})",
    )
    parser.add_argument(
        "--phone-only", action="store_true", help="run only the 12-MP photo steps (no grid)"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        help=f"rounds of the short steps ({', '.join(s for s in STEPS if s not in RUN_ONCE)}), "
        "run in turn, each round on its own empty caches; each step reports its fastest round "
        f"(default: {FULL_REPEAT}; quick: 1). The reference steps and the grid run once",
    )
    parser.add_argument("--per-class", type=int, help="images per class (default: all; quick: 64)")
    parser.add_argument(
        "--grid-file", type=Path, help="grid YAML for the grid step (default: strategies.yaml)"
    )
    parser.add_argument(
        "--output-dir", type=Path, default=RESULTS_DIR, help="where latest.json / latest.md go"
    )
    parser.add_argument(
        "--keep-tmp", action="store_true", help="keep the temporary caches and MLflow store"
    )
    parser.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.repeat is None:
        args.repeat = 1 if args.quick else FULL_REPEAT
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    if args.grid is None:
        args.grid = not args.quick
    if args.phone_only:
        args.only = [*(args.only or []), *PHONE_STEPS]
    return args


def selected_steps(args: argparse.Namespace) -> list[str]:
    """Return the steps to run in order: all (or --only plus dependencies), grid per --grid."""
    wanted = set(args.only or STEPS)
    if args.only is None and not args.grid:
        wanted.discard("grid")
    if args.only is None and not args.phone:
        wanted.difference_update(PHONE_STEPS)
    for name in list(wanted):
        wanted.update(DEPENDS.get(name, ()))
    return [s for s in STEPS if s in wanted]


def schedule(steps: list[str], repeat: int) -> list[tuple[int, str]]:
    """Return ``(round, step)`` in run order: rounds of the short steps in turn, then the grid.

    The steps of :data:`RUN_ONCE` run in round 0 only; the grid runs last, after every round.
    """
    order = [
        (r, name)
        for r in range(repeat)
        for name in steps
        if name != "grid" and (r == 0 or name not in RUN_ONCE)
    ]
    return order + [(0, "grid")] * ("grid" in steps)


def fastest(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Return the round with the fewest ``seconds`` (a failed round wins: errors are not hidden).

    The other rounds' seconds are kept in ``round_seconds``; the minimum of repeated timings is
    the one least disturbed by other work on the machine (the advice of Python's ``timeit``).
    """
    failed = [r for r in rounds if "error" in r]
    if failed:
        return failed[0]
    best = min(rounds, key=lambda r: r["seconds"])
    if len(rounds) > 1:
        best = {**best, "round_seconds": [r["seconds"] for r in rounds]}
        times = ", ".join(f"{r['seconds']:.2f}" for r in rounds)
        best["notes"] = (
            f"{best.get('notes', '')}; fastest of {len(rounds)} rounds ({times} s)"
        ).lstrip("; ")
    return best


def run_child(name: str, config: Path, tmp: Path) -> dict[str, Any]:
    """Run one step in a fresh Python process; return its result or ``{"error": ...}``."""
    out = tmp / f"{name}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--step", name]
    command += ["--config", str(config), "--out", str(out)]
    start = time.perf_counter()
    process = subprocess.run(command, cwd=REPO_ROOT, check=False)
    if process.returncode != 0 or not out.is_file():
        return {"step": name, "error": f"step process exited with code {process.returncode}"}
    result = json.loads(out.read_text())
    result["process_seconds"] = time.perf_counter() - start  # with interpreter start-up
    return result


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds: running children are killed, tmp is removed


def main(argv: list[str] | None = None) -> int:
    """Run the selected steps, print the table and write latest.json / latest.md."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if args.step:
        return run_step(
            args.step, args.config, args.out, {**STEP_FUNCTIONS, **PHONE_STEP_FUNCTIONS}
        )
    from imgcls.core import paths
    from imgcls.data.folders import data_version

    steps = selected_steps(args)
    per_class = args.per_class or (QUICK_PER_CLASS if args.quick else None)
    tmp = Path(tempfile.mkdtemp(prefix="imgcls-bench-"))
    cfg = {
        "quick": args.quick,
        "per_class": per_class,
        "folds": QUICK_FOLDS if args.quick else FULL_FOLDS,
        "train_steps": QUICK_TRAIN_STEPS if args.quick else FULL_TRAIN_STEPS,
        "device": args.device,
        "threads": args.threads,
        "data_md5": data_version(paths.data_dir()),
        "cache_dir": str(tmp / "cache"),
        "tmp_dir": str(tmp),
        "grid_file": str(args.grid_file.resolve()) if args.grid_file else None,
        "timestamp": time.strftime("%Y%m%d-%H%M%S"),
    }
    if any(step in PHONE_STEPS for step in steps):
        phone_dir = build_phone_set()
        cfg["phone_dir"] = str(phone_dir)
        cfg["phone_md5"] = data_version(phone_dir.parent)
        cfg["phone_per_class"] = QUICK_PHONE_PER_CLASS if args.quick else None
        per_class_phone = cfg["phone_per_class"] or PHONE_PER_CLASS
        cfg["phone_photos"] = sum(
            min(per_class_phone, sum(1 for _ in d.iterdir())) for d in phone_dir.iterdir()
        )
    configs = []
    for r in range(args.repeat):  # each round on its own empty caches (cold steps stay cold)
        round_dir = tmp if r == 0 else tmp / f"round{r}"
        round_dir.mkdir(exist_ok=True)
        round_cfg = {**cfg, "cache_dir": str(round_dir / "cache"), "tmp_dir": str(round_dir)}
        configs.append(round_dir / "config.json")
        configs[-1].write_text(json.dumps(round_cfg, indent=2))
    print(
        f"benchmark ({'quick' if args.quick else 'full'}, {args.repeat} round(s)): "
        f"{', '.join(steps)}; tmp {tmp}"
    )
    rounds: dict[str, list[dict[str, Any]]] = {}
    try:
        for r, name in schedule(steps, args.repeat):
            print(f"running {name}{f' (round {r + 1})' if args.repeat > 1 else ''} ...", flush=True)
            result = run_child(name, configs[r], configs[r].parent)
            rounds.setdefault(name, []).append(result)
            if "error" in result:
                print(f"  {name}: FAILED ({result['error']})", flush=True)
            else:
                print(
                    f"  {name}: {result['seconds']:.2f} s, {fmt_number(result['images_per_second'], 1)}"
                    f" img/s, peak RSS {fmt_mb(result['peak_rss_bytes'])} MB "
                    f"(process {result['process_seconds']:.1f} s with start-up)",
                    flush=True,
                )
    finally:
        if args.keep_tmp:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    results = {name: fastest(found) for name, found in rounds.items()}
    labels = load_labels_count(per_class)
    env = next((r["environment"] for r in results.values() if "environment" in r), {})
    report = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "mode": "quick" if args.quick else "full",
        "command": [Path(sys.executable).name, *sys.argv],
        "environment": {
            **env,
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "dataset": {
            "train_images": labels,
            "per_class": per_class or "all",
            "folds": cfg["folds"],
            "image_size": IMAGE_SIZE,
            "data_md5": cfg["data_md5"],
            "phone_photos": cfg.get("phone_photos"),
        },
        "steps_run": steps,
        "rounds": args.repeat,
        "steps": results,
        "targets": compute_targets(results),
    }
    markdown = render_markdown(report)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "latest.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (args.output_dir / "latest.md").write_text(markdown)
    print()
    print(markdown, end="")
    print(f"\nwritten: {args.output_dir / 'latest.json'}, {args.output_dir / 'latest.md'}")
    return 1 if any("error" in r for r in results.values()) else 0


def load_labels_count(per_class: int | None) -> int:
    """Return the number of training images the steps used (without decoding any)."""
    from imgcls.core import paths
    from imgcls.data.folders import scan_image_folder

    folder = scan_image_folder(paths.data_dir() / "train", validate=False)
    return len(subset_indices(folder.labels, per_class))


if __name__ == "__main__":
    sys.exit(main())
