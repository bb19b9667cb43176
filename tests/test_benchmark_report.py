"""The benchmark's verdicts: each target is MET, NOT MET or n/a from the measured steps."""

from __future__ import annotations

import sys

from imgcls.core import paths

sys.path.insert(0, str(paths.REPO_ROOT / "benchmarks"))

from bench_report import compute_targets, render_markdown

STEPS = {
    "floor_forward": {"seconds": 10.0, "images_per_second": 95.0},
    "floor_train_step": {"seconds": 16.0, "images_per_second": 40.0},
    "reference_frozen": {"seconds": 180.0, "images_per_second": 42.0},
    "ours_frozen_cold": {"seconds": 12.0, "images_per_second": 600.0},
    "ours_frozen_warm": {"seconds": 4.0, "images_per_second": 1900.0},
    "reference_finetune": {"seconds": 30.0, "images_per_second": 25.0},
    # 36 img/s with the validation pass (0.9x the floor), 30 img/s for the training steps alone
    "ours_finetune": {
        "seconds": 21.0,
        "images_per_second": 36.0,
        "train_phase_images_per_second": 30.0,
    },
    "grid": {
        "exit_code": 0,
        "mean_fixed_overhead_seconds": 12.0,
        "mean_orchestration_seconds": 5.0,
        "empty_notebook_seconds": 2.0,
        "tree_peak_rss_bytes": 4.2e9,
    },
}


def _verdicts(steps: dict) -> dict[str, tuple[float | None, str]]:
    return {t["target"]: (t["value"], t["status"]) for t in compute_targets(steps)}


def test_each_target_is_judged_against_its_threshold():
    verdicts = _verdicts(STEPS)
    assert verdicts["frozen cold / floor_forward"] == (1.2, "MET")
    assert verdicts["reference_frozen / ours_frozen_warm"] == (45.0, "NOT MET")
    assert verdicts["reference_finetune / ours_finetune (time per train image)"] == (
        36.0 / 25.0,
        "MET",
    )
    # the floor comparison uses the training steps, not the epoch with its validation pass
    assert verdicts["ours_finetune training-step img/s / floor_train_step img/s"] == (
        0.75,
        "NOT MET",
    )
    # a ratio to one papermill run of an empty notebook in the same run, not absolute seconds
    overhead = "grid orchestration per grid point / one empty notebook (papermill)"
    assert verdicts[overhead] == (2.5, "MET")
    slower = {**STEPS, "grid": {**STEPS["grid"], "empty_notebook_seconds": 1.5}}
    assert _verdicts(slower)[overhead] == (5.0 / 1.5, "NOT MET")
    assert verdicts["grid peak RSS (process tree)"] == (4.2e9, "NOT MET")


def test_failed_or_missing_steps_give_n_a_not_a_verdict():
    steps = {**STEPS, "ours_frozen_cold": {"error": "step process exited with code 1"}}
    steps["grid"] = {**STEPS["grid"], "exit_code": 1}
    del steps["floor_train_step"]
    verdicts = _verdicts(steps)
    assert verdicts["frozen cold / floor_forward"] == (None, "n/a")
    assert verdicts["ours_finetune training-step img/s / floor_train_step img/s"] == (None, "n/a")
    assert verdicts["grid peak RSS (process tree)"] == (None, "n/a")


def test_markdown_lists_every_target_with_its_status():
    report = {
        "environment": {
            "device": "cpu",
            "device_name": "cpu",
            "torch_threads": 2,
            "cpu_count": 2,
            "python": "3.11",
        },
        "dataset": {"train_images": 949, "per_class": "all", "folds": 5, "image_size": 160},
        "mode": "full",
        "created": "2026-11-27T00:00:00",
        "steps_run": list(STEPS),
        "steps": {
            name: {**step, "images": 1, "peak_rss_bytes": 1e9, "notes": ""}
            for name, step in STEPS.items()
        },
        "targets": compute_targets(STEPS),
    }
    markdown = render_markdown(report)
    for target in report["targets"]:
        assert target["target"] in markdown
    assert markdown.count("| NOT MET |") == 3


def test_grid_point_split_counts_seed_repetitions_as_training(tmp_path):
    import nbformat
    from bench_grid import notebook_cell_seconds, split_grid_point

    notebook = nbformat.v4.new_notebook()
    notebook.cells = [
        nbformat.v4.new_markdown_cell("# a title has no duration"),
        nbformat.v4.new_code_cell("x = 1", metadata={"papermill": {"duration": 1.25}}),
        nbformat.v4.new_code_cell("y = 2", metadata={"papermill": {"duration": 0.5}}),
    ]
    path = tmp_path / "02_train_cv.ipynb"
    nbformat.write(notebook, path)
    assert notebook_cell_seconds(path) == 1.75
    notebook.cells.append(nbformat.v4.new_code_cell("z = 3"))  # never executed by papermill
    nbformat.write(notebook, path)
    assert notebook_cell_seconds(path) is None
    assert notebook_cell_seconds(tmp_path / "missing.ipynb") is None

    metrics = {
        "grid_point_seconds": 20.0,
        "cv_train_seconds": 2.0,
        "refit_seconds": 1.0,
        "cv_setup_seconds": 0.5,
        "seed_repetition_seconds": 3.5,
    }
    parts = split_grid_point(metrics, cells=15.0)
    assert parts["training_seconds"] == 7.0  # 2 + 3.5 + 1 + 0.5
    assert parts["fixed_overhead_seconds"] == 13.0
    assert parts["orchestration_seconds"] == 5.0  # outside any cell
    assert parts["analysis_seconds"] == 8.0  # inside cells, not training
    finetuned = split_grid_point({**metrics, "seed_repetition_seconds": None}, cells=None)
    assert finetuned["training_seconds"] == 3.5
    assert finetuned["orchestration_seconds"] is None and finetuned["analysis_seconds"] is None


def test_rounds_repeat_the_short_steps_and_keep_the_fastest():
    from run_benchmarks import fastest, schedule

    steps = ["floor_forward", "reference_frozen", "ours_frozen_cold", "grid"]
    assert schedule(steps, 2) == [
        (0, "floor_forward"),
        (0, "reference_frozen"),
        (0, "ours_frozen_cold"),
        (1, "floor_forward"),
        (1, "ours_frozen_cold"),
        (0, "grid"),
    ]
    assert schedule(steps, 1) == [(0, s) for s in steps]
    best = fastest([{"seconds": 17.1, "notes": "a"}, {"seconds": 12.4, "notes": "b"}])
    assert best["seconds"] == 12.4 and best["round_seconds"] == [17.1, 12.4]
    assert best["notes"] == "b; fastest of 2 rounds (17.10, 12.40 s)"
    failed = {"error": "step process exited with code 1"}
    assert fastest([{"seconds": 1.0}, failed]) == failed  # a failed round is never hidden


def test_the_bench_imports_what_notebook_02_imports_before_its_cv():
    from bench_steps import notebook_imports

    statements = notebook_imports("02_train_cv", before="cross_validate(")
    assert "from imgcls.pipeline.session import TrainingSession" in statements
    assert all(s.startswith(("import ", "from ")) for s in statements)
    # a cell marker that comes first yields nothing: only cells before it are read
    assert notebook_imports("02_train_cv", before="strategy") == []
