"""MLflow 3 lineage: datasets, logged-model metrics, git and run names, one identity writer.

One grid point runs through the runner (run_experiments.py: 02 and 03 as papermill notebooks)
and the same strategy through a hand-opened session (TrainingSession.start with no parent run,
then EvaluationSession), into one real SQLite store; the tests read both back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient
from papermill.execute import ERROR_MARKER_TAG

from imgcls import tracking
from imgcls.core import paths
from imgcls.data.folders import data_version
from imgcls.evaluation.evaluate import metric_prefix
from tests.conftest import TINY_GRID_DEFAULTS, write_dataset, write_tiny_data

GRID = (
    TINY_GRID_DEFAULTS
    + """\
strategies:
  frozen:
    lr: [0.01]
  broken:
    weights: /nonexistent/weights.pth
"""
)
STRATEGY = {
    "backbone": "resnet18",
    "weights": "none",
    "image_size": 32,
    "folds": 2,
    "epochs": 2,
    "batch_size": 8,
    "lr": 0.01,
}
POINT = "frozen-lr=0.01"  # the runner's name of the grid point


@pytest.fixture(scope="module")
def lineage(tmp_path_factory):
    """Run the grid with the runner, then the same strategy by hand, into one SQLite store."""
    from imgcls.evaluation.evaluate import EvaluationSession
    from imgcls.pipeline.session import TrainingSession

    tmp = tmp_path_factory.mktemp("lineage")
    data = write_tiny_data(tmp / "data")
    phone = write_dataset(tmp / "phone", {"forest": 3, "sea": 3}, seed=3)
    (tmp / "grid.yaml").write_text(GRID)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    env = {
        **os.environ,
        "IMGCLS_REPORTS_DIR": str(tmp / "reports"),
        "IMGCLS_ARTIFACT_ROOT": str(tmp / "artifacts"),
        "IMGCLS_CACHE_DIR": str(tmp / "cache"),
    }
    args = ["--grid", str(tmp / "grid.yaml"), "--data-dir", str(data), "--tracking-uri", uri]
    args += ["--experiment", "lineage", "--eval-dir", str(phone), "--no-register"]
    cli = subprocess.run(
        [sys.executable, str(paths.REPO_ROOT / "run_experiments.py"), *args],
        cwd=paths.REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert cli.returncode == 1, cli.stdout + cli.stderr  # "broken" fails on purpose
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("IMGCLS_CACHE_DIR", str(tmp / "cache"))
        session = TrainingSession.start(STRATEGY, "frozen", None, "lineage", uri, str(data))
        result = session.cross_validate(progress=False)
        session.refit(result, progress=False)
        session.finish()
        evaluation = EvaluationSession.start(session.run_id, "lineage", uri)
        test = evaluation.evaluate_test(str(data))
        evaluation.fold_models_on(test)
        evaluation.gate(test)
        evaluation.evaluate(evaluation.load_folder(phone), name=str(phone))
    tracking.configure(uri)
    client = MlflowClient()
    experiment = client.get_experiment_by_name("lineage")
    points = client.search_runs(
        [experiment.experiment_id], f"tags.{tracking.TAG_KIND} = 'grid_point'"
    )
    by_grid = {
        (r.data.tags[tracking.TAG_GRID_ID], r.data.tags[tracking.TAG_STRATEGY]): r for r in points
    }
    runner = next(r for (g, s), r in by_grid.items() if s == "frozen" and g != "by-hand")
    broken = next(r for (_, s), r in by_grid.items() if s == "broken")
    return {
        "tmp": tmp,
        "data": data,
        "phone": phone,
        "experiment": experiment,
        "runner": runner,
        "hand": client.get_run(session.run_id),
        "broken": broken,
    }


def _children(run) -> list:
    return MlflowClient().search_runs(
        [run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'"
    )


def test_runner_and_hand_opened_runs_carry_the_same_identity(lineage):
    runner, hand = lineage["runner"], lineage["hand"]
    assert runner.info.status == hand.info.status == "FINISHED"
    assert runner.data.params == hand.data.params
    runner_tags = set(runner.data.tags) - set(tracking.RUNNER_TAGS)
    assert runner_tags == set(hand.data.tags)
    assert set(tracking.IDENTITY_TAGS) <= runner_tags
    same = (
        "run_key",
        "code_version",
        "data_md5",
        "git_commit",
        "strategy",
        "mlflow.source.git.commit",
    )
    assert {k: runner.data.tags[k] for k in same} == {k: hand.data.tags[k] for k in same}
    assert hand.data.tags[tracking.TAG_GRID_ID] == "by-hand"
    assert runner.data.tags[tracking.TAG_GRID_POINT] == POINT


def test_each_split_is_a_dataset_input_with_its_data_version(lineage):
    data, phone = lineage["data"], lineage["phone"]
    expected = {
        ("train", data_version(data / "train"), str(data / "train"), "training"),
        ("test", data_version(data / "test"), str(data / "test"), "evaluation"),
        (str(phone), data_version(phone), str(phone), "evaluation"),
    }
    for run in (lineage["runner"], lineage["hand"]):
        found = {
            (
                i.dataset.name,
                i.dataset.digest,
                json.loads(i.dataset.source)["uri"],
                {t.key: t.value for t in i.tags}["mlflow.data.context"],
            )
            for i in run.inputs.dataset_inputs
        }
        assert found == expected
        children = _children(run)
        assert len(children) == 2
        for child in children:
            inputs = [(i.dataset.name, i.dataset.digest) for i in child.inputs.dataset_inputs]
            assert inputs == [("train", data_version(data / "train"))]


def test_test_metrics_are_linked_to_the_logged_model_and_the_test_set(lineage):
    client = MlflowClient()
    digest = data_version(lineage["data"] / "test")
    for run in (lineage["runner"], lineage["hand"]):
        found = tracking.logged_model(run.info.run_id)
        assert found.source_run_id == run.info.run_id
        assert "model_uri" not in run.data.tags  # found through the LoggedModel, not a tag
        model = client.get_logged_model(found.model_id)
        assert model.params == run.data.params
        assert model.tags["mlflow.source.name"] == tracking.SOURCE_NOTEBOOK[0]
        assert model.tags["mlflow.source.git.commit"] == run.data.tags["git_commit"]
        on_test = {m.key: m for m in model.metrics if m.dataset_name == "test"}
        assert on_test["test_accuracy"].dataset_digest == digest
        assert on_test["test_accuracy"].value == run.data.metrics["test_accuracy"]
        assert on_test["gate_passed"].value == run.data.metrics["gate_passed"]
        phone = {m.key for m in model.metrics if m.dataset_name == str(lineage["phone"])}
        assert f"{metric_prefix(str(lineage['phone']))}_accuracy" in phone


def test_git_commit_and_source_are_mlflows_own_tags(lineage):
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=paths.REPO_ROOT, capture_output=True, text=True
    ).stdout.strip()
    runner, hand = lineage["runner"].data.tags, lineage["hand"].data.tags
    assert runner["mlflow.source.git.commit"] == runner["git_commit"] == head
    assert (runner["mlflow.source.name"], runner["mlflow.source.type"]) == tracking.SOURCE_RUNNER
    assert (hand["mlflow.source.name"], hand["mlflow.source.type"]) == tracking.SOURCE_NOTEBOOK


def test_run_names_and_parent_links_come_from_the_api(lineage):
    for run, point in ((lineage["runner"], POINT), (lineage["hand"], "frozen")):
        assert run.info.run_name == run.data.tags["mlflow.runName"] == point
        children = _children(run)
        assert sorted(c.info.run_name for c in children) == [f"{point}-fold0", f"{point}-fold1"]
        for child in children:
            assert child.data.tags["mlflow.parentRunId"] == run.info.run_id
            assert child.info.status == "FINISHED"
            assert child.data.tags["mlflow.source.git.commit"] == run.data.tags["git_commit"]


def test_the_experiment_opens_as_model_training(lineage, tmp_path):
    tags = lineage["experiment"].tags
    assert tags[tracking.EXPERIMENT_KIND_TAG] == tracking.EXPERIMENT_KIND
    # an experiment created before this tag existed gets it the next time it is used
    tracking.configure(f"sqlite:///{tmp_path / 'old.db'}")
    client = MlflowClient()
    old = client.create_experiment("old", artifact_location=(tmp_path / "a").as_uri())
    assert tracking.EXPERIMENT_KIND_TAG not in client.get_experiment(old).tags
    assert tracking.get_experiment_id("old") == old
    assert (
        client.get_experiment(old).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    )


def test_notebook_02_gets_the_grid_points_full_name(lineage):
    notebook = lineage["tmp"] / "reports" / POINT / "02_train_cv.ipynb"
    parameters = json.loads(notebook.read_text())["metadata"]["papermill"]["parameters"]
    assert parameters["strategy_name"] == POINT


def test_a_failed_notebook_is_named_by_papermills_error_fields(lineage):
    """The error tag names the cell papermill ran (its index before papermill's marker cells)."""
    notebook = lineage["tmp"] / "reports" / "broken" / "02_train_cv.ipynb"
    cells = json.loads(notebook.read_text())["cells"]
    executed = [c for c in cells if ERROR_MARKER_TAG not in c.get("metadata", {}).get("tags", [])]
    index, error = next(
        (i, o)
        for i, c in enumerate(executed)
        for o in c.get("outputs", [])
        if o.get("output_type") == "error"
    )
    expected = f"cell {index}: {error['ename']}: {error['evalue']}"
    assert lineage["broken"].data.tags["error"] == expected
    assert "weights file not found" in expected


def test_log_batch_leaves_the_request_limits_to_mlflow(tmp_path):
    """250 params, 150 tags and 2500 metrics: over every per-request limit, one call."""
    tracking.configure(f"sqlite:///{tmp_path / 'batch.db'}")
    experiment = MlflowClient().create_experiment("b", artifact_location=tmp_path.as_uri())
    run_id = MlflowClient().create_run(experiment).info.run_id
    tracking.log_batch(
        run_id,
        metrics={f"m{i}": i / 7 for i in range(2500)},
        params={f"p{i}": i for i in range(250)},
        tags={f"t{i}": i for i in range(150)},
    )
    data = MlflowClient().get_run(run_id).data
    assert len(data.params) == 250 and data.params["p249"] == "249"
    assert len(data.metrics) == 2500 and abs(data.metrics["m2499"] - 2499 / 7) < 1e-12
    assert {f"t{i}" for i in range(150)} <= set(data.tags)


def test_identity_without_lineage_tags_is_refused(tmp_path):
    tracking.configure(f"sqlite:///{tmp_path / 'id.db'}")
    experiment = MlflowClient().create_experiment("i", artifact_location=tmp_path.as_uri())
    run_id = MlflowClient().create_run(experiment).info.run_id
    with pytest.raises(ValueError, match=r"lineage tags \['grid_id'.*tracking.lineage_tags"):
        tracking.log_grid_point_identity(run_id, {"lr": 0.1}, {"strategy": "s"})
    assert MlflowClient().get_run(run_id).data.params == {}
