"""Checkpoints that carry everything needed to use a model: weights, classes, preprocessing.

Saved with plain types only, so they load with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imgcls.modeling.ensemble import EnsembleClassifier, ensemble_from_payload
from imgcls.modeling.models import Classifier, Preprocessing, build_classifier, build_head


def save_checkpoint(
    path: str | Path,
    model: Classifier | EnsembleClassifier,
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
    An :class:`~imgcls.modeling.ensemble.EnsembleClassifier` (``tta``/``ensemble`` strategies)
    also stores its ``ensemble`` spec; its heads are the ``heads.*`` tensors.
    """
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    heads = "heads." if isinstance(model, EnsembleClassifier) else "head."
    if head_only_with_weights:
        state = {k: v for k, v in state.items() if k.startswith(heads)}
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
    if isinstance(model, EnsembleClassifier):
        payload["ensemble"] = model.spec()
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint's payload safely (``weights_only=True``) without building a model."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    return torch.load(path, map_location="cpu", weights_only=True)


def preprocessing_of(payload: dict) -> Preprocessing:
    """Return the preprocessing a checkpoint's model expects."""
    prep = payload["preprocessing"]
    return Preprocessing(int(prep["image_size"]), tuple(prep["mean"]), tuple(prep["std"]))


def model_from_checkpoint(payload: dict) -> Classifier | EnsembleClassifier:
    """Build a checkpoint's full classifier (backbone rebuilt from its weights when head-only).

    A payload with an ``ensemble`` spec gives an :class:`~imgcls.modeling.ensemble.EnsembleClassifier`.
    """
    if payload.get("ensemble"):
        return ensemble_from_payload(payload)
    model, _ = build_classifier(
        payload["backbone"],
        payload.get("backbone_weights") or "none",
        preprocessing_of(payload).image_size,
        len(payload["classes"]),
        payload.get("dropout", 0.0),
        seed=0,
    )
    model.load_state_dict(payload["state_dict"], strict=not payload.get("head_only", False))
    return model.eval()


def head_from_checkpoint(payload: dict) -> nn.Sequential:
    """Build only a checkpoint's head (dropout + linear), in eval mode: it maps features to logits."""
    weight = payload["state_dict"]["head.1.weight"]
    head = build_head(weight.shape[1], weight.shape[0], payload.get("dropout", 0.0), seed=0)
    head.load_state_dict(
        {
            k.removeprefix("head."): v
            for k, v in payload["state_dict"].items()
            if k.startswith("head.")
        }
    )
    return head.eval()


def load_checkpoint(
    path: str | Path,
) -> tuple[Classifier | EnsembleClassifier, list[str], Preprocessing, dict]:
    """Load a checkpoint safely (``weights_only=True``); return ``(model in eval mode, classes, prep, payload)``."""
    payload = read_checkpoint(path)
    return (
        model_from_checkpoint(payload),
        list(payload["classes"]),
        preprocessing_of(payload),
        payload,
    )
