"""Where the model looks: Grad-CAM maps of a classifier's decision, for notebook 03's gallery.

Grad-CAM (Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via
Gradient-based Localization", ICCV 2017, eq. 1-2): for class ``c`` and the activations ``A^k``
of a convolutional layer, ``alpha_k = mean_ij d y_c / d A^k_ij`` and the map is
``ReLU(sum_k alpha_k A^k)``. The computation is Captum's ``LayerGradCam`` (BSD-3-Clause, the
PyTorch team); this module picks the layer, upsamples, normalises and keeps the model unchanged.

The target layer of each backbone is :data:`TARGET_LAYERS`, the one place it is chosen: the last
convolutional block, whose output global average pooling turns into the features the linear
head reads. There Grad-CAM equals the class activation map of Zhou et al. (CVPR 2016) up to a
positive factor, so the map shows what the head's decision is made of.

Gradients are taken with respect to that layer's activations, not the parameters, so the maps
work for a frozen backbone (``requires_grad=False`` everywhere) too. The model runs on detached
copies of its weights (it may hold inference tensors after ``predict_folder``): no gradient is
written to it, and its weights, flags and train/eval modes are as they were afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from captum.attr import LayerAttribution, LayerGradCam
from torch import nn
from torch.func import functional_call

from imgcls.data.images import load_rgb
from imgcls.evaluation.evaluate import EvaluationResult
from imgcls.modeling.ensemble import EnsembleClassifier
from imgcls.modeling.features import to_model_input
from imgcls.modeling.models import Classifier, Preprocessing

Model = Classifier | EnsembleClassifier

# Backbone name (as in strategies.yaml) -> the Grad-CAM layer, a module path inside the model
# (Classifier and EnsembleClassifier both keep theirs under ``backbone``).
# resnet18 (torchvision): layer4, the last residual stage (512 channels at 1/32 of the input).
# efficientnet_lite0 (timm tf_efficientnet_lite0): bn2, the conv_head 1x1 convolution
# (320 -> 1280 channels at 1/32) after its BatchNorm and ReLU6, the last convolutional block.
# Both feed global average pooling directly; pytorch-grad-cam's README recommends the same
# layers (``model.layer4[-1]`` and EfficientNet's last ``features`` block).
TARGET_LAYERS: dict[str, str] = {
    "resnet18": "backbone.layer4",
    "efficientnet_lite0": "backbone.bn2",
}

# Images per forward/backward pass: 16 images of 160 px need about 0.3 GB on the CPU.
GRADCAM_BATCH_SIZE = 16


class ExplainError(ValueError):
    """A Grad-CAM request that cannot be served (unknown backbone, wrong shapes)."""


def target_layer(model: Model, backbone: str) -> nn.Module:
    """Return the module of ``model`` whose activations Grad-CAM weighs (:data:`TARGET_LAYERS`).

    Raises :class:`ExplainError` for a backbone without an entry (naming the known ones), or
    when the model has no such module (e.g. ``backbone`` names another architecture than the
    model's).
    """
    if backbone not in TARGET_LAYERS:
        known = ", ".join(sorted(TARGET_LAYERS))
        raise ExplainError(
            f"backbone {backbone!r} has no Grad-CAM layer; known: {known} "
            "(add it to imgcls.evaluation.explain.TARGET_LAYERS)"
        )
    path = TARGET_LAYERS[backbone]
    try:
        return model.get_submodule(path)
    except AttributeError as exc:
        raise ExplainError(
            f"the model has no module {path!r}, the Grad-CAM layer of {backbone}; is the "
            f"model's backbone really {backbone}? (strategy param `backbone`)"
        ) from exc


def _detached_forward(model: nn.Module):
    """Return ``images -> logits`` of ``model`` run on plain copies of its weights and buffers.

    The copies never require gradients, so no ``.grad`` is written and ``requires_grad`` flags
    are never touched. Copies are needed, not just convenient: a model that ran under
    ``torch.inference_mode`` after ``.to(memory_format=...)`` (as ``predict_folder`` does) holds
    inference tensors, which autograd refuses to save for backward. Forward hooks on the model's
    modules (Captum's) still fire.
    """
    tensors = {
        name: tensor.detach().clone()
        for name, tensor in (*model.named_parameters(), *model.named_buffers())
    }

    def forward(images: torch.Tensor) -> torch.Tensor:
        return functional_call(model, tensors, (images,))

    return forward


def gradcam_maps(
    model: Model,
    images: np.ndarray,
    prep: Preprocessing,
    backbone: str,
    targets: Sequence[int] | np.ndarray | None = None,
    batch_size: int = GRADCAM_BATCH_SIZE,
) -> np.ndarray:
    """Return Grad-CAM maps ``(N, H, W)`` float32 in [0, 1] for uint8 images ``(N, H, W, 3)``.

    ``images`` are what the model sees (``H == W == prep.image_size``, as from
    :func:`imgcls.data.images.load_rgb`); they are normalised with ``prep``. ``targets`` are the
    class indices to explain, one per image (default: the model's predicted class). Each map is
    computed at the target layer's resolution (1/32 of the input for both backbones), upsampled
    bilinearly to ``H x W`` and divided by its maximum, so 1 is the image's most relevant region
    and 0 no positive evidence (an all-zero map when nothing supports the class).

    The model runs in eval mode (no dropout, BatchNorm running statistics) on the device of its
    parameters (a CPU works: 12 images of 160 px took 3.6 s with efficientnet_lite0 on 2 busy
    cores), and is left as it was: modes, ``requires_grad`` flags, weights and buffers; no
    ``.grad`` is written. For an :class:`~imgcls.modeling.ensemble.EnsembleClassifier` the class
    score is its log mean probability over heads (and views); with ``tta: flip`` the backbone runs
    twice and the map is of the unflipped image's activations (the view it runs last).
    Raises :class:`ExplainError` for a wrong image shape, a target count that differs from the
    image count, a target outside the classes, or an unknown backbone.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] != images.shape[2]:
        raise ExplainError(f"images must be uint8 (N, S, S, 3), got shape {images.shape}")
    layer = target_layer(model, backbone)
    count, size = images.shape[0], images.shape[1]
    if targets is not None:
        targets = np.asarray(targets, dtype=np.int64).reshape(-1)
        classes = model.head[-1].out_features
        if targets.shape[0] != count:
            raise ExplainError(f"{targets.shape[0]} targets for {count} images; give one each")
        if count and (targets.min() < 0 or targets.max() >= classes):
            raise ExplainError(f"targets must be class indices 0..{classes - 1}, got {targets}")
    parameter = next(model.parameters(), None)
    dev = parameter.device if parameter is not None else torch.device("cpu")
    modes = [(module, module.training) for module in model.modules()]
    maps = np.zeros((count, size, size), dtype=np.float32)
    try:
        model.eval()
        forward = _detached_forward(model)
        cam = LayerGradCam(forward, layer)
        for start in range(0, count, batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size]))
            batch = to_model_input(chunk.permute(0, 3, 1, 2), prep, dev)
            if targets is None:
                with torch.no_grad():
                    chosen = forward(batch).argmax(1)
            else:
                chosen = torch.from_numpy(targets[start : start + batch_size]).to(dev)
            with torch.enable_grad():
                coarse = cam.attribute(batch, target=chosen, relu_attributions=True)
            fine = LayerAttribution.interpolate(coarse.detach(), (size, size), "bilinear")
            fine = fine[:, 0].float().clamp_min(0).cpu().numpy()
            peak = fine.reshape(len(fine), -1).max(1)
            scale = np.where(peak > 0, peak, 1.0)[:, None, None]
            maps[start : start + len(fine)] = fine / scale
    finally:
        for module, training in modes:
            module.training = training
    return maps


@dataclass
class Explanations:
    """Grad-CAM maps of a set of test images, with what the overlay titles need.

    ``images`` uint8 ``(N, S, S, 3)`` as the model saw them, ``maps`` float32 ``(N, S, S)`` in
    [0, 1] for the predicted class; ``true``/``predicted`` class names, ``confidence`` the top-1
    softmax probability (fraction), ``names`` the file names.
    """

    images: np.ndarray
    maps: np.ndarray
    true: list[str]
    predicted: list[str]
    confidence: list[float]
    names: list[str]


def explain_hardest(
    model: Model,
    prep: Preprocessing,
    backbone: str,
    result: EvaluationResult,
    limit: int = 12,
) -> Explanations:
    """Explain the predicted class of the images of the 03 gallery (``result.hardest_indices``).

    Images are read at the model's input size (``prep.image_size``) with the project's reader;
    see :func:`gradcam_maps` for the maps and errors. Raises
    :class:`imgcls.data.images.ImageReadError` naming a file that cannot be read.
    """
    chosen = result.hardest_indices(limit)
    folder, size = result.folder, prep.image_size
    images = np.zeros((len(chosen), size, size, 3), dtype=np.uint8)
    for row, index in enumerate(chosen):
        images[row] = load_rgb(folder.paths[index], size)
    predicted = result.predictions[np.asarray(chosen, dtype=np.int64)]
    maps = gradcam_maps(model, images, prep, backbone, predicted)
    return Explanations(
        images=images,
        maps=maps,
        true=[folder.classes[folder.labels[i]] for i in chosen],
        predicted=[folder.classes[p] for p in predicted],
        confidence=[float(result.probabilities[i].max()) for i in chosen],
        names=[folder.paths[i].name for i in chosen],
    )
