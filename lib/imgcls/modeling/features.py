"""Input tensors and the frozen-backbone feature cache.

A frozen backbone (no gradients, BatchNorm in eval mode) maps an image to the same vector every
time, so its embedding is computed once per (data version, file list, backbone, weights, image
size) and the head trains on the cached vectors.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from imgcls.core.config import stable_hash
from imgcls.data.cache import DecodedImages, cached_array
from imgcls.data.folders import ImageFolder
from imgcls.modeling.models import Preprocessing, build_backbone, weights_identity

# Images per forward pass when predicting (validation, evaluation): on a CPU, 32 is as fast as
# 64-128 and holds less activation memory. Feature extraction keeps batches of 64.
EVAL_BATCH_SIZE = 32


def pick_device(preferred: str | None = None) -> torch.device:
    """Return ``preferred`` if given, else CUDA when available, else the CPU."""
    if preferred:
        return torch.device(preferred)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def to_model_input(
    batch_uint8: torch.Tensor, prep: Preprocessing, device: torch.device, channels_last: bool = True
) -> torch.Tensor:
    """Convert a uint8 ``[B, 3, S, S]`` batch to a normalised float tensor on ``device``."""
    batch = batch_uint8.to(device, non_blocking=True).float().div_(255.0)
    mean = torch.tensor(prep.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(prep.std, device=device).view(1, 3, 1, 1)
    batch = (batch - mean) / std
    return batch.contiguous(memory_format=torch.channels_last) if channels_last else batch


@torch.inference_mode()
def embed_images(
    backbone: nn.Module,
    images: np.ndarray,
    prep: Preprocessing,
    device: torch.device,
    batch_size: int = 64,
    progress: bool = False,
    desc: str = "features",
    wait_for: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Run a backbone in eval mode over uint8 images; return float32 features ``[N, F]``.

    ``wait_for(rows)``, when given, blocks until the first ``rows`` images are filled in (images
    still being decoded by :class:`~imgcls.data.cache.DecodedImages`).
    """
    backbone.eval().to(device)
    backbone = backbone.to(memory_format=torch.channels_last)
    starts = range(0, len(images), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc=desc, unit="batch", mininterval=3)
    chunks = []
    for start in starts:
        if wait_for is not None:
            wait_for(min(start + batch_size, len(images)))
        batch = torch.from_numpy(images[start : start + batch_size])
        chunks.append(backbone(to_model_input(batch, prep, device)).float().cpu())
    return torch.cat(chunks).numpy()


def cached_features(
    folder: ImageFolder,
    backbone_name: str,
    weights: str,
    image_size: int,
    data_md5: str,
    device: torch.device | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, bool]:
    """Return ``(features [N, F] float32, cache_hit)`` of a frozen backbone over a split, cached.

    On a miss the images are decoded (:class:`~imgcls.data.cache.DecodedImages`, on the cores the
    forward pass on ``device`` leaves free) while the backbone is built and embeds the rows
    decoded so far. Raises :class:`imgcls.data.images.ImageReadError` naming an unreadable file.
    """
    key = {
        "data": data_md5,
        "root": folder.root.name,
        "files": stable_hash(folder.relpaths(), 32),
        "backbone": backbone_name,
        "weights": weights_identity(weights),
        "size": image_size,
        "version": 1,
    }

    def build() -> np.ndarray:
        # Images not decoded yet are decoded in a background thread while the backbone is built
        # (importing timm) and embeds the rows decoded so far.
        target = pick_device(str(device) if device else None)
        images = DecodedImages(folder, image_size, data_md5, device=str(target))
        backbone, _, prep = build_backbone(backbone_name, weights, image_size)
        features = embed_images(
            backbone,
            images.array,
            prep,
            target,
            progress=progress,
            desc=f"{backbone_name} features {folder.root.name}",
            wait_for=images.wait_for,
        )
        images.result()  # the decoded images are cached too (fine-tuning and 03 read them)
        return features

    return cached_array("features", key, build)


def set_threads(torch_threads: int) -> int:
    """Set torch's intra-op threads when ``torch_threads`` > 0; return the count in use."""
    if torch_threads and torch_threads > 0:
        torch.set_num_threads(int(torch_threads))
    return torch.get_num_threads()
