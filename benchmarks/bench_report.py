"""Targets (MET / NOT MET) and the Markdown report of a benchmark run."""

from __future__ import annotations

from typing import Any

from bench_config import ISSUE_TODAY_MS, TARGETS

# --------------------------------------------------------------------------------------------
# Orchestration and the report
# --------------------------------------------------------------------------------------------


def fmt_number(value: float | None, digits: int = 2) -> str:
    """Return ``value`` with thousands separators and ``digits`` decimals, or "-" for None."""
    return "-" if value is None else f"{value:,.{digits}f}"


def fmt_mb(value: float | None) -> str:
    """Return a byte count in whole megabytes, or "-" when unknown."""
    return "-" if not value else f"{value / 1e6:,.0f}"


def _seconds(steps: dict[str, Any], name: str) -> float | None:
    step = steps.get(name) or {}
    return None if "error" in step else step.get("seconds")


def _ips(steps: dict[str, Any], name: str) -> float | None:
    step = steps.get(name) or {}
    return None if "error" in step else step.get("images_per_second")


def _train_ips(steps: dict[str, Any]) -> float | None:
    """Fine-tuning throughput of the training steps (the epoch's validation pass is excluded:
    it is a forward pass, compared with floor_forward; the reference ratio includes it)."""
    step = steps.get("ours_finetune") or {}
    return None if "error" in step else step.get("train_phase_images_per_second")


def _field(steps: dict[str, Any], name: str, key: str) -> float | None:
    step = steps.get(name) or {}
    return None if "error" in step else step.get(key)


def compute_targets(steps: dict[str, Any]) -> list[dict[str, Any]]:
    """Return every target with its measured value, threshold and MET / NOT MET / n/a status."""

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    grid = steps.get("grid") or {}
    grid_ok = "error" not in grid and grid.get("exit_code") == 0
    rows = [
        (
            "frozen cold / floor_forward",
            ratio(_seconds(steps, "ours_frozen_cold"), _seconds(steps, "floor_forward")),
            "<=",
            TARGETS["frozen_cold_vs_floor"],
            "x",
        ),
        (
            "reference_frozen / ours_frozen_warm",
            ratio(_seconds(steps, "reference_frozen"), _seconds(steps, "ours_frozen_warm")),
            ">=",
            TARGETS["frozen_warm_speedup"],
            "x",
        ),
        (
            "reference_finetune / ours_finetune (time per train image)",
            ratio(_ips(steps, "ours_finetune"), _ips(steps, "reference_finetune")),
            ">=",
            TARGETS["finetune_speedup"],
            "x",
        ),
        (
            "ours_finetune training-step img/s / floor_train_step img/s",
            ratio(_train_ips(steps), _ips(steps, "floor_train_step")),
            ">=",
            TARGETS["finetune_vs_floor"],
            "x",
        ),
        (
            "grid orchestration per grid point / one empty notebook (papermill)",
            ratio(grid.get("mean_orchestration_seconds"), grid.get("empty_notebook_seconds"))
            if grid_ok
            else None,
            "<",
            TARGETS["grid_orchestration_vs_empty_notebook"],
            "x",
        ),
        (
            "grid peak RSS (process tree)",
            grid.get("tree_peak_rss_bytes") if grid_ok else None,
            "<",
            TARGETS["grid_peak_rss_bytes"],
            "bytes",
        ),
        (
            "12-MP photos: frozen cold / floor_forward",
            ratio(_seconds(steps, "phone_frozen_cold"), _seconds(steps, "phone_floor_forward")),
            "<=",
            TARGETS["phone_frozen_cold_vs_floor"],
            "x",
        ),
        (
            "12-MP photos: validation per image, model input included (1 core)",
            _field(steps, "phone_validate", "validate_with_input_ms_per_image"),
            "<=",
            TARGETS["phone_validation_ms"],
            "ms",
        ),
        (
            "12-MP photos: re-validation of a recorded data version per image",
            _field(steps, "phone_validate", "rescan_ms_per_image"),
            "<=",
            TARGETS["phone_revalidation_ms"],
            "ms",
        ),
        (
            "12-MP photos: decode to 160 px per image (1 core)",
            _field(steps, "phone_decode", "decode_ms_per_image"),
            "<=",
            TARGETS["phone_decode_ms"],
            "ms",
        ),
    ]
    compare = {
        "<=": lambda v, t: v <= t,
        ">=": lambda v, t: v >= t,
        "<": lambda v, t: v < t,
    }
    out = []
    for name, value, op, threshold, unit in rows:
        status = "n/a" if value is None else "MET" if compare[op](value, threshold) else "NOT MET"
        out.append(
            {
                "target": name,
                "value": value,
                "op": op,
                "threshold": threshold,
                "unit": unit,
                "status": status,
            }
        )
    return out


def _target_text(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "bytes":
        return f"{value / 1e9:.2f} GB"
    if unit == "s":
        return f"{value:.2f} s"
    if unit == "ms":
        return f"{value:.1f} ms"
    return f"{value:.2f}x"


def phone_rows(steps: dict[str, Any]) -> list[str]:
    """Return the Markdown table of the 12-MP rows next to the issue's "today" figures.

    Empty when no phone step ran. Per image, milliseconds; "today's path, here" is the full
    decode (what the code did before issue 14) timed in the same run on a few of the photos.
    """
    if not any(name.startswith("phone_") for name in steps):
        return []
    validate = steps.get("phone_validate") or {}
    decode = steps.get("phone_decode") or {}
    floor = steps.get("phone_floor_forward") or {}
    cold = steps.get("phone_frozen_cold") or {}

    def ms(value: float | None, digits: int = 1) -> str:
        return "-" if value is None else f"{value:,.{digits}f}"

    def per_image(step: dict[str, Any]) -> float | None:
        if "error" in step or not step.get("images") or step.get("seconds") is None:
            return None
        images = step.get("photos") or step["images"]
        return step["seconds"] * 1000 / images

    def per_ms(seconds: float | None, step: dict[str, Any]) -> float | None:
        images = step.get("photos") or step.get("images")
        return None if seconds is None or not images else seconds * 1000 / images

    def end_to_end(step: dict[str, Any], first: str, second: str) -> float | None:
        parts = [step.get(first), step.get(second)]
        return None if "error" in step or None in parts else parts[0] + parts[1]

    lines = [
        "",
        "| 12-MP photo, per image | issue: today | today's path, here | now | now, all cores |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| validation (ms) | {ISSUE_TODAY_MS['validation']:.0f} | "
        f"{ms(validate.get('today_path_ms_per_image'))} | "
        f"{ms(validate.get('validate_ms_per_image'))} | "
        f"{ms(validate.get('scan_ms_per_image'))} first scan, "
        f"{ms(validate.get('rescan_ms_per_image'), 2)} re-scan |",
        f"| decode to 160 px (ms) | {ISSUE_TODAY_MS['decode']:.0f} | "
        f"{ms(decode.get('today_path_ms_per_image'))} | {ms(decode.get('decode_ms_per_image'))} | "
        f"{ms(decode.get('pool_ms_per_image'))} ({decode.get('workers', '-')} threads) |",
        f"| of which Pillow's scaled decode alone (ms) | - | - | "
        f"{ms(decode.get('pillow_decode_ms_per_image'))} | - |",
        f"| forward pass, floor (ms) | {ISSUE_TODAY_MS['forward']:.0f} | - | "
        f"{ms(per_image(floor))} | - |",
        f"| validation + the model's input from the same decode (ms) | - | - | "
        f"{ms(validate.get('validate_with_input_ms_per_image'))} | - |",
        "",
        "| 12-MP photo, per image, the runner's flow (ms, wall, all cores) | decode twice "
        "(before decode-once) | decode once (now) |",
        "| --- | ---: | ---: |",
        f"| validation pass | "
        f"{ms(per_ms(cold.get('decode_twice_validation_seconds'), cold))} | "
        f"{ms(per_ms(cold.get('runner_validation_seconds'), cold))} (decodes for the model too) |",
        f"| cold frozen CV (feature cache empty) | "
        f"{ms(per_ms(cold.get('decode_twice_cv_seconds'), cold))} (decodes again) | "
        f"{ms(per_image(cold))} |",
        f"| end to end | "
        f"{ms(per_ms(end_to_end(cold, 'decode_twice_validation_seconds', 'decode_twice_cv_seconds'), cold))} | "
        f"{ms(per_ms(end_to_end(cold, 'runner_validation_seconds', 'seconds'), cold))} |",
    ]
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    """Render the report as Markdown tables (also what is printed)."""
    env = report["environment"]
    data = report["dataset"]
    steps = report["steps"]
    mode = report["mode"]
    lines = [f"# Benchmark results ({mode} mode, {report['created']})", ""]
    if mode == "quick":
        lines += [
            "Quick mode: a data subset and fewer folds, a smoke test only; the targets are meant "
            "for the full run.",
            "",
        ]
    lines += [
        "| setting | value |",
        "| --- | --- |",
        f"| device | {env.get('device_name', '-')} ({env.get('device', '-')}) |",
        f"| torch threads | {env.get('torch_threads', '-')} (of {env['cpu_count']} CPUs) |",
        f"| torch / python | {env.get('torch_version', '-')} / {env['python']} |",
        f"| training images | {data['train_images']} ({data['per_class']} per class), "
        f"{data['folds']} folds, {data['image_size']} px |",
        f"| rounds | {report.get('rounds', 1)} of each short step, the fastest reported "
        "(reference steps and grid: 1) |",
        "",
        "| step | seconds | images | images/s | peak RSS (MB) | notes |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for name in report["steps_run"]:
        step = steps.get(name, {})
        if "error" in step:
            lines.append(f"| {name} | - | - | - | - | FAILED: {step['error']} |")
            continue
        images = step.get("images")
        lines.append(
            f"| {name} | {fmt_number(step.get('seconds'))} | {'-' if images is None else images} | "
            f"{fmt_number(step.get('images_per_second'), 1)} | {fmt_mb(step.get('peak_rss_bytes'))} | "
            f"{step.get('notes', '')} |"
        )
    lines += ["", "| target | value | threshold | status |", "| --- | ---: | ---: | --- |"]
    for row in report["targets"]:
        threshold = _target_text(row["threshold"], row["unit"])
        lines.append(
            f"| {row['target']} | {_target_text(row['value'], row['unit'])} | "
            f"{row['op']} {threshold} | {row['status']} |"
        )
    if data.get("phone_photos"):
        lines += [
            "",
            f"12-MP rows: {data['phone_photos']} shipped photos (half per class) cropped to 4:3, "
            "upscaled to 4032x3024 and saved as JPEG q90 (benchmarks/bench_phone.py).",
        ]
    lines += phone_rows(steps)
    grid = steps.get("grid") or {}
    if grid.get("grid_points"):
        lines += [
            "",
            "Per grid point: training = CV folds + seed repetitions + refit + cache setup; fixed "
            "overhead = total - training = analysis (the rest of the notebooks' cells) + "
            "orchestration (outside any cell: kernel reset, papermill, HTML, MLflow bookkeeping).",
            "",
            "| grid point | total s | cv train s | seeds s | refit s | setup s | fixed overhead s | "
            "analysis s | orchestration s | 02_train_cv s | 03_evaluate s |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for p in grid["grid_points"]:
            cells = [
                p.get(k)
                for k in (
                    "grid_point_seconds",
                    "cv_train_seconds",
                    "seed_repetition_seconds",
                    "refit_seconds",
                    "cv_setup_seconds",
                    "fixed_overhead_seconds",
                    "analysis_seconds",
                    "orchestration_seconds",
                    "02_train_cv_seconds",
                    "03_evaluate_seconds",
                )
            ]
            lines.append(f"| {p['run']} | " + " | ".join(fmt_number(v, 1) for v in cells) + " |")
        once = [n for n in grid.get("notebooks", []) if n["run"] is None]
        if once:
            lines += [
                "",
                "Once-per-grid notebooks: "
                + ", ".join(f"{n['notebook']} {n['seconds']:.1f} s" for n in once)
                + f"; whole grid {grid['seconds']:.1f} s.",
            ]
    return "\n".join(lines) + "\n"
