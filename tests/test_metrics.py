"""Hand-computed checks of imgcls.evaluation.metrics and smoke tests of imgcls.reporting.plots."""

from __future__ import annotations

import math
import warnings

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from scipy import stats

from imgcls.evaluation import metrics
from imgcls.reporting import plots

Z95 = 1.959963984540054  # two-sided 95% normal quantile

# Six images, classes forest=0 / sea=1. Column 1 (sea) scores: 0.1 0.2 0.3 0.6 0.9 0.4, so the
# top-1 predictions are 0 0 0 1 1 0 against the truth 0 0 0 0 1 1.
CLASSES = ["forest", "sea"]
Y6 = np.array([0, 0, 0, 0, 1, 1])
SEA6 = np.array([0.1, 0.2, 0.3, 0.6, 0.9, 0.4])
P6 = np.column_stack([1 - SEA6, SEA6])


def _wilson_by_hand(k: int, n: int) -> tuple[float, float]:
    phat = k / n
    centre = (phat + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 / (1 + Z95**2 / n) * math.sqrt(phat * (1 - phat) / n + Z95**2 / (4 * n * n))
    return centre - half, centre + half


# ----------------------------------------------------------------------------- Wilson interval


def test_wilson_8_of_10_known_value() -> None:
    low, high = metrics.wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4)
    assert high == pytest.approx(0.9433, abs=1e-4)


def test_wilson_32_of_35_by_hand() -> None:
    # phat = 0.9142857, z^2/n = 0.1097560, denominator = 1.1097560
    # centre = (0.9142857 + 0.0548780) / 1.1097560 = 0.8733124
    # half = 1.959964 / 1.1097560 * sqrt(0.0022391 + 0.0007840) = 0.0971052
    low, high = metrics.wilson_interval(32, 35)
    assert (low, high) == pytest.approx(_wilson_by_hand(32, 35), abs=1e-12)
    assert low == pytest.approx(0.7762, abs=1e-4)
    assert high == pytest.approx(0.9704, abs=1e-4)
    # The Wald interval (0.9143 +- 0.0927) would give 0.8215 / 1.0070: a wrong formula fails.
    assert high < 1.0


def _wilson_closed_form(k: int, n: int, confidence: float) -> tuple[float, float]:
    """The Wilson (1927) score interval as the module computed it before SciPy took over."""
    z = float(stats.norm.ppf(0.5 + confidence / 2))
    phat = k / n
    denominator = 1 + z * z / n
    centre = (phat + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


@pytest.mark.parametrize(
    ("k", "n"), [(0, 1), (1, 1), (0, 7), (7, 7), (3, 7), (4, 6), (32, 35), (1, 1000), (949, 949)]
)
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_wilson_equals_closed_form_to_1e_12(k: int, n: int, confidence: float) -> None:
    low, high = metrics.wilson_interval(k, n, confidence)
    expected_low, expected_high = _wilson_closed_form(k, n, confidence)
    assert abs(low - expected_low) <= 1e-12
    assert abs(high - expected_high) <= 1e-12
    assert 0.0 <= low <= k / n <= high <= 1.0


def test_wilson_rejects_successes_outside_0_to_n() -> None:
    with pytest.raises(ValueError, match=r"0\.\.10"):
        metrics.wilson_interval(11, 10)
    with pytest.raises(ValueError, match=r"0\.\.10"):
        metrics.wilson_interval(-1, 10)


def test_wilson_edges() -> None:
    assert all(math.isnan(v) for v in metrics.wilson_interval(0, 0))
    low, high = metrics.wilson_interval(10, 10)
    assert high == pytest.approx(1.0)
    assert low == pytest.approx(10 / (10 + Z95**2), abs=1e-12)  # closed form at phat = 1


# ----------------------------------------------------------------------- classification metrics


def test_classification_metrics_six_samples_by_hand() -> None:
    m = metrics.classification_metrics(Y6, P6, CLASSES)
    assert m["n_images"] == 6
    assert m["accuracy"] == pytest.approx(4 / 6)
    # recall forest 3/4, recall sea 1/2 -> balanced accuracy (0.75 + 0.5) / 2
    assert m["balanced_accuracy"] == pytest.approx(0.625)
    # predicted forest: rows 0,1,2,5 (3 correct); predicted sea: rows 3,4 (1 correct)
    assert m["precision_forest"] == pytest.approx(3 / 4)
    assert m["recall_forest"] == pytest.approx(3 / 4)
    assert m["f1_forest"] == pytest.approx(3 / 4)
    assert m["precision_sea"] == pytest.approx(1 / 2)
    assert m["recall_sea"] == pytest.approx(1 / 2)
    assert m["f1_sea"] == pytest.approx(1 / 2)
    assert m["macro_f1"] == pytest.approx(0.625)
    # ROC AUC: positives 0.9 and 0.4 vs negatives 0.1 0.2 0.3 0.6 -> 4 + 3 of 8 pairs
    assert m["roc_auc"] == pytest.approx(7 / 8)
    # AP: ranks 0.9 (P, recall .5, precision 1), 0.6 (N), 0.4 (P, recall 1, precision 2/3)
    assert m["pr_auc"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    low, high = _wilson_by_hand(4, 6)
    assert m["accuracy_ci_low"] == pytest.approx(low)
    assert m["accuracy_ci_high"] == pytest.approx(high)
    expected_loss = -np.mean(np.log([0.9, 0.8, 0.7, 0.4, 0.9, 0.4]))
    assert m["log_loss"] == pytest.approx(expected_loss)


def test_log_loss_two_samples() -> None:
    y = np.array([0, 1])
    p = np.array([[0.8, 0.2], [0.4, 0.6]])
    m = metrics.classification_metrics(y, p, CLASSES)
    # -(ln 0.8 + ln 0.6) / 2 = (0.2231436 + 0.5108256) / 2
    assert m["log_loss"] == pytest.approx(0.3669846, abs=1e-7)
    assert m["log_loss"] == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2)


def test_log_loss_clips_zero_probability() -> None:
    y = np.array([0, 1])
    p = np.array([[0.0, 1.0], [0.0, 1.0]])
    m = metrics.classification_metrics(y, p, CLASSES)
    assert m["log_loss"] == pytest.approx(-math.log(1e-15) / 2, rel=1e-6)


def test_single_class_present_gives_nan_auc_and_no_crash() -> None:
    y = np.array([1, 1, 1])
    p = np.array([[0.2, 0.8], [0.6, 0.4], [0.1, 0.9]])
    m = metrics.classification_metrics(y, p, CLASSES)
    assert math.isnan(m["roc_auc"])
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert math.isfinite(m["log_loss"])
    y0 = np.array([0, 0])
    m0 = metrics.classification_metrics(y0, np.array([[0.9, 0.1], [0.3, 0.7]]), CLASSES)
    assert math.isnan(m0["roc_auc"])
    assert math.isnan(m0["pr_auc"])


def test_multiclass_metrics_macro_ovr() -> None:
    classes = ["a", "b", "c"]
    y = np.array([0, 1, 2, 0, 1, 2])
    p = np.eye(3)[y] * 0.7 + 0.1  # every row correct with confidence 0.8
    m = metrics.classification_metrics(y, p, classes)
    assert m["accuracy"] == 1.0
    assert m["roc_auc"] == pytest.approx(1.0)
    assert m["pr_auc"] == pytest.approx(1.0)
    assert m["log_loss"] == pytest.approx(-math.log(0.8))
    assert set(m) >= {f"{k}_{c}" for k in ("precision", "recall", "f1") for c in classes}


def test_per_class_table() -> None:
    table = metrics.per_class_table(Y6, P6, CLASSES)
    assert list(table.index) == CLASSES
    assert list(table.columns) == ["precision", "recall", "f1", "support"]
    assert table.loc["forest", "support"] == 4
    assert table.loc["sea", "recall"] == pytest.approx(0.5)


def test_confusion_shape_and_counts() -> None:
    frame = metrics.confusion(Y6, P6.argmax(axis=1), CLASSES)
    assert frame.shape == (2, 2)
    assert list(frame.index) == ["true: forest", "true: sea"]
    assert list(frame.columns) == ["predicted: forest", "predicted: sea"]
    assert frame.to_numpy().tolist() == [[3, 1], [1, 1]]
    assert frame.to_numpy().sum() == 6


def _random_predictions(
    seed: int, n: int, n_classes: int, absent: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded labels [n] and probability rows [n, C]; class ``absent`` never occurs in y."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, size=n)
    if absent is not None:
        y[y == absent] = (absent + 1) % n_classes
    logits = rng.normal(size=(n, n_classes)) + 1.5 * np.eye(n_classes)[y]
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, p


CASES = [(0, 200, 2, None), (1, 97, 3, None), (2, 150, 4, 2), (3, 5, 5, None)]


@pytest.mark.parametrize(("seed", "n", "n_classes", "absent"), CASES)
def test_per_class_scores_and_confusion_equal_counting_by_hand(seed, n, n_classes, absent):
    y, p = _random_predictions(seed, n, n_classes, absent)
    predictions = p.argmax(axis=1)
    classes = [f"c{c}" for c in range(n_classes)]
    counts = np.zeros((n_classes, n_classes), dtype=int)
    for truth, guess in zip(y, predictions, strict=True):
        counts[truth, guess] += 1
    frame = metrics.confusion(y, predictions, classes)
    assert frame.to_numpy().tolist() == counts.tolist()

    table = metrics.per_class_table(y, p, classes)
    scores = metrics.classification_metrics(y, p, classes)
    for c, name in enumerate(classes):
        hits = counts[c, c]
        precision = hits / counts[:, c].sum() if counts[:, c].sum() else 0.0
        recall = hits / counts[c].sum() if counts[c].sum() else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        row = table.loc[name]
        assert (row["precision"], row["recall"], row["f1"]) == pytest.approx(
            (precision, recall, f1), abs=1e-15
        )
        assert row["support"] == counts[c].sum()
        assert scores[f"precision_{name}"] == pytest.approx(precision, abs=1e-15)
        assert scores[f"recall_{name}"] == pytest.approx(recall, abs=1e-15)
        assert scores[f"f1_{name}"] == pytest.approx(f1, abs=1e-15)
    present = [c for c in range(n_classes) if counts[c].sum()]
    balanced = np.mean([counts[c, c] / counts[c].sum() for c in present])
    assert scores["balanced_accuracy"] == pytest.approx(balanced, abs=1e-15)
    assert scores["accuracy"] == pytest.approx(np.trace(counts) / n, abs=1e-15)
    assert scores["macro_f1"] == pytest.approx(table["f1"].mean(), abs=1e-15)


def test_a_class_never_true_gives_zero_scores_and_no_warning() -> None:
    y, p = _random_predictions(2, 150, 4, absent=2)
    p[:5] = np.eye(4)[2] * 0.9 + 0.025  # five images predicted as the absent class
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores = metrics.classification_metrics(y, p, ["a", "b", "c", "d"])
    assert scores["precision_c"] == 0.0 and scores["recall_c"] == 0.0 and scores["f1_c"] == 0.0


def test_empty_input_gives_zero_counts_and_nan_scores() -> None:
    empty_y, empty_p = np.zeros(0, dtype=int), np.zeros((0, 2))
    assert metrics.confusion(empty_y, empty_y, CLASSES).to_numpy().tolist() == [[0, 0], [0, 0]]
    table = metrics.per_class_table(empty_y, empty_p, CLASSES)
    assert table["support"].tolist() == [0, 0]
    scores = metrics.classification_metrics(empty_y, empty_p, CLASSES)
    assert math.isnan(scores["accuracy"]) and math.isnan(scores["balanced_accuracy"])
    assert math.isnan(scores["accuracy_ci_low"]) and scores["n_images"] == 0


@pytest.mark.parametrize(("seed", "n", "n_classes", "absent"), CASES[:3])
def test_roc_auc_equals_pair_counting(seed, n, n_classes, absent):
    """ROC AUC = P(score of a positive > score of a negative) + ties / 2 (Hanley & McNeil)."""
    y, p = _random_predictions(seed, n, n_classes, absent)

    def by_pairs(positive: np.ndarray, score: np.ndarray) -> float:
        pos, neg = score[positive], score[~positive]
        greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
        return greater / (pos.size * neg.size)

    if n_classes == 2:
        expected = by_pairs(y == 1, p[:, 1])
    else:
        expected = np.mean([by_pairs(y == c, p[:, c]) for c in range(n_classes) if (y == c).any()])
    scores = metrics.classification_metrics(y, p, [f"c{c}" for c in range(n_classes)])
    assert scores["roc_auc"] == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------------------------- calibration


def test_calibration_bins_counts_and_ece() -> None:
    bins = metrics.calibration_bins(Y6, P6, n_bins=10)
    assert list(bins.columns) == ["bin_low", "bin_high", "mean_confidence", "accuracy", "count"]
    assert bins["count"].sum() == 6
    assert (bins["count"] > 0).all()
    # top-1 confidences 0.9 0.8 0.7 0.6 0.9 0.6 -> bins (0.5,0.6] x2, (0.6,0.7], (0.7,0.8],
    # (0.8,0.9] x2 (right-inclusive); correct: rows 0,1,2,4 -> per-bin accuracy 0, 1, 1, 1
    assert bins["count"].tolist() == [2, 1, 1, 2]
    assert bins["accuracy"].tolist() == pytest.approx([0.0, 1.0, 1.0, 1.0])
    ece = metrics.expected_calibration_error(Y6, P6, n_bins=10)
    expected = (2 * 0.6 + 1 * 0.3 + 1 * 0.2 + 2 * 0.1) / 6
    assert ece == pytest.approx(expected)


# ------------------------------------------------------------------------- corrected t-test


def test_corrected_ttest_three_folds_by_hand() -> None:
    a = [0.9, 0.8, 0.85]
    b = [0.8, 0.75, 0.8]
    # d = [0.10, 0.05, 0.05]; mean = 0.0666667; s^2 = (0.0333^2 + 2 * 0.0167^2) / 2 = 0.00083333
    # correction = 1/3 + 10/20 = 0.8333333; t = 0.0666667 / sqrt(0.8333333 * 0.00083333)
    t_expected = (0.2 / 3) / math.sqrt((1 / 3 + 10 / 20) * (0.0025 / 3))
    assert t_expected == pytest.approx(2.5298221, abs=1e-6)
    # Student t with 2 dof: P(T > t) = (1 - t / sqrt(t^2 + 2)) / 2, two-sided doubles it
    p_expected = 1 - t_expected / math.sqrt(t_expected**2 + 2)
    t, p = metrics.corrected_resampled_ttest(a, b, n_train=20, n_test=10)
    assert t == pytest.approx(t_expected, rel=1e-9)
    assert p == pytest.approx(p_expected, rel=1e-9)
    assert p == pytest.approx(0.1271284, abs=1e-6)
    t_rev, p_rev = metrics.corrected_resampled_ttest(b, a, n_train=20, n_test=10)
    assert t_rev == pytest.approx(-t)
    assert p_rev == pytest.approx(p)


def test_corrected_ttest_zero_variance_cases() -> None:
    assert metrics.corrected_resampled_ttest([0.8, 0.7], [0.8, 0.7], 20, 10) == (0.0, 1.0)
    t, p = metrics.corrected_resampled_ttest([0.9, 0.8], [0.8, 0.7], 20, 10)
    assert t == math.inf and p == 0.0
    t, p = metrics.corrected_resampled_ttest([0.5, 0.5, 0.5], [0.75, 0.75, 0.75], 20, 10)
    assert t == -math.inf and p == 0.0


def test_corrected_ttest_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        metrics.corrected_resampled_ttest([0.9, 0.8], [0.8], 20, 10)
    with pytest.raises(ValueError):
        metrics.corrected_resampled_ttest([0.9], [0.8], 20, 10)


def test_compare_to_best() -> None:
    scores = {"best": [0.9, 0.8, 0.85], "other": [0.8, 0.75, 0.8], "same": [0.9, 0.8, 0.85]}
    frame = metrics.compare_to_best(scores, "best", n_train=20, n_test=10)
    assert list(frame.index) == ["best", "other", "same"]
    assert frame.loc["best"].isna().all()
    assert frame.loc["other", "mean_difference"] == pytest.approx(0.2 / 3)
    assert frame.loc["other", "t"] == pytest.approx(2.5298221, abs=1e-6)
    assert frame.loc["other", "p_value"] == pytest.approx(0.1271284, abs=1e-6)
    assert frame.loc["same", "p_value"] == 1.0


# ------------------------------------------------------------------------ gate and champion


def test_quality_gate_pass_and_fail_messages() -> None:
    passed = metrics.quality_gate(0.914, 0.7)
    assert passed["passed"] is True
    assert passed["margin"] == pytest.approx(0.214)
    assert passed["message"] == "PASSED: test accuracy 0.914 >= 0.700 (margin +0.214)"
    failed = metrics.quality_gate(0.6, 0.7)
    assert failed["passed"] is False
    assert failed["margin"] == pytest.approx(-0.1)
    assert failed["message"] == "FAILED: test accuracy 0.600 < 0.700 (short by 0.100)"
    assert metrics.quality_gate(0.7, 0.7)["passed"] is True


def test_champion_ignores_test_columns() -> None:
    table = pd.DataFrame(
        {
            "cv_accuracy_mean": [0.90, 0.88],
            "cv_loss_mean": [0.30, 0.20],
            "train_seconds": [100.0, 10.0],
            "test_accuracy": [0.80, 0.99],
        },
        index=["cv_winner", "test_winner"],
    )
    assert metrics.choose_champion(table) == "cv_winner"


def test_champion_tie_broken_by_lower_cv_loss() -> None:
    table = pd.DataFrame(
        {
            "cv_accuracy_mean": [0.9, 0.9 + 1e-12, 0.85],
            "cv_loss_mean": [0.35, 0.40, 0.10],
            "train_seconds": [50.0, 5.0, 1.0],
        },
        index=["low_loss", "high_loss", "worse"],
    )
    assert metrics.choose_champion(table) == "low_loss"


def test_champion_then_by_lower_train_seconds_then_order() -> None:
    table = pd.DataFrame(
        {
            "cv_accuracy_mean": [0.9, 0.9, 0.9],
            "cv_loss_mean": [0.3, 0.3, 0.3],
            "train_seconds": [60.0, 20.0, 20.0],
        },
        index=["slow", "fast_first", "fast_second"],
    )
    assert metrics.choose_champion(table) == "fast_first"


def test_champion_empty_raises() -> None:
    with pytest.raises(ValueError):
        metrics.choose_champion(
            pd.DataFrame(columns=["cv_accuracy_mean", "cv_loss_mean", "train_seconds"])
        )


# ------------------------------------------------------------------------------- plot smoke


def _history(offset: float, with_val: bool = True) -> list[dict]:
    rows = []
    for epoch in range(1, 4):
        row = {"epoch": epoch, "train_loss": 1.0 / epoch, "train_accuracy": 0.6 + 0.1 * epoch}
        if with_val:
            row["val_loss"] = 1.2 / epoch + offset
            row["val_accuracy"] = 0.55 + 0.1 * epoch - offset
        rows.append(row)
    return rows


def _figures() -> list[Figure]:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8) for _ in range(7)]
    table = pd.DataFrame(
        {"cv_accuracy_mean": [0.9, 0.85], "cv_accuracy_std": [0.02, 0.03]}, index=["a", "b"]
    )
    y3 = np.array([0, 1, 2, 2])
    p3 = np.array([[0.7, 0.2, 0.1], [0.2, 0.6, 0.2], [0.1, 0.2, 0.7], [0.3, 0.3, 0.4]])
    return [
        plots.learning_curves([_history(0.0), _history(0.05, with_val=False)], "curves"),
        plots.learning_curves([], "no curves"),
        plots.overlaid_learning_curves({"a": _history(0.0) + _history(0.1), "b": _history(0.2)}),
        plots.confusion_matrix_plot(metrics.confusion(Y6, P6.argmax(1), CLASSES), "confusion"),
        plots.roc_pr_curves(Y6, P6, CLASSES, "roc binary"),
        plots.roc_pr_curves(y3, p3, ["a", "b", "c"], "roc multiclass"),
        plots.roc_pr_curves(np.array([1, 1]), P6[:2], CLASSES, "roc one class"),
        plots.reliability_plot(metrics.calibration_bins(Y6, P6), "reliability"),
        plots.image_gallery(images, [f"img {i}" for i in range(7)], "gallery", columns=3),
        plots.image_gallery([], [], "empty gallery"),
        plots.class_balance(
            pd.DataFrame({"train": [40, 35], "test": [10, 9]}, index=CLASSES), "balance"
        ),
        plots.fold_scores_plot({"a": [0.9, 0.8, 0.85], "b": [0.8, 0.75, 0.8]}, "folds"),
        plots.strategy_bars(table, "cv_accuracy_mean", "cv_accuracy_std", "bars"),
        plots.strategy_bars(table, "cv_accuracy_mean", None, "bars without error"),
    ]


def test_plots_return_titled_figures() -> None:
    figures = _figures()
    try:
        for fig in figures:
            assert isinstance(fig, Figure)
            assert fig.axes
            for ax in fig.axes:
                assert ax.get_title().strip(), f"untitled axes in {fig}"
    finally:
        for fig in figures:
            plt.close(fig)
