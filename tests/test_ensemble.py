"""Ensembles and test-time augmentation as strategy fields (`ensemble: folds`, `tta: flip`).

The served model of an ensemble strategy averages its fold models; its cross-validation score is
nested (no inner model sees the outer validation fold); `tta: flip` averages each image and its
mirror everywhere; the grid refuses an ensemble of fine-tuned backbones and the fields are part
of the run key.
"""

from __future__ import annotations

import base64
import time

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from imgcls import tracking
from imgcls.core.config import ConfigError, Strategy, load_grid, run_key, strategy_from_dict
from imgcls.data.folders import data_version, scan_image_folder
from imgcls.modeling.checkpoint import load_checkpoint, save_checkpoint
from imgcls.modeling.crossval import cross_validate, prepare_inputs
from imgcls.modeling.ensemble import fold_ensemble
from imgcls.modeling.features import cached_features
from imgcls.modeling.nested import FoldScorer
from imgcls.modeling.training import predict_rows, train_rows
from imgcls.serving.pyfunc import images_to_batch, predict_images
from tests.conftest import make_image, write_dataset

TINY = {
    "backbone": "resnet18",
    "weights": "none",
    "image_size": 32,
    "folds": 2,
    "epochs": 3,
    "batch_size": 8,
    "lr": 0.01,
}


@pytest.fixture()
def data(tmp_path, monkeypatch):
    """Generated train (12 + 12) and test (4 + 4) images, caches and artifacts in tmp_path."""
    monkeypatch.setenv("IMGCLS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("IMGCLS_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    write_dataset(tmp_path / "data" / "train", {"forest": 12, "sea": 12}, seed=5)
    write_dataset(tmp_path / "data" / "test", {"forest": 4, "sea": 4}, seed=6)
    return tmp_path / "data"


def test_ensemble_checkpoint_predicts_the_mean_of_its_fold_heads_on_both_views(data, tmp_path):
    """Fast check of the served model's file: the fold heads on the cached test features (and
    on the cached features of the mirrored images) average to what the checkpoint predicts."""
    strategy = Strategy(**TINY, ensemble="folds", tta="flip")
    folder, test = scan_image_folder(data / "train"), scan_image_folder(data / "test")
    md5 = data_version(data)
    inputs, _ = prepare_inputs(strategy, folder, md5)
    cv = cross_validate(strategy, folder, md5, progress=False, inputs=inputs)
    model, history, _ = fold_ensemble(strategy, cv.folds, inputs, folder, md5)
    assert 0.0 <= history[0]["train_accuracy"] <= 1.0
    path = save_checkpoint(tmp_path / "ens.pt", model, folder.classes, cv.preprocessing, "resnet18")
    loaded, classes, prep, payload = load_checkpoint(path)
    assert payload["ensemble"] == {"members": 2, "tta": "flip", "num_features": 512}
    values = [p.read_bytes() for p in test.paths]
    served = predict_images(loaded, classes, prep, values)
    test_md5 = data_version(data / "test")
    views = [
        torch.from_numpy(np.array(cached_features(test, "resnet18", "none", 32, test_md5)[0])),
        torch.from_numpy(
            np.array(cached_features(test, "resnet18", "none", 32, test_md5, mirrored=True)[0])
        ),
    ]
    heads = []
    for fold in cv.folds:
        head = inputs.new_model(0)
        head.load_state_dict(fold.state_dict)
        heads.append(head.head.eval())
    with torch.inference_mode():
        probs = [torch.softmax(h(v), dim=1).numpy() for h in heads for v in views]
    expected = np.mean(probs, axis=0)
    np.testing.assert_allclose(
        served[[f"prob_{c}" for c in classes]].to_numpy(), expected, atol=1e-4
    )
    assert np.abs(np.mean(probs[:2], axis=0) - expected).max() > 1e-4  # not fold 0 alone


@pytest.mark.slow
def test_served_ensemble_equals_the_mean_of_its_fold_models(data, tmp_path):
    """The issue's check, end to end: 02's session logs the model, MLflow serves it, 03 scores it."""
    from imgcls.evaluation.evaluate import EvaluationSession
    from imgcls.pipeline.session import TrainingSession

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    strategy = {**TINY, "folds": 3, "ensemble": "folds", "tta": "flip"}
    session = TrainingSession.start(strategy, "ens", None, "ensemble", uri, str(data))
    cv = session.cross_validate(progress=False)
    refit = session.refit(cv, progress=False)
    session.finish()
    assert refit["epochs"] == 0  # nothing retrained: the fold models are the model

    # the served model, as `mlflow models serve` loads it, on test images sent as base64 bytes
    test = scan_image_folder(data / "test")
    values = [base64.b64encode(p.read_bytes()).decode() for p in test.paths]
    served = mlflow.pyfunc.load_model(refit["model_uri"]).predict(pd.DataFrame({"image": values}))
    served_probs = served[[f"prob_{c}" for c in test.classes]].to_numpy()

    # the fold models, each loaded from its own logged checkpoint, on the image and its mirror
    tracking.configure(uri)
    folds = tracking.download_artifact(session.run_id, "checkpoints", tmp_path / "ckpt")
    paths = sorted(folds.glob("fold*.pt"))
    assert len(paths) == 3
    per_fold = []
    for path in paths:
        model, _, prep, payload = load_checkpoint(path)
        assert payload["head_only"]  # one backbone, k heads
        batch = images_to_batch(values, prep)
        with torch.inference_mode():
            views = [torch.softmax(model(b), dim=1) for b in (batch, batch.flip(-1))]
        per_fold.append(((views[0] + views[1]) / 2).numpy())
    expected = np.mean(per_fold, axis=0)
    np.testing.assert_allclose(served_probs, expected, atol=1e-5)
    assert np.abs(per_fold[0] - expected).max() > 1e-4  # an average, not one of the models
    assert list(served["predicted_class"]) == [test.classes[i] for i in expected.argmax(1)]

    # 03 scores the same model; its fold rows (cached features and their mirrors) average to it
    evaluation = EvaluationSession.start(session.run_id, "ensemble", uri)
    result = evaluation.evaluate_test(str(data))
    np.testing.assert_allclose(result.probabilities, expected, atol=1e-5)
    table = evaluation.fold_models_on(result)
    assert table.index[-1] == "ensemble (mean of the fold models)"
    from_features = np.mean([evaluation.fold_probabilities(p, result) for p in paths], axis=0)
    np.testing.assert_allclose(from_features, expected, atol=1e-4)


def test_ensemble_fold_score_never_sees_the_outer_validation_fold(data):
    """Relabelling the outer validation rows leaves the nested ensemble's predictions there
    unchanged, while any model trained on those rows changes: no inner model saw them."""
    strategy = Strategy(**TINY, ensemble="folds")
    folder = scan_image_folder(data / "train")
    md5 = data_version(data)
    inputs, _ = prepare_inputs(strategy, folder, md5)
    scorer = FoldScorer(strategy, folder, md5, inputs)
    val = torch.arange(0, len(folder), 3)
    train = torch.tensor([i for i in range(len(folder)) if i % 3])
    before = scorer.inner_ensemble(train, val)
    leaky_before = predict_rows(
        inputs, inputs.trainable(train_rows(inputs, val, None, 1, 3)[0]), val
    )
    inputs.labels[val] = 1 - inputs.labels[val]
    after = scorer.inner_ensemble(train, val)
    leaky_after = predict_rows(
        inputs, inputs.trainable(train_rows(inputs, val, None, 1, 3)[0]), val
    )
    assert torch.equal(before, after)
    assert not torch.allclose(leaky_before, leaky_after)  # the check can see a model that saw them


def test_cv_scores_the_served_model_and_keeps_the_same_fold_models(data):
    folder = scan_image_folder(data / "train")
    md5 = data_version(data)
    plain = cross_validate(Strategy(**TINY), folder, md5, progress=False)
    flip = cross_validate(Strategy(**TINY, tta="flip"), folder, md5, progress=False)
    ens = cross_validate(Strategy(**TINY, ensemble="folds"), folder, md5, progress=False)
    for a, b, c in zip(plain.folds, flip.folds, ens.folds, strict=True):
        for key, tensor in a.state_dict.items():  # the same fold models, scored differently
            assert torch.equal(tensor, b.state_dict[key]) and torch.equal(tensor, c.state_dict[key])
    features = torch.from_numpy(np.array(cached_features(folder, "resnet18", "none", 32, md5)[0]))
    mirrored = torch.from_numpy(
        np.array(cached_features(folder, "resnet18", "none", 32, md5, mirrored=True)[0])
    )
    labels = torch.from_numpy(folder.labels)
    inputs, _ = prepare_inputs(Strategy(**TINY), folder, md5)
    for fold in flip.folds:
        model = inputs.new_model(0)
        model.load_state_dict(fold.state_dict)
        rows = torch.from_numpy(fold.val_indices)
        with torch.inference_mode():
            probs = sum(torch.softmax(model.head(f[rows]), dim=1) for f in (features, mirrored)) / 2
        assert fold.val_accuracy == pytest.approx(
            float((probs.argmax(1) == labels[rows]).float().mean())
        )


def test_flipped_features_are_the_features_of_the_mirrored_images(tmp_path, monkeypatch):
    monkeypatch.setenv("IMGCLS_CACHE_DIR", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    for kind in ("forest", "sea"):
        for root in ("plain", "mirror"):
            (tmp_path / root / kind).mkdir(parents=True)
        for i in range(3):
            image = make_image(kind, rng, size=64)  # lossless PNG: a mirror is exact
            image.save(tmp_path / "plain" / kind / f"{i}.png")
            image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(
                tmp_path / "mirror" / kind / f"{i}.png"
            )
    plain, mirror = scan_image_folder(tmp_path / "plain"), scan_image_folder(tmp_path / "mirror")
    flipped, _ = cached_features(
        plain, "resnet18", "none", 32, data_version(tmp_path / "plain"), mirrored=True
    )
    direct, _ = cached_features(mirror, "resnet18", "none", 32, data_version(tmp_path / "mirror"))
    unflipped, _ = cached_features(plain, "resnet18", "none", 32, data_version(tmp_path / "plain"))
    np.testing.assert_allclose(flipped, direct, atol=1e-4)
    assert np.abs(unflipped - direct).max() > 1e-2  # the images are not mirror-symmetric


def test_grid_refuses_an_ensemble_of_fine_tuned_backbones_at_the_ensemble_key(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        "defaults:\n  epochs: 2\nstrategies:\n  ok:\n    ensemble: folds\n"
        "  ft:\n    freeze_backbone: false\n    ensemble: folds\n"
    )
    with pytest.raises(ConfigError) as error:
        load_grid(grid)
    message = str(error.value)
    assert message.startswith(f"{grid}:8: strategies.ft.ensemble: ensemble 'folds' needs")
    assert "freeze_backbone is false" in message and "set ensemble: none" in message
    with pytest.raises(ConfigError, match=r"^strategy\.ensemble: .*use_feature_cache is false"):
        strategy_from_dict({"ensemble": "folds", "use_feature_cache": False})
    with pytest.raises(ConfigError, match=r"strategies\.ok\.tta: unknown tta 'mirror'"):
        grid.write_text("strategies:\n  ok:\n    tta: mirror\n")
        load_grid(grid)


def test_new_fields_default_to_none_and_change_the_run_key(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("strategies:\n  a: {}\n  b:\n    tta: [none, flip]\n    ensemble: folds\n")
    a, b_none, b_flip = load_grid(grid).strategies
    assert (a.ensemble, a.tta) == ("none", "none")
    assert {"ensemble", "tta"} <= set(a.params())  # logged as params, hashed into the run key
    keys = {run_key(s, "data", "code") for s in (a, b_none, b_flip)}
    assert len(keys) == 3


def test_grad_cam_of_a_tta_model_shows_the_unflipped_image():
    """The mirror passes the backbone first, so Grad-CAM's hook (Captum keeps a layer's last
    activation) explains the image itself: its map matches the plain model's, not the mirror's."""
    from imgcls.evaluation.explain import gradcam_maps
    from imgcls.modeling.ensemble import EnsembleClassifier
    from imgcls.modeling.models import build_classifier

    model, prep = build_classifier("efficientnet_lite0", "imagenet", 128, 2, 0.0, 0)
    images = np.random.default_rng(1).integers(0, 40, (2, 128, 128, 3), dtype=np.uint8)
    images[:, 30:90, 8:50] += 200  # a bright patch on the left only

    def cam(tta: str) -> np.ndarray:
        ensemble = EnsembleClassifier(model.backbone, [model.head], tta)
        return gradcam_maps(ensemble, images, prep, "efficientnet_lite0", [0, 0])

    flip, plain = cam("flip"), cam("none")
    same = np.corrcoef(flip.ravel(), plain.ravel())[0, 1]
    mirrored = np.corrcoef(flip.ravel(), plain[..., ::-1].ravel())[0, 1]
    assert same > 0.9 and same > mirrored + 0.2, (same, mirrored)


@pytest.mark.parametrize("given_inputs", [False, True], ids=["inputs-built", "inputs-given"])
def test_building_the_mirrors_features_counts_as_cv_setup_not_training(
    data, monkeypatch, given_inputs
):
    """The first ``tta: flip`` run on a frozen backbone builds the mirrors' feature cache; that
    time is ``cv_setup_seconds`` (cache setup), never fixed overhead or training."""
    import imgcls.modeling.nested as nested

    built: list[float] = []
    real = nested.cached_features

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            built.append(time.perf_counter() - start)

    monkeypatch.setattr(nested, "cached_features", timed)
    strategy = Strategy(**TINY, tta="flip")
    folder, md5 = scan_image_folder(data / "train"), data_version(data)
    inputs = prepare_inputs(strategy, folder, md5)[0] if given_inputs else None
    cv = cross_validate(strategy, folder, md5, progress=False, inputs=inputs)
    assert len(built) == 1, "the mirrors' features are built once per CV"
    assert cv.summary()["cv_setup_seconds"] >= built[0] > 0
