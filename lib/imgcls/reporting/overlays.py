"""Grad-CAM overlays for notebook 03: each image with where the model looked blended over it.

The maps come from :func:`imgcls.evaluation.explain.gradcam_maps`. This module only draws, so a
change to the figure leaves the code version (and so every finished grid point) unchanged. Like
:mod:`imgcls.reporting.plots`, it returns figures and never calls ``plt.show()``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from imgcls.reporting.notebook import mark_photographs

# "turbo" (Mikhailov 2019, in matplotlib since 3.4): the rainbow look readers know from Grad-CAM
# figures (jet), with smooth perceived lightness.
HEATMAP_COLOURMAP = "turbo"
# The heatmap's opacity where the map is 1; it falls linearly to 0 where the map is 0, so the
# photo stays visible wherever the model did not look.
MAX_OPACITY = 0.6


def blend(image: np.ndarray, heatmap: np.ndarray, max_opacity: float = MAX_OPACITY) -> np.ndarray:
    """Return ``image`` (uint8 ``(H, W, 3)``) with ``heatmap`` (``(H, W)`` in [0, 1]) over it.

    Per pixel, with ``a = max_opacity * m``: ``(1 - a) * image + a * colour(m)``, where
    ``colour`` is :data:`HEATMAP_COLOURMAP`; the result is float ``(H, W, 3)`` in [0, 1]. Raises
    ValueError when the shapes differ, the map leaves [0, 1] or ``max_opacity`` is not in [0, 1].
    """
    image = np.asarray(image)
    heatmap = np.asarray(heatmap, dtype=float)
    if image.ndim != 3 or image.shape[-1] != 3 or heatmap.shape != image.shape[:2]:
        raise ValueError(
            f"image {image.shape} and heatmap {heatmap.shape}: need (H, W, 3) and the same (H, W)"
        )
    if heatmap.size and (np.nanmin(heatmap) < 0 or np.nanmax(heatmap) > 1):
        raise ValueError("heatmap values must lie in [0, 1] (gradcam_maps normalises them)")
    if not 0 <= max_opacity <= 1:
        raise ValueError(f"max_opacity must be in [0, 1], got {max_opacity}")
    colour = plt.get_cmap(HEATMAP_COLOURMAP)(heatmap)[..., :3]
    opacity = max_opacity * heatmap[..., None]
    return (1 - opacity) * (image.astype(float) / 255.0) + opacity * colour


def gradcam_overlays(
    images: np.ndarray | Sequence[np.ndarray],
    maps: np.ndarray,
    true: Sequence[str],
    predicted: Sequence[str],
    confidence: Sequence[float],
    title: str,
    captions: Sequence[str] | None = None,
    columns: int = 4,
) -> Figure:
    """Return a grid of images with their Grad-CAM maps blended over them (:func:`blend`).

    ``images`` uint8 ``(N, H, W, 3)``, ``maps`` ``(N, H, W)`` in [0, 1]; each panel is titled
    ``#k RIGHT/WRONG``, ``true <class>``, ``predicted <class> (<confidence>)`` (confidence: the
    top-1 softmax probability, a fraction), with ``captions`` (e.g. file names) under it. One
    colourbar gives the scale: relevance as a fraction of the image's strongest region. The
    figure is marked as photographs (:func:`imgcls.reporting.notebook.mark_photographs`): a
    prepared notebook shows it as JPEG. Raises ValueError when the lengths or shapes disagree.
    """
    count = len(images)
    lengths = {len(maps), len(true), len(predicted), len(confidence)}
    if captions is not None:
        lengths.add(len(captions))
    if lengths != {count}:
        raise ValueError(
            f"{count} images but {len(maps)} maps, {len(true)} true and {len(predicted)} "
            f"predicted classes, {len(confidence)} confidences"
            + ("" if captions is None else f", {len(captions)} captions")
            + "; give one of each per image"
        )
    if not count:
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.set_title(title)
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no images", ha="center", va="center", transform=ax.transAxes)
        return fig
    columns = max(1, min(columns, count))
    rows = math.ceil(count / columns)
    fig, axes = plt.subplots(
        rows, columns, figsize=(2.6 * columns + 1.0, 3.3 * rows + 0.6), squeeze=False
    )
    flat = axes.ravel()
    for index, ax in enumerate(flat):
        if index >= count:
            fig.delaxes(ax)
            continue
        verdict = "RIGHT" if true[index] == predicted[index] else "WRONG"
        ax.imshow(blend(images[index], maps[index]))
        ax.set_title(
            f"#{index + 1} {verdict}\ntrue {true[index]}\n"
            f"predicted {predicted[index]} ({confidence[index]:.2f})",
            fontsize="small",
            color="tab:red" if verdict == "WRONG" else "black",
        )
        ax.set_xticks([])
        ax.set_yticks([])
        if captions is not None:
            ax.set_xlabel(str(captions[index]), fontsize="x-small")
    scale = ScalarMappable(Normalize(0, 1), plt.get_cmap(HEATMAP_COLOURMAP))
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    bar_axes = fig.add_axes((0.92, 0.15, 0.015, 0.7))
    fig.colorbar(scale, cax=bar_axes).set_label(
        "Grad-CAM relevance (fraction of the image's maximum)"
    )
    return mark_photographs(fig)
