"""Evaluation metrics, calibration, fold-level significance tests and champion selection.

Pure numpy / scipy / scikit-learn: no torch and no MLflow, so every function can be unit
tested with hand-computed numbers. Labels are integer class indices ``0..C-1`` and
probabilities are ``[N, C]`` arrays whose rows sum to one; the prediction is the top-1 class.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.metrics import (
    average_precision_score,
    balanced_accuracy_score,
    confusion_matrix,
    log_loss,
    precision_recall_fscore_support,
    roc_auc_score,
)

from imgcls.core.names import PER_CLASS_METRICS, class_metric_keys

PROBABILITY_FLOOR = 1e-15
TIE_TOLERANCE = 1e-9
ZERO_TOLERANCE = 1e-12


def _as_inputs(y_true: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert labels [N] and probabilities [N, C] to int64 / float64 arrays."""
    y = np.asarray(y_true).astype(np.int64).reshape(-1)
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"probabilities must be 2-D [N, C], got shape {p.shape}")
    if p.shape[0] != y.shape[0]:
        raise ValueError(f"{y.shape[0]} labels but {p.shape[0]} probability rows")
    if y.size and (y.min() < 0 or y.max() >= p.shape[1]):
        raise ValueError(f"labels must lie in 0..{p.shape[1] - 1}")
    return y, p


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Return the Wilson score interval (low, high) of a proportion ``successes / n``.

    Bounds are fractions in [0, 1], from SciPy's ``binomtest(successes, n).proportion_ci(
    confidence, method="wilson")`` (Wilson 1927, no continuity correction). Returns NaNs when
    ``n <= 0``; raises ValueError when ``successes`` is outside ``0..n``.
    """
    if n <= 0:
        return (math.nan, math.nan)
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in 0..{n}, got {successes}")
    interval = stats.binomtest(int(successes), int(n)).proportion_ci(confidence, method="wilson")
    return (float(interval.low), float(interval.high))


def _binary_roc_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC of a boolean target against a score; NaN when only one class is present."""
    if positive.all() or not positive.any():
        return math.nan
    return float(roc_auc_score(positive.astype(int), score))


def _binary_average_precision(positive: np.ndarray, score: np.ndarray) -> float:
    """Average precision of a boolean target against a score; NaN when there is no positive."""
    if not positive.any():
        return math.nan
    return float(average_precision_score(positive.astype(int), score))


def _macro_ovr(y: np.ndarray, p: np.ndarray, scorer: Any) -> float:
    """Macro average of a binary scorer over one-vs-rest classes, skipping undefined classes."""
    values = [scorer(y == c, p[:, c]) for c in range(p.shape[1])]
    defined = [v for v in values if not math.isnan(v)]
    return float(np.mean(defined)) if defined else math.nan


def _log_loss(y: np.ndarray, p: np.ndarray) -> float:
    """Cross-entropy with probabilities clipped to [1e-15, 1] and rows renormalised."""
    if y.size == 0:
        return math.nan
    clipped = np.clip(p, PROBABILITY_FLOOR, 1.0)
    clipped = clipped / clipped.sum(axis=1, keepdims=True)
    return float(log_loss(y, clipped, labels=list(range(p.shape[1]))))


def _confusion_counts(y: np.ndarray, predictions: np.ndarray, n_classes: int) -> np.ndarray:
    """[C, C] int64 counts, rows = true class, columns = predicted class (zeros for no input)."""
    if y.size == 0:  # scikit-learn refuses empty input
        return np.zeros((n_classes, n_classes), dtype=np.int64)
    return confusion_matrix(y, predictions, labels=np.arange(n_classes)).astype(np.int64)


def _precision_recall_f1(
    y: np.ndarray, predictions: np.ndarray, n_classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-class precision, recall, F1 (each [C] float) and support ([C] int); 0/0 counts as 0."""
    if y.size == 0:  # scikit-learn refuses empty input
        zeros = np.zeros(n_classes)
        return zeros, zeros.copy(), zeros.copy(), np.zeros(n_classes, dtype=np.int64)
    precision, recall, f1, support = precision_recall_fscore_support(
        y, predictions, labels=np.arange(n_classes), zero_division=0
    )
    return precision, recall, f1, np.asarray(support, dtype=np.int64)


def _balanced_accuracy(y: np.ndarray, predictions: np.ndarray) -> float:
    """Mean recall over the classes present in ``y`` (scikit-learn's balanced accuracy).

    scikit-learn warns when a predicted class is absent from ``y`` and leaves that class out,
    which is the definition used here, so that one warning is silenced.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        return float(balanced_accuracy_score(y, predictions))


def classification_metrics(
    y_true: np.ndarray, probabilities: np.ndarray, classes: list[str]
) -> dict[str, float]:
    """Take labels [N], probabilities [N, C] and class names; return a flat dict of metrics.

    Keys: accuracy, balanced_accuracy, log_loss, roc_auc, pr_auc, accuracy_ci_low,
    accuracy_ci_high, n_images, precision_/recall_/f1_<class key> and macro_f1. The class key is
    the MLflow-safe form of the class name (:func:`imgcls.core.names.metric_key`: ``sea (coast)`` ->
    ``sea_coast``); tables and plots keep the class names. Raises ValueError for inputs of the
    wrong shape and imgcls.core.names.InvalidNameError for class names that give no key or the same key.
    """
    y, p = _as_inputs(y_true, probabilities)
    if p.shape[1] != len(classes):
        raise ValueError(f"{p.shape[1]} probability columns but {len(classes)} classes")
    keys = class_metric_keys(classes, "class names")
    n = int(y.size)
    predictions = p.argmax(axis=1) if n else np.zeros(0, dtype=np.int64)
    correct = int((predictions == y).sum())

    out: dict[str, float] = {}
    out["accuracy"] = correct / n if n else math.nan
    out["balanced_accuracy"] = _balanced_accuracy(y, predictions) if n else math.nan
    out["log_loss"] = _log_loss(y, p)

    if len(classes) == 2:
        out["roc_auc"] = _binary_roc_auc(y == 1, p[:, 1])
        out["pr_auc"] = _binary_average_precision(y == 1, p[:, 1])
    else:
        out["roc_auc"] = _macro_ovr(y, p, _binary_roc_auc)
        out["pr_auc"] = _macro_ovr(y, p, _binary_average_precision)

    low, high = wilson_interval(correct, n)
    out["accuracy_ci_low"] = low
    out["accuracy_ci_high"] = high
    out["n_images"] = float(n)

    precision, recall, f1, _ = _precision_recall_f1(y, predictions, len(classes))
    for index, name in enumerate(classes):
        for metric, values in zip(PER_CLASS_METRICS, (precision, recall, f1), strict=True):
            out[f"{metric}_{keys[name]}"] = float(values[index])
    out["macro_f1"] = float(np.mean(f1)) if len(classes) else math.nan
    return out


def per_class_table(
    y_true: np.ndarray, probabilities: np.ndarray, classes: list[str]
) -> pd.DataFrame:
    """Take labels [N], probabilities [N, C] and C class names; return a per-class table.

    One row per class name (index ``class``), columns precision, recall, f1 (fractions, 0/0
    counted as 0) and support (true images of the class), from scikit-learn's
    ``precision_recall_fscore_support(zero_division=0)`` on the top-1 predictions. Raises
    ValueError for inputs of the wrong shape.
    """
    y, p = _as_inputs(y_true, probabilities)
    predictions = p.argmax(axis=1) if y.size else np.zeros(0, dtype=np.int64)
    precision, recall, f1, support = _precision_recall_f1(y, predictions, len(classes))
    return pd.DataFrame(
        {
            "precision": precision.astype(float),
            "recall": recall.astype(float),
            "f1": f1.astype(float),
            "support": support.astype(int),
        },
        index=pd.Index(classes, name="class"),
    )


def confusion(y_true: np.ndarray, predictions: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """Take true [N] and predicted [N] labels and C class names; return the [C, C] count table.

    Rows ``true: <class>``, columns ``predicted: <class>``, counts of images from scikit-learn's
    ``confusion_matrix(labels=0..C-1)`` (all zeros for N = 0). Raises ValueError when the
    lengths differ or a label lies outside ``0..C-1``.
    """
    y = np.asarray(y_true).astype(np.int64).reshape(-1)
    yhat = np.asarray(predictions).astype(np.int64).reshape(-1)
    if yhat.shape != y.shape:
        raise ValueError(f"{y.size} labels but {yhat.size} predictions")
    for values in (y, yhat):
        if values.size and (values.min() < 0 or values.max() >= len(classes)):
            raise ValueError(f"labels and predictions must lie in 0..{len(classes) - 1}")
    matrix = _confusion_counts(y, yhat, len(classes))
    return pd.DataFrame(
        matrix,
        index=[f"true: {name}" for name in classes],
        columns=[f"predicted: {name}" for name in classes],
    )


def calibration_bins(
    y_true: np.ndarray, probabilities: np.ndarray, n_bins: int = 10
) -> pd.DataFrame:
    """Take labels and probabilities; return the top-1 reliability table (non-empty bins only).

    Bins split [0, 1] into ``n_bins`` equal widths, right-inclusive: (low, high]; a
    confidence of exactly 0 falls in the first bin. Columns: bin_low, bin_high,
    mean_confidence, accuracy, count.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    y, p = _as_inputs(y_true, probabilities)
    columns = ["bin_low", "bin_high", "mean_confidence", "accuracy", "count"]
    if y.size == 0:
        return pd.DataFrame(columns=columns)
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(float)
    index = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    rows = []
    for b in range(n_bins):
        mask = index == b
        count = int(mask.sum())
        if count == 0:
            continue
        rows.append(
            {
                "bin_low": b / n_bins,
                "bin_high": (b + 1) / n_bins,
                "mean_confidence": float(confidence[mask].mean()),
                "accuracy": float(correct[mask].mean()),
                "count": count,
            }
        )
    return pd.DataFrame(rows, columns=columns)


def expected_calibration_error(
    y_true: np.ndarray, probabilities: np.ndarray, n_bins: int = 10
) -> float:
    """Take labels and probabilities; return the count-weighted mean |accuracy - confidence|."""
    bins = calibration_bins(y_true, probabilities, n_bins)
    total = int(bins["count"].sum()) if len(bins) else 0
    if total == 0:
        return math.nan
    gaps = (bins["accuracy"] - bins["mean_confidence"]).abs()
    return float((gaps * bins["count"]).sum() / total)


def corrected_resampled_ttest(
    scores_a: Sequence[float], scores_b: Sequence[float], n_train: int, n_test: int
) -> tuple[float, float]:
    """Take paired per-fold scores and fold sizes; return Nadeau-Bengio corrected (t, p).

    d = a - b over k folds, t = mean(d) / sqrt((1/k + n_test/n_train) * var(d, ddof=1)),
    two-sided p from Student's t with k - 1 degrees of freedom.
    """
    a = np.asarray(scores_a, dtype=np.float64).reshape(-1)
    b = np.asarray(scores_b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"score lists differ in length: {a.size} vs {b.size}")
    k = a.size
    if k < 2:
        raise ValueError(f"need at least 2 folds, got {k}")
    if n_train <= 0 or n_test <= 0:
        raise ValueError(f"n_train and n_test must be positive, got {n_train}, {n_test}")
    d = a - b
    mean = float(d.mean())
    # Differences of fold scores carry float noise (0.9 - 0.8 != 0.8 - 0.7), so "all zero" and
    # "all equal" are judged to within 1e-12 rather than exactly.
    if np.all(np.abs(d) <= ZERO_TOLERANCE):
        return (0.0, 1.0)
    if np.all(np.abs(d - d[0]) <= ZERO_TOLERANCE):
        return (math.copysign(math.inf, mean), 0.0)
    variance = float(d.var(ddof=1))
    t = mean / math.sqrt((1.0 / k + n_test / n_train) * variance)
    p = float(2.0 * stats.t.sf(abs(t), df=k - 1))
    return (float(t), p)


def quality_gate(accuracy: float, min_accuracy: float) -> dict[str, Any]:
    """Take a test accuracy and a threshold; return passed flag, margin and a readable message."""
    margin = accuracy - min_accuracy
    passed = bool(accuracy >= min_accuracy)
    if passed:
        message = (
            f"PASSED: test accuracy {accuracy:.3f} >= {min_accuracy:.3f} (margin {margin:+.3f})"
        )
    else:
        message = (
            f"FAILED: test accuracy {accuracy:.3f} < {min_accuracy:.3f} (short by {-margin:.3f})"
        )
    return {
        "passed": passed,
        "accuracy": accuracy,
        "min_accuracy": min_accuracy,
        "margin": margin,
        "message": message,
    }


def choose_champion(table: pd.DataFrame) -> str:
    """Take one row per candidate (index = name); return the champion's name, on CV only.

    Highest ``cv_accuracy_mean`` wins; ties (within 1e-9) go to the lower ``cv_loss_mean``,
    then the lower ``train_seconds``, then the earlier row. Every other column (test-set
    metrics included) is ignored. Missing values rank last.
    """
    if table is None or len(table) == 0:
        raise ValueError("choose_champion needs at least one candidate")
    if "cv_accuracy_mean" not in table.columns:
        raise ValueError("table lacks the cv_accuracy_mean column")
    # Each key is "higher is better" after the sign flip, with NaN ranked last.
    keys: list[np.ndarray] = [
        np.nan_to_num(table["cv_accuracy_mean"].to_numpy(dtype=float), nan=-np.inf)
    ]
    for column in ("cv_loss_mean", "train_seconds"):
        if column in table.columns:
            values = table[column].to_numpy(dtype=float)
            keys.append(-np.nan_to_num(values, nan=np.inf))
    candidates = np.arange(len(table))
    for key in keys:
        values = key[candidates]
        best = values.max()
        keep = values == best if np.isinf(best) else values >= best - TIE_TOLERANCE
        candidates = candidates[keep]
        if candidates.size == 1:
            break
    return str(table.index[int(candidates[0])])


def compare_to_best(
    fold_scores: dict[str, Sequence[float]], best: str, n_train: int, n_test: int
) -> pd.DataFrame:
    """Take per-fold scores by candidate and the best's name; return diff, t and p vs the best.

    Columns: mean_difference (best - other), t, p_value; the best's own row holds NaNs.
    """
    if best not in fold_scores:
        raise ValueError(f"best candidate {best!r} not among {sorted(fold_scores)}")
    reference = fold_scores[best]
    rows: dict[str, dict[str, float]] = {}
    for name, scores in fold_scores.items():
        if name == best:
            rows[name] = {"mean_difference": math.nan, "t": math.nan, "p_value": math.nan}
            continue
        t, p = corrected_resampled_ttest(reference, scores, n_train, n_test)
        difference = float(np.mean(np.asarray(reference, float) - np.asarray(scores, float)))
        rows[name] = {"mean_difference": difference, "t": t, "p_value": p}
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame = frame.reindex(columns=["mean_difference", "t", "p_value"])
    frame.index.name = "candidate"
    return frame
