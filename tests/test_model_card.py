"""The model card: every section, numbers from MLflow, "unknown" for what was not recorded."""

from __future__ import annotations

import re

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from imgcls import tracking
from imgcls.reporting import modelcard

SECTIONS = [
    "Model",
    "Intended input and output",
    "Data",
    "Leakage audit",
    "Cross-validation",
    "Test set",
    "Promotion against the previous champion",
    "Quality gate",
    "Lineage and environment",
    "Reproduce",
]


class _Constant(mlflow.pyfunc.PythonModel):
    """A stand-in model: the registry only needs a logged model to version."""

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return pd.DataFrame({"predicted_class": ["sea"] * len(model_input)})


@pytest.fixture()
def version(tmp_path):
    """One grid-point run as the pipeline logs it (no test_ece), registered as version 1."""
    tracking.configure(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = MlflowClient().create_experiment("card", (tmp_path / "artifacts").as_uri())
    tags = {
        tracking.TAG_KIND: "grid_point",
        tracking.TAG_GRID_POINT: "frozen-lr=0.01",
        tracking.TAG_STRATEGY: "frozen",
        tracking.TAG_RUN_KEY: "abcdef0123456789",
        tracking.TAG_GRID_ID: "g1",
        "code_version": "c0de",
        "data_md5": "44f106a2f74236e45f5d73b1491bd2b5.dir",
        "mlflow.source.git.commit": "1027109abc",
        "git_dirty": "false",
        "classes": "forest,<b>sea</b>",
        "quality_gate": "passed",
        "quality_gate_message": "PASSED: test accuracy 0.9900 >= 0.70",
    }
    with mlflow.start_run(experiment_id=experiment, tags=tags) as run:
        mlflow.log_params({"backbone": "resnet18", "image_size": 32, "lr": 0.01, "name": "frozen"})
        mlflow.log_params({"freeze_backbone": True, "fold_assignment": "da441c28daa9"})
        for step, value in enumerate([0.9, 0.95, 1.0]):
            mlflow.log_metric("fold_val_accuracy", value, step=step)
        mlflow.log_metrics(
            {
                "cv_accuracy_mean": 0.95,
                "cv_accuracy_std": 0.05,
                "n_train_images": 949,
                "test_accuracy": 0.99,
                "test_accuracy_ci_low": 0.97,
                "test_accuracy_ci_high": 0.997,
                "test_n_images": 35,
                "test_images_with_train_copies": 0,
            }
        )
        info = mlflow.pyfunc.log_model(
            name="model", python_model=_Constant(), pip_requirements=["torch==2.14.1"]
        )
    registered = mlflow.register_model(info.model_uri, "card-classifier")
    MlflowClient().set_model_version_tag("card-classifier", "1", "promotion_verdict", "PROMOTE")
    return run.info.run_id, registered


def test_card_has_every_section_and_says_unknown_for_what_was_not_recorded(version, tmp_path):
    _, registered = version
    files = modelcard.write_model_card("card-classifier", registered.version, tmp_path)
    markdown = files.markdown.read_text()
    html = files.html.read_text()
    for section in SECTIONS:
        assert f"## {section}\n" in markdown, section
        assert f">{section}</h2>" in html, section
    assert "Fold accuracies: 0.9000, 0.9500, 1.0000; mean 0.9500 ± 0.0500" in markdown
    assert "| expected calibration error (10 bins) | unknown |" in markdown  # no test_ece logged
    assert "| accuracy 95% Wilson interval | [0.970, 0.997] |" in markdown
    assert "| promotion_verdict | PROMOTE |" in markdown
    assert "| promotion_rope | unknown |" in markdown
    assert "torch==2.14.1" in markdown  # the logged model's own pins
    assert "frozen-lr=0.01" in markdown and "`44f106a2f74236e45f5d73b1491bd2b5.dir`" in markdown


def test_html_card_escapes_recorded_text_and_loads_nothing_from_outside(version, tmp_path):
    _, registered = version
    html = modelcard.write_model_card("card-classifier", registered.version, tmp_path).html
    page = html.read_text()
    assert "<b>sea</b>" not in page and "&lt;b&gt;sea&lt;/b&gt;" in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page), "an external resource"


def test_card_is_logged_to_the_run_and_linked_from_the_version(version, tmp_path):
    run_id, registered = version
    files = modelcard.write_model_card("card-classifier", registered.version, tmp_path)
    client = MlflowClient()
    logged = {a.path for a in client.list_artifacts(run_id, "model_card")}
    assert logged == {f"model_card/{files.markdown.name}", f"model_card/{files.html.name}"}
    tag = client.get_model_version("card-classifier", registered.version).tags["model_card"]
    assert tag.endswith(f"model_card/{files.html.name}")


def test_reproduce_section_is_a_grid_file_of_the_logged_strategy(version, tmp_path):
    import yaml

    _, registered = version
    markdown = modelcard.write_model_card("card-classifier", registered.version, tmp_path)
    text = markdown.markdown.read_text()
    grid = yaml.safe_load(text.split("<<'GRID'\n", 1)[1].split("GRID\n", 1)[0])
    assert grid == {
        "strategies": {
            "frozen": {
                "backbone": "resnet18",
                "freeze_backbone": True,
                "image_size": 32,
                "lr": 0.01,
            }
        }
    }
