"""Evaluation folders: class checks, scores logged per folder, the quality gate."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from imgcls import tracking
from imgcls.core import names
from imgcls.data.folders import DataError
from imgcls.evaluation.evaluate import EvaluationSession, metric_prefix, predict_folder
from imgcls.modeling.checkpoint import load_checkpoint, save_checkpoint
from imgcls.modeling.models import build_classifier
from tests.conftest import write_dataset


@pytest.fixture()
def session(tmp_path, isolated_cache):
    tracking.configure(f"sqlite:///{tmp_path / 'm.db'}")
    experiment = MlflowClient().create_experiment(
        "eval", artifact_location=(tmp_path / "a").as_uri()
    )
    run = MlflowClient().create_run(experiment)
    model, prep = build_classifier("resnet18", "none", 32, 2, 0.0, seed=0)
    return EvaluationSession(
        run.info.run_id, model, ["forest", "sea"], prep, {"min_accuracy": "0.7"}, tmp_path
    )


def test_extra_folder_with_other_classes_is_a_clear_error(session, tmp_path):
    write_dataset(tmp_path / "extra", {"forest": 2, "desert": 2})
    with pytest.raises(DataError, match=r"classes \['desert', 'forest'\] do not match"):
        session.load_folder(tmp_path / "extra")


def test_extra_folder_is_scored_and_logged_under_its_own_prefix(session, tmp_path):
    folder = write_dataset(tmp_path / "phone photos", {"forest": 3, "sea": 3})
    result = session.evaluate(session.load_folder(folder), name=str(folder))
    prefix = metric_prefix(str(folder))
    logged = MlflowClient().get_run(session.run_id).data.metrics
    assert logged[f"{prefix}_accuracy"] == pytest.approx(result.scores["accuracy"])
    assert logged[f"{prefix}_n_images"] == 6
    assert result.confusion().to_numpy().sum() == 6
    shutil.rmtree(folder)


@pytest.mark.parametrize(("threshold", "passed"), [(0.0, True), (1.01, False)])
def test_quality_gate_is_logged_with_its_margin(session, tmp_path, threshold, passed):
    folder = write_dataset(tmp_path / "gate", {"forest": 2, "sea": 2})
    result = session.evaluate(session.load_folder(folder), name="gate")
    verdict = session.gate(result, threshold)
    assert verdict["passed"] is passed
    run = MlflowClient().get_run(session.run_id)
    assert run.data.tags["quality_gate"] == ("passed" if passed else "failed")
    assert run.data.metrics["gate_margin"] == pytest.approx(result.scores["accuracy"] - threshold)
    assert ("PASSED" if passed else "FAILED") in run.data.tags["quality_gate_message"]


def test_head_only_fold_models_score_on_cached_features_like_the_full_model(session, tmp_path):
    """A frozen strategy's fold checkpoint (head only) scores exactly as its rebuilt full model."""
    folder = write_dataset(tmp_path / "test", {"forest": 4, "sea": 4}, seed=3)
    result = session.evaluate(session.load_folder(folder), name="test")
    torch.manual_seed(7)
    for index, head_only in enumerate([True, False]):
        model, prep = build_classifier("resnet18", "none", 32, 2, 0.1, seed=index + 1)
        with torch.no_grad():
            model.head[1].weight.normal_(0, 0.5)  # a head far from its initialisation
        save_checkpoint(
            session.checkpoint_dir / f"fold{index}.pt",
            model,
            ["forest", "sea"],
            prep,
            "resnet18",
            0.1,
            head_only_with_weights="none" if head_only else None,
        )
        full, _, _, _ = load_checkpoint(session.checkpoint_dir / f"fold{index}.pt")
        expected = predict_folder(full, prep, result.folder, result.data_md5)
        found = session.fold_probabilities(session.checkpoint_dir / f"fold{index}.pt", result)
        assert found.shape == (8, 2)
        np.testing.assert_allclose(found, expected, atol=1e-5)
        assert not np.allclose(found, 0.5, atol=0.01)  # the scores depend on the trained head
    table = session.fold_models_on(result)
    assert list(table.index) == ["fold0", "fold1", "refit (all training data)"]


def test_class_names_mlflow_refuses_are_logged_mapped_and_shown_as_named(tmp_path, isolated_cache):
    """Issue 10: a class folder `sea (coast)` made notebook 03 fail when logging its metrics."""
    tracking.configure(f"sqlite:///{tmp_path / 'm.db'}")
    client = MlflowClient()
    experiment = client.create_experiment("eval", artifact_location=(tmp_path / "a").as_uri())
    run_id = client.create_run(experiment).info.run_id
    classes = ["forêt & bois", "sea (coast)"]
    model, prep = build_classifier("resnet18", "none", 32, 2, 0.0, seed=0)
    session = EvaluationSession(run_id, model, classes, prep, {}, tmp_path)
    folder = write_dataset(tmp_path / "photos", {name: 2 for name in classes})
    result = session.evaluate(session.load_folder(folder), name="test")
    logged = client.get_run(run_id).data.metrics
    for key in ("foret_bois", "sea_coast"):
        for metric in names.PER_CLASS_METRICS:
            assert f"test_{metric}_{key}" in logged
            assert logged[f"test_{metric}_{key}"] == pytest.approx(result.scores[f"{metric}_{key}"])
    fixed = [k for k in logged if not k.endswith(("foret_bois", "sea_coast"))]
    assert max(len(k) - len("test_") for k in fixed) <= names.LONGEST_FIXED_METRIC
    assert list(result.per_class().index) == classes  # the names people read
    assert list(result.confusion().index) == [f"true: {name}" for name in classes]
    assert metric_prefix("data/été.v2") == "data_ete.v2"  # one rule for every metric key


def test_downloaded_checkpoints_are_removed_with_the_session(tmp_path, isolated_cache):
    import gc

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    tracking.configure(uri)
    client = MlflowClient()
    experiment = client.create_experiment("cleanup", artifact_location=(tmp_path / "a").as_uri())
    run = client.create_run(experiment)
    model, prep = build_classifier("resnet18", "none", 32, 2, 0.0, seed=0)
    checkpoint = save_checkpoint(
        tmp_path / "ckpt" / "refit.pt", model, ["forest", "sea"], prep, "resnet18"
    )
    client.log_artifact(run.info.run_id, str(checkpoint), "checkpoints")
    session = EvaluationSession.start(run.info.run_id, tracking_uri=uri)
    downloaded = session.checkpoint_dir
    assert (downloaded / "refit.pt").is_file()
    del session
    gc.collect()
    assert not downloaded.exists()


def test_test_accuracy_is_reported_without_test_images_copied_from_training(session, tmp_path):
    data = tmp_path / "data"
    write_dataset(data / "train", {"forest": 4, "sea": 4}, seed=1, size=64)
    write_dataset(data / "test", {"forest": 3, "sea": 3}, seed=2, size=64)
    # a training photo, resized and re-encoded, planted in test: a near-copy, not a byte copy
    from PIL import Image

    Image.open(data / "train" / "sea" / "sea_001.jpg").resize((80, 80)).save(
        data / "test" / "sea" / "copy_of_train.jpg", quality=60
    )
    result = session.evaluate_test(str(data))
    table = session.without_train_copies(result, str(data))
    assert table.loc["all test images", "images"] == 7
    assert table.loc["without near-copies", "images"] == 6
    correct = result.predictions == result.folder.labels
    clean = [p.name != "copy_of_train.jpg" for p in result.folder.paths]
    assert table.loc["without near-copies", "accuracy"] == pytest.approx(correct[clean].mean())
    logged = MlflowClient().get_run(session.run_id).data.metrics
    assert logged["test_images_with_train_copies"] == 1
    assert logged["test_accuracy_without_train_copies"] == pytest.approx(correct[clean].mean())
