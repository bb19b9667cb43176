"""Promotion of a challenger over the previous champion, Holm-adjusted p-values, the noise floor.

Pure numpy / scipy, no MLflow: inputs are plain per-fold scores (fractions, e.g. fold validation
accuracy), fold sizes and costs; outputs are frozen dataclasses that hold every number a report or
a registry tag needs. The grid file's ``promotion:`` section
(:class:`imgcls.core.strategy.PromotionSettings`) supplies ``rope`` and ``alpha``.

Sources:

* Variance correction of the paired t-test over cross-validation folds: Nadeau & Bengio (2003),
  "Inference for the Generalization Error", Machine Learning 52(3), 239-281: the variance of the
  mean of k fold differences is ``(1/k + n_test/n_train) * s^2``, not ``s^2 / k``, because the
  training sets overlap (:func:`imgcls.evaluation.metrics.corrected_resampled_ttest`).
* Region of practical equivalence (ROPE): Kruschke (2018), "Rejecting or accepting parameter
  values in Bayesian estimation", AMPPS 1(2); for comparing classifiers, Benavoli, Corani,
  Demsar & Zaffalon (2017), "Time for a change: a tutorial for comparing multiple classifiers
  through Bayesian analysis", JMLR 18(77). Here the ROPE is used with the frequentist interval:
  the decision interval at confidence ``1 - 2 * alpha`` is the two one-sided tests (TOST) of
  Schuirmann (1987), J. Pharmacokinetics and Biopharmaceutics 15(6), 657-680.
* Holm (1979), "A simple sequentially rejective multiple test procedure", Scandinavian Journal
  of Statistics 6(2), 65-70.

The noise floor (run-to-run spread, smallest detectable difference) is in
:mod:`imgcls.selection.noisefloor`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from imgcls.evaluation.metrics import ZERO_TOLERANCE, corrected_resampled_ttest

logger = logging.getLogger(__name__)

Cost = tuple[float, float]  # (training seconds, latency in ms per image); NaN = unknown


class Verdict(StrEnum):
    """What happens to the ``champion`` alias: the challenger takes it, or the incumbent keeps it."""

    PROMOTE = "PROMOTE"
    KEEP = "KEEP"
    EQUIVALENT_CHEAPER = "EQUIVALENT_CHEAPER"


@dataclass(frozen=True)
class PromotionVerdict:
    """A promotion decision and every number behind it (see :func:`decide_promotion`).

    Differences are challenger - incumbent, as fractions of the metric (0.01 = 1 accuracy point).
    Without an incumbent every statistic is NaN and ``k`` is the challenger's fold count.
    """

    verdict: Verdict
    reason: str
    mean_difference: float
    ci_low: float
    ci_high: float
    confidence: float  # 1 - 2 * alpha
    t: float  # corrected t of "difference > rope" (mean_difference - rope) / se
    p_value: float  # one-sided p of "difference > rope"; PROMOTE exactly when p_value < alpha
    p_equivalence: float  # TOST p of "-rope < difference < rope" (the larger one-sided p)
    t_difference: float  # corrected two-sided t-test of "difference != 0" (metrics)
    p_difference: float
    rope: float
    alpha: float
    k: int
    n_train: float
    n_test: float
    fold_differences: tuple[float, ...]
    challenger_cost: Cost | None
    incumbent_cost: Cost | None
    challenger_cheaper: bool | None  # None: no incumbent or a cost unknown
    metric: str

    @property
    def promoted(self) -> bool:
        """True when the challenger becomes champion (PROMOTE or EQUIVALENT_CHEAPER)."""
        return self.verdict is not Verdict.KEEP

    def as_dict(self) -> dict[str, Any]:
        """Return the verdict as a flat, JSON-serialisable dict (verdict as its name, tuples as
        lists), e.g. for registry tags or a report table."""
        record = asdict(self)
        record["verdict"] = self.verdict.value
        for key in ("fold_differences", "challenger_cost", "incumbent_cost"):
            record[key] = None if record[key] is None else list(record[key])
        return record


def check_scores(values: Sequence[float], who: str) -> np.ndarray:
    """Return scores [k] (fractions) as a float64 array.

    Raises ValueError naming ``who`` and the fold of a score that is not a finite fraction in
    [0, 1] (a percentage such as 95 included).
    """
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    for fold, value in enumerate(array):
        if not math.isfinite(value) or not 0.0 <= value <= 1.0:
            raise ValueError(
                f"{who} score of fold {fold} is {value}; scores must be finite fractions in "
                "[0, 1] (accuracy 0.95, not 95)"
            )
    return array


def _cost(value: Sequence[float] | None, who: str) -> Cost | None:
    """Return a (training seconds, latency ms per image) pair; ValueError when malformed."""
    if value is None:
        return None
    pair = tuple(float(v) for v in value)
    if len(pair) != 2 or any(v < 0 for v in pair if not math.isnan(v)):
        raise ValueError(
            f"{who} cost must be (training seconds, latency ms per image), both >= 0 or NaN "
            f"(unknown), got {value!r}"
        )
    return (pair[0], pair[1])


def _cheaper(challenger: Cost | None, incumbent: Cost | None) -> bool | None:
    """Lexicographic: lower training seconds, then lower latency. None when a cost that the
    comparison needs is unknown (a latency is needed only when the training seconds tie; notebook
    03 logs it as ``latency_ms_per_image``, :mod:`imgcls.evaluation.latency`)."""
    if challenger is None or incumbent is None or math.isnan(challenger[0] + incumbent[0]):
        return None
    if challenger[0] != incumbent[0]:
        return challenger[0] < incumbent[0]
    if math.isnan(challenger[1] + incumbent[1]):
        return None
    return challenger[1] < incumbent[1]


def _one_sided(excess: float, se: float, df: int) -> tuple[float, float]:
    """Return (t, P(T_df > t)) for t = excess / se; a zero se gives t = +-inf or 0 (p 0, 1, 0.5)."""
    if se > 0:
        t = excess / se
        return (t, float(stats.t.sf(t, df)))
    if abs(excess) <= ZERO_TOLERANCE:
        return (0.0, 0.5)
    return (math.copysign(math.inf, excess), 0.0 if excess > 0 else 1.0)


def _points(value: float) -> str:
    return f"{100 * value:+.2f}"


def _cost_text(challenger: Cost | None, incumbent: Cost | None) -> str:
    if challenger is None or incumbent is None:
        return "costs unknown"
    return (
        f"training {challenger[0]:.1f} s vs {incumbent[0]:.1f} s, "
        f"latency {challenger[1]:.2f} vs {incumbent[1]:.2f} ms/image"
    )


def decide_promotion(
    challenger_scores: Sequence[float],
    incumbent_scores: Sequence[float] | None,
    n_train: float,
    n_test: float,
    rope: float = 0.005,
    alpha: float = 0.05,
    challenger_cost: Sequence[float] | None = None,
    incumbent_cost: Sequence[float] | None = None,
    *,
    metric: str = "fold_val_accuracy",
) -> PromotionVerdict:
    """Decide whether a challenger replaces the incumbent champion, from paired fold scores.

    Inputs: ``challenger_scores`` and ``incumbent_scores`` are per-fold scores [k] of the SAME k
    folds (same data version, fold count and seed), fractions in [0, 1], higher is better;
    ``incumbent_scores`` is None when there is no previous champion. ``n_train`` / ``n_test``
    are the training and validation images per fold (their mean when folds differ by one).
    ``rope`` (a fraction; 0.005 = 0.5 accuracy points) and ``alpha`` come from the grid file's
    ``promotion:`` section. Costs are (training seconds, latency ms per image); NaN = unknown.

    Rule. d = challenger - incumbent per fold; se = sqrt((1/k + n_test/n_train) * var(d, ddof=1))
    (Nadeau & Bengio 2003); the decision interval is mean(d) +- t_{1-alpha, k-1} * se, of
    confidence 1 - 2 * alpha (the two one-sided tests of Schuirmann 1987). Then:

    * PROMOTE when the interval's lower end lies above +rope (equivalently, the one-sided
      corrected t-test of "difference > rope" has p < alpha), or when there is no incumbent;
    * EQUIVALENT_CHEAPER when the whole interval lies inside [-rope, +rope] (a difference of
      practical equivalence, Kruschke 2018; Benavoli et al. 2017) and the challenger is cheaper:
      lower training seconds, then lower latency (lexicographic; a tie is not cheaper; an
      unknown latency matters only when the training seconds tie);
    * KEEP otherwise: the challenger is worse, not better by more than the rope, equivalent but
      not cheaper (or a cost unknown), or the interval is too wide to tell.

    Bounds are compared within 1e-12 (``metrics.ZERO_TOLERANCE``), so a difference of exactly
    ``rope`` (as fold scores give it, with float noise) is equivalent, not better. With
    zero-variance differences the interval is the single point mean(d).

    Raises ValueError naming the problem for score lists of different lengths (not the same
    folds), fewer than 2 folds, a score that is not a finite fraction, non-positive fold sizes,
    ``rope`` outside [0, 1), ``alpha`` outside (0, 0.5), or a malformed cost.
    """
    challenger = check_scores(challenger_scores, "challenger")
    costs = (_cost(challenger_cost, "challenger"), _cost(incumbent_cost, "incumbent"))
    if not 0.0 <= rope < 1.0:
        raise ValueError(f"rope must be a fraction in [0, 1) (0.005 = 0.5 points), got {rope}")
    if not 0.0 < alpha < 0.5:
        raise ValueError(f"alpha must lie in (0, 0.5) (the interval is 1 - 2*alpha), got {alpha}")
    if not (n_train > 0 and n_test > 0):
        raise ValueError(f"n_train and n_test must be positive, got {n_train}, {n_test}")
    k = int(challenger.size)
    if k < 2:
        raise ValueError(f"need the scores of at least 2 folds, got {k}")
    nan = math.nan
    common = dict(
        rope=float(rope),
        alpha=float(alpha),
        confidence=1.0 - 2.0 * alpha,
        k=k,
        n_train=float(n_train),
        n_test=float(n_test),
        challenger_cost=costs[0],
        incumbent_cost=costs[1],
        metric=metric,
    )
    if incumbent_scores is None:
        verdict = PromotionVerdict(
            Verdict.PROMOTE, "PROMOTE: no previous champion", nan, nan, nan,
            t=nan, p_value=nan, p_equivalence=nan, t_difference=nan, p_difference=nan,
            fold_differences=(), challenger_cheaper=None, **common,
        )  # fmt: skip
        logger.info("promotion: %s", verdict.reason)
        return verdict
    incumbent = check_scores(incumbent_scores, "incumbent")
    if incumbent.size != k:
        raise ValueError(
            f"the challenger has {k} fold scores but the incumbent {incumbent.size}: a paired "
            "comparison needs the same folds (same data version, folds and seed); re-train the "
            "incumbent on the challenger's folds"
        )
    d = challenger - incumbent
    mean = float(d.mean())
    same = bool(np.all(np.abs(d - d[0]) <= ZERO_TOLERANCE))
    se = 0.0 if same else math.sqrt((1.0 / k + n_test / n_train) * float(d.var(ddof=1)))
    half = float(stats.t.ppf(1.0 - alpha, k - 1)) * se
    low, high = mean - half, mean + half
    t, p = _one_sided(mean - rope, se, k - 1)
    p_equivalence = max(
        _one_sided(mean + rope, se, k - 1)[1], _one_sided(rope - mean, se, k - 1)[1]
    )
    t_difference, p_difference = corrected_resampled_ttest(challenger, incumbent, n_train, n_test)
    cheaper = _cheaper(*costs)

    level = f"{100 * (1 - 2 * alpha):.0f}%"
    numbers = (
        f"mean difference {_points(mean)} points, {level} interval [{_points(low)}, "
        f"{_points(high)}] over {k} folds, rope {100 * rope:.2f} points, one-sided p {p:.3g} "
        "for a gain above the rope"
    )
    tol = ZERO_TOLERANCE
    if low > rope + tol:
        kind, why = Verdict.PROMOTE, "the challenger is better by more than the rope"
    elif low >= -rope - tol and high <= rope + tol:
        if cheaper:
            kind, why = Verdict.EQUIVALENT_CHEAPER, "equivalent within the rope and cheaper"
        elif cheaper is None:
            kind, why = Verdict.KEEP, "equivalent within the rope but a cost is unknown"
        else:
            kind, why = Verdict.KEEP, "equivalent within the rope but not cheaper"
        why += f" ({_cost_text(*costs)})"
    elif high < -rope - tol:
        kind, why = Verdict.KEEP, "the challenger is worse by more than the rope"
    elif high <= rope + tol:
        kind, why = Verdict.KEEP, "the challenger is not better by more than the rope"
    else:
        kind, why = Verdict.KEEP, "the interval is too wide to show a gain larger than the rope"
    verdict = PromotionVerdict(
        kind, f"{kind.value}: {why}: {numbers}.", mean, low, high,
        t=t, p_value=p, p_equivalence=p_equivalence, t_difference=t_difference,
        p_difference=p_difference, fold_differences=tuple(float(x) for x in d),
        challenger_cheaper=cheaper, **common,
    )  # fmt: skip
    logger.info("promotion: %s", verdict.reason)
    return verdict


def holm(p_values: Mapping[str, float]) -> dict[str, float]:
    """Return Holm-Bonferroni adjusted p-values (Holm 1979), keyed and ordered as given.

    With the m non-NaN p-values sorted ascending p_(1) <= ... <= p_(m), the adjusted value of
    p_(i) is max over j <= i of min(1, (m - j + 1) * p_(j)): monotone in p and capped at 1
    (statsmodels' ``multipletests(method="holm")``). NaN stays NaN and does not count in m.
    Raises ValueError naming the key of a p-value outside [0, 1].
    """
    for name, p in p_values.items():
        if not math.isnan(p) and not 0.0 <= p <= 1.0:
            raise ValueError(f"p-value of {name!r} is {p}; p-values lie in [0, 1]")
    finite = sorted(((p, n) for n, p in p_values.items() if not math.isnan(p)), key=lambda x: x[0])
    m = len(finite)
    adjusted: dict[str, float] = {}
    running = 0.0
    for i, (p, name) in enumerate(finite):
        running = max(running, min(1.0, (m - i) * p))
        adjusted[name] = running
    return {name: adjusted.get(name, math.nan) for name in p_values}


def with_holm(table: pd.DataFrame, column: str = "p_value") -> pd.DataFrame:
    """Return a copy of ``table`` (e.g. :func:`metrics.compare_to_best`'s) with ``p_holm``.

    ``p_holm`` is :func:`holm` over ``table[column]`` (the rows are the comparisons of one grid;
    NaN rows, such as the best's own, stay NaN). Raises KeyError naming a missing column.
    """
    if column not in table.columns:
        raise KeyError(f"table has no column {column!r}; columns: {list(table.columns)}")
    out = table.copy()
    adjusted = holm({str(i): float(p) for i, p in zip(range(len(out)), out[column], strict=True)})
    out["p_holm"] = [adjusted[str(i)] for i in range(len(out))]
    return out
