"""A faithful re-implementation of the upstream training approach, used only as a baseline.

Upstream kept no caches: a torchvision-style ``Dataset`` opened, decoded, resized and
normalised every JPEG each time it was accessed; a ``DataLoader`` (no worker processes) fed
batches of 16; each ``KFold`` fold built a fresh model and ran the *whole* backbone forward
on every batch of every epoch even when the backbone was frozen (``requires_grad=False`` only,
the module itself left in training mode), then ran a validation pass the same way.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.model_selection import KFold
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from imgcls.modeling.models import build_classifier


class UpstreamImageDataset(Dataset):
    """Images decoded from disk on every access, resized and normalised (no cache)."""

    def __init__(self, paths: Sequence[Path], labels: np.ndarray, transform: transforms.Compose):
        self.paths = list(paths)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.paths[index]) as img:
            image = img.convert("RGB")
        return self.transform(image), int(self.labels[index])


@dataclass
class UpstreamFold:
    """The outcome of one upstream fold: sizes, final validation accuracy and wall time."""

    fold: int
    train_images: int
    val_images: int
    epochs: int
    val_accuracy: float
    seconds: float


def upstream_folds(num_images: int, folds: int, seed: int = 42) -> list[tuple[np.ndarray, ...]]:
    """Return upstream's ``KFold(folds, shuffle=True, random_state=seed)`` (train, val) splits."""
    splitter = KFold(n_splits=folds, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(num_images)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_upstream_fold(
    paths: Sequence[Path],
    labels: np.ndarray,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    *,
    fold: int,
    freeze_backbone: bool,
    epochs: int,
    lr: float,
    device: torch.device,
    image_size: int = 160,
    batch_size: int = 16,
    backbone: str = "efficientnet_lite0",
    seed: int = 42,
) -> UpstreamFold:
    """Train and validate one fold the upstream way; the wall time includes building the model."""
    start = time.perf_counter()
    torch.manual_seed(seed + fold)
    num_classes = int(np.max(labels)) + 1
    model, prep = build_classifier(backbone, "imagenet", image_size, num_classes, 0.0, seed)
    if freeze_backbone:
        for parameter in model.backbone.parameters():
            parameter.requires_grad = False
    model.to(device)
    transform = transforms.Compose(
        [
            transforms.Resize((image_size, image_size)),
            transforms.ToTensor(),
            transforms.Normalize(prep.mean, prep.std),
        ]
    )
    paths = list(paths)
    train_set = UpstreamImageDataset([paths[i] for i in train_idx], labels[train_idx], transform)
    val_set = UpstreamImageDataset([paths[i] for i in val_idx], labels[val_idx], transform)
    train_loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, num_workers=0)
    val_loader = DataLoader(val_set, batch_size=batch_size, shuffle=False, num_workers=0)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    accuracy = float("nan")
    for _ in range(epochs):
        model.train()
        for images, targets in train_loader:
            images, targets = images.to(device), targets.to(device)
            loss = loss_fn(model(images), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for images, targets in val_loader:
                logits = model(images.to(device))
                correct += int((logits.argmax(1).cpu() == targets).sum())
        accuracy = correct / max(1, len(val_set))
    _sync(device)
    return UpstreamFold(
        fold, len(train_set), len(val_set), epochs, accuracy, time.perf_counter() - start
    )


def run_upstream_cv(
    paths: Sequence[Path],
    labels: np.ndarray,
    *,
    folds: int,
    freeze_backbone: bool,
    epochs: int,
    lr: float,
    device: torch.device,
    only_fold: int | None = None,
    image_size: int = 160,
    batch_size: int = 16,
    seed: int = 42,
) -> list[UpstreamFold]:
    """Run upstream k-fold training (every fold, or only ``only_fold``); return each fold's result."""
    results = []
    for fold, (train_idx, val_idx) in enumerate(upstream_folds(len(paths), folds, seed)):
        if only_fold is not None and fold != only_fold:
            continue
        results.append(
            train_upstream_fold(
                paths,
                labels,
                train_idx,
                val_idx,
                fold=fold,
                freeze_backbone=freeze_backbone,
                epochs=epochs,
                lr=lr,
                device=device,
                image_size=image_size,
                batch_size=batch_size,
                seed=seed,
            )
        )
    return results
