"""What a pipeline notebook calls first: the package's log lines in the cell output, no noise.

Library code reports progress through :mod:`logging` (``imgcls.*`` loggers); a notebook shows
those lines as cell output once :func:`prepare` has attached a handler. Two warnings that say
nothing about the user's experiment are silenced: tqdm's "IProgress not found" (huggingface_hub,
imported by timm, imports ``tqdm.auto``; no progress bar is ever drawn in a report) and MLflow's
UserWarnings about its own internals (e.g. the model signature's integer columns).
"""

from __future__ import annotations

import logging
import sys
import warnings

PACKAGE_LOGGER = "imgcls"
_HANDLER_NAME = "imgcls-notebook"


def prepare(level: int = logging.INFO) -> None:
    """Route ``imgcls`` log records (``level`` and above) to stdout and silence known noise.

    Idempotent: calling it again in the same kernel does not add a second handler. Returns
    nothing (so the cell shows no output). Raises nothing.
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
