"""k-fold cross-validation of a strategy and its refit on all training data.

Folds come from :func:`imgcls.data.duplicates.split_folds` (stratified, seeded: every strategy of
a data version is scored on the same folds); each fold and the refit run the loop of
:mod:`imgcls.modeling.training`. Progress lines go to this module's logger (INFO).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from imgcls.core.config import Strategy
from imgcls.data import duplicates
from imgcls.data.folders import ImageFolder
from imgcls.modeling.features import pick_device
from imgcls.modeling.models import Classifier, Preprocessing
from imgcls.modeling.nested import FoldScorer
from imgcls.modeling.training import FoldResult, TrainingInputs, train_rows

logger = logging.getLogger(__name__)


@dataclass
class CVResult:
    """Cross-validation of one strategy: per-fold results and the fold assignment used."""

    strategy: Strategy
    classes: list[str]
    folds: list[FoldResult]
    fold_assignment: np.ndarray
    preprocessing: Preprocessing
    feature_cache_hit: bool
    setup_seconds: float

    def summary(self) -> dict[str, float]:
        """Return mean and std (ddof=1) of fold validation accuracy and loss, and timing."""
        acc = np.array([f.val_accuracy for f in self.folds])
        loss = np.array([f.val_loss for f in self.folds])

        def std(a):
            return float(a.std(ddof=1)) if len(a) > 1 else 0.0

        return {
            "cv_accuracy_mean": float(acc.mean()),
            "cv_accuracy_std": std(acc),
            "cv_loss_mean": float(loss.mean()),
            "cv_loss_std": std(loss),
            "cv_train_seconds": float(sum(f.train_seconds for f in self.folds)),
            "cv_setup_seconds": self.setup_seconds,
            "cv_images_per_second": float(np.mean([f.images_per_second for f in self.folds])),
        }

    def refit_epochs(self) -> int:
        """Return the epoch count for the refit: the rounded mean best epoch over folds."""
        return max(1, round(np.mean([f.best_epoch for f in self.folds])))


def prepare_inputs(
    strategy: Strategy,
    folder: ImageFolder,
    data_md5: str,
    device: str | None = None,
    progress: bool = False,
) -> tuple[TrainingInputs, float]:
    """Load (or build) the cached inputs of a strategy; return them and the seconds it took."""
    start = time.perf_counter()
    inputs = TrainingInputs(strategy, folder, data_md5, pick_device(device), progress)
    return inputs, time.perf_counter() - start


def cross_validate(
    strategy: Strategy,
    folder: ImageFolder,
    data_md5: str,
    device: str | None = None,
    progress: bool = True,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    inputs: TrainingInputs | None = None,
) -> CVResult:
    """Run stratified k-fold CV of ``strategy`` on ``folder``; return every fold's result.

    A fold's ``val_loss``/``val_accuracy`` are those of the model the strategy serves
    (:class:`imgcls.modeling.nested.FoldScorer`): with ``tta: flip`` averaged over each image and
    its mirror, with ``ensemble: folds`` the nested k x k inner ensemble (its training time is
    in ``train_seconds``). The result's ``setup_seconds`` is the input setup (when ``inputs`` is
    None) plus the served views' setup (with ``tta: flip`` on a frozen backbone: the mirrors'
    features, computed once per backbone and data version). Raises ConfigError for an ensemble
    its backbone setting refuses.
    """
    setup = 0.0
    if inputs is None:
        inputs, setup = prepare_inputs(strategy, folder, data_md5, device, progress)
    start = time.perf_counter()
    scorer = FoldScorer(strategy, folder, data_md5, inputs)  # builds the mirrors' features cache
    setup += time.perf_counter() - start
    assignment = duplicates.split_folds(folder, strategy.folds, strategy.seed)
    results = []
    for fold in range(strategy.folds):
        start = time.perf_counter()
        train_idx = torch.from_numpy(np.flatnonzero(assignment != fold))
        val_idx = torch.from_numpy(np.flatnonzero(assignment == fold))
        model, history, best_epoch = train_rows(
            inputs, train_idx, val_idx, strategy.seed + fold, strategy.epochs, fold, on_epoch
        )
        seen = len(train_idx) * len(history)
        rate = seen / (time.perf_counter() - start)
        best = dict(history[best_epoch - 1])
        served = scorer.score(model, train_idx, val_idx)
        if served is not None:
            best["val_loss"], best["val_accuracy"] = served
        seconds = time.perf_counter() - start
        results.append(
            FoldResult(
                fold=fold,
                history=history,
                best_epoch=best_epoch,
                val_loss=best["val_loss"],
                val_accuracy=best["val_accuracy"],
                val_indices=val_idx.numpy(),
                train_seconds=seconds,
                images_per_second=rate,
                state_dict={k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            )
        )
        if progress:
            logger.info(
                "  fold %d/%d: val_accuracy=%.4f val_loss=%.4f best_epoch=%d/%d (%.1fs)",
                fold + 1,
                strategy.folds,
                best["val_accuracy"],
                best["val_loss"],
                best_epoch,
                len(history),
                seconds,
            )
    return CVResult(
        strategy, folder.classes, results, assignment, inputs.prep, inputs.cache_hit, setup
    )


def refit(
    strategy: Strategy,
    folder: ImageFolder,
    data_md5: str,
    epochs: int,
    device: str | None = None,
    inputs: TrainingInputs | None = None,
    progress: bool = False,
) -> tuple[Classifier, list[dict[str, float]], float]:
    """Train on all of ``folder`` for ``epochs``; return ``(model on CPU, history, seconds)``."""
    if inputs is None:
        inputs, _ = prepare_inputs(strategy, folder, data_md5, device, progress)
    start = time.perf_counter()
    rows = torch.arange(len(folder))
    model, history, _ = train_rows(inputs, rows, None, strategy.seed + 1000, epochs)
    model = inputs.full_model(model.cpu()).eval()
    return model, history, time.perf_counter() - start
