"""End to end: run_experiments.py on a generated dataset, checked in a real MLflow store."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from imgcls.core import paths
from tests.conftest import TINY_GRID_DEFAULTS, write_tiny_data

GRID = (
    TINY_GRID_DEFAULTS
    + """\
  lr: 0.01
strategies:
  frozen: {}
  broken:
    weights: /nonexistent/weights.pth
"""
)


def run_cli(
    args: list[str], env: dict[str, str], timeout: int = 600
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(paths.REPO_ROOT / "run_experiments.py"), *args],
        cwd=paths.REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory):
    """Run a two-point grid (one point fails on purpose) into a throwaway store, twice."""
    tmp = tmp_path_factory.mktemp("pipeline")
    data = write_tiny_data(tmp / "data")
    stamp = time.time_ns() - 60 * 10**9  # older than validation's racy window, however fast
    for path in data.rglob("*"):
        os.utime(path, ns=(stamp, stamp))
    grid = tmp / "grid.yaml"
    grid.write_text(GRID)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    env = {
        **os.environ,
        "IMGCLS_REPORTS_DIR": str(tmp / "reports"),
        "IMGCLS_ARTIFACT_ROOT": str(tmp / "artifacts"),
        "IMGCLS_CACHE_DIR": str(tmp / "cache"),
        "IMGCLS_WARM_KERNEL": "1",  # the runner's own default, whatever the caller's shell says
    }
    args = [
        "--grid",
        str(grid),
        "--data-dir",
        str(data),
        "--tracking-uri",
        uri,
        "--experiment",
        "e2e",
    ]
    first = run_cli(args, env)
    second = run_cli(args, env)
    mlflow.set_tracking_uri(uri)
    return {
        "first": first,
        "second": second,
        "uri": uri,
        "tmp": tmp,
        "data": data,
        "env": env,
        "args": args,
    }


def _runs(kind: str | None = None):
    client = MlflowClient()
    experiment = client.get_experiment_by_name("e2e")
    query = f"tags.run_kind = '{kind}'" if kind else ""
    return client.search_runs([experiment.experiment_id], query, max_results=1000)


def test_failing_strategy_does_not_stop_the_others_and_exit_is_nonzero(grid_run):
    first = grid_run["first"]
    assert first.returncode == 1, first.stdout + first.stderr
    assert "broken" in first.stdout and "FAILED" in first.stdout
    assert re.search(r"frozen\s+FINISHED", first.stdout), first.stdout
    assert "reports:" in first.stdout and "MLflow:" in first.stdout


def test_warm_kernel_is_stopped_after_the_last_notebook_before_the_summary_page(grid_run):
    """The kernel's memory (GBs after fine-tuning) is not held while the runner renders pages."""
    out = grid_run["first"].stdout
    stopped = re.search(r"stopped the notebooks' warm kernel \(pid (\d+)\)", out)
    assert stopped, out[-3000:]
    assert out.index("04_compare_runs done") < stopped.start() < out.index("one-file summary")


def test_the_validation_pass_decodes_the_models_inputs_and_no_notebook_decodes_again(grid_run):
    """One decode per photo: the runner's validation pass fills the decoded-image cache of both
    splits, and notebooks 02 and 03 (keyed by the same data version) only read it."""
    out = grid_run["first"].stdout
    written = []
    for split, count in (("train", 20), ("test", 8)):
        line = re.search(
            rf"decoded {count} {split} images for the model at 32 px in the "
            r"validation pass: (\S+\.npy)",
            out,
        )
        assert line, out[:3000]
        written.append(Path(line.group(1)))
    decoded = sorted((grid_run["tmp"] / "cache" / "decoded").glob("*.npy"))
    assert decoded == sorted(written)
    assert "decoded" not in grid_run["second"].stdout.split("plan:")[0]  # nothing new to decode


def test_parent_and_child_runs_carry_lineage(grid_run):
    client = MlflowClient()
    frozen = [r for r in _runs("grid_point") if r.data.tags["strategy"] == "frozen"]
    assert len(frozen) == 1, "the second invocation skipped the finished point"
    run = frozen[0]
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    for tag in (
        "grid_id",
        "run_key",
        "strategy",
        "git_commit",
        "git_dirty",
        "data_md5",
        "code_version",
        "pipeline_complete",
    ):
        assert tags.get(tag), tag
    assert tags["data_md5"].endswith(".dir")
    assert run.data.params["lr"] == "0.01" and run.data.params["backbone"] == "resnet18"
    for metric in (
        "cv_accuracy_mean",
        "cv_accuracy_std",
        "cv_loss_mean",
        "test_accuracy",
        "test_accuracy_ci_low",
        "gate_passed",
    ):
        assert metric in run.data.metrics, metric
    children = client.search_runs(
        [run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'"
    )
    assert len(children) == 2
    history = client.get_metric_history(children[0].info.run_id, "val_accuracy")
    assert sorted(m.step for m in history) == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "notebooks")}
    assert artifacts == {
        f"notebooks/{n}.{e}" for n in ("02_train_cv", "03_evaluate") for e in ("ipynb", "html")
    }


def test_failed_run_is_marked_failed_with_its_notebook_kept(grid_run):
    broken = [r for r in _runs("grid_point") if r.data.tags["strategy"] == "broken"]
    assert len(broken) == 2 and all(r.info.status == "FAILED" for r in broken)
    assert "weights file not found" in broken[0].data.tags["error"]
    notebook = Path(grid_run["tmp"]) / "reports" / "broken" / "02_train_cv.ipynb"
    cells = json.loads(notebook.read_text())["cells"]
    assert any(o.get("output_type") == "error" for c in cells for o in c.get("outputs", []))
    assert not [r for r in _runs() if r.info.status == "RUNNING"]


def test_second_invocation_trains_nothing_that_finished(grid_run):
    second = grid_run["second"]
    assert "skip (finished run" in second.stdout
    assert "plan: 1 to run, 1 already finished" in second.stdout


def test_reports_index_links_every_report(grid_run):
    reports = Path(grid_run["tmp"]) / "reports"
    index = (reports / "index.html").read_text()
    assert index.count("★ champion") == 1 and "frozen ★ champion" in index
    for target in (
        "data/01_data.html",
        "comparison/04_compare_runs.html",
        "frozen/02_train_cv.html",
        "frozen/03_evaluate.html",
    ):
        assert f'href="{target}"' in index and (reports / target).is_file()
    html = (reports / "frozen" / "03_evaluate.html").read_text()
    source = (paths.notebooks_dir() / "03_evaluate.ipynb").read_text()
    assert "EvaluationSession.start(" in source  # a line of 03's code ...
    assert "Quality gate" in html and "EvaluationSession.start(" not in html  # ... hidden


def test_reports_show_photographs_as_jpeg_and_charts_as_png(grid_run):
    """01's sample gallery, 03's hardest images and their Grad-CAM overlays are photographs."""
    reports = Path(grid_run["tmp"]) / "reports"
    data = (reports / "data" / "01_data.html").read_text()
    evaluation = (reports / "frozen" / "03_evaluate.html").read_text()
    assert data.count("data:image/jpeg;base64,") == 1 and "data:image/png;base64," in data
    assert evaluation.count("data:image/jpeg;base64,") == 2
    assert evaluation.count("data:image/png;base64,") >= 3  # confusion, ROC/PR, reliability


def test_champion_alias_and_pyfunc_in_a_new_process(grid_run):
    client = MlflowClient()
    version = client.get_model_version_by_alias("e2e-classifier", "champion")
    frozen = next(r for r in _runs("grid_point") if r.data.tags["strategy"] == "frozen")
    assert version.run_id == frozen.info.run_id or version.tags.get("run_id") == frozen.info.run_id
    script = (
        "import base64, mlflow, pandas as pd, pathlib, json, sys\n"
        f"mlflow.set_tracking_uri({grid_run['uri']!r})\n"
        "model = mlflow.pyfunc.load_model('models:/e2e-classifier@champion')\n"
        f"files = sorted(pathlib.Path({str(grid_run['data'] / 'test')!r}).glob('*/*.jpg'))\n"
        "values = [base64.b64encode(f.read_bytes()).decode() for f in files]\n"
        "out = model.predict(pd.DataFrame({'image': values}))\n"
        "acc = sum(p == f.parent.name for p, f in zip(out['predicted_class'], files)) / len(files)\n"
        "print(json.dumps({'accuracy': acc, 'columns': list(out.columns)}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd="/",
        env=grid_run["env"],
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["columns"] == ["predicted_class", "confidence", "prob_forest", "prob_sea"]
    assert answer["accuracy"] == pytest.approx(frozen.data.metrics["test_accuracy"])


def test_dry_run_and_bad_grid_fail_before_anything_runs(grid_run, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("strategies:\n  s:\n    lr: -1\n")
    result = run_cli(["--grid", str(bad), "--data-dir", str(grid_run["data"])], grid_run["env"])
    assert result.returncode == 2
    assert f"{bad}:3: strategies.s.lr: learning rate must be > 0" in result.stderr
    too_many = tmp_path / "folds.yaml"
    too_many.write_text("strategies:\n  s:\n    folds: 11\n")
    result = run_cli(
        ["--grid", str(too_many), "--data-dir", str(grid_run["data"])], grid_run["env"]
    )
    assert result.returncode == 2 and "folds: 11 folds but class" in result.stderr
    unreachable = run_cli(
        [*grid_run["args"][:4], "--tracking-uri", "http://127.0.0.1:9"], grid_run["env"]
    )
    assert unreachable.returncode == 2 and "tracking server unreachable" in unreachable.stderr
    dry = run_cli([*grid_run["args"], "--dry-run"], grid_run["env"])
    assert dry.returncode == 0 and "dry run: nothing executed" in dry.stdout
