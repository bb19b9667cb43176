"""Grad-CAM: maps follow a planted signal, fit the input, leave the model as it was; overlays."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import copy

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from imgcls.data.folders import data_version, scan_image_folder
from imgcls.evaluation.evaluate import EvaluationResult, predict_folder
from imgcls.evaluation.explain import (
    TARGET_LAYERS,
    ExplainError,
    explain_hardest,
    gradcam_maps,
    target_layer,
)
from imgcls.modeling.ensemble import EnsembleClassifier
from imgcls.modeling.features import to_model_input
from imgcls.modeling.models import (
    BACKBONE_BUILDERS,
    build_classifier,
    build_head,
    freeze_backbone,
    preprocessing_for,
)
from imgcls.reporting.overlays import blend, gradcam_overlays
from tests.conftest import write_dataset

SIZE = 128  # a 4 x 4 grid of Grad-CAM cells (stride 32): each quadrant is 2 x 2 cells
HALF = SIZE // 2


def _planted(count: int, quadrants: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Noise images; where ``quadrants[i] >= 0`` that quadrant is covered by blue stripes."""
    images = rng.integers(0, 256, (count, SIZE, SIZE, 3), dtype=np.uint8)
    rows = np.arange(HALF)[:, None, None]
    stripes = np.where((rows // 4) % 2 == 1, [40, 90, 220], [10, 10, 10]).astype(np.uint8)
    for image, quadrant in zip(images, quadrants, strict=True):
        if quadrant >= 0:
            top, left = divmod(int(quadrant), 2)
            image[top * HALF : (top + 1) * HALF, left * HALF : (left + 1) * HALF] = stripes
    return images


def _input(images: np.ndarray, prep) -> torch.Tensor:
    return to_model_input(torch.from_numpy(images).permute(0, 3, 1, 2), prep, torch.device("cpu"))


@pytest.fixture(scope="module")
def planted_model():
    """ImageNet EfficientNet-Lite0 (frozen) with a head trained to say 'stripes somewhere'.

    Class 1 images carry the stripes in a random quadrant, class 0 images are noise only, so the
    only evidence for class 1 is where the stripes are.
    """
    rng = np.random.default_rng(0)
    labels = np.arange(48) % 2
    quadrants = np.where(labels == 1, rng.integers(0, 4, labels.size), -1)
    model, prep = build_classifier("efficientnet_lite0", "imagenet", SIZE, 2, 0.0, seed=0)
    freeze_backbone(model)
    with torch.no_grad():
        features = model.backbone(_input(_planted(labels.size, quadrants, rng), prep))
    optimiser = torch.optim.Adam(model.head.parameters(), lr=1e-2)
    target = torch.from_numpy(labels)
    for _ in range(100):
        optimiser.zero_grad()
        loss = F.cross_entropy(model.head(features), target)
        loss.backward()
        optimiser.step()
    assert loss.item() < 0.05, "the head did not learn the planted signal"
    return model.eval(), prep


@pytest.fixture(scope="module")
def random_models():
    """Each backbone with random weights and a 2-class head (dropout 0.5); copy before changing."""
    return {
        name: build_classifier(name, "none", 64, 2, 0.5, seed=0)[0] for name in BACKBONE_BUILDERS
    }


def test_the_map_lies_on_the_planted_signal_wherever_it_is(planted_model):
    model, prep = planted_model
    quadrants = np.arange(4)
    images = _planted(4, quadrants, np.random.default_rng(1))
    with torch.no_grad():
        assert model(_input(images, prep)).argmax(1).tolist() == [1, 1, 1, 1]
    maps = gradcam_maps(model, images, prep, "efficientnet_lite0", targets=[1, 1, 1, 1])
    assert maps.shape == (4, SIZE, SIZE) and maps.dtype == np.float32
    shares = maps.reshape(4, 2, HALF, 2, HALF).sum(axis=(2, 4)).reshape(4, 4)
    shares /= maps.sum(axis=(1, 2))[:, None]
    # the stripes' quadrant holds the largest share, and far more than the uniform 1/4
    assert shares.argmax(axis=1).tolist() == quadrants.tolist(), shares.round(2)
    assert (shares[np.arange(4), quadrants] > 0.4).all(), shares.round(2)


@pytest.mark.parametrize("backbone", sorted(BACKBONE_BUILDERS))
@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "fine-tuned"])
def test_both_backbones_give_input_sized_maps_and_leave_the_model_unchanged(
    random_models, backbone, frozen
):
    model, prep = copy.deepcopy(random_models[backbone]), preprocessing_for(backbone, 64)
    if frozen:  # every backbone parameter without gradients, as a frozen strategy trains
        freeze_backbone(model)
    model.train()
    if frozen:
        model.backbone.eval()
    modes = {name: module.training for name, module in model.named_modules()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    state = {name: value.clone() for name, value in model.state_dict().items()}
    images = np.random.default_rng(2).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)

    maps = gradcam_maps(model, images, prep, backbone, batch_size=2)

    assert maps.shape == (3, 64, 64)
    assert maps.min() >= 0 and maps.max() <= 1
    assert np.isclose(maps.reshape(3, -1).max(1), 1).any(), "no map reached its maximum 1"
    assert {name: module.training for name, module in model.named_modules()} == modes
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    after = model.state_dict()
    assert all(torch.equal(state[name], after[name]) for name in state)
    assert all(p.grad is None for p in model.parameters())
    # eval mode inside (dropout 0.5 is off): the same maps again, as from an eval-mode model
    np.testing.assert_allclose(gradcam_maps(model.eval(), images, prep, backbone), maps, atol=1e-5)


def test_an_ensemble_with_flip_tta_is_explained_like_a_single_model(random_models):
    """``ensemble: folds`` + ``tta: flip``: one backbone, several heads, image and mirror."""
    single = random_models["resnet18"]
    heads = [build_head(512, 2, 0.5, seed) for seed in range(3)]
    model = EnsembleClassifier(copy.deepcopy(single.backbone), heads, tta="flip").eval()
    state = {name: value.clone() for name, value in model.state_dict().items()}
    images = np.random.default_rng(6).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)

    maps = gradcam_maps(model, images, preprocessing_for("resnet18", 64), "resnet18")

    assert maps.shape == (2, 64, 64) and maps.min() >= 0 and maps.max() <= 1
    assert maps.reshape(2, -1).max(1).tolist() == pytest.approx([1, 1])
    assert not model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_target_layer_is_the_last_convolutional_block_of_each_backbone(random_models):
    assert set(TARGET_LAYERS) == set(BACKBONE_BUILDERS)
    resnet = random_models["resnet18"]
    assert target_layer(resnet, "resnet18") is resnet.backbone.layer4
    with pytest.raises(ExplainError, match=r"no module 'backbone\.bn2'.*efficientnet_lite0"):
        target_layer(resnet, "efficientnet_lite0")
    with pytest.raises(ExplainError, match="'vgg16' has no Grad-CAM layer; known: "):
        target_layer(resnet, "vgg16")


def test_bad_inputs_are_refused_with_what_to_give(random_models):
    model, prep = random_models["resnet18"], preprocessing_for("resnet18", 32)
    images = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    with pytest.raises(ExplainError, match=r"uint8 \(N, S, S, 3\), got shape \(2, 3, 32, 32\)"):
        gradcam_maps(model, images.transpose(0, 3, 1, 2), prep, "resnet18")
    with pytest.raises(ExplainError, match="1 targets for 2 images"):
        gradcam_maps(model, images, prep, "resnet18", targets=[0])
    with pytest.raises(ExplainError, match=r"class indices 0\.\.1"):
        gradcam_maps(model, images, prep, "resnet18", targets=[0, 2])


def test_explain_hardest_explains_the_gallery_images_in_order(
    random_models, tmp_path, isolated_cache
):
    """As in 03: the model first predicts the folder (under inference mode), then is explained."""
    folder = scan_image_folder(write_dataset(tmp_path / "test", {"forest": 4, "sea": 4}, seed=5))
    model, prep = copy.deepcopy(random_models["resnet18"]), preprocessing_for("resnet18", 32)
    md5 = data_version(folder.root)
    probabilities = predict_folder(model, prep, folder, md5, "cpu")
    assert any(p.is_inference() for p in model.parameters())  # what predict_folder leaves
    result = EvaluationResult("test", folder, probabilities, {}, md5)

    explained = explain_hardest(model, prep, "resnet18", result, limit=5)

    _, captions = result.hardest_images(limit=5)
    assert [c.split("\n")[0].split(" ", 1)[1] for c in captions] == explained.names
    assert explained.images.shape == (5, 32, 32, 3) and explained.maps.shape == (5, 32, 32)
    chosen = result.hardest_indices(5)
    assert explained.predicted == [folder.classes[result.predictions[i]] for i in chosen]
    assert explained.true == [folder.classes[folder.labels[i]] for i in chosen]
    assert explained.confidence == pytest.approx(probabilities[chosen].max(1).tolist())


def test_blend_keeps_the_photo_where_the_map_is_zero():
    image = np.full((4, 4, 3), 200, dtype=np.uint8)
    heatmap = np.zeros((4, 4))
    heatmap[0, 0] = 1.0
    mixed = blend(image, heatmap, max_opacity=0.5)
    np.testing.assert_allclose(mixed[1:, 1:], 200 / 255)
    colour = np.array(plt.get_cmap("turbo")(1.0)[:3])
    np.testing.assert_allclose(mixed[0, 0], 0.5 * 200 / 255 + 0.5 * colour)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        blend(image, heatmap * 2)


def test_overlay_figure_titles_each_image_with_true_predicted_and_confidence():
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    maps = rng.random((5, 16, 16))
    true = ["sea", "forest", "sea", "sea", "forest"]
    predicted = ["forest", "forest", "sea", "forest", "forest"]
    fig = gradcam_overlays(
        images, maps, true, predicted, [0.91, 0.55, 0.6, 0.7, 0.51], "Where it looks", columns=3
    )
    panels = [ax for ax in fig.axes if ax.images and ax.get_title()]
    assert len(panels) == 5
    assert panels[0].get_title() == "#1 WRONG\ntrue sea\npredicted forest (0.91)"
    assert panels[1].get_title() == "#2 RIGHT\ntrue forest\npredicted forest (0.55)"
    assert fig._suptitle.get_text() == "Where it looks"
    colourbar = [ax for ax in fig.axes if ax not in panels]
    assert [ax.get_ylabel() for ax in colourbar] == [
        "Grad-CAM relevance (fraction of the image's maximum)"
    ]
    plt.close(fig)
    with pytest.raises(ValueError, match="5 images but 4 maps"):
        gradcam_overlays(images, maps[:4], true, predicted, [0.5] * 5, "x")
