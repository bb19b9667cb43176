"""What notebook 03 does: score a strategy's refit model (and its fold models) on labelled folders.

The model comes from MLflow (the parent run's checkpoints and its LoggedModel), never from
notebook state. Results are logged to that parent run: ``test_*`` metrics for ``data/test`` and
``<name>_*`` metrics for each extra evaluation folder, the quality gate as tags and metrics. Each
scored folder is a dataset input of the run (context ``evaluation``, digest = its data version)
and its metrics are linked to the refit LoggedModel and that dataset, so the model's page in
``mlflow ui`` lists them.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.tracking import MlflowClient

from imgcls import tracking
from imgcls.core import names
from imgcls.core.names import METRIC_LATENCY
from imgcls.data import duplicates
from imgcls.data.arrays import take_rows
from imgcls.data.cache import decoded_images
from imgcls.data.folders import (
    DataError,
    ImageFolder,
    cache_version,
    require_split,
    scan_image_folder,
)
from imgcls.data.images import load_rgb
from imgcls.evaluation import metrics
from imgcls.evaluation.latency import latency_ms_per_image
from imgcls.modeling.checkpoint import (
    head_from_checkpoint,
    load_checkpoint,
    model_from_checkpoint,
    preprocessing_of,
    read_checkpoint,
)
from imgcls.modeling.ensemble import with_tta
from imgcls.modeling.features import (
    EVAL_BATCH_SIZE,
    cached_features,
    head_probabilities,
    pick_device,
    set_threads,
    to_model_input,
)
from imgcls.modeling.models import Classifier, Preprocessing

logger = logging.getLogger(__name__)


@dataclass
class EvaluationResult:
    """Predictions and scores of one model on one labelled folder."""

    name: str
    folder: ImageFolder
    probabilities: np.ndarray
    scores: dict[str, float]
    data_md5: str
    dataset: mlflow.entities.Dataset | None = None

    @property
    def predictions(self) -> np.ndarray:
        """Return the predicted class index per image."""
        return self.probabilities.argmax(1)

    def scores_table(self) -> pd.DataFrame:
        """Return the headline scores as a one-column table."""
        keys = [
            "n_images",
            "accuracy",
            "accuracy_ci_low",
            "accuracy_ci_high",
            "balanced_accuracy",
            "macro_f1",
            "log_loss",
            "roc_auc",
            "pr_auc",
        ]
        return pd.DataFrame({"value": [self.scores[k] for k in keys]}, index=keys)

    def per_class(self) -> pd.DataFrame:
        """Return precision, recall, F1 and support per class."""
        return metrics.per_class_table(self.folder.labels, self.probabilities, self.folder.classes)

    def confusion(self) -> pd.DataFrame:
        """Return the confusion matrix (counts)."""
        return metrics.confusion(self.folder.labels, self.predictions, self.folder.classes)

    def hardest_indices(self, limit: int = 12) -> list[int]:
        """Return up to ``limit`` image indices: misclassified (most confident first), then the
        least confident correct ones. The gallery and its Grad-CAM overlays show these."""
        true, pred = self.folder.labels, self.predictions
        confidence = self.probabilities.max(1)
        wrong = [int(i) for i in np.argsort(-confidence, kind="stable") if pred[i] != true[i]]
        unsure = [int(i) for i in np.argsort(confidence, kind="stable") if pred[i] == true[i]]
        return (wrong + unsure)[:limit]

    def hardest_images(self, limit: int = 12) -> tuple[list[np.ndarray], list[str]]:
        """Return the :meth:`hardest_indices` images (128 px) with captions."""
        true = self.folder.labels
        pred = self.predictions
        confidence = self.probabilities.max(1)
        chosen = self.hardest_indices(limit)
        classes = self.folder.classes
        images = [load_rgb(self.folder.paths[i], 128) for i in chosen]
        captions = [
            f"{'WRONG' if pred[i] != true[i] else 'unsure'} {self.folder.paths[i].name}\n"
            f"true {classes[true[i]]}, pred {classes[pred[i]]} ({confidence[i]:.2f})"
            for i in chosen
        ]
        return images, captions


@torch.inference_mode()
def predict_folder(
    model: Classifier,
    prep: Preprocessing,
    folder: ImageFolder,
    data_md5: str,
    device: str | None = None,
    batch_size: int = EVAL_BATCH_SIZE,
) -> np.ndarray:
    """Return softmax probabilities ``[N, C]`` of ``model`` over a folder (decoded-image cache).

    The cache is memory-mapped and read ``batch_size`` rows at a time (``take_rows``).
    """
    dev = pick_device(device)
    model = model.eval().to(dev, memory_format=torch.channels_last)
    images = decoded_images(folder, prep.image_size, data_md5)
    out = []
    for start in range(0, len(images), batch_size):
        rows = take_rows(images, slice(start, start + batch_size))
        batch = to_model_input(torch.from_numpy(rows), prep, dev)
        out.append(torch.softmax(model(batch).float(), dim=1).cpu())
    return torch.cat(out).numpy()


def metric_prefix(name: str) -> str:
    """Return the MLflow metric prefix of an evaluation-set name (``test``, or a folder path).

    The rule is :func:`imgcls.core.names.metric_key` (``data/phone photos`` -> ``data_phone_photos``);
    raises imgcls.core.names.InvalidNameError for a name that gives no prefix.
    """
    return names.metric_key(name)


@dataclass
class EvaluationSession:
    """Evaluation of one grid point's models, logged to its MLflow parent run."""

    run_id: str
    model: Classifier
    classes: list[str]
    prep: Preprocessing
    params: dict[str, str]
    checkpoint_dir: Path
    device: str | None = None
    model_id: str | None = None

    @classmethod
    def start(
        cls,
        parent_run_id: str | None = None,
        experiment_name: str = tracking.DEFAULT_EXPERIMENT,
        tracking_uri: str | None = None,
        torch_threads: int = 0,
        device: str | None = None,
    ) -> EvaluationSession:
        """Find the run (given id, or the latest finished training run) and load its refit model.

        The run's checkpoints are downloaded to a temporary folder that is deleted when the
        session is garbage-collected (or the process exits). The refit model's LoggedModel is
        looked up by source run (:func:`imgcls.tracking.logged_model`) so that the scores are
        linked to it; a run without one (only a checkpoint) is still evaluated, unlinked, with a
        warning.
        """
        set_threads(torch_threads)
        tracking.configure(tracking_uri)
        run_id = parent_run_id or tracking.latest_run(
            experiment_name, f"tags.{tracking.TAG_KIND} = 'grid_point'"
        )
        run = MlflowClient().get_run(run_id)
        try:
            model_id: str | None = tracking.logged_model(run_id).model_id
        except tracking.TrackingError as exc:
            # the text only: a record holding the exception would keep this frame (and the
            # session, whose finalizer deletes the downloaded checkpoints) alive
            logger.warning("%s; its scores are logged to the run only", str(exc))
            model_id = None
        target = Path(tempfile.mkdtemp(prefix="eval-"))
        checkpoint_dir = tracking.download_artifact(run_id, "checkpoints", target)
        model, classes, prep, _ = load_checkpoint(checkpoint_dir / "refit.pt")
        params = dict(run.data.params)
        session = cls(run_id, model, classes, prep, params, checkpoint_dir, device, model_id)
        weakref.finalize(session, shutil.rmtree, target, True)
        return session

    def load_folder(self, folder: str | Path, skip_bad_images: bool = False) -> ImageFolder:
        """Scan a labelled folder and check its classes equal the model's classes."""
        scanned = scan_image_folder(folder, skip_bad=skip_bad_images)
        if scanned.classes != self.classes:
            raise DataError(
                f"{folder}: classes {scanned.classes} do not match the model's classes "
                f"{self.classes}; an evaluation folder needs exactly the same class folders"
            )
        return scanned

    def evaluate(self, folder: ImageFolder, name: str = "test") -> EvaluationResult:
        """Score the refit model on ``folder``; log ``<name>_*`` metrics to the run.

        The folder is logged as dataset ``name`` (context ``evaluation``, digest = its data
        version) and the metrics are linked to the refit LoggedModel and that dataset
        (``mlflow.log_metrics(model_id=..., dataset=...)``).
        """
        md5 = cache_version(folder, training=False)  # its data version, also its cache key
        probs = predict_folder(self.model, self.prep, folder, md5, self.device)
        scores = metrics.classification_metrics(folder.labels, probs, self.classes)
        scores["ece"] = metrics.expected_calibration_error(folder.labels, probs)
        prefix = metric_prefix(name)
        logged = {f"{prefix}_{k}": v for k, v in scores.items() if np.isfinite(v)}
        logged[f"{prefix}_skipped_images"] = len(folder.skipped)
        dataset = tracking.split_dataset(name, folder.root, md5)
        tracking.log_datasets(self.run_id, [dataset], "evaluation")
        self._log_model_metrics(logged, dataset)
        tracking.log_batch(self.run_id, tags={f"{prefix}_data_md5": md5})
        return EvaluationResult(name, folder, probs, scores, md5, dataset)

    def _log_model_metrics(
        self, values: dict[str, float], dataset: mlflow.entities.Dataset | None
    ) -> None:
        """Log metrics to the run, linked to the refit LoggedModel and ``dataset``."""
        mlflow.log_metrics(
            {k: float(v) for k, v in values.items()},
            run_id=self.run_id,
            model_id=self.model_id,
            dataset=dataset,
            synchronous=True,
        )

    def evaluate_test(
        self, data_dir: str | None = None, skip_bad_images: bool = False
    ) -> EvaluationResult:
        """Score the refit model on the ``test`` split; log it and its latency per image.

        Besides the ``test_*`` metrics, ``latency_ms_per_image`` (batch size 1, median over up to
        32 test images; :func:`imgcls.evaluation.latency.latency_ms_per_image`) is logged to the
        run, linked to the refit LoggedModel: the promotion rule's tie-break after training time.
        """
        root = Path(data_dir) if data_dir else None
        result = self.evaluate(
            self.load_folder(require_split("test", root), skip_bad_images), "test"
        )
        images = decoded_images(result.folder, self.prep.image_size, result.data_md5)
        latency = latency_ms_per_image(self.model, images, self.prep, self.device)
        self._log_model_metrics({METRIC_LATENCY: latency}, None)
        return result

    def without_train_copies(
        self, result: EvaluationResult, data_dir: str | None = None, skip_bad_images: bool = False
    ) -> pd.DataFrame:
        """Return test accuracy with and without test images that have a near-copy in training.

        A near-copy is a training image within :data:`imgcls.data.duplicates.MAX_DISTANCE` bits
        of perceptual hash (resized, re-encoded, slightly edited copies). Rows: all test images,
        and those without a near-copy; columns: images, accuracy (fraction) and its 95% Wilson
        interval. Logs ``<prefix>_images_with_train_copies`` and
        ``<prefix>_accuracy_without_train_copies`` (linked to the refit model and the dataset).
        """
        root = Path(data_dir) if data_dir else None
        train = scan_image_folder(require_split("train", root), skip_bad=skip_bad_images)
        leaked = duplicates.test_images_with_train_copies(train, result.folder)
        clean = np.array([path not in leaked for path in result.folder.paths], dtype=bool)
        correct = result.predictions == result.folder.labels
        rows = {}
        for label, mask in (
            ("all test images", np.ones_like(clean)),
            ("without near-copies", clean),
        ):
            n, hits = int(mask.sum()), int(correct[mask].sum())
            low, high = metrics.wilson_interval(hits, n)
            rows[label] = {
                "images": n,
                "accuracy": hits / n if n else float("nan"),
                "ci_low": low,
                "ci_high": high,
            }
        prefix = metric_prefix(result.name)
        values = {f"{prefix}_images_with_train_copies": float(len(leaked))}
        if clean.any():
            values[f"{prefix}_accuracy_without_train_copies"] = rows["without near-copies"][
                "accuracy"
            ]
        self._log_model_metrics(values, result.dataset)
        return pd.DataFrame(rows).T

    def fold_probabilities(self, path: Path, result: EvaluationResult) -> np.ndarray:
        """Return a fold checkpoint's softmax probabilities ``[N, C]`` on the folder of ``result``.

        A head-only checkpoint (frozen backbone) is applied to the folder's cached backbone
        features, computed once for every fold and grid point with the same backbone and weights;
        a full checkpoint runs its own model over the images. With the strategy's ``tta: flip``
        the probabilities average each image and its mirror, as the refit model's do.
        """
        payload = read_checkpoint(path)
        tta = self.params.get("tta", "none")
        if not payload.get("head_only"):
            model = with_tta(model_from_checkpoint(payload), tta)
            prep = preprocessing_of(payload)
            return predict_folder(model, prep, result.folder, result.data_md5, self.device)
        spec = (
            result.folder,
            payload["backbone"],
            payload["backbone_weights"],
            preprocessing_of(payload).image_size,
            result.data_md5,
            pick_device(self.device),
        )
        mirrored = [True] if tta == "flip" else []
        views = [cached_features(*spec, mirrored=m)[0] for m in [False, *mirrored]]
        head = head_from_checkpoint(payload)
        with torch.inference_mode():
            probs = [head_probabilities(head, v) for v in views]  # streamed from the cache
        return (sum(probs) / len(probs)).numpy()

    def fold_models_on(self, result: EvaluationResult) -> pd.DataFrame:
        """Score every fold model on the same folder; log mean and std; return a table.

        The last row is the strategy's model (``result``'s): the refit, or for ``ensemble: folds``
        the average of the fold models above it.
        """
        served = (
            "refit (all training data)"
            if self.params.get("ensemble", "none") == "none"
            else "ensemble (mean of the fold models)"
        )
        rows = []
        for path in sorted(self.checkpoint_dir.glob("fold*.pt")):
            probs = self.fold_probabilities(path, result)
            scores = metrics.classification_metrics(result.folder.labels, probs, self.classes)
            rows.append(
                {
                    "model": path.stem,
                    "accuracy": scores["accuracy"],
                    "log_loss": scores["log_loss"],
                    "roc_auc": scores["roc_auc"],
                }
            )
        rows.append(
            {
                "model": served,
                "accuracy": result.scores["accuracy"],
                "log_loss": result.scores["log_loss"],
                "roc_auc": result.scores["roc_auc"],
            }
        )
        table = pd.DataFrame(rows).set_index("model")
        folds = table.drop(index=served)
        if len(folds):
            prefix = metric_prefix(result.name)
            tracking.log_batch(
                self.run_id,
                metrics={
                    f"{prefix}_fold_models_accuracy_mean": float(folds["accuracy"].mean()),
                    f"{prefix}_fold_models_accuracy_std": float(folds["accuracy"].std(ddof=1))
                    if len(folds) > 1
                    else 0.0,
                },
            )
        return table

    def gate(self, result: EvaluationResult, min_accuracy: float | None = None) -> dict[str, Any]:
        """Apply the quality gate (default: the strategy's ``min_accuracy``); log and return it."""
        threshold = float(
            min_accuracy if min_accuracy is not None else self.params.get("min_accuracy", 0.70)
        )
        verdict = metrics.quality_gate(result.scores["accuracy"], threshold)
        self._log_model_metrics(
            {
                "gate_passed": float(verdict["passed"]),
                "gate_min_accuracy": threshold,
                "gate_margin": verdict["margin"],
            },
            result.dataset,
        )
        tracking.log_batch(
            self.run_id,
            tags={
                "quality_gate": "passed" if verdict["passed"] else "failed",
                "quality_gate_message": verdict["message"],
            },
        )
        return verdict
