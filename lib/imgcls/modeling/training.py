"""Training loop: one fold of one strategy (epochs, early stopping, best state).

k-fold cross-validation and the refit on all training data are in :mod:`imgcls.modeling.crossval`.

Two input modes share one loop: *features* (a frozen backbone's cached embeddings; only the head
trains) and *images* (decoded uint8 images through the backbone; needed when the backbone is
fine-tuned, or when the feature cache is switched off).

On CUDA the image forward passes run under autocast (bfloat16, or float16 with a GradScaler),
batches arrive through pinned memory, and an epoch's loss and accuracy are summed on the GPU and
read once per epoch (see :mod:`imgcls.modeling.features` for the device policy). On the CPU the
arithmetic is float32 and the results are those of the code before the CUDA path, bit for bit.
"""

from __future__ import annotations

import contextlib
import copy
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from imgcls.core.config import Strategy
from imgcls.data.arrays import take_rows
from imgcls.data.cache import decoded_images
from imgcls.data.folders import ImageFolder
from imgcls.modeling.features import (
    EVAL_BATCH_SIZE,
    amp_context,
    amp_dtype,
    augment_batch,
    cached_features,
    to_device,
    to_model_input,
)
from imgcls.modeling.models import (
    Classifier,
    Preprocessing,
    build_classifier,
    build_head,
    freeze_backbone,
    preprocessing_for,
    set_train_mode,
)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's random generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer(strategy: Strategy, parameters: list[nn.Parameter]) -> torch.optim.Optimizer:
    """Return the strategy's optimizer (adam, adamw or sgd) over ``parameters``."""
    if strategy.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=strategy.lr, weight_decay=strategy.weight_decay)
    if strategy.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=strategy.lr, weight_decay=strategy.weight_decay)
    return torch.optim.SGD(
        parameters, lr=strategy.lr, momentum=strategy.momentum, weight_decay=strategy.weight_decay
    )


@dataclass
class FoldResult:
    """The outcome of training on one fold: history, best epoch and best-state scores."""

    fold: int
    history: list[dict[str, float]]
    best_epoch: int
    val_loss: float
    val_accuracy: float
    val_indices: np.ndarray
    train_seconds: float
    images_per_second: float
    state_dict: dict = field(repr=False, default_factory=dict)


class TrainingInputs:
    """Everything a strategy trains on: the inputs array, labels and how to turn rows into a batch.

    ``inputs`` is the cached features (float32 ``[N, F]``) or decoded images (uint8
    ``[N, 3, S, S]``) as a read-only memory map; :meth:`batch` copies only a batch's rows.
    """

    def __init__(
        self,
        strategy: Strategy,
        folder: ImageFolder,
        data_md5: str,
        device: torch.device,
        progress: bool = False,
    ):
        self.strategy = strategy
        self.device = device
        self.labels = torch.from_numpy(folder.labels)
        self.classes = folder.classes
        self.num_classes = len(folder.classes)
        self.use_features = strategy.freeze_backbone and strategy.use_feature_cache
        # Autocast only for backbone forward passes on CUDA; the head alone on cached features
        # is one small matrix product, kept in float32.
        self.amp_dtype = None if self.use_features else amp_dtype(device)
        if self.use_features:
            # Only the head trains: no backbone is built here (the features are cached).
            self.template = None
            self.prep = preprocessing_for(strategy.backbone, strategy.image_size)
            features, self.cache_hit = cached_features(
                folder,
                strategy.backbone,
                strategy.weights,
                strategy.image_size,
                data_md5,
                device,
                progress,
            )
            self.inputs: np.ndarray = features
        else:
            self.template, self.prep = self._build_classifier()
            self.cache_hit = False
            self.inputs = decoded_images(folder, strategy.image_size, data_md5, progress=progress)

    def new_model(self, seed: int) -> Classifier:
        """Return a fresh model with the head initialised from ``seed``.

        On cached features the backbone is an identity (features are its input); otherwise a
        copy of the pretrained backbone, frozen when the strategy says so.
        """
        if self.template is None:
            width = self.inputs.shape[1]
            model = Classifier(nn.Identity(), width, self.num_classes, self.strategy.dropout)
            model.head = build_head(width, self.num_classes, self.strategy.dropout, seed)
            return model.to(self.device)
        model = copy.deepcopy(self.template)
        model.head = build_head(
            model.head[1].in_features, self.num_classes, self.strategy.dropout, seed
        )
        if self.strategy.freeze_backbone:
            freeze_backbone(model)
        # channels_last weights to match channels_last inputs: about 1.6x faster CPU convolutions
        return model.to(self.device, memory_format=torch.channels_last)

    def _build_classifier(self) -> tuple[Classifier, Preprocessing]:
        s = self.strategy
        return build_classifier(
            s.backbone, s.weights, s.image_size, self.num_classes, s.dropout, s.seed
        )

    def full_model(self, trained: Classifier) -> Classifier:
        """Return a complete classifier (pretrained backbone + the trained head) on the CPU."""
        if self.template is not None:
            return trained.cpu()
        model, _ = self._build_classifier()
        model.head.load_state_dict(trained.head.state_dict())
        freeze_backbone(model)
        return model.eval()

    def trainable(self, model: Classifier) -> nn.Module:
        """Return the module that sees the inputs: the head on features, the whole model on images."""
        return model.head if self.use_features else model

    def autocast(self) -> contextlib.AbstractContextManager:
        """Return the context for forward passes: CUDA autocast on images, else a no-op."""
        return contextlib.nullcontext() if self.amp_dtype is None else amp_context(self.device)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Return a GradScaler, enabled only for float16 autocast (a pass-through otherwise).

        float16's largest value is 65504 and its smallest normal 6e-5: small gradients underflow
        to zero unless the loss is scaled up (PyTorch AMP docs, "Gradient Scaling"). bfloat16 and
        float32 need no scaling, and a disabled scaler calls ``optimizer.step()`` unchanged.
        """
        return torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

    def targets(self, rows: torch.Tensor) -> torch.Tensor:
        """Return the int64 labels ``[len(rows)]`` of ``rows`` on the device."""
        return to_device(self.labels[rows], self.device)

    def batch(self, rows: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Return the model-ready batch for ``rows`` (augmented when a generator is given).

        Features: float32 ``[B, F]``; images: normalised float32 ``[B, 3, S, S]``, channels_last.
        Only the rows of the batch are read from the memory-mapped inputs (``take_rows``); inputs
        replaced by an in-memory tensor are indexed directly.
        """
        if isinstance(self.inputs, torch.Tensor):
            data = self.inputs[rows]
        else:
            data = torch.from_numpy(take_rows(self.inputs, rows.numpy()))
        if self.use_features:
            return to_device(data, self.device)
        batch = to_model_input(data, self.prep, self.device)
        if generator is not None and self.strategy.augment:
            batch = augment_batch(batch, generator)
        return batch


@torch.inference_mode()
def predict_rows(
    inputs: TrainingInputs, module: nn.Module, rows: torch.Tensor, batch_size: int | None = None
) -> torch.Tensor:
    """Return float32 softmax probabilities ``[len(rows), C]``, on the CPU, of ``module`` (eval).

    Default batch: 1024 feature vectors, or ``EVAL_BATCH_SIZE`` images (a larger image batch is
    no faster on a CPU and holds more activations: 128 images peaked 0.5 GB above 32). Forward
    passes run under :meth:`TrainingInputs.autocast`; the probabilities are copied to the host once.
    """
    batch_size = batch_size or (1024 if inputs.use_features else EVAL_BATCH_SIZE)
    module.eval()
    outputs = []
    for i in range(0, len(rows), batch_size):
        batch = inputs.batch(rows[i : i + batch_size], None)
        with inputs.autocast():
            logits = module(batch)
        outputs.append(torch.softmax(logits.float(), dim=1))
    return torch.cat(outputs).cpu() if outputs else torch.empty(0, inputs.num_classes)


def train_epoch(
    inputs: TrainingInputs,
    model: Classifier,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    order: torch.Tensor,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train ``model`` for one pass over the rows ``order`` (shuffled int64 ``[N]``) in batches.

    Returns 0-dim tensors on ``inputs.device``: the sum over steps of ``loss * batch rows``
    (float64) and the count of correct training predictions (int64). The caller reads them once per
    epoch: a ``loss.item()`` per step would make the host wait for each CUDA step to finish (a
    host-device synchronisation) and leave the GPU idle while the next batch is prepared. Adding
    the float32 losses in float64, in step order, gives bit for bit the Python-float sum of
    ``loss.item() * len(rows)`` this replaces (float32 -> float64 is exact, and both round the same
    IEEE-754 double products and sums). The loss is computed in float32 from the logits, outside
    autocast; with float16 autocast ``scaler`` scales it (see :meth:`TrainingInputs.grad_scaler`).
    """
    strategy = inputs.strategy
    module = inputs.trainable(model)
    if inputs.use_features:
        module.train()
    else:
        set_train_mode(model, strategy.freeze_backbone)
    loss_fn = nn.CrossEntropyLoss()
    loss_sum = torch.zeros((), dtype=torch.float64, device=inputs.device)
    correct = torch.zeros((), dtype=torch.int64, device=inputs.device)
    for start in range(0, len(order), strategy.batch_size):
        rows = order[start : start + strategy.batch_size]
        targets = inputs.targets(rows)
        batch = inputs.batch(rows, generator)
        with inputs.autocast():
            logits = module(batch)
        logits = logits.float()
        loss = loss_fn(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        loss_sum += loss.detach().double() * len(rows)
        correct += (logits.argmax(1) == targets).sum()
    return loss_sum, correct


def train_rows(
    inputs: TrainingInputs,
    train_rows_: torch.Tensor,
    val_rows: torch.Tensor | None,
    seed: int,
    epochs: int,
    fold: int = -1,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[Classifier, list[dict[str, float]], int]:
    """Train a fresh model on ``train_rows_``; with ``val_rows``, early-stop and keep the best epoch.

    Returns ``(model with best weights, per-epoch history, best epoch (1-based))``; each epoch is
    one :func:`train_epoch`, whose device-side sums are read here once.
    """
    strategy = inputs.strategy
    seed_everything(seed)
    model = inputs.new_model(strategy.seed)
    module = inputs.trainable(model)
    parameters = [p for p in module.parameters() if p.requires_grad]
    optimizer = make_optimizer(strategy, parameters)
    scaler = inputs.grad_scaler()
    generator = torch.Generator().manual_seed(seed)
    history: list[dict[str, float]] = []
    best = (float("inf"), 0, copy.deepcopy(module.state_dict()))
    stale = 0
    for epoch in range(1, epochs + 1):
        order = train_rows_[torch.randperm(len(train_rows_), generator=generator)]
        epoch_start = time.perf_counter()
        loss_sum, correct = train_epoch(inputs, model, optimizer, scaler, order, generator)
        train_loss, train_correct = loss_sum.item(), int(correct)  # waits for the epoch's GPU work
        record = {
            "epoch": epoch,
            "train_loss": train_loss / len(order),
            "train_accuracy": train_correct / len(order),
            "epoch_train_seconds": time.perf_counter() - epoch_start,
        }
        if val_rows is not None and len(val_rows):
            val_start = time.perf_counter()
            probs = predict_rows(inputs, module, val_rows)
            targets = inputs.labels[val_rows]
            record["val_loss"] = float(
                nn.functional.nll_loss(torch.log(probs.clamp_min(1e-12)), targets)
            )
            record["val_accuracy"] = float((probs.argmax(1) == targets).float().mean())
            record["epoch_val_seconds"] = time.perf_counter() - val_start
            if record["val_loss"] < best[0] - 1e-6:
                best, stale = (record["val_loss"], epoch, copy.deepcopy(module.state_dict())), 0
            else:
                stale += 1
        else:
            best = (record["train_loss"], epoch, None)
        history.append(record)
        if on_epoch:
            on_epoch(fold, record)
        if val_rows is not None and strategy.patience and stale >= strategy.patience:
            break
    if best[2] is not None:
        module.load_state_dict(best[2])
    return model, history, best[1]
