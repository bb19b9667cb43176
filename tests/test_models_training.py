"""Backbones, real freezing, cached vs uncached training, determinism, checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imgcls.core import paths
from imgcls.core.config import Strategy, load_grid
from imgcls.data.folders import data_version, scan_image_folder
from imgcls.modeling.checkpoint import load_checkpoint, save_checkpoint
from imgcls.modeling.crossval import cross_validate, prepare_inputs, refit
from imgcls.modeling.models import (
    WeightsError,
    _efficientnet_package_file,
    build_backbone,
    build_classifier,
    freeze_backbone,
    set_train_mode,
)

TINY = {"image_size": 32, "folds": 2, "epochs": 3, "batch_size": 8, "patience": 0}


def test_efficientnet_imagenet_weights_are_mapped_by_position():
    backbone, features, prep = build_backbone("efficientnet_lite0", "imagenet", 160)
    source = torch.load(_efficientnet_package_file(), map_location="cpu", weights_only=True)
    assert features == 1280 and prep.mean == (0.5, 0.5, 0.5) and prep.std == (0.5, 0.5, 0.5)
    assert torch.equal(backbone.conv_stem.weight, source["_conv_stem.weight"])
    assert torch.equal(backbone.bn2.running_var, source["_bn1.running_var"])


def test_resnet18_from_none_and_local_file(tmp_path):
    backbone, features, prep = build_backbone("resnet18", "none", 64)
    assert features == 512 and prep.std[0] == pytest.approx(0.229)
    path = tmp_path / "resnet.pth"
    torch.save(backbone.state_dict(), path)
    loaded, _, _ = build_backbone("resnet18", str(path), 64)
    assert torch.equal(loaded.conv1.weight, backbone.conv1.weight)
    with pytest.raises(WeightsError, match="not found"):
        build_backbone("resnet18", str(tmp_path / "missing.pth"), 64)
    torch.save({"unrelated": torch.zeros(3)}, tmp_path / "wrong.pth")
    with pytest.raises(WeightsError, match="not a resnet18 state_dict"):
        build_backbone("resnet18", str(tmp_path / "wrong.pth"), 64)


def test_frozen_backbone_gets_no_gradients_and_batchnorm_does_not_move():
    model, _ = build_classifier("resnet18", "none", 32, 2, 0.0, seed=0)
    freeze_backbone(model)
    set_train_mode(model, frozen=True)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        reference = model.backbone(images)
    loss = model(images).sum()
    loss.backward()
    optimizer.step()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.head[1].weight.grad is not None
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running stats included
    with torch.no_grad():
        assert torch.equal(model.backbone(images), reference)


def test_cached_and_uncached_frozen_training_give_the_same_model(image_dataset, isolated_cache):
    folder = scan_image_folder(image_dataset / "train")
    md5 = data_version(image_dataset)
    cached = Strategy(weights="none", **TINY)
    uncached = Strategy(weights="none", use_feature_cache=False, **TINY)
    a = cross_validate(cached, folder, md5, progress=False)
    b = cross_validate(uncached, folder, md5, progress=False)
    assert list((isolated_cache / "features").glob("*.npy")), (
        "the cached run used the feature cache"
    )
    for fa, fb in zip(a.folds, b.folds, strict=True):
        assert fa.best_epoch == fb.best_epoch
        assert fa.val_accuracy == fb.val_accuracy
        assert fa.val_loss == pytest.approx(fb.val_loss, abs=1e-5)
        for key in ("head.1.weight", "head.1.bias"):
            torch.testing.assert_close(fa.state_dict[key], fb.state_dict[key], atol=1e-5, rtol=1e-4)


def test_same_strategy_twice_gives_the_same_cv_scores(image_dataset, isolated_cache):
    folder = scan_image_folder(image_dataset / "train")
    md5 = data_version(image_dataset)
    strategy = Strategy(
        weights="none", freeze_backbone=False, backbone="resnet18", augment=True, **TINY
    )
    first = cross_validate(strategy, folder, md5, progress=False)
    second = cross_validate(strategy, folder, md5, progress=False)
    assert [f.val_loss for f in first.folds] == [f.val_loss for f in second.folds]
    assert [f.val_accuracy for f in first.folds] == [f.val_accuracy for f in second.folds]


def test_early_stopping_keeps_the_best_epoch(image_dataset, isolated_cache):
    folder = scan_image_folder(image_dataset / "train")
    folder.labels = np.random.default_rng(0).permutation(folder.labels)  # unlearnable: overfits
    md5 = data_version(image_dataset)
    strategy = Strategy(
        weights="none", image_size=32, folds=2, epochs=40, patience=2, lr=0.05, batch_size=4
    )
    result = cross_validate(strategy, folder, md5, progress=False)
    for fold in result.folds:
        losses = [h["val_loss"] for h in fold.history]
        assert len(fold.history) < 40
        assert fold.best_epoch == int(np.argmin(losses)) + 1
        assert len(fold.history) - fold.best_epoch == 2  # stopped after `patience` worse epochs
        assert fold.val_loss == pytest.approx(min(losses))


def test_finetuning_moves_the_backbone(image_dataset, isolated_cache):
    folder = scan_image_folder(image_dataset / "train")
    md5 = data_version(image_dataset)
    strategy = Strategy(backbone="resnet18", weights="none", freeze_backbone=False, **TINY)
    inputs, _ = prepare_inputs(strategy, folder, md5)
    model, history, _ = refit(strategy, folder, md5, epochs=1, inputs=inputs)
    initial = inputs.template.backbone.conv1.weight
    assert not torch.equal(model.backbone.conv1.weight, initial)
    assert {"train_loss", "train_accuracy"} <= set(history[0])


@pytest.mark.parametrize("head_only", [False, True])
def test_checkpoint_round_trip_with_weights_only(tmp_path, head_only):
    model, prep = build_classifier("efficientnet_lite0", "imagenet", 64, 2, 0.1, seed=3)
    path = save_checkpoint(
        tmp_path / "m.pt",
        model,
        ["forest", "sea"],
        prep,
        "efficientnet_lite0",
        0.1,
        {"note": "x"},
        head_only_with_weights="imagenet" if head_only else None,
    )
    payload = torch.load(path, weights_only=True)  # plain types only: safe to load
    assert payload["classes"] == ["forest", "sea"]
    loaded, classes, loaded_prep, _ = load_checkpoint(path)
    assert classes == ["forest", "sea"] and loaded_prep == prep
    images = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images))


def test_every_shipped_strategy_trains_in_tiny_mode(image_dataset, isolated_cache):
    """No strategy of strategies.yaml rots: each one trains on tiny data with its own settings."""
    folder = scan_image_folder(image_dataset / "train")
    md5 = data_version(image_dataset)
    for strategy in load_grid(paths.REPO_ROOT / "strategies.yaml").strategies:
        tiny = Strategy(**{**strategy.params(), "image_size": 32, "folds": 2, "epochs": 1})
        result = cross_validate(tiny, folder, md5, progress=False)
        assert len(result.folds) == 2, strategy.run_name
        assert 0.0 <= result.summary()["cv_accuracy_mean"] <= 1.0


def test_augmentation_draws_a_crop_offset_per_image():
    from imgcls.modeling.training import augment_batch

    # identical images: any difference between outputs comes from per-image flips and offsets
    ramp = torch.arange(16, dtype=torch.float32).repeat(16, 1)
    image = (ramp + 16 * ramp.T).expand(3, 16, 16)
    batch = image.expand(32, 3, 16, 16).clone()
    out = augment_batch(batch, torch.Generator().manual_seed(0), pad=4)
    assert out.shape == batch.shape
    unflipped = [o for o in out if o[0, 0, 1] > o[0, 0, 0]]  # ramp still increases left->right
    shifts = {(float(o[0, 0, 0]) // 16, float(o[0, 0, 0]) % 16) for o in unflipped}
    assert len(shifts) > 3, shifts  # one offset shared by the batch would give a single value
    centre = augment_batch(batch, torch.Generator().manual_seed(0), pad=0)
    assert all(torch.equal(c, image) or torch.equal(c, image.flip(-1)) for c in centre)
