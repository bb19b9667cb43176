"""The champion alias moves between grids, and only the current champion's run says so.

The alias moves only on a promotion verdict (tests/test_promotion_flow.py covers KEEP and
EQUIVALENT_CHEAPER); here the second grid is better by 5 points on the same folds.
"""

from __future__ import annotations

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from imgcls import tracking
from imgcls.core.names import InvalidNameError
from imgcls.selection.comparison import GridComparison


class _Constant(mlflow.pyfunc.PythonModel):
    """A stand-in model: the registry only needs a logged model to version."""

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return pd.DataFrame({"predicted_class": ["sea"] * len(model_input)})


def _grid(
    grid_id: str, experiment_id: str, accuracy: float, experiment_name: str = "registry"
) -> GridComparison:
    """Log one finished grid-point run with a model and CV scores; load it as a grid."""
    tags = {
        tracking.TAG_KIND: "grid_point",
        tracking.TAG_GRID_ID: grid_id,
        tracking.TAG_GRID_POINT: f"point-{grid_id}",
        tracking.TAG_STRATEGY: "s",
    }
    tags["data_md5"] = "d1"
    folds = [accuracy - 0.01, accuracy, accuracy + 0.01]  # on the same folds in every grid
    with mlflow.start_run(experiment_id=experiment_id, tags=tags) as run:
        mlflow.pyfunc.log_model(name="model", python_model=_Constant())
        mlflow.log_param("fold_assignment", "aaaaaaaaaaaa")
        mlflow.log_metrics(
            {"cv_accuracy_mean": accuracy, "cv_loss_mean": 0.1, "n_train_images": 30.0}
        )
        for step, value in enumerate(folds):
            mlflow.log_metric("fold_val_accuracy", value, step=step)
    grid = GridComparison.load(experiment_name, grid_id)
    assert grid.runs["run_id"].tolist() == [run.info.run_id]
    return grid


def test_a_new_champion_takes_the_alias_and_the_old_run_loses_its_tag(tmp_path):
    tracking.configure(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    experiment = client.create_experiment("registry", artifact_location=(tmp_path / "a").as_uri())
    first = _grid("g1", experiment, 0.9).register_champion("registry-model")
    assert client.get_run(first["run_id"]).data.tags["champion"] == "true"

    second = _grid("g2", experiment, 0.95).register_champion("registry-model")
    assert second["verdict"].verdict == "PROMOTE" and second["incumbent_version"] == "1"
    assert second["version"] == first["version"] + 1
    alias = client.get_model_version_by_alias("registry-model", "champion")
    assert int(alias.version) == second["version"]
    assert client.get_run(second["run_id"]).data.tags["champion"] == "true"
    assert client.get_run(first["run_id"]).data.tags["champion"] == "false"


def test_champion_of_an_experiment_with_a_slash_is_registered_under_the_mapped_name(tmp_path):
    """Issue 10: `--experiment vision-team/sea-forest` trained the grid, then failed to register."""
    tracking.configure(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    name = "vision-team/sea-forest"
    experiment = client.create_experiment(name, artifact_location=(tmp_path / "a").as_uri())
    grid = _grid("g1", experiment, 0.9, experiment_name=name)
    with pytest.raises(InvalidNameError, match="use --model-name team-model"):
        grid.register_champion("team/model")
    assert client.search_registered_models() == []  # refused before anything was registered
    registered = grid.register_champion()
    assert registered["name"] == "vision-team-sea-forest-classifier"
    assert registered["uri"] == "models:/vision-team-sea-forest-classifier@champion"
    alias = client.get_model_version_by_alias("vision-team-sea-forest-classifier", "champion")
    assert alias.run_id == registered["run_id"]


def test_registration_writes_nothing_to_stderr(tmp_path, capfd, caplog):
    """MLflow's "Successfully registered model" lines go to the log, not to a red report box."""
    import logging

    tracking.configure(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = MlflowClient().create_experiment(
        "registry", artifact_location=(tmp_path / "a").as_uri()
    )
    grid = _grid("g1", experiment, 0.9)
    capfd.readouterr()
    with caplog.at_level(logging.INFO, logger="imgcls"):
        grid.register_champion("quiet-model")
    assert capfd.readouterr().err == ""
    assert any("Successfully registered model 'quiet-model'" in r.message for r in caplog.records)
