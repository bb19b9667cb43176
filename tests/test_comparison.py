"""Paired comparisons of grid points, held against a real SQLite MLflow store.

Fold k of two grid points is the same images only when both runs carry the same
``params.fold_assignment``; any other pair must be reported as not comparable, not paired by
fold index.
"""

from __future__ import annotations

import math
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from imgcls import tracking
from imgcls.selection.comparison import PARAM_FOLD_ASSIGNMENT, GridComparison

# Fold accuracies of test_metrics.test_corrected_ttest_three_folds_by_hand: with 30 training
# images in 3 folds (n_train 20, n_test 10) the corrected t is 2.5298221 and p 0.1271284.
CHAMPION_FOLDS = [0.9, 0.8, 0.85]
OTHER_FOLDS = [0.8, 0.75, 0.8]
P_BY_HAND = 0.1271284


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One SQLite store for the module: creating its schema costs seconds, so it is made once."""
    return tmp_path_factory.mktemp("comparison-store")


@pytest.fixture()
def experiment(store: Path, request: pytest.FixtureRequest) -> str:
    """A fresh experiment (named after the test) in the module's store; returns its name."""
    uri = f"sqlite:///{store / 'mlflow.db'}"
    tracking.configure(uri)
    name = request.node.name
    MlflowClient().create_experiment(name, artifact_location=(store / name).as_uri())
    return name


def _log_point(
    experiment: str,
    grid_id: str,
    point: str,
    folds: list[float],
    fold_assignment: str | None,
    run_key: str | None = None,
) -> None:
    """Log one finished grid-point run the way the training session does."""
    tags = {
        tracking.TAG_KIND: "grid_point",
        tracking.TAG_GRID_ID: grid_id,
        tracking.TAG_GRID_POINT: point,
        tracking.TAG_STRATEGY: point,
        tracking.TAG_RUN_KEY: run_key or f"{grid_id}-{point}",
    }
    # no mlflow.set_experiment: it would leave a process-wide active experiment for later tests
    experiment_id = mlflow.get_experiment_by_name(experiment).experiment_id
    with mlflow.start_run(experiment_id=experiment_id, tags=tags):
        if fold_assignment is not None:
            mlflow.log_param(PARAM_FOLD_ASSIGNMENT, fold_assignment)
        mlflow.log_metrics(
            {
                "cv_accuracy_mean": sum(folds) / len(folds),
                "cv_loss_mean": 0.3,
                "cv_train_seconds": 10.0,
                "n_train_images": 30.0,
            }
        )
        for step, value in enumerate(folds):
            mlflow.log_metric("fold_val_accuracy", value, step=step)


def test_only_points_with_the_champions_folds_are_paired(experiment: str) -> None:
    _log_point(experiment, "g", "champion", CHAMPION_FOLDS, "aaaaaaaaaaaa")
    _log_point(experiment, "g", "same_folds", OTHER_FOLDS, "aaaaaaaaaaaa")
    _log_point(experiment, "g", "other_folds", OTHER_FOLDS, "bbbbbbbbbbbb")
    _log_point(experiment, "g", "no_param", OTHER_FOLDS, None)
    _log_point(experiment, "g", "two_folds", [0.8, 0.75], "aaaaaaaaaaaa")
    grid = GridComparison.load(experiment, "g")
    assert grid.champion() == "champion"

    result = grid.significance()
    assert list(result.columns) == ["mean_difference", "t", "p_value", "pairing"]
    assert result.loc["same_folds", "p_value"] == pytest.approx(P_BY_HAND, abs=1e-6)
    assert result.loc["same_folds", "t"] == pytest.approx(2.5298221, abs=1e-6)
    assert result.loc["same_folds", "pairing"] == "same folds (fold_assignment aaaaaaaaaaaa)"
    # Same scores and fold count as same_folds: paired by index they would get the same p.
    for point in ("other_folds", "no_param", "two_folds", "champion"):
        assert result.loc[point, ["mean_difference", "t", "p_value"]].isna().all(), point
    assert result.loc["other_folds", "pairing"] == (
        "not comparable: other folds (fold_assignment bbbbbbbbbbbb, champion aaaaaaaaaaaa)"
    )
    assert "run has no params.fold_assignment" in result.loc["no_param", "pairing"]
    assert result.loc["two_folds", "pairing"] == "not comparable: 2 fold scores, the champion has 3"
    assert result.loc["champion", "pairing"] == "champion (the reference)"

    table = grid.table()
    assert table.loc["same_folds", "p_value_vs_best"] == pytest.approx(P_BY_HAND, abs=1e-6)
    assert math.isnan(table.loc["other_folds", "p_value_vs_best"])
    shown = grid.display_table()
    assert shown.loc["other_folds", "paired on"].startswith("not comparable: other folds")

    assert set(grid.fold_scores(same_folds_as="champion")) == {
        "champion",
        "same_folds",
        "two_folds",
    }
    assert set(grid.fold_scores(same_folds_as="no_param")) == set()
    assert len(grid.fold_scores()) == 5
    with pytest.raises(KeyError, match="not a grid point"):
        grid.fold_scores(same_folds_as="missing")


def test_a_champion_without_a_fold_assignment_is_paired_with_nothing(experiment: str) -> None:
    _log_point(experiment, "old", "champion", CHAMPION_FOLDS, None)
    _log_point(experiment, "old", "other", OTHER_FOLDS, None)
    grid = GridComparison.load(experiment, "old")
    result = grid.significance()
    assert result["p_value"].isna().all()
    assert result.loc["other", "pairing"].startswith(
        "not comparable: the champion's run has no params.fold_assignment"
    )
    assert grid.table()["p_value_vs_best"].isna().all()


def test_a_point_reused_from_an_earlier_grid_is_compared_in_the_new_one(experiment: str) -> None:
    """Second run of a grid after one strategy changed: the unchanged points are skipped (their
    runs keep the first grid's id), yet the new grid compares all of them."""
    _log_point(experiment, "grid1", "baseline", OTHER_FOLDS, "f", "key-baseline")
    _log_point(experiment, "grid1", "lr", CHAMPION_FOLDS, "f", "key-lr-1e-4")
    _log_point(experiment, "grid1", "augment", OTHER_FOLDS, "f", "key-augment")
    _log_point(experiment, "grid2", "lr", OTHER_FOLDS, "f", "key-lr-1e-3")  # the changed one
    keys = ["key-baseline", "key-lr-1e-3", "key-augment"]
    grid = GridComparison.load(experiment, "grid2", run_keys=keys)
    assert sorted(grid.runs.index) == ["augment", "baseline", "lr"]
    assert grid.runs.loc["lr", f"tags.{tracking.TAG_RUN_KEY}"] == "key-lr-1e-3"
    # by grid id alone (04 opened by hand) only the point that ran in grid 2
    assert list(GridComparison.load(experiment, "grid2").runs.index) == ["lr"]
    with pytest.raises(tracking.TrackingError, match="no finished grid-point runs"):
        GridComparison.load(experiment, "grid3", run_keys=["key-never-ran"])
