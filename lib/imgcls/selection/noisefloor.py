"""The noise floor of a champion: run-to-run spread and the smallest difference folds can detect.

Pure numpy / scipy, no MLflow. Inputs are plain scores (fractions); the result is a frozen
:class:`NoiseFloor` holding every number a report needs. Sources: Nadeau & Bengio (2003),
"Inference for the Generalization Error", Machine Learning 52(3), for the variance of a mean over
overlapping cross-validation folds; the usual power approximation of a paired t-test (e.g. Chow,
Shao & Wang, "Sample Size Calculations in Clinical Research", 2nd ed. 2008, ch. 3).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from imgcls.selection.promotion import check_scores

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NoiseFloor:
    """How large a difference the current folds can tell from run-to-run noise.

    ``run_sd``: standard deviation of one fold's score between runs (``source`` "seeds":
    repeated training with different seeds on the same folds, pooled over folds; "folds": the
    spread of the k fold scores). ``n_runs``: the seed repetitions, or k for "folds". ``difference_sd``:
    the assumed standard deviation of a paired fold difference, sqrt(2) * run_sd.
    ``min_detectable_difference``: the smallest true mean difference the corrected t-test over
    ``k`` folds detects at ``alpha`` (two-sided) with probability ``power`` (see
    :func:`noise_floor`). All in the metric's units (fractions).
    """

    run_sd: float
    source: str
    n_runs: int
    k: int
    n_train: float
    n_test: float
    alpha: float
    power: float
    difference_sd: float
    min_detectable_difference: float

    def closer_than_floor(self, points: Mapping[str, float], champion: str) -> list[str]:
        """Return the grid points closer to ``champion`` than the floor (see the module function)."""
        return closer_than_floor(points, champion, self.min_detectable_difference)


def noise_floor(
    seed_scores: Sequence[Sequence[float]] | np.ndarray | None,
    fold_scores: Sequence[float],
    n_train: float,
    n_test: float,
    alpha: float = 0.05,
    power: float = 0.8,
) -> NoiseFloor:
    """Return the champion's noise floor: run-to-run spread and the smallest detectable difference.

    ``seed_scores`` [r, k]: the per-fold scores of r >= 2 repeated trainings on the same k folds
    that differ only in the seed (for frozen backbones: the head re-trained on cached features,
    :mod:`imgcls.modeling.seeds`); None or empty: use the fold spread. ``fold_scores`` [k]: the
    champion's per-fold scores; ``n_train`` / ``n_test``: the training and validation images per
    fold. Scores are fractions.

    With seeds, run_sd = sqrt(mean over folds of var(seed_scores[:, f], ddof=1)): the pooled
    within-fold spread between runs, fold difficulty removed. Without, run_sd =
    std(fold_scores, ddof=1). Assumption: two
    models differ run to run independently with the same spread, so a paired fold difference has
    variance s^2 = 2 * run_sd^2 (conservative when fold scores are positively correlated, as the
    same folds make them; the fold spread also holds fold-to-fold difficulty, so it overstates
    run-to-run noise). With the Nadeau & Bengio (2003) variance factor and Student t quantiles
    (the usual power approximation for a paired t-test, e.g. Chow, Shao & Wang, "Sample Size
    Calculations in Clinical Research", 2nd ed. 2008, ch. 3):

        mdd = (t_{1-alpha/2, k-1} + t_{power, k-1}) * sqrt((1/k + n_test/n_train) * s^2)

    Raises ValueError for fewer than 2 fold scores, seed scores that are not [r >= 2, k] with
    the k of ``fold_scores``, a score that is not a finite fraction, non-positive fold sizes, alpha outside (0, 1) or power outside [0.5, 1).
    """
    folds = check_scores(fold_scores, "fold")
    k = int(folds.size)
    if k < 2:
        raise ValueError(f"need the scores of at least 2 folds, got {k}")
    seeds = None
    if seed_scores is not None and len(seed_scores) > 0:
        seeds = np.asarray(seed_scores, dtype=np.float64)
        if seeds.ndim != 2 or seeds.shape[0] < 2 or seeds.shape[1] != k:
            raise ValueError(
                f"seed scores must be [repetitions >= 2, {k} folds], got shape {seeds.shape}; "
                "a run-to-run spread needs at least 2 seed repetitions (pass None to use folds)"
            )
        check_scores(seeds, "seed")
    if not (n_train > 0 and n_test > 0):
        raise ValueError(f"n_train and n_test must be positive, got {n_train}, {n_test}")
    if not 0.0 < alpha < 1.0 or not 0.5 <= power < 1.0:
        raise ValueError(f"alpha must lie in (0, 1) and power in [0.5, 1), got {alpha}, {power}")
    if seeds is None:
        run_sd, n_runs = float(folds.std(ddof=1)), k
    else:
        run_sd, n_runs = float(np.sqrt(seeds.var(axis=0, ddof=1).mean())), int(seeds.shape[0])
    difference_sd = math.sqrt(2.0) * run_sd
    quantiles = float(stats.t.ppf(1.0 - alpha / 2.0, k - 1) + stats.t.ppf(power, k - 1))
    mdd = quantiles * math.sqrt((1.0 / k + n_test / n_train) * difference_sd**2)
    floor = NoiseFloor(
        run_sd=run_sd,
        source="folds" if seeds is None else "seeds",
        n_runs=n_runs,
        k=k,
        n_train=float(n_train),
        n_test=float(n_test),
        alpha=float(alpha),
        power=float(power),
        difference_sd=difference_sd,
        min_detectable_difference=mdd,
    )
    logger.info(
        "noise floor: run-to-run sd %.4f (%s), smallest detectable difference %.4f over %d folds",
        run_sd,
        floor.source,
        mdd,
        k,
    )
    return floor


def closer_than_floor(
    points: Mapping[str, float], champion: str, floor: float | NoiseFloor
) -> list[str]:
    """Return the grid points whose score lies closer to the champion's than ``floor``.

    ``points``: grid point name -> mean score (e.g. CV accuracy); ``floor``: a difference in the
    same units, or a :class:`NoiseFloor` (its ``min_detectable_difference``). A point counts when
    |score - champion's score| < floor; the champion itself and NaN scores are left out. Sorted
    by distance to the champion, nearest first (ties in ``points`` order). Raises ValueError when
    ``champion`` is not among ``points`` or its score is NaN.
    """
    limit = floor.min_detectable_difference if isinstance(floor, NoiseFloor) else float(floor)
    if champion not in points:
        raise ValueError(f"champion {champion!r} is not among the grid points {sorted(points)}")
    best = float(points[champion])
    if math.isnan(best):
        raise ValueError(f"champion {champion!r} has no score (NaN)")
    gaps = {
        name: abs(float(score) - best)
        for name, score in points.items()
        if name != champion and not math.isnan(float(score))
    }
    return sorted((name for name, gap in gaps.items() if gap < limit), key=lambda n: gaps[n])
