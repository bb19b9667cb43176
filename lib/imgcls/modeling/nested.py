"""Honest cross-validation scores for ``tta: flip`` and ``ensemble: folds`` strategies.

The champion is chosen on cross-validation only, so an ensemble or TTA strategy must get a fold
score that means what a plain strategy's means: the score of the model the strategy serves,
trained without its validation fold.

* ``tta: flip``: the fold model predicts each validation image and its horizontal mirror and the
  two probability vectors are averaged (:class:`Views`), as 03 and the served model do. On a
  frozen backbone the mirrors' features are cached like the images' own
  (:func:`imgcls.modeling.features.cached_features` with ``mirrored=True``).
* ``ensemble: folds``: the served model averages the k fold models, each of which saw (k-1)/k of
  the training images. Averaging those k models on an outer validation fold would leak (k-1 of
  them trained on it). Instead, within each outer fold the outer training part is split again
  into k inner folds (the same stratified, near-duplicate-aware rule and seed as the outer
  split), k inner models are trained exactly as fold models are (early stopping on their inner
  validation fold) and their averaged probabilities score the outer validation fold, which none
  of them saw (:class:`FoldScorer`). This is nested cross-validation of the whole procedure
  (Varma & Simon 2006, "Bias in error estimation when using cross-validation for model
  selection", BMC Bioinformatics 7:91). It costs k x k head trainings on cached features
  (seconds), which is why :func:`imgcls.core.strategy.ensemble_problem` refuses it for
  fine-tuned backbones.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from imgcls.core.config import ConfigError, Strategy
from imgcls.core.strategy import ensemble_problem
from imgcls.data.duplicates import fold_groups
from imgcls.data.folders import ImageFolder
from imgcls.data.folds import assign_folds
from imgcls.modeling.features import cached_features
from imgcls.modeling.training import TrainingInputs, predict_rows, train_rows


def flipped_inputs(inputs: TrainingInputs, folder: ImageFolder, data_md5: str) -> TrainingInputs:
    """Return a shallow copy of ``inputs`` whose rows are the horizontal mirrors of its rows.

    On cached features: :func:`imgcls.modeling.features.cached_features` with ``mirrored=True``
    (cached under the same key plus ``view: hflip``); on images: a view of the uint8
    ``[N, 3, S, S]`` array reversed along its last (width) axis (no copy: a memory-mapped cache
    stays mapped, and :meth:`~imgcls.modeling.training.TrainingInputs.batch` copies only a batch).
    """
    twin = copy.copy(inputs)
    if inputs.use_features:
        s = inputs.strategy
        twin.inputs, _ = cached_features(
            folder, s.backbone, s.weights, s.image_size, data_md5, inputs.device, mirrored=True
        )
    elif isinstance(inputs.inputs, torch.Tensor):
        twin.inputs = torch.flip(inputs.inputs, dims=[-1])
    else:
        twin.inputs = inputs.inputs[..., ::-1]
    return twin


class Views:
    """What a strategy predicts from: the images (or their features), and with ``tta: flip`` also
    their mirrors; :meth:`probabilities` averages the views' probabilities."""

    def __init__(self, inputs: TrainingInputs, folder: ImageFolder, data_md5: str, tta: str):
        self.inputs = inputs
        self.flipped = flipped_inputs(inputs, folder, data_md5) if tta == "flip" else None

    def probabilities(self, module: nn.Module, rows: torch.Tensor) -> torch.Tensor:
        """Return float32 probabilities ``[len(rows), C]`` of ``module`` (put in eval mode): the
        mean of its softmax on each view (:func:`imgcls.modeling.training.predict_rows`)."""
        probs = predict_rows(self.inputs, module, rows)
        if self.flipped is not None:
            probs = (probs + predict_rows(self.flipped, module, rows)) / 2
        return probs


def loss_and_accuracy(probs: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    """Return (mean cross-entropy in nats, accuracy as a fraction) of probabilities ``[N, C]``
    against int64 labels ``[N]``; probabilities are clamped at 1e-12 as in training's
    validation loss."""
    loss = nn.functional.nll_loss(torch.log(probs.clamp_min(1e-12)), targets)
    return float(loss), float((probs.argmax(1) == targets).float().mean())


class FoldScorer:
    """Scores each outer fold of a strategy as the model it serves would score there.

    Plain strategies (``ensemble: none``, ``tta: none``) keep the best epoch's validation scores
    from the training loop (:meth:`score` returns None). Raises ConfigError (``strategy.ensemble``)
    for an ensemble that :func:`imgcls.core.strategy.ensemble_problem` refuses.
    """

    def __init__(
        self, strategy: Strategy, folder: ImageFolder, data_md5: str, inputs: TrainingInputs
    ):
        problem = ensemble_problem(strategy)
        if problem:
            raise ConfigError(f"strategy.ensemble: {problem}")
        self.strategy = strategy
        self.inputs = inputs
        self.plain = strategy.ensemble == "none" and strategy.tta == "none"
        self.views = None if self.plain else Views(inputs, folder, data_md5, strategy.tta)
        self.groups = fold_groups(folder) if strategy.ensemble == "folds" else None

    def score(
        self, model: nn.Module, train_idx: torch.Tensor, val_idx: torch.Tensor
    ) -> tuple[float, float] | None:
        """Return (validation loss, validation accuracy) of the served model on ``val_idx``.

        ``model``: the fold model trained on ``train_idx`` (int64 row indices). With ``tta``,
        its averaged views; with ``ensemble: folds``, :meth:`inner_ensemble`; None for a plain
        strategy (the training loop's best-epoch scores stand).
        """
        if self.views is None:
            return None
        if self.groups is not None:
            probs = self.inner_ensemble(train_idx, val_idx)
        else:
            probs = self.views.probabilities(self.inputs.trainable(model), val_idx)
        return loss_and_accuracy(probs, self.inputs.labels[val_idx])

    def inner_ensemble(self, train_idx: torch.Tensor, val_idx: torch.Tensor) -> torch.Tensor:
        """Return ``[len(val_idx), C]``: the mean probabilities of k models trained on ``train_idx``.

        The k inner folds split ``train_idx`` by :func:`imgcls.data.folds.assign_folds` with the
        strategy's fold count and seed and the near-duplicate groups; inner model ``j`` trains on
        the other inner folds with early stopping on fold ``j`` and seed ``seed + j``, as
        cross-validation trains the fold models the served ensemble averages. No row of
        ``val_idx`` is seen by any of them. Raises DataError when the outer training part has too
        few groups of a class for k inner folds.
        """
        s = self.strategy
        rows = train_idx.numpy()
        labels = self.inputs.labels.numpy()[rows]
        inner = assign_folds(labels, s.folds, s.seed, groups=self.groups[rows])
        total = torch.zeros(len(val_idx), self.inputs.num_classes)
        for j in range(s.folds):
            fit = torch.from_numpy(rows[inner != j])
            stop = torch.from_numpy(rows[inner == j])
            model, _, _ = train_rows(self.inputs, fit, stop, s.seed + j, s.epochs)
            total += self.views.probabilities(self.inputs.trainable(model), val_idx)
        return total / s.folds
