"""What a pipeline notebook calls first: the package's log lines in the cell output, no noise.

Library code reports progress through :mod:`logging` (``imgcls.*`` loggers); a notebook shows
those lines as cell output once :func:`prepare` has attached a handler. Two warnings that say
nothing about the user's experiment are silenced: tqdm's "IProgress not found" (huggingface_hub,
imported by timm, imports ``tqdm.auto``; no progress bar is ever drawn in a report) and MLflow's
UserWarnings about its own internals (e.g. the model signature's integer columns).

:func:`prepare` also shows figures made of photographs (galleries, Grad-CAM overlays; marked with
:func:`mark_photographs`) as JPEG instead of the inline backend's PNG. PNG is lossless and right
for charts, but a photograph does not compress in it: 03's Grad-CAM figure was a 1.2 MB PNG
that took 0.8 s to encode, against 0.17 MB and 0.3 s as JPEG at quality 90 (measured
2026-12-01), and every executed notebook, HTML report and MLflow copy carries those bytes.
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Any

PACKAGE_LOGGER = "imgcls"
_HANDLER_NAME = "imgcls-notebook"

PHOTOGRAPHS_GID = "imgcls-photographs"
"""The ``gid`` of a figure made of photographs, which a prepared notebook shows as JPEG."""

JPEG_QUALITY = 90
"""Pillow's JPEG quality (1-95) for photograph figures: no visible blocking around captions."""

_INLINE_BACKENDS = ("inline", "module://matplotlib_inline.backend_inline")


def prepare(level: int = logging.INFO) -> None:
    """Route ``imgcls`` log records (``level`` and above) to stdout and silence known noise.

    In an IPython kernel with matplotlib's inline backend it also shows photograph figures
    (:func:`mark_photographs`) as JPEG and every other figure as PNG, as before. Idempotent:
    calling it again in the same kernel adds no second handler or formatter. Returns nothing (so
    the cell shows no output). Raises nothing.
    """
    warnings.filterwarnings("ignore", message="IProgress not found")
    warnings.filterwarnings("ignore", category=UserWarning, module="mlflow")
    logger = logging.getLogger(PACKAGE_LOGGER)
    logger.setLevel(level)
    if not any(h.get_name() == _HANDLER_NAME for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.set_name(_HANDLER_NAME)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    _show_photographs_as_jpeg()


def mark_photographs(fig: Any) -> Any:
    """Mark a matplotlib figure as made of photographs (shown as JPEG); return it.

    Sets the figure's ``gid`` to :data:`PHOTOGRAPHS_GID`. Raises nothing.
    """
    fig.set_gid(PHOTOGRAPHS_GID)
    return fig


def is_photographs(fig: Any) -> bool:
    """Return True for a figure :func:`mark_photographs` marked."""
    return getattr(fig, "get_gid", lambda: None)() == PHOTOGRAPHS_GID


def _show_photographs_as_jpeg() -> None:
    """Make the inline backend's figure formatters send photograph figures as JPEG only.

    IPython displays a figure through one formatter per MIME type; the inline backend registers a
    PNG one for every ``Figure`` (``IPython.core.pylabtools.select_figure_formats``) when it is
    imported, which is why it is imported here first. A formatter that returns None adds no
    output of its type, so a photograph figure gets ``image/jpeg`` and any other ``image/png``.
    Does nothing outside IPython, with another backend (``%matplotlib widget``), or when done.
    """
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None:
        return
    import matplotlib

    if matplotlib.get_backend(auto_select=False) not in _INLINE_BACKENDS:
        return
    import matplotlib_inline.backend_inline  # noqa: F401  (importing it registers its formatters)
    from IPython.core.pylabtools import print_figure
    from matplotlib.figure import Figure

    png = shell.display_formatter.formatters["image/png"]
    jpeg = shell.display_formatter.formatters["image/jpeg"]
    try:
        as_png = png.lookup_by_type(Figure)
    except KeyError:
        return
    if getattr(as_png, "leaves_photographs_to_jpeg", False):
        return

    def png_unless_photographs(fig: Figure) -> str | None:
        return None if is_photographs(fig) else as_png(fig)

    def jpeg_of_photographs(fig: Figure) -> str | None:
        if not is_photographs(fig):
            return None
        return print_figure(
            fig, "jpeg", bbox_inches="tight", base64=True, pil_kwargs={"quality": JPEG_QUALITY}
        )

    png_unless_photographs.leaves_photographs_to_jpeg = True  # type: ignore[attr-defined]
    png.for_type(Figure, png_unless_photographs)
    jpeg.for_type(Figure, jpeg_of_photographs)
