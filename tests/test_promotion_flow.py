"""Promotion against the incumbent, end to end in a real SQLite MLflow store and registry.

Grid-point runs are logged directly with mlflow, the way the training session logs them
(fold scores as ``fold_val_accuracy`` with step = fold, ``params.fold_assignment``, tag
``data_md5``, ``cv_train_seconds``, ``n_train_images``, a logged model); each ``register_champion``
call is one grid's notebook 04. The plan test builds a real plan on a tiny generated dataset.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from imgcls import tracking
from imgcls.core.config import Strategy
from imgcls.data.folders import scan_image_folder
from imgcls.pipeline.plan import RunnerOptions, build_plan, print_plan
from imgcls.selection.comparison import GridComparison
from imgcls.selection.incumbent import INCUMBENT_POINT, fold_assignment_of
from imgcls.selection.promotion import Verdict
from tests.conftest import TINY_GRID_DEFAULTS, write_tiny_data

N_IMAGES = 100.0  # n_train_images: 5 folds of 20 -> n_train 80, n_test 20 per fold
FOLDS = "f0f0f0f0f0f0"
DATA = "data-v1"
BASE = [0.90, 0.91, 0.89, 0.90, 0.92]
BETTER = [0.93, 0.945, 0.92, 0.93, 0.955]  # BASE + [3, 3.5, 3, 3, 3.5] points
SAME = [0.931, 0.944, 0.9205, 0.93, 0.9545]  # BETTER + [0.1, -0.1, 0.05, 0, -0.05] points
RECORD = {"promotion_verdict", "promotion_mean_difference", "promotion_ci_low"}
RECORD |= {"promotion_ci_high", "promotion_rope", "incumbent_version"}


class _Constant(mlflow.pyfunc.PythonModel):
    """A stand-in model: the registry only needs a logged model to version."""

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return pd.DataFrame({"predicted_class": ["sea"] * len(model_input)})


@pytest.fixture()
def store(tmp_path: Path) -> str:
    """A fresh SQLite store with experiment ``promotion``; returns the experiment id."""
    tracking.configure(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return MlflowClient().create_experiment("promotion", (tmp_path / "artifacts").as_uri())


def _point(
    experiment_id: str,
    grid: str,
    point: str,
    folds: list[float],
    seconds: float = 10.0,
    data: str = DATA,
    assignment: str | None = FOLDS,
    tags: dict[str, str] | None = None,
) -> str:
    """Log one finished grid-point run with a model; return its run id."""
    run_tags = {
        tracking.TAG_KIND: "grid_point",
        tracking.TAG_GRID_ID: grid,
        tracking.TAG_GRID_POINT: point,
        tracking.TAG_STRATEGY: point,
        "data_md5": data,
        **(tags or {}),
    }
    with mlflow.start_run(experiment_id=experiment_id, tags=run_tags) as run:
        mlflow.pyfunc.log_model(name="model", python_model=_Constant())
        if assignment is not None:
            mlflow.log_param("fold_assignment", assignment)
        mlflow.log_metrics(
            {
                "cv_accuracy_mean": sum(folds) / len(folds),
                "cv_loss_mean": 0.2,
                "cv_train_seconds": seconds,
                "n_train_images": N_IMAGES,
            }
        )
        for step, value in enumerate(folds):
            mlflow.log_metric("fold_val_accuracy", value, step=step)
    return run.info.run_id


def _judge(grid: str, comparison_run_id: str | None = None) -> dict:
    return GridComparison.load("promotion", grid).register_champion(
        "m", rope=0.005, alpha=0.05, comparison_run_id=comparison_run_id
    )


def _alias() -> int:
    return int(MlflowClient().get_model_version_by_alias("m", "champion").version)


def _version_tags(version: int) -> dict[str, str]:
    return MlflowClient().get_model_version("m", str(version)).tags


def test_promotion_moves_the_alias_only_on_promote_or_equivalent_cheaper(store: str) -> None:
    client = MlflowClient()
    # (a) first registration: no incumbent -> PROMOTE, alias on version 1, verdict tags on it
    first_run = _point(store, "g1", "base", BASE)
    first = _judge("g1")
    assert first["verdict"].verdict is Verdict.PROMOTE and first["promoted"]
    assert (first["version"], first["champion_version"], _alias()) == (1, 1, 1)
    tags = _version_tags(1)
    assert set(tags) >= RECORD and tags["promotion_verdict"] == "PROMOTE"
    assert tags["incumbent_version"] == "none" and math.isnan(float(tags["promotion_ci_low"]))
    assert "no previous champion" in client.get_model_version("m", "1").description

    # (b) better by more than the rope on the same folds -> PROMOTE, alias moves to version 2
    comparison = client.create_run(store, tags={tracking.TAG_KIND: "comparison"}).info.run_id
    second_run = _point(store, "g2", "better", BETTER)
    second = _judge("g2", comparison)
    verdict = second["verdict"]
    assert verdict.verdict is Verdict.PROMOTE and _alias() == second["version"] == 2
    differences = [b - a for a, b in zip(BASE, BETTER, strict=True)]
    assert verdict.mean_difference == pytest.approx(sum(differences) / 5, abs=1e-15)
    assert verdict.ci_low > 0.005 and verdict.n_train == 80 and verdict.n_test == 20
    assert "fold scores reused" in second["incumbent_source"]
    tags = _version_tags(2)
    assert tags["promotion_verdict"] == "PROMOTE" and tags["incumbent_version"] == "1"
    assert float(tags["promotion_mean_difference"]) == verdict.mean_difference
    assert float(tags["promotion_ci_low"]) == verdict.ci_low
    assert float(tags["promotion_rope"]) == 0.005
    assert client.get_model_version("m", "2").description.startswith("PROMOTE: the challenger")
    logged = client.get_run(comparison).data
    assert logged.tags["promotion_verdict"] == "PROMOTE" and logged.tags["incumbent_version"] == "1"
    assert logged.metrics["promotion_mean_difference"] == verdict.mean_difference
    assert client.get_run(first_run).data.tags["champion"] == "false"
    assert client.get_run(second_run).data.tags["champion"] == "true"

    # (c) inside the rope and slower -> KEEP: registered WITHOUT the alias, which stays on v2
    slow_run = _point(store, "g3", "slow", SAME, seconds=50.0)
    third = _judge("g3")
    assert third["verdict"].verdict is Verdict.KEEP and not third["promoted"]
    assert "equivalent within the rope but not cheaper" in third["verdict"].reason
    assert (third["version"], third["champion_version"], _alias()) == (3, 2, 2)
    tags = _version_tags(3)
    assert tags["promotion_verdict"] == "KEEP" and tags["incumbent_version"] == "2"
    assert client.get_model_version("m", "3").aliases == []
    assert client.get_run(slow_run).data.tags["champion"] == "false"
    assert client.get_run(second_run).data.tags["champion"] == "true"
    assert _judge("g3")["version"] == 3  # judged again: the same version, not a fourth

    # (d) equivalent and cheaper -> EQUIVALENT_CHEAPER moves the alias
    _point(store, "g4", "cheap", SAME, seconds=5.0)
    fourth = _judge("g4")
    assert fourth["verdict"].verdict is Verdict.EQUIVALENT_CHEAPER and fourth["promoted"]
    assert (fourth["version"], _alias()) == (4, 4)
    assert _version_tags(4)["promotion_verdict"] == "EQUIVALENT_CHEAPER"

    # the champion judged against itself (04 re-run on the same grid): KEEP, nothing moves
    again = _judge("g4")
    assert again["verdict"].verdict is Verdict.KEEP and "itself" in again["verdict"].reason
    assert (again["version"], _alias()) == (4, 4)
    assert _version_tags(4)["promotion_verdict"] == "EQUIVALENT_CHEAPER"  # its own verdict kept


def test_incumbent_retrained_on_the_grids_folds_is_compared_but_never_chosen(store: str) -> None:
    old = _point(store, "g1", "old", BASE, data="data-v0", assignment="0ld0ld0ld0ld")
    assert _judge("g1")["version"] == 1
    # new data: the runner added the incumbent point (same strategy, this grid's folds); it
    # scores best of the grid, but the champion is chosen among the grid's own points
    _point(store, "g2", "new", BASE, seconds=20.0)
    tags = {"incumbent_run_id": old, "incumbent_version": "1", "incumbent_model": "m"}
    _point(store, "g2", INCUMBENT_POINT, BETTER, tags=tags)
    grid = GridComparison.load("promotion", "g2")
    assert grid.champion() == "new" and len(grid.runs) == 2
    result = grid.register_champion("m")
    assert result["verdict"].verdict is Verdict.KEEP and _alias() == 1
    assert result["verdict"].mean_difference == pytest.approx(-0.032, abs=1e-12)
    assert result["incumbent_source"].startswith("re-trained on this grid's folds")
    assert "p_holm_vs_best" in grid.table() and "p Holm" in grid.display_table()
    floor, too_close = grid.noise_floor()
    assert floor.source == "folds" and floor.k == 5
    assert floor.run_sd == pytest.approx(statistics.stdev(BASE), abs=1e-15)
    # (t_0.975,4 + t_0.8,4) * sqrt((1/5 + 20/80) * 2 * sd^2): 2.7764 + 0.9410 = 3.7174
    mdd = 3.7174 * math.sqrt(0.45 * 2) * statistics.stdev(BASE)
    assert floor.min_detectable_difference == pytest.approx(mdd, abs=1e-5)  # 4.0 points
    assert too_close == [INCUMBENT_POINT]  # 3.2 points from the champion: inside the floor


def test_without_comparable_incumbent_scores_the_alias_stays(store: str) -> None:
    _point(store, "g1", "old", BASE, data="data-v0", assignment="0ld0ld0ld0ld")
    _judge("g1")
    _point(store, "g2", "new", BETTER)  # other data, and no incumbent point re-trained
    result = _judge("g2")
    assert result["verdict"].verdict is Verdict.KEEP and _alias() == 1
    assert "run the grid with run_experiments.py" in result["verdict"].reason
    assert math.isnan(result["verdict"].mean_difference)


def _register_champion_run(experiment_id: str, strategy: Strategy, data: str, folds: str) -> str:
    """Log a champion run with every strategy field as a param (text, as MLflow keeps it)."""
    with mlflow.start_run(experiment_id=experiment_id, tags={"data_md5": data}) as run:
        mlflow.pyfunc.log_model(name="model", python_model=_Constant())
        mlflow.log_params({**strategy.params(), "fold_assignment": folds})
    version = mlflow.register_model(f"runs:/{run.info.run_id}/model", "tiny-model")
    MlflowClient().set_registered_model_alias("tiny-model", "champion", version.version)
    return run.info.run_id


def test_plan_retrains_a_champion_of_another_data_version_as_the_incumbent_point(
    tmp_path: Path, isolated_cache: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv("IMGCLS_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    data = write_tiny_data(tmp_path / "data")
    grid = tmp_path / "grid.yaml"
    grid.write_text(TINY_GRID_DEFAULTS + "  seed: 7\nstrategies:\n  a: {}\n  b:\n    lr: 0.01\n")
    options = RunnerOptions(
        grid=grid,
        data_dir=str(data),
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        experiment="plan",
        model_name="tiny-model",
    )
    plan = build_plan(options)  # no champion yet: no incumbent
    assert plan.incumbent is None and [p.strategy.name for p in plan.points] == ["a", "b"]

    logged = Strategy(name="old", backbone="resnet18", weights="none", image_size=48, folds=3)
    logged = logged.model_copy(update={"lr": 0.003, "augment": True, "seed": 1})
    old_run = _register_champion_run(plan.experiment_id, logged, "other-data", "aaaaaaaaaaaa")
    plan = build_plan(options)
    point = plan.points[-1]
    assert [p.strategy.name for p in plan.points] == ["a", "b", INCUMBENT_POINT]
    assert point.action == "run" and point.tags["incumbent_run_id"] == old_run
    assert point.tags["incumbent_version"] == "1"
    expected = logged.model_copy(update={"name": INCUMBENT_POINT, "folds": 2, "seed": 7})
    assert point.strategy.params() == expected.params()  # its strategy, this grid's folds
    # the grid 04 compares: every point's run key, the incumbent's included, also under --only
    assert plan.member_keys == tuple(p.key for p in plan.points)
    only = build_plan(dataclasses.replace(options, only=["b"]))
    assert [p.strategy.name for p in only.points] == ["b", INCUMBENT_POINT]
    assert only.member_keys == plan.member_keys and only.grid_id == plan.grid_id
    print_plan(plan)
    out = capsys.readouterr().out
    assert "incumbent: version 1 of tiny-model re-trained on this grid's folds" in out
    assert "its data version other-data" in out and "folds 3 -> 2, seed 1 -> 7" in out

    # the same champion on this data and these folds: its fold scores are reused, no point added
    train = scan_image_folder(data / "train")
    folds = fold_assignment_of(train, 2, 7)
    _register_champion_run(plan.experiment_id, logged, plan.data_md5, folds)
    plan = build_plan(options)
    assert [p.strategy.name for p in plan.points] == ["a", "b"]
    assert plan.incumbent.sentence().startswith("incumbent: version 2, fold scores reused")
