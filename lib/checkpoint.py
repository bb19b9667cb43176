"""Checkpoints that carry everything needed to use a model: weights, classes, preprocessing.

Saved with plain types only, so they load with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from lib.models import Classifier, Preprocessing, build_classifier


def save_checkpoint(
    path: str | Path,
    model: Classifier,
    classes: list[str],
    preprocessing: Preprocessing,
    backbone: str,
    dropout: float = 0.0,
    metadata: dict[str, Any] | None = None,
    head_only_with_weights: str | None = None,
) -> Path:
    """Write model weights, class list, preprocessing and backbone name atomically; return the path.

    With ``head_only_with_weights`` (the backbone's weights spec, e.g. ``imagenet``) only the head
    is stored: right for a frozen backbone, which is rebuilt from those weights when loading.
    """
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if head_only_with_weights:
        state = {k: v for k, v in state.items() if k.startswith("head.")}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": 1,
        "state_dict": state,
        "backbone_weights": head_only_with_weights or "",
        "head_only": bool(head_only_with_weights),
        "classes": list(classes),
        "preprocessing": preprocessing.to_dict(),
        "backbone": backbone,
        "dropout": float(dropout),
        "metadata": dict(metadata or {}),
    }
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path) -> tuple[Classifier, list[str], Preprocessing, dict]:
    """Load a checkpoint safely (``weights_only=True``); return ``(model in eval mode, classes, prep, payload)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    prep_dict = payload["preprocessing"]
    prep = Preprocessing(
        int(prep_dict["image_size"]), tuple(prep_dict["mean"]), tuple(prep_dict["std"])
    )
    backbone_weights = payload.get("backbone_weights") or "none"
    model, _ = build_classifier(
        payload["backbone"],
        backbone_weights,
        prep.image_size,
        len(payload["classes"]),
        payload.get("dropout", 0.0),
        seed=0,
    )
    model.load_state_dict(payload["state_dict"], strict=not payload.get("head_only", False))
    model.eval()
    return model, list(payload["classes"]), prep, payload
