"""Seed repetitions: the run-to-run spread of a strategy's CV score, for the noise floor.

Two trainings of the same strategy on the same folds differ only by their random seed (head
initialisation, batch order, dropout). Repeating the cross-validation with several seeds on the
*same* fold assignment measures that spread directly, which the fold spread only bounds from
above (it also holds fold-to-fold difficulty). For a frozen backbone on cached features a repeat
trains k small heads: seconds. Fine-tuned backbones are not repeated (minutes per repeat); their
noise floor uses the fold spread (:func:`imgcls.selection.noisefloor.noise_floor`).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from imgcls.modeling.training import TrainingInputs

# torch and the training loop are imported where a repetition trains: the metric names here are
# read by imgcls.selection in the runner, which must not load torch (tests/test_architecture.py).

logger = logging.getLogger(__name__)

SEED_REPETITIONS = 5  # CV runs per strategy, the logged run included: 4 extra trainings of k heads
# The fold scores of repetition i >= 1, step = fold; repetition 0 is ``fold_val_accuracy`` itself.
METRIC_SEED_FOLD_PREFIX = "fold_val_accuracy_seed"


def seed_metric(repetition: int) -> str:
    """Return the metric name of repetition ``repetition`` (>= 1): ``fold_val_accuracy_seed<i>``."""
    return f"{METRIC_SEED_FOLD_PREFIX}{repetition}"


def repetition_seeds(seed: int, repetitions: int = SEED_REPETITIONS) -> list[int]:
    """Return the seeds of ``repetitions`` CV runs: ``seed`` (the logged run) then seed+1000*i.

    Steps of 1000 keep every per-fold training seed (seed + fold, k < 1000) distinct between
    repetitions. Raises ValueError when ``repetitions`` < 2 (one run has no spread).
    """
    if repetitions < 2:
        raise ValueError(f"a run-to-run spread needs at least 2 repetitions, got {repetitions}")
    return [seed + 1000 * i for i in range(repetitions)]


def can_repeat_cheaply(inputs: TrainingInputs) -> bool:
    """Return True when a repeat trains heads on cached features only and scores them plainly.

    False for fine-tuned backbones (a repeat is a full CV) and for ``ensemble`` or ``tta``
    strategies, whose fold score is not one plain head's (nested CV, mirrored views): a repeat
    of :func:`seed_fold_scores` would measure another model's noise. Those use the fold spread.
    """
    strategy = inputs.strategy
    plain = strategy.ensemble == "none" and strategy.tta == "none"
    return bool(inputs.use_features) and plain


def seed_fold_scores(
    inputs: TrainingInputs, assignment: np.ndarray, seeds: Sequence[int], epochs: int
) -> np.ndarray:
    """Return the best-epoch validation accuracy ``[len(seeds), k]`` of every fold for each seed.

    ``assignment`` [N]: the fold (0..k-1) of each training row, as cross-validation used it;
    ``seeds``: one CV run each, in which fold f trains with seed ``s + f`` and a head initialised
    from ``s`` (exactly what :func:`imgcls.modeling.crossval.cross_validate` does for a strategy
    whose seed is ``s``, except that the folds stay those of ``assignment``), for at most
    ``epochs`` epochs with the strategy's early stopping. Accuracies are fractions in [0, 1];
    columns are in fold order.

    Raises ValueError when ``assignment`` does not match the inputs' rows or has fewer than 2
    folds.
    """
    import torch

    from imgcls.modeling.training import train_rows

    assignment = np.asarray(assignment)
    if assignment.shape != (len(inputs.labels),):
        raise ValueError(
            f"fold assignment has shape {assignment.shape}, the inputs have {len(inputs.labels)} rows"
        )
    folds = np.unique(assignment)
    if folds.size < 2:
        raise ValueError(f"seed repetitions need at least 2 folds, got {folds.size}")
    scores = np.empty((len(seeds), folds.size))
    for row, seed in enumerate(seeds):
        start = time.perf_counter()
        # the strategy's seed decides the head initialisation (TrainingInputs.new_model)
        repeat = copy.copy(inputs)
        repeat.strategy = inputs.strategy.model_copy(update={"seed": int(seed)})
        for column, fold in enumerate(folds):
            train = torch.from_numpy(np.flatnonzero(assignment != fold))
            val = torch.from_numpy(np.flatnonzero(assignment == fold))
            _, history, best_epoch = train_rows(repeat, train, val, int(seed) + int(fold), epochs)
            scores[row, column] = history[best_epoch - 1]["val_accuracy"]
        logger.info(
            "  seed %d: mean CV accuracy %.4f (%.1fs)",
            seed,
            scores[row].mean(),
            time.perf_counter() - start,
        )
    return scores
