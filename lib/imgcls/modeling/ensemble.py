"""The model a ``tta: flip`` or ``ensemble: folds`` strategy serves: one backbone, k heads, 1-2 views.

:class:`EnsembleClassifier` is a drop-in for :class:`~imgcls.modeling.models.Classifier`: it maps
a normalised image batch to "logits" whose softmax is the mean of its heads' softmax over the
image and, with ``tta: flip``, its horizontal mirror. It returns the log of that mean (a softmax
of log-probabilities that sum to 1 gives them back), so everything that applies a softmax to a
model's output (03's evaluation, the pyfunc, the predict CLI) gets the averaged probabilities.

* ``ensemble: folds``: the k fold models of cross-validation averaged (:func:`fold_ensemble`);
  ``ensemble_problem`` allows it only for a frozen backbone, so the k models share one backbone
  and differ only in their heads (k heads of ``F x C`` weights: a few kB each).
* ``tta: flip`` alone: the refit model's backbone and its one head (:func:`with_tta`).

Checkpoints (:mod:`imgcls.modeling.checkpoint`) store its full state dict and
:meth:`EnsembleClassifier.spec`; :func:`ensemble_from_payload` rebuilds it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
from torch import nn

from imgcls.modeling.models import Classifier, build_backbone, build_head, freeze_backbone

if TYPE_CHECKING:  # training-side types: the served model imports none of their modules
    from imgcls.core.config import Strategy
    from imgcls.data.folders import ImageFolder
    from imgcls.modeling.training import FoldResult, TrainingInputs

TTA_VIEWS = ("none", "flip")


class EnsembleClassifier(nn.Module):
    """A backbone shared by ``heads`` (each dropout + linear), averaged over 1 or 2 views.

    ``tta``: ``none`` (the image only) or ``flip`` (the image and its left-right mirror, flipped
    along the last axis). Raises ValueError for an unknown ``tta`` or no heads.
    """

    def __init__(self, backbone: nn.Module, heads: list[nn.Module], tta: str = "none"):
        super().__init__()
        if tta not in TTA_VIEWS:
            raise ValueError(f"unknown tta {tta!r}; allowed: {', '.join(TTA_VIEWS)}")
        if not heads:
            raise ValueError("an ensemble needs at least one head")
        self.backbone = backbone
        self.heads = nn.ModuleList(heads)
        self.tta = tta

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Map a normalised batch ``[B, 3, S, S]`` to ``log(mean probabilities)`` ``[B, C]``.

        The mean is over every head and view of ``softmax(head(backbone(view)))`` in float32,
        clamped at float32's smallest normal number before the log (a softmax of the output
        gives the mean back to float32 rounding). The mirror goes through the backbone first and
        the image itself last, so a layer hook that keeps the last activation (Captum's Grad-CAM
        in :mod:`imgcls.evaluation.explain`) sees the unflipped image.
        """
        views = (images.flip(-1), images) if self.tta == "flip" else (images,)
        total = None
        for view in views:
            features = self.backbone(view)
            for head in self.heads:
                probs = torch.softmax(head(features).float(), dim=1)
                total = probs if total is None else total + probs
        mean = total / (len(views) * len(self.heads))
        return torch.log(mean.clamp_min(torch.finfo(torch.float32).tiny))

    @property
    def head(self) -> nn.Module:
        """The first member's head (dropout + linear ``F -> C``): every head has the same shape,
        so code that reads a classifier's ``head`` for its class count works unchanged."""
        return self.heads[0]

    def spec(self) -> dict:
        """Return what rebuilds the structure: ``members`` (heads), ``tta``, ``num_features``."""
        return {
            "members": len(self.heads),
            "tta": self.tta,
            "num_features": int(self.heads[0][1].in_features),
        }


def with_tta(model: Classifier, tta: str) -> nn.Module:
    """Return ``model`` itself for ``tta: none``, else an :class:`EnsembleClassifier` of its
    backbone and its one head over the ``tta`` views (in eval mode)."""
    if tta == "none":
        return model
    return EnsembleClassifier(model.backbone, [model.head], tta).eval()


def fold_ensemble(
    strategy: Strategy,
    folds: list[FoldResult],
    inputs: TrainingInputs,
    folder: ImageFolder,
    data_md5: str,
) -> tuple[EnsembleClassifier, list[dict[str, float]], float]:
    """Assemble the served model of ``ensemble: folds``: the fold models' heads on one backbone.

    ``folds``: cross-validation's results, whose state dicts are heads on cached features
    (``inputs.use_features``; :func:`imgcls.core.strategy.ensemble_problem` refuses the rest).
    Returns ``(model in eval mode on the CPU, history, seconds)``: ``history`` is one record with
    the ensemble's ``train_loss`` (nats) and ``train_accuracy`` (fraction) over every training
    image with the strategy's views (each head saw (k-1)/k of them), as a refit's last epoch
    reports. Raises ValueError when the inputs are not cached features.
    """
    if not inputs.use_features:
        raise ValueError(
            "ensemble 'folds' averages heads on one frozen backbone; set freeze_backbone: true "
            "and use_feature_cache: true"
        )
    # training-only (folds, near-duplicate groups): kept out of the served model's imports
    from imgcls.modeling.nested import Views, loss_and_accuracy

    start = time.perf_counter()
    heads = []
    for fold in folds:
        model = inputs.new_model(strategy.seed)
        model.load_state_dict(fold.state_dict)
        heads.append(model.head.cpu().eval())
    rows = torch.arange(len(folder))
    views = Views(inputs, folder, data_md5, strategy.tta)
    probs = sum(views.probabilities(head.to(inputs.device), rows) for head in heads) / len(heads)
    loss, accuracy = loss_and_accuracy(probs, inputs.labels)
    backbone, _, _ = build_backbone(strategy.backbone, strategy.weights, strategy.image_size)
    model = EnsembleClassifier(backbone, [head.cpu() for head in heads], strategy.tta)
    freeze_backbone(model)  # it has a .backbone, as Classifier does
    history = [{"epoch": 0, "train_loss": loss, "train_accuracy": accuracy}]
    return model.eval(), history, time.perf_counter() - start


def ensemble_from_payload(payload: dict) -> EnsembleClassifier:
    """Rebuild a checkpoint's :class:`EnsembleClassifier` (eval mode) from its ``ensemble`` spec.

    The backbone's architecture is built without weights (they are in the state dict, unless the
    payload is head-only: then from ``backbone_weights``). Raises RuntimeError (torch) when the
    state dict does not fit the spec.
    """
    spec = payload["ensemble"]
    head_only = bool(payload.get("head_only", False))
    weights = (payload.get("backbone_weights") or "none") if head_only else "none"
    size = int(payload["preprocessing"]["image_size"])
    backbone, num_features, _ = build_backbone(payload["backbone"], weights, size)
    classes, dropout = len(payload["classes"]), float(payload.get("dropout", 0.0))
    heads = [build_head(num_features, classes, dropout, seed=0) for _ in range(spec["members"])]
    model = EnsembleClassifier(backbone, heads, spec["tta"])
    model.load_state_dict(payload["state_dict"], strict=not head_only)
    return model.eval()
