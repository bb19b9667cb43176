"""Input tensors, device placement and mixed precision, and the frozen-backbone feature cache.

A frozen backbone (no gradients, BatchNorm in eval mode) maps an image to the same vector every
time, so its embedding is computed once per (data version, file list, backbone, weights, image
size, autocast dtype) and the head trains on the cached vectors.

Device policy, shared by training and feature extraction:

* CPU: float32 throughout and plain tensors; the numbers are those of the code before the CUDA
  path existed, bit for bit.
* CUDA: host batches are copied from page-locked (pinned) memory with ``non_blocking=True``
  (:func:`to_device`), and backbone forward passes run under ``torch.autocast`` in bfloat16, or
  float16 on GPUs without native bfloat16 (:func:`amp_dtype`, :func:`amp_context`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn

from imgcls.core.config import stable_hash
from imgcls.data.arrays import NpyStream, take_rows
from imgcls.data.cache import DecodedImages, cache_file, free_cores, load_cached
from imgcls.data.folders import ImageFolder
from imgcls.data.images import usable_cores
from imgcls.modeling.models import Preprocessing, build_backbone, weights_identity

# Images per forward pass when predicting (validation, evaluation): on a CPU, 32 is as fast as
# 64-128 and holds less activation memory. Feature extraction keeps batches of 64.
EVAL_BATCH_SIZE = 32
# Feature rows gathered (on the device) before one copy to the host and the cache file: one host
# synchronisation per 4096 rows on CUDA, and at most 4096 x F floats (8 MB at F = 512) in memory.
FEATURE_FLUSH_ROWS = 4096


def pick_device(preferred: str | None = None) -> torch.device:
    """Return ``preferred`` if given, else CUDA when available, else the CPU."""
    if preferred:
        return torch.device(preferred)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """Return the autocast dtype of forward passes on ``device``; None means float32 (no autocast).

    * CPU: None. CPU autocast supports only bfloat16, which is no faster than float32 on most CPUs
      and would change the CPU results.
    * CUDA with native bfloat16 (compute capability >= 8, Ampere and later): ``torch.bfloat16``.
      It has float32's exponent range, so gradients need no loss scaling (PyTorch AMP docs,
      https://pytorch.org/docs/stable/amp.html and the "Automatic Mixed Precision" recipe).
    * Older CUDA GPUs: ``torch.float16``, whose narrow range needs ``torch.amp.GradScaler``
      (:meth:`imgcls.modeling.training.TrainingInputs.grad_scaler`). bfloat16 is not chosen there
      even though ``torch.cuda.is_bf16_supported()`` says True by emulating it (its default
      ``including_emulation=True``): emulated bfloat16 has no tensor-core kernels and is slow.
    """
    if device.type != "cuda":
        return None
    with torch.cuda.device(device):
        native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.bfloat16 if native_bf16 else torch.float16


def amp_context(device: torch.device) -> contextlib.AbstractContextManager:
    """Return ``torch.autocast`` in :func:`amp_dtype` on CUDA, a no-op context on the CPU.

    Under autocast, convolutions and matrix products run in the low-precision dtype and reductions
    and losses in float32 (PyTorch's autocast op lists, https://pytorch.org/docs/stable/amp.html);
    backward passes must run outside the context.
    """
    dtype = amp_dtype(device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Return ``tensor`` (any shape and dtype) on ``device``.

    A CPU tensor bound for CUDA is copied into page-locked memory (PyTorch's caching host
    allocator reuses the buffers, as ``DataLoader(pin_memory=True)`` does) and then copied with
    ``non_blocking=True``: the copy is queued on the current stream without blocking the host,
    which a copy from ordinary pageable memory would do ("A guide on good usage of non_blocking and
    pin_memory() in PyTorch", pytorch.org tutorials). Otherwise a plain ``.to(device)``.
    """
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def to_model_input(
    batch_uint8: torch.Tensor, prep: Preprocessing, device: torch.device, channels_last: bool = True
) -> torch.Tensor:
    """Convert a uint8 ``[B, 3, S, S]`` batch to a normalised float32 tensor on ``device``.

    Values become ``(x / 255 - mean) / std`` per channel (``prep``'s ImageNet-style statistics);
    channels_last memory format (NHWC strides, same shape) by default: about 1.6x faster
    convolutions on the CPU, and the layout cuDNN's tensor-core kernels use on CUDA. Host tensors
    reach CUDA through :func:`to_device` (pinned, non-blocking).
    """
    batch = to_device(batch_uint8, device).float().div_(255.0)
    mean = to_device(torch.tensor(prep.mean), device).view(1, 3, 1, 1)
    std = to_device(torch.tensor(prep.std), device).view(1, 3, 1, 1)
    batch = (batch - mean) / std
    return batch.contiguous(memory_format=torch.channels_last) if channels_last else batch


def augment_batch(batch: torch.Tensor, generator: torch.Generator, pad: int = 8) -> torch.Tensor:
    """Randomly flip and shift each image of a float batch ``[B, C, S, S]``; same shape out.

    Per image: a horizontal flip with probability 0.5, then a crop of ``S x S`` at a random offset
    (0..2*pad pixels in each direction) from the image reflect-padded by ``pad`` pixels (the
    "random crop with padding" of the CIFAR ResNet recipe, He et al. 2016). Every image draws its
    own flip and offset from ``generator``.
    """
    count, size = batch.shape[0], batch.shape[-1]
    flip = torch.rand(count, generator=generator) < 0.5
    batch = torch.where(to_device(flip.view(-1, 1, 1, 1), batch.device), batch.flip(-1), batch)
    padded = nn.functional.pad(batch, (pad, pad, pad, pad), mode="reflect")
    offsets = to_device(
        torch.randint(0, 2 * pad + 1, (count, 2), generator=generator), batch.device
    )
    span = torch.arange(size, device=batch.device)
    rows = (offsets[:, 0, None] + span)[:, :, None]  # [B, S, 1]
    cols = (offsets[:, 1, None] + span)[:, None, :]  # [B, 1, S]
    images = torch.arange(count, device=batch.device)[:, None, None]
    cropped = padded.permute(0, 2, 3, 1)[images, rows, cols]  # [B, S, S, C]
    return cropped.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)


@torch.inference_mode()
def embed_batches(
    backbone: nn.Module,
    images: np.ndarray,
    prep: Preprocessing,
    device: torch.device,
    batch_size: int = 64,
    progress: bool = False,
    desc: str = "features",
    wait_for: Callable[[int], None] | None = None,
    flush_rows: int = FEATURE_FLUSH_ROWS,
) -> Iterator[tuple[int, np.ndarray]]:
    """Run a backbone in eval mode over uint8 images ``[N, 3, S, S]``, a block of rows at a time.

    Yields ``(start, features)``: float32 ``[k, F]`` for rows ``start..start+k``, in row order,
    ``k`` about ``flush_rows``. Images are read ``batch_size`` rows at a time
    (:func:`~imgcls.data.arrays.take_rows`: a memory-mapped ``images`` is never all in memory).
    On CUDA the forward passes run under :func:`amp_context` (bfloat16 or float16; the features
    are cast back to float32, about 3 significant digits in bfloat16) and a block's features stay
    on the GPU until one copy to the host per block, so the host waits once per block, not per
    batch. On the CPU everything is float32. ``wait_for(rows)``, when given, blocks until the first
    ``rows`` images are filled in (images still being decoded by
    :class:`~imgcls.data.cache.DecodedImages`).
    """
    backbone.eval().to(device)
    backbone = backbone.to(memory_format=torch.channels_last)
    starts = range(0, len(images), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc=desc, unit="batch", mininterval=3)
    chunks: list[torch.Tensor] = []
    block_start = 0
    for start in starts:
        stop = min(start + batch_size, len(images))
        if wait_for is not None:
            wait_for(stop)
        rows = torch.from_numpy(take_rows(images, slice(start, stop)))
        batch = to_model_input(rows, prep, device)
        with amp_context(device):
            chunks.append(backbone(batch).float())
        if stop - block_start >= flush_rows or stop == len(images):
            yield block_start, torch.cat(chunks).cpu().numpy()
            chunks, block_start = [], stop


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
    """Run a backbone in eval mode over uint8 images ``[N, 3, S, S]``; return float32 ``[N, F]``.

    :func:`embed_batches` gathered into one in-memory array (``N x F`` floats); the feature cache
    (:func:`cached_features`) streams the blocks to its file instead. Raises ValueError for
    ``N = 0``.
    """
    if len(images) == 0:
        raise ValueError("embed_images needs at least one image, got an empty array")
    blocks = embed_batches(backbone, images, prep, device, batch_size, progress, desc, wait_for)
    return np.concatenate([block for _, block in blocks])


@torch.inference_mode()
def head_probabilities(
    head: nn.Module, features: np.ndarray, batch_size: int = 1024
) -> torch.Tensor:
    """Return float32 softmax probabilities ``[N, C]`` (CPU) of ``head`` over features ``[N, F]``.

    The features (a memory-mapped cache or any array) are read ``batch_size`` rows at a time
    (:func:`~imgcls.data.arrays.take_rows`); 1024 rows as in training's validation pass
    (:func:`imgcls.modeling.training.predict_rows`).
    """
    head.eval()
    out = []
    for start in range(0, len(features), batch_size):
        rows = torch.from_numpy(take_rows(features, slice(start, start + batch_size)))
        out.append(torch.softmax(head(rows).float(), dim=1))
    return torch.cat(out) if out else torch.empty(0, 0)


def cached_features(
    folder: ImageFolder,
    backbone_name: str,
    weights: str,
    image_size: int,
    data_md5: str,
    device: torch.device | None = None,
    progress: bool = False,
    mirrored: bool = False,
) -> tuple[np.ndarray, bool]:
    """Return ``(features [N, F] float32, cache_hit)`` of a frozen backbone over a split, cached.

    ``mirrored``: the features of every image flipped left-right (test-time augmentation), row
    ``i`` the mirror of row ``i``; cached under the same key plus ``view: hflip``.

    On a miss the images are decoded (:class:`~imgcls.data.cache.DecodedImages`) while the
    backbone is built and, on the cores the forward pass on ``device`` leaves free
    (:func:`~imgcls.data.cache.free_cores`), while it embeds the rows decoded so far; with no
    core free, on every core before the forward pass starts. ``device`` None means
    :func:`pick_device`'s choice. Features computed under CUDA autocast differ from float32 ones
    in the 3rd-4th digit, so the autocast dtype is part of the cache key (float32 keys are unchanged, so existing CPU caches stay valid). The features
    are written to the cache file block by block (:func:`embed_batches`) and returned as its
    read-only memory map. Raises :class:`imgcls.data.images.ImageReadError` naming an unreadable
    file.
    """
    target = pick_device(str(device) if device else None)
    key = {
        "data": data_md5,
        "root": folder.root.name,
        "files": stable_hash(folder.relpaths(), 32),
        "backbone": backbone_name,
        "weights": weights_identity(weights),
        "size": image_size,
        "version": 1,
    }
    if mirrored:
        key["view"] = "hflip"
    if (dtype := amp_dtype(target)) is not None:
        key["autocast"] = str(dtype).removeprefix("torch.")

    path = cache_file("features", key)
    cached = load_cached(path)
    if cached is not None:
        return cached, True
    # Images not decoded yet are decoded in background threads while the backbone is built
    # (importing timm) and, when the forward pass leaves a core free, while it embeds the rows
    # decoded so far. With no core free (a CPU forward pass on every core) the decode runs on
    # every core first: beside the forward pass it would only take turns with torch's threads
    # (cached_features on 2 cores, fastest of 3 alternating runs, 2026-11-30: 96 12-MP photos
    # 3.19 s beside, 2.54 s first; the 949 shipped photos 16.07 s beside, 15.13 s first).
    overlap = free_cores(str(target)) >= 1
    workers = None if overlap else usable_cores()
    images = DecodedImages(folder, image_size, data_md5, workers=workers, device=str(target))
    backbone, width, prep = build_backbone(backbone_name, weights, image_size)
    if not overlap:
        images.result()
    blocks = embed_batches(
        backbone,
        images.array[..., ::-1] if mirrored else images.array,  # a reversed view, not a copy
        prep,
        target,
        progress=progress,
        desc=f"{backbone_name} features {folder.root.name}",
        wait_for=images.wait_for,
    )
    with NpyStream(path, (len(folder), width), np.float32) as stream:
        for start, block in blocks:
            stream.write(start, block)
        images.result()  # the decoded images are cached too (fine-tuning and 03 read them)
        return stream.publish(), False


def set_threads(torch_threads: int) -> int:
    """Set torch's intra-op threads when ``torch_threads`` > 0; return the count in use."""
    if torch_threads and torch_threads > 0:
        torch.set_num_threads(int(torch_threads))
    return torch.get_num_threads()
