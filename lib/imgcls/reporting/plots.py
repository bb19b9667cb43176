"""Figures for the notebooks: learning curves, confusion, ROC/PR, calibration, galleries, bars.

Every function builds its own figure with ``plt.subplots`` and returns it; nothing here calls
``plt.show()`` or selects a backend, so the notebooks' inline backend and headless "Agg" runs
both work. Each axes gets a title and labelled axes (with units where meaningful).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_curve

from imgcls.reporting.notebook import mark_photographs

_METRIC_LABELS = {
    "loss": "loss (cross-entropy)",
    "accuracy": "accuracy (fraction)",
}


def _metric_label(metric: str) -> str:
    """Axis label with units for a metric name such as ``val_accuracy`` or ``cv_loss_mean``."""
    prefix, _, kind = metric.partition("_")
    if kind in _METRIC_LABELS and prefix in {"val", "train"}:
        split = "validation" if prefix == "val" else "training"
        return f"{split} {_METRIC_LABELS[kind]}"
    if metric in _METRIC_LABELS:
        return _METRIC_LABELS[metric]
    if "accuracy" in metric or metric.endswith(("f1", "auc", "precision", "recall")):
        return f"{metric} (fraction)"
    if "loss" in metric:
        return f"{metric} (cross-entropy)"
    if "seconds" in metric:
        return f"{metric} (s)"
    return metric


def _message(ax: Axes, text: str) -> None:
    """Write ``text`` in the middle of an otherwise empty axes."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=11)


def _series(history: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(epochs, values) of ``key`` from per-epoch dicts, skipping epochs without the key."""
    rows = [row for row in history if row.get(key) is not None and "epoch" in row]
    epochs = np.array([row["epoch"] for row in rows], dtype=float)
    values = np.array([row[key] for row in rows], dtype=float)
    return epochs, values


def learning_curves(histories: list[list[dict]], title: str) -> Figure:
    """Take per-fold lists of per-epoch dicts; return loss and accuracy panels, a line per fold."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    colours = plt.get_cmap("tab10")
    drawn = False
    for fold, history in enumerate(histories):
        colour = colours(fold % 10)
        for ax, kind in ((ax_loss, "loss"), (ax_acc, "accuracy")):
            for split, style in (("train", "--"), ("val", "-")):
                epochs, values = _series(history, f"{split}_{kind}")
                if epochs.size == 0:
                    continue
                label = f"fold {fold + 1} {'validation' if split == 'val' else 'training'}"
                ax.plot(epochs, values, linestyle=style, color=colour, marker=".", label=label)
                drawn = True
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_loss.set_title("loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel(_METRIC_LABELS["loss"])
    ax_acc.set_title("accuracy")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel(_METRIC_LABELS["accuracy"])
    if drawn:
        ax_acc.legend(fontsize="small", loc="lower right")
    else:
        for ax in (ax_loss, ax_acc):
            _message(ax, "no epochs recorded")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def overlaid_learning_curves(
    curves: dict[str, list[dict]],
    metric: str = "val_accuracy",
    title: str = "Validation accuracy by epoch, mean over folds",
) -> Figure:
    """Take per-strategy per-epoch dicts; return one mean-over-folds line per strategy.

    Entries that share an epoch (one per fold) are averaged; with several folds a band shows
    the minimum-to-maximum range.
    """
    fig, ax = plt.subplots(figsize=(8, 4.5))
    drawn = False
    for name, history in curves.items():
        epochs, values = _series(history, metric)
        if epochs.size == 0:
            continue
        frame = pd.DataFrame({"epoch": epochs, "value": values}).groupby("epoch")["value"]
        summary = frame.agg(["mean", "min", "max", "count"])
        (line,) = ax.plot(summary.index, summary["mean"], marker=".", label=name)
        if (summary["count"] > 1).any():
            ax.fill_between(
                summary.index, summary["min"], summary["max"], color=line.get_color(), alpha=0.15
            )
        drawn = True
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.set_ylabel(_metric_label(metric))
    if drawn:
        ax.legend(fontsize="small")
    else:
        _message(ax, f"no {metric} values")
    fig.tight_layout()
    return fig


# Tick labels longer than this wrap onto several lines (confusion matrix with long class names).
LABEL_WRAP_CHARS = 16


def _wrapped(labels: Sequence[str], width: int = LABEL_WRAP_CHARS) -> list[str]:
    return [textwrap.fill(str(label), width, break_long_words=True) for label in labels]


def confusion_matrix_plot(matrix: pd.DataFrame, title: str) -> Figure:
    """Take a confusion-count DataFrame (rows true, columns predicted); return a heatmap.

    Class names (the ``true: `` / ``predicted: `` prefixes of :func:`imgcls.evaluation.metrics.confusion` are
    moved to the axis labels) are wrapped at :data:`LABEL_WRAP_CHARS` characters, predicted
    names are rotated 45 degrees, and the figure grows with the number of classes, so six or more
    long names stay legible and inside the figure.
    """
    rows = [str(i).removeprefix("true: ") for i in matrix.index]
    columns = [str(c).removeprefix("predicted: ") for c in matrix.columns]
    longest = max(len(line) for name in _wrapped(rows + columns) for line in name.split("\n"))
    size = max(3.5, 1.2 * len(matrix.columns) + 2.0)
    margin = 0.09 * longest  # inches for the wrapped tick labels
    fig, ax = plt.subplots(figsize=(size + 1.0 + margin, size + margin))
    sns.heatmap(
        pd.DataFrame(matrix.to_numpy(), index=_wrapped(rows), columns=_wrapped(columns)),
        annot=True,
        fmt="d",
        cmap="Blues",
        cbar_kws={"label": "images (count)"},
        ax=ax,
        square=True,
    )
    ax.set_title(title)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.tick_params(axis="y", labelrotation=0)
    if len(columns) > 2 or longest > 8:
        plt.setp(ax.get_xticklabels(), rotation=45, ha="right", rotation_mode="anchor")
    colourbar = ax.collections[0].colorbar
    colourbar.locator = MaxNLocator(integer=True)  # counts are whole images
    colourbar.update_ticks()
    colourbar.ax.set_title("count", fontsize="small")
    fig.tight_layout()
    return fig


def roc_pr_curves(
    y_true: np.ndarray, probabilities: np.ndarray, classes: list[str], title: str
) -> Figure:
    """Take labels, probabilities [N, C] and class names; return ROC and precision-recall panels.

    Binary: one curve for the positive class (column 1). Multiclass: one-vs-rest per class.
    A class whose one-vs-rest problem has only one label present gets no curve.
    """
    y = np.asarray(y_true).astype(int).reshape(-1)
    p = np.asarray(probabilities, dtype=float)
    fig, (ax_roc, ax_pr) = plt.subplots(1, 2, figsize=(10, 4))
    targets = [(1, classes[1])] if len(classes) == 2 else list(enumerate(classes))
    drawn = False
    for index, name in targets:
        positive = (y == index).astype(int)
        if positive.size == 0 or positive.all() or not positive.any():
            continue
        fpr, tpr, _ = roc_curve(positive, p[:, index])
        ax_roc.plot(fpr, tpr, label=f"{name} (AUC {auc(fpr, tpr):.3f})")
        precision, recall, _ = precision_recall_curve(positive, p[:, index])
        ap = average_precision_score(positive, p[:, index])
        ax_pr.step(recall, precision, where="post", label=f"{name} (AP {ap:.3f})")
        drawn = True
    ax_roc.plot([0, 1], [0, 1], linestyle=":", color="grey", label="chance")
    ax_roc.set_title("ROC curve")
    ax_roc.set_xlabel("false positive rate (fraction)")
    ax_roc.set_ylabel("true positive rate (fraction)")
    ax_pr.set_title("precision-recall curve")
    ax_pr.set_xlabel("recall (fraction)")
    ax_pr.set_ylabel("precision (fraction)")
    for ax in (ax_roc, ax_pr):
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        if drawn:
            ax.legend(fontsize="small", loc="lower right" if ax is ax_roc else "lower left")
        else:
            _message(ax, "undefined: one class only")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def reliability_plot(bins: pd.DataFrame, title: str) -> Figure:
    """Take a ``calibration_bins`` table; return a reliability diagram with the diagonal."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", label="perfect calibration")
    if len(bins):
        widths = bins["bin_high"] - bins["bin_low"]
        ax.bar(
            bins["bin_low"],
            bins["accuracy"],
            width=widths,
            align="edge",
            alpha=0.3,
            edgecolor="tab:blue",
            label="bin accuracy",
        )
        ax.plot(bins["mean_confidence"], bins["accuracy"], marker="o", label="observed")
        for _, row in bins.iterrows():
            ax.annotate(
                f"n={int(row['count'])}",
                (row["mean_confidence"], row["accuracy"]),
                textcoords="offset points",
                xytext=(0, 6),
                ha="center",
                fontsize="x-small",
            )
    else:
        _message(ax, "no predictions")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.set_xlabel("mean predicted confidence")
    ax.set_ylabel("observed accuracy")
    ax.legend(fontsize="small", loc="upper left")
    fig.tight_layout()
    return fig


def image_gallery(
    images: list[np.ndarray], captions: list[str], title: str, columns: int = 6
) -> Figure:
    """Take HxWx3 uint8 images and captions; return a grid with each caption under its image.

    The figure is marked as photographs (:func:`imgcls.reporting.notebook.mark_photographs`): a
    prepared notebook shows it as JPEG. Raises ValueError when the counts differ.
    """
    if len(captions) != len(images):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    if not images:
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.set_title(title)
        ax.set_axis_off()
        _message(ax, "no images")
        return fig
    columns = max(1, min(columns, len(images)))
    rows = math.ceil(len(images) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.9 * columns, 2.2 * rows + 0.5))
    flat = np.atleast_1d(axes).ravel()
    for index, ax in enumerate(flat):
        if index >= len(images):
            fig.delaxes(ax)
            continue
        ax.imshow(images[index])
        ax.set_title(f"#{index + 1}", fontsize="small")
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.set_xlabel(captions[index], fontsize="x-small")
    fig.suptitle(title)
    fig.tight_layout()
    return mark_photographs(fig)


def class_balance(counts: pd.DataFrame, title: str) -> Figure:
    """Take image counts (index = class, columns = splits or folds); return grouped bars."""
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(counts.index) * max(1, counts.shape[1])), 4))
    n_groups = max(1, counts.shape[1])
    width = 0.8 / n_groups
    positions = np.arange(len(counts.index))
    for offset, column in enumerate(counts.columns):
        bars = ax.bar(
            positions + (offset - (n_groups - 1) / 2) * width,
            counts[column].to_numpy(dtype=float),
            width=width,
            label=str(column),
        )
        ax.bar_label(bars, fmt="%d", fontsize="x-small")
    ax.set_xticks(positions, [str(name) for name in counts.index])
    ax.set_title(title)
    ax.set_xlabel("class")
    ax.set_ylabel("images (count)")
    if counts.shape[1]:
        ax.legend(fontsize="small")
    else:
        _message(ax, "no counts")
    fig.tight_layout()
    return fig


def fold_scores_plot(scores: dict[str, Sequence[float]], title: str) -> Figure:
    """Take per-fold accuracies by strategy; return lines across folds (a paired comparison)."""
    fig, ax = plt.subplots(figsize=(10, 4.5))
    longest = 0
    for name, values in scores.items():
        values = np.asarray(values, dtype=float)
        folds = np.arange(1, values.size + 1)
        longest = max(longest, values.size)
        ax.plot(folds, values, marker="o", label=f"{name} (mean {np.nanmean(values):.3f})")
    if longest:
        ax.set_xticks(np.arange(1, longest + 1))
        # beside the axes, not on them: with many grid points a legend inside hides the lines
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        _message(ax, "no fold scores")
    ax.set_title(title)
    ax.set_xlabel("fold")
    ax.set_ylabel("validation accuracy (fraction)")
    fig.tight_layout()
    return fig


def strategy_bars(table: pd.DataFrame, value: str, error: str | None, title: str) -> Figure:
    """Take a table (index = strategy) and column names; return horizontal bars of ``value``."""
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.45 * len(table) + 1.2)))
    names = [str(name) for name in table.index]
    values = table[value].to_numpy(dtype=float)
    errors = table[error].to_numpy(dtype=float) if error else None
    positions = np.arange(len(names))
    bars = ax.barh(positions, values, xerr=errors, capsize=3 if error else 0, color="tab:blue")
    ax.bar_label(bars, fmt="%.3f", fontsize="x-small", padding=3)
    ax.set_yticks(positions, names)
    ax.invert_yaxis()
    ax.set_title(title)
    ax.set_xlabel(_metric_label(value) + (f" (error bars: {error})" if error else ""))
    ax.set_ylabel("strategy")
    if not names:
        _message(ax, "no strategies")
    fig.tight_layout()
    return fig


def critical_difference_plot(
    mean_ranks: pd.Series, p_values: pd.DataFrame, alpha: float, title: str
) -> Figure:
    """Take mean ranks over folds and pairwise p-values; return a critical-difference diagram.

    ``mean_ranks`` [m]: grid point -> mean rank over the folds (1 = best); ``p_values``
    [m x m]: the adjusted p-value of every pair (same labels as index and columns, diagonal
    ignored). Points joined by a crossbar are not significantly different at ``alpha``. Drawn
    by scikit-posthocs' ``critical_difference_diagram`` (Demsar 2006, JMLR 7, 1-30), which
    reads only ranks and p-values, so the test behind the crossbars is the caller's. Raises
    ValueError when fewer than 2 points are given or the labels of the two inputs differ.
    """
    import scikit_posthocs

    labels = [str(label) for label in mean_ranks.index]
    if len(labels) < 2:
        raise ValueError(f"a critical-difference diagram needs >= 2 points, got {labels}")
    if sorted(labels) != sorted(str(c) for c in p_values.columns):
        raise ValueError(f"ranks of {labels} but p-values of {list(p_values.columns)}")
    fig, ax = plt.subplots(figsize=(9, max(2.6, 0.42 * len(labels) + 1.4)))
    scikit_posthocs.critical_difference_diagram(
        mean_ranks.astype(float),
        p_values.astype(float),
        alpha=alpha,
        ax=ax,
        label_fmt_left="{label} ({rank:.2f})",
        label_fmt_right="({rank:.2f}) {label}",
        label_props={"fontsize": "small"},
    )
    ax.set_title(title, pad=28)
    ax.set_xlabel("mean rank over folds (1 = best)")
    ax.xaxis.set_label_position("top")
    fig.tight_layout()
    return fig


def champion_gaps_plot(gaps: pd.Series, floor: float, close: Sequence[str], title: str) -> Figure:
    """Take each grid point's mean CV accuracy minus the champion's; return horizontal bars.

    ``gaps`` [m]: grid point -> difference in accuracy points (%, the champion's is 0);
    ``floor``: the smallest detectable difference in the same units, drawn dashed at +-floor
    (NaN: no lines); points in ``close`` (closer to the champion than the floor) are orange.
    """
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.4 * len(gaps) + 1.5)))
    names = [str(name) for name in gaps.index]
    colours = ["tab:orange" if name in set(close) else "tab:blue" for name in names]
    ax.barh(np.arange(len(names)), gaps.to_numpy(dtype=float), color=colours)
    ax.set_yticks(np.arange(len(names)), names)
    if math.isfinite(floor):
        for side in (-1, 1):
            ax.axvline(side * floor, color="grey", linestyle="--")
    ax.invert_yaxis()
    ax.set_title(title)
    ax.set_xlabel("difference in mean CV accuracy (accuracy points, %)")
    ax.set_ylabel("grid point")
    if not names:
        _message(ax, "no grid points")
    fig.tight_layout()
    return fig
