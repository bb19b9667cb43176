"""Inference latency per image: the second cost the promotion rule compares (after training time).

The number answers "how long does one request for one image take once the model is loaded":
batch size 1, the model in eval mode on the evaluating device, the image already decoded and
resized to the model's input size (decoding is the same for every strategy of a grid, so it is
left out). The median over images is reported (robust to a scheduler hiccup on a shared machine),
after warm-up passes that are not counted (the first passes allocate buffers and pick kernels).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from imgcls.modeling.features import amp_context, pick_device, to_model_input
from imgcls.modeling.models import Preprocessing

logger = logging.getLogger(__name__)

WARMUP_PASSES = 3
MAX_TIMED_IMAGES = 32


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def latency_ms_per_image(
    predict: Callable[[torch.Tensor], torch.Tensor],
    images: np.ndarray,
    prep: Preprocessing,
    device: str | torch.device | None = None,
    max_images: int = MAX_TIMED_IMAGES,
    warmup: int = WARMUP_PASSES,
) -> float:
    """Return the median wall time in milliseconds of predicting one image, batch size 1.

    ``predict`` maps a normalised float batch ``[1, 3, S, S]`` on ``device`` to class scores
    ``[1, C]`` (a model, or an ensemble / test-time-augmentation wrapper: whatever is served);
    ``images``: decoded uint8 images ``[N, 3, S, S]`` (e.g. the decoded-image cache of the test
    split; a memory-mapped array is read one row at a time). The first ``min(N, max_images)``
    images are timed, each from uint8 to probabilities (normalisation, forward pass, softmax,
    copy back to the host: what a request pays after decoding), under no_grad and the device's
    autocast, after ``warmup`` untimed passes. Times are ``time.perf_counter`` differences, with
    the CUDA stream synchronised before each reading on a GPU.

    Raises ValueError when ``images`` is empty or not ``[N, 3, S, S]`` uint8, or ``max_images``
    is below 1.
    """
    if images.ndim != 4 or images.shape[1] != 3 or images.dtype != np.uint8 or len(images) == 0:
        raise ValueError(
            f"latency needs decoded uint8 images [N, 3, S, S] with N >= 1, "
            f"got {images.dtype} {images.shape}"
        )
    if max_images < 1:
        raise ValueError(f"max_images must be at least 1, got {max_images}")
    dev = pick_device(device)
    count = min(len(images), max_images)

    def one(row: int) -> float:
        start = time.perf_counter()
        batch = to_model_input(torch.from_numpy(np.array(images[row : row + 1])), prep, dev)
        with amp_context(dev):
            torch.softmax(predict(batch).float(), dim=1).cpu()
        _synchronize(dev)
        return time.perf_counter() - start

    with torch.no_grad():
        for row in range(warmup):
            one(row % count)
        timings = [one(row) for row in range(count)]
    median_ms = 1000.0 * statistics.median(timings)
    logger.info("latency: %.2f ms per image (median of %d, batch 1, %s)", median_ms, count, dev)
    return median_ms
