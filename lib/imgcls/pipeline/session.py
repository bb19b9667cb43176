"""What notebook 02 does, as a few calls: set up one strategy's MLflow run, cross-validate, refit.

The runner creates the parent run, writes its identity (params, lineage tags) and passes its id;
a notebook opened by hand creates its own run and writes the same identity with the same call
(:func:`imgcls.tracking.log_grid_point_identity`). Fold results go to child runs (per-epoch
metrics with ``step`` = epoch); the CV summary, the checkpoints and the refit model (an MLflow
pyfunc taking images, found again through its LoggedModel) go to the parent run. The training
split is an MLflow dataset input (context ``training``) of the parent and of every fold run.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch
from mlflow.tracking import MlflowClient

from imgcls import tracking
from imgcls.core.config import Strategy, check_against_data, strategy_from_dict
from imgcls.data.folders import (
    ImageFolder,
    cache_version,
    data_version,
    require_split,
    scan_image_folder,
)
from imgcls.data.folds import fold_assignment_hash
from imgcls.modeling import seeds
from imgcls.modeling.checkpoint import save_checkpoint
from imgcls.modeling.crossval import CVResult, cross_validate, prepare_inputs, refit
from imgcls.modeling.ensemble import fold_ensemble, with_tta
from imgcls.modeling.features import set_threads
from imgcls.modeling.training import TrainingInputs
from imgcls.selection.comparison import PARAM_FOLD_ASSIGNMENT

logger = logging.getLogger(__name__)


@dataclass
class TrainingSession:
    """One strategy's training inside its MLflow parent run."""

    strategy: Strategy
    folder: ImageFolder
    data_md5: str
    run_id: str
    experiment_id: str
    managed: bool
    dataset: mlflow.entities.Dataset
    device: str | None = None
    inputs: TrainingInputs | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @classmethod
    def start(
        cls,
        strategy: dict[str, Any],
        strategy_name: str = "default",
        parent_run_id: str | None = None,
        experiment_name: str = tracking.DEFAULT_EXPERIMENT,
        tracking_uri: str | None = None,
        data_dir: str | None = None,
        torch_threads: int = 0,
        skip_bad_images: bool = False,
        device: str | None = None,
    ) -> TrainingSession:
        """Validate the strategy and data, and open (or create) the MLflow parent run.

        With ``parent_run_id`` (the runner's run, whose identity the runner wrote) the session
        only adds what it learns from the data; without it, it creates a run named
        ``Strategy.run_name`` and writes the identity with
        :func:`imgcls.tracking.log_grid_point_identity`, as the runner does. Either way the
        ``train`` split is logged as a dataset input (digest: its data version). Raises
        ConfigError/DataError for a bad strategy or data folder, TrackingError for the store.
        """
        set_threads(torch_threads)
        parsed = strategy_from_dict({**strategy, "name": strategy_name}, where="strategy")
        root = Path(data_dir) if data_dir else None
        train_dir = require_split("train", root)
        folder = scan_image_folder(train_dir, skip_bad=skip_bad_images)
        check_against_data(parsed, folder.class_counts(), where="strategy")
        md5 = cache_version(folder, training=True)  # the dataset's: run key and train caches
        dataset = tracking.split_dataset("train", train_dir, data_version(train_dir))
        tracking.configure(tracking_uri)
        experiment_id = tracking.get_experiment_id(experiment_name)
        client = MlflowClient()
        if parent_run_id is None:
            run_id = client.create_run(experiment_id, run_name=parsed.run_name).info.run_id
            tags = tracking.lineage_tags(parsed, md5)
            tracking.log_grid_point_identity(run_id, parsed.params(), tags)
        else:
            run_id = client.get_run(parent_run_id).info.run_id
        tracking.log_datasets(run_id, [dataset], "training")
        tracking.log_batch(
            run_id,
            metrics={"skipped_images_train": len(folder.skipped)},
            tags={"classes": ",".join(folder.classes)},
        )
        managed = parent_run_id is not None
        return cls(parsed, folder, md5, run_id, experiment_id, managed, dataset, device)

    def describe(self) -> pd.DataFrame:
        """Return a one-column table of the strategy, data and run this session uses."""
        rows = {
            **self.strategy.params(),
            "train images": len(self.folder),
            "classes": ", ".join(self.folder.classes),
            "data version": self.data_md5,
            "MLflow run": self.run_id,
            "torch threads": torch.get_num_threads(),
        }
        return pd.DataFrame({"value": [str(v) for v in rows.values()]}, index=list(rows))

    def cross_validate(self, progress: bool = True) -> CVResult:
        """Run k-fold CV; log one child run per fold and the CV summary on the parent.

        Each fold run is a child of the parent run (``mlflow.start_run(parent_run_id=...)``),
        named ``<grid point>-fold<k>``, with the train split as its training dataset. The parent
        gets param ``fold_assignment`` (:func:`imgcls.data.folds.fold_assignment_hash`).
        """
        self.inputs, setup = prepare_inputs(
            self.strategy, self.folder, self.data_md5, self.device, progress
        )
        self.timings["input_setup_seconds"] = setup
        result = cross_validate(
            self.strategy, self.folder, self.data_md5, self.device, progress, inputs=self.inputs
        )
        result.setup_seconds += setup  # the inputs' setup, and the views' (cross_validate's)
        client = MlflowClient()
        point = client.get_run(self.run_id).data.tags.get(tracking.TAG_GRID_POINT)
        point = point or self.strategy.run_name
        tags = {
            tracking.TAG_KIND: "fold",
            **tracking.git_info(),
            **tracking.source_tags(tracking.SOURCE_NOTEBOOK),
        }
        for fold in result.folds:
            self._log_fold_run(f"{point}-fold{fold.fold}", {**tags, "fold": str(fold.fold)}, fold)
        summary = result.summary()
        summary["feature_cache_hit"] = float(result.feature_cache_hit)
        summary["n_train_images"] = len(self.folder)
        # which file was in which fold: comparison pairs fold scores only between equal splits
        folds = fold_assignment_hash(self.folder.relpaths(), result.fold_assignment)
        tracking.log_batch(self.run_id, metrics=summary, params={PARAM_FOLD_ASSIGNMENT: folds})
        client.log_batch(
            self.run_id,
            metrics=[
                mlflow.entities.Metric(name, value, int(time.time() * 1000), fold.fold)
                for fold in result.folds
                for name, value in (
                    ("fold_val_accuracy", fold.val_accuracy),
                    ("fold_val_loss", fold.val_loss),
                )
            ],
        )
        self._log_seed_repetitions(result, progress)
        with tempfile.TemporaryDirectory() as tmp:
            assignment = pd.DataFrame(
                {
                    "path": self.folder.relpaths(),
                    "label": [self.folder.classes[i] for i in self.folder.labels],
                    "fold": result.fold_assignment,
                }
            )
            assignment.to_csv(Path(tmp) / "fold_assignment.csv", index=False)
            self._save_fold_checkpoints(result, Path(tmp) / "checkpoints")
            client.log_artifact(self.run_id, str(Path(tmp) / "fold_assignment.csv"), "cv")
            client.log_artifacts(self.run_id, str(Path(tmp) / "checkpoints"), "checkpoints")
        return result

    def _log_seed_repetitions(self, result: CVResult, progress: bool) -> None:
        """For a head on cached features, repeat the CV with other seeds on the same folds.

        Logs the fold scores of repetition i (1..4) as metric ``fold_val_accuracy_seed<i>``
        (step = fold, like ``fold_val_accuracy``, which is repetition 0) and
        ``seed_repetition_seconds``; notebook 04's noise floor reads them
        (:meth:`imgcls.selection.comparison.GridComparison.noise_floor`). Fine-tuned strategies
        log nothing here (a repeat costs a full CV): their noise floor uses the fold spread.
        """
        if self.inputs is None or not seeds.can_repeat_cheaply(self.inputs):
            return
        start = time.perf_counter()
        if progress:
            logger.info("Seed repetitions for the noise floor (heads on cached features):")
        extra = seeds.repetition_seeds(self.strategy.seed)[1:]
        scores = seeds.seed_fold_scores(
            self.inputs, result.fold_assignment, extra, self.strategy.epochs
        )
        now = int(time.time() * 1000)
        MlflowClient().log_batch(
            self.run_id,
            metrics=[
                mlflow.entities.Metric(seeds.seed_metric(repetition), float(value), now, fold)
                for repetition, row in enumerate(scores, start=1)
                for fold, value in enumerate(row)
            ],
        )
        tracking.log_batch(
            self.run_id, metrics={"seed_repetition_seconds": time.perf_counter() - start}
        )

    def _log_fold_run(self, name: str, tags: dict[str, str], fold: Any) -> None:
        """Log one fold as a FINISHED child run ``name`` of the parent run."""
        with mlflow.start_run(
            experiment_id=self.experiment_id,
            run_name=name,
            parent_run_id=self.run_id,
            nested=True,
            tags=tags,
        ) as child:
            child_id = child.info.run_id
            tracking.log_datasets(child_id, [self.dataset], "training")
            tracking.log_history(child_id, fold.history)
            tracking.log_batch(
                child_id,
                params={
                    "fold": fold.fold,
                    "n_train": int(len(self.folder) - len(fold.val_indices)),
                    "n_val": len(fold.val_indices),
                },
                metrics={
                    "best_val_accuracy": fold.val_accuracy,
                    "best_val_loss": fold.val_loss,
                    "best_epoch": fold.best_epoch,
                    "train_seconds": fold.train_seconds,
                },
            )

    def _save_fold_checkpoints(self, result: CVResult, folder: Path) -> None:
        head_only = self.strategy.weights if self.strategy.freeze_backbone else None
        for fold in result.folds:
            model = self.inputs.new_model(self.strategy.seed)
            model.load_state_dict(fold.state_dict)
            # a head-only checkpoint needs no backbone: only the head's tensors are stored
            full = model.cpu() if head_only else self.inputs.full_model(model.cpu())
            save_checkpoint(
                folder / f"fold{fold.fold}.pt",
                full,
                result.classes,
                result.preprocessing,
                self.strategy.backbone,
                self.strategy.dropout,
                {"fold": fold.fold},
                head_only_with_weights=head_only,
            )

    def fold_table(self, result: CVResult) -> pd.DataFrame:
        """Return one row per fold: best epoch, validation accuracy and loss, seconds."""
        return pd.DataFrame(
            [
                {
                    "fold": f.fold,
                    "val images": len(f.val_indices),
                    "best epoch": f.best_epoch,
                    "epochs run": len(f.history),
                    "val accuracy": f.val_accuracy,
                    "val loss": f.val_loss,
                    "seconds": round(f.train_seconds, 2),
                }
                for f in result.folds
            ]
        ).set_index("fold")

    def summary_table(self, result: CVResult) -> pd.DataFrame:
        """Return the CV summary (mean and std of validation accuracy and loss) as a table."""
        s = result.summary()
        return pd.DataFrame(
            {
                "mean": [s["cv_accuracy_mean"], s["cv_loss_mean"]],
                "std": [s["cv_accuracy_std"], s["cv_loss_std"]],
            },
            index=["validation accuracy", "validation loss"],
        )

    def refit(self, result: CVResult, progress: bool = True) -> dict[str, Any]:
        """Train on all training data (epochs = mean best CV epoch); log checkpoint and pyfunc model.

        With ``ensemble: folds`` nothing is retrained: the model is the fold models' heads on one
        backbone (:func:`imgcls.modeling.ensemble.fold_ensemble`, ``epochs`` 0); with ``tta: flip``
        it averages each image and its mirror (:func:`imgcls.modeling.ensemble.with_tta`).

        The pyfunc model becomes a LoggedModel of the parent run, carrying the strategy's params;
        evaluation finds it with :func:`imgcls.tracking.logged_model`. Returns ``model_uri``,
        ``model_id``, ``epochs``, ``seconds`` (wall-clock) and ``final_train_accuracy``.
        """
        from imgcls.serving.pyfunc import log_pyfunc_model

        epochs = result.refit_epochs()
        if self.strategy.ensemble == "folds":  # the served model is the fold models averaged
            epochs = 0
            model, history, seconds = fold_ensemble(
                self.strategy, result.folds, self.inputs, self.folder, self.data_md5
            )
        else:
            model, history, seconds = refit(
                self.strategy,
                self.folder,
                self.data_md5,
                epochs,
                self.device,
                inputs=self.inputs,
                progress=progress,
            )
            model = with_tta(model, self.strategy.tta)
        if progress:
            logger.info(
                "  refit on %d images, %d epochs (%.1fs)", len(self.folder), epochs, seconds
            )
        params = MlflowClient().get_run(self.run_id).data.params
        # the model's own lineage: the notebook and commit that produced it ("Logged from")
        tags = {**tracking.source_tags(tracking.SOURCE_NOTEBOOK), **tracking.git_info()}
        with tempfile.TemporaryDirectory() as tmp:
            path = save_checkpoint(
                Path(tmp) / "refit.pt",
                model,
                result.classes,
                result.preprocessing,
                self.strategy.backbone,
                self.strategy.dropout,
                {"epochs": epochs, "run_id": self.run_id},
            )
            MlflowClient().log_artifact(self.run_id, str(path), "checkpoints")
            start = time.perf_counter()
            with tracking.active_run(self.run_id, self.managed):
                info = log_pyfunc_model(path, self.folder.paths[0], params=params, tags=tags)
            log_seconds = time.perf_counter() - start
        tracking.log_batch(
            self.run_id,
            metrics={
                "refit_epochs": epochs,
                "refit_seconds": seconds,
                "model_log_seconds": log_seconds,
                "refit_final_train_loss": history[-1]["train_loss"],
                "refit_final_train_accuracy": history[-1]["train_accuracy"],
            },
        )
        return {
            "model_uri": info.model_uri,
            "model_id": info.model_id,
            "epochs": epochs,
            "seconds": seconds,
            "final_train_accuracy": history[-1]["train_accuracy"],
        }

    def finish(self) -> str:
        """End a by-hand run as FINISHED (the runner ends its own runs); return the run id."""
        if not self.managed:
            MlflowClient().set_terminated(self.run_id, "FINISHED")
        uri = mlflow.get_tracking_uri()
        logger.info("MLflow run %s (%s) at %s", self.run_id, self.strategy.run_name, uri)
        return self.run_id
