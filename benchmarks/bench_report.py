"""Targets (MET / NOT MET) and the Markdown report of a benchmark run."""

from __future__ import annotations

from typing import Any

from bench_config import TARGETS

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
            "grid fixed overhead per grid point",
            grid.get("mean_fixed_overhead_seconds") if grid_ok else None,
            "<",
            TARGETS["grid_fixed_overhead_s"],
            "s",
        ),
        (
            "grid peak RSS (process tree)",
            grid.get("tree_peak_rss_bytes") if grid_ok else None,
            "<",
            TARGETS["grid_peak_rss_bytes"],
            "bytes",
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
    return f"{value:.2f}x"


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
    grid = steps.get("grid") or {}
    if grid.get("grid_points"):
        lines += [
            "",
            "| grid point | total s | cv train s | refit s | setup s | fixed overhead s | "
            "02_train_cv s | 03_evaluate s |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for p in grid["grid_points"]:
            lines.append(
                f"| {p['run']} | {fmt_number(p['grid_point_seconds'], 1)} | "
                f"{fmt_number(p['cv_train_seconds'], 1)} | {fmt_number(p['refit_seconds'], 1)} | "
                f"{fmt_number(p['cv_setup_seconds'], 1)} | {fmt_number(p['fixed_overhead_seconds'], 1)} | "
                f"{fmt_number(p['02_train_cv_seconds'], 1)} | {fmt_number(p['03_evaluate_seconds'], 1)} |"
            )
        once = [n for n in grid.get("notebooks", []) if n["run"] is None]
        if once:
            lines += [
                "",
                "Once-per-grid notebooks: "
                + ", ".join(f"{n['notebook']} {n['seconds']:.1f} s" for n in once)
                + f"; whole grid {grid['seconds']:.1f} s.",
            ]
    return "\n".join(lines) + "\n"
