"""The measured training steps; each runs in its own process (``run_benchmarks.py --step``)."""

from __future__ import annotations

import json
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_config import (
    BACKBONE,
    BATCH_SIZE,
    FINETUNE,
    FORWARD_BATCH,
    FROZEN,
    IMAGE_SIZE,
    SEED,
    WARMUP_STEPS,
)
from bench_grid import step_grid

# --------------------------------------------------------------------------------------------
# Helpers shared by the steps (run inside the step subprocesses)
# --------------------------------------------------------------------------------------------


def default_threads() -> int:
    """Return the number of CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def self_peak_rss_bytes() -> int:
    """Return this process's peak resident set size in bytes (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def subset_indices(labels: Any, per_class: int | None) -> list[int]:
    """Return the first ``per_class`` indices of every class (all indices when None)."""
    if per_class is None:
        return list(range(len(labels)))
    keep: list[int] = []
    for label in sorted(set(int(v) for v in labels)):
        keep += [i for i, v in enumerate(labels) if int(v) == label][:per_class]
    return sorted(keep)


def load_train_folder(cfg: dict[str, Any]) -> Any:
    """Return the training ImageFolder, cut to ``cfg['per_class']`` images per class in quick mode."""
    from imgcls.core import paths
    from imgcls.data.folders import ImageFolder, scan_image_folder

    folder = scan_image_folder(paths.data_dir() / "train", validate=False)
    keep = subset_indices(folder.labels, cfg["per_class"])
    if len(keep) == len(folder):
        return folder
    return ImageFolder(
        folder.root, folder.classes, [folder.paths[i] for i in keep], folder.labels[keep]
    )


def setup_torch(cfg: dict[str, Any]) -> Any:
    """Set torch's thread count and return the benchmark device."""
    import torch

    from imgcls.modeling.features import pick_device

    torch.set_num_threads(cfg["threads"])
    return pick_device(cfg["device"])


def notebook_imports(name: str, before: str) -> list[str]:
    """Return the import statements of notebook ``name``'s code cells before the first cell that
    contains ``before``: its top-level ``import`` / ``from ... import`` lines, in order.

    Read from the committed notebook, so the list cannot drift from what the notebook does.
    """
    import ast

    import nbformat

    from imgcls.core import paths

    notebook = nbformat.read(paths.notebooks_dir() / f"{name}.ipynb", as_version=4)
    statements: list[str] = []
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        if before in cell.source:
            break
        statements += [
            ast.unparse(node)
            for node in ast.parse(cell.source).body
            if isinstance(node, ast.Import | ast.ImportFrom)
        ]
    return statements


def import_libraries() -> float:
    """Import the training libraries before a step's clock starts; return the seconds it took.

    Every step times work, not interpreter start-up: the floors and the reference import torch,
    torchvision and timm (torchvision pulls in ``torch._dynamo``) before their clocks too. Ours
    also import what notebook 02 imports before its cross-validation cell
    (:func:`notebook_imports`: scikit-learn's metrics and SciPy come with them), so scikit-learn's
    1-2 s first import is not charged to the folds: after it, ``sklearn.model_selection``
    (imported by the fold split) costs ~0.02 s, as in 02.
    """
    start = time.perf_counter()
    import timm  # noqa: F401

    import imgcls.modeling.features
    import imgcls.modeling.training  # noqa: F401

    for statement in notebook_imports("02_train_cv", before="cross_validate("):
        exec(statement, {})  # the notebook's own import lines, nothing else
    return time.perf_counter() - start


def sync(device: Any) -> None:
    """Wait for queued CUDA work so wall times are complete."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_in_memory(folder: Any, image_size: int) -> Any:
    """Decode every image of ``folder`` to a uint8 ``[N, 3, S, S]`` tensor, bypassing all caches."""
    import numpy as np
    import torch

    from imgcls.data.images import load_rgb

    out = np.empty((len(folder), 3, image_size, image_size), dtype=np.uint8)
    for i, path in enumerate(folder.paths):
        out[i] = load_rgb(path, image_size).transpose(2, 0, 1)
    return torch.from_numpy(out)


def rate(images: float, seconds: float) -> float | None:
    """Return images per second, or None for a zero duration."""
    return images / seconds if seconds > 0 else None


# --------------------------------------------------------------------------------------------
# The measured steps
# --------------------------------------------------------------------------------------------


def step_floor_forward(cfg: dict[str, Any]) -> dict[str, Any]:
    """Time one frozen-backbone forward pass over in-memory uint8 images (eval, channels_last)."""
    return floor_forward(cfg, load_train_folder(cfg))


def floor_forward(cfg: dict[str, Any], folder: Any) -> dict[str, Any]:
    """Time the forward pass of the frozen backbone over ``folder``'s images, decoded untimed."""
    import torch

    from imgcls.modeling.features import to_model_input
    from imgcls.modeling.models import build_backbone

    device = setup_torch(cfg)
    images = decode_in_memory(folder, IMAGE_SIZE)
    backbone, _, prep = build_backbone(BACKBONE, "imagenet", IMAGE_SIZE)
    backbone = backbone.eval().to(device).to(memory_format=torch.channels_last)
    with torch.inference_mode():
        backbone(to_model_input(images[:FORWARD_BATCH], prep, device))  # warm-up, not timed
        sync(device)
        start = time.perf_counter()
        for first in range(0, len(images), FORWARD_BATCH):
            batch = to_model_input(images[first : first + FORWARD_BATCH], prep, device)
            backbone(batch)
        sync(device)
        seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "images": len(images),
        "images_per_second": rate(len(images), seconds),
        "notes": f"batch {FORWARD_BATCH}, 1 warm-up batch untimed",
    }


def step_floor_train_step(cfg: dict[str, Any]) -> dict[str, Any]:
    """Time N forward+backward+Adam steps of the unfrozen model on in-memory batches of 16."""
    import torch
    from torch import nn

    from imgcls.modeling.features import to_model_input
    from imgcls.modeling.models import build_classifier

    device = setup_torch(cfg)
    folder = load_train_folder(cfg)
    images = decode_in_memory(folder, IMAGE_SIZE)
    labels = torch.from_numpy(folder.labels)
    model, prep = build_classifier(BACKBONE, "imagenet", IMAGE_SIZE, len(folder.classes), 0.0, SEED)
    model = model.to(device).to(memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=FINETUNE["lr"])
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(SEED)

    def train_step() -> None:
        rows = torch.randint(0, len(images), (BATCH_SIZE,), generator=generator)
        batch = to_model_input(images[rows], prep, device)
        loss = loss_fn(model(batch), labels[rows].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(WARMUP_STEPS):
        train_step()
    sync(device)
    steps = cfg["train_steps"]
    start = time.perf_counter()
    for _ in range(steps):
        train_step()
    sync(device)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "images": steps * BATCH_SIZE,
        "images_per_second": rate(steps * BATCH_SIZE, seconds),
        "notes": f"{steps} steps x batch {BATCH_SIZE}, {WARMUP_STEPS} warm-up steps untimed",
    }


def _reference(cfg: dict[str, Any], frozen: bool) -> dict[str, Any]:
    from reference_upstream import run_upstream_cv

    device = setup_torch(cfg)
    folder = load_train_folder(cfg)
    params = FROZEN if frozen else FINETUNE
    start = time.perf_counter()
    folds = run_upstream_cv(
        folder.paths,
        folder.labels,
        folds=cfg["folds"],
        freeze_backbone=frozen,
        epochs=params["epochs"],
        lr=params["lr"],
        device=device,
        only_fold=None if frozen else 0,
        image_size=IMAGE_SIZE,
        batch_size=BATCH_SIZE,
        seed=SEED,
    )
    seconds = time.perf_counter() - start
    seen = sum(f.train_images * f.epochs for f in folds)
    accuracy = sum(f.val_accuracy for f in folds) / len(folds)
    what = f"{cfg['folds']} folds" if frozen else f"fold 0 of {cfg['folds']}"
    return {
        "seconds": seconds,
        "images": seen,
        "images_per_second": rate(seen, seconds),
        "train_images": sum(f.train_images for f in folds),
        "val_accuracy": accuracy,
        "folds": [vars(f) for f in folds],
        "notes": f"{what} x {params['epochs']} epoch(s), lr {params['lr']:g}, "
        f"val acc {accuracy:.3f}",
    }


def step_reference_frozen(cfg: dict[str, Any]) -> dict[str, Any]:
    """Time the upstream frozen-backbone k-fold training (decode every access, full forward)."""
    return _reference(cfg, frozen=True)


def step_reference_finetune(cfg: dict[str, Any]) -> dict[str, Any]:
    """Time one upstream fine-tuning fold (fold 0, 1 epoch, lr 1e-4)."""
    return _reference(cfg, frozen=False)


def _strategy(cfg: dict[str, Any], frozen: bool) -> Any:
    from imgcls.core.config import Strategy

    params = FROZEN if frozen else FINETUNE
    return Strategy(
        freeze_backbone=frozen,
        epochs=params["epochs"],
        lr=params["lr"],
        batch_size=BATCH_SIZE,
        patience=0,
        folds=cfg["folds"],
        image_size=IMAGE_SIZE,
    )


def _cache_files(root: Path) -> int:
    return sum(1 for p in root.rglob("*.npy")) if root.is_dir() else 0


def ours_frozen(
    cfg: dict[str, Any],
    expect_warm: bool,
    folder: Any = None,
    data_md5: str | None = None,
    validated: bool = True,
) -> dict[str, Any]:
    """Time imgcls.modeling.crossval.cross_validate of the frozen strategy on ``folder`` (default: train).

    With ``validated`` (default) the folder is validated and pHashed before the clock, as
    ``run_experiments.py`` does once per data version in its plan before any notebook runs (the
    validation rows time that step); without it, the clock includes it (the scale table's rows).
    """
    os.environ["IMGCLS_CACHE_DIR"] = cfg[
        "cache_dir"
    ]  # imgcls.core.paths.cache_dir() reads it per call
    import_seconds = import_libraries()
    from imgcls.data.duplicates import folder_hashes
    from imgcls.modeling.crossval import cross_validate

    device = setup_torch(cfg)
    folder = folder if folder is not None else load_train_folder(cfg)
    cached_before = _cache_files(Path(cfg["cache_dir"]))
    validation_seconds = None
    if validated:
        start = time.perf_counter()
        folder_hashes(folder)  # validates, hashes and records the files not recorded yet
        validation_seconds = time.perf_counter() - start
    start = time.perf_counter()
    result = cross_validate(
        _strategy(cfg, frozen=True),
        folder,
        data_md5 or cfg["data_md5"],
        device=str(device),
        progress=False,
    )
    sync(device)
    seconds = time.perf_counter() - start
    summary = result.summary()
    seen = sum(len(f.history) * (len(folder) - len(f.val_indices)) for f in result.folds)
    state = "warm" if result.feature_cache_hit else "cold"
    notes = (
        f"{cfg['folds']} folds x {FROZEN['epochs']} epochs, setup {summary['cv_setup_seconds']:.2f} s"
        f" (feature cache {state}), val acc {summary['cv_accuracy_mean']:.3f};"
        f" imports {import_seconds:.1f} s before the clock"
    )
    if validation_seconds is not None:
        notes += f"; validation and pHash {validation_seconds:.2f} s before the clock"
    if result.feature_cache_hit != expect_warm:
        notes += f" WARNING: expected a {'warm' if expect_warm else 'cold'} cache"
    return {
        "seconds": seconds,
        "images": seen,
        "images_per_second": rate(seen, seconds),
        "cache_files_before": cached_before,
        "import_seconds": import_seconds,
        "validation_seconds": validation_seconds,
        "feature_cache_hit": result.feature_cache_hit,
        "val_accuracy": summary["cv_accuracy_mean"],
        "summary": summary,
        "notes": notes,
    }


def step_ours_frozen_cold(cfg: dict[str, Any]) -> dict[str, Any]:
    """Time imgcls.modeling.crossval.cross_validate of the frozen strategy with empty caches."""
    return ours_frozen(cfg, expect_warm=False)


def step_ours_frozen_warm(cfg: dict[str, Any]) -> dict[str, Any]:
    """Time the same cross_validate call again, with the caches the cold run filled."""
    return ours_frozen(cfg, expect_warm=True)


def step_ours_finetune(cfg: dict[str, Any]) -> dict[str, Any]:
    """Time imgcls.modeling.training.train_rows of one fine-tuning fold (fold 0); setup is timed apart."""
    os.environ["IMGCLS_CACHE_DIR"] = cfg["cache_dir"]
    import_libraries()
    import numpy as np
    import torch

    from imgcls.data.folds import assign_folds
    from imgcls.modeling.crossval import prepare_inputs
    from imgcls.modeling.training import train_rows

    device = setup_torch(cfg)
    folder = load_train_folder(cfg)
    strategy = _strategy(cfg, frozen=False)
    cached_before = _cache_files(Path(cfg["cache_dir"]))
    inputs, setup_seconds = prepare_inputs(strategy, folder, cfg["data_md5"], str(device))
    assignment = assign_folds(folder.labels, strategy.folds, strategy.seed)
    train_idx = torch.from_numpy(np.flatnonzero(assignment != 0))
    val_idx = torch.from_numpy(np.flatnonzero(assignment == 0))
    start = time.perf_counter()
    _, history, _ = train_rows(inputs, train_idx, val_idx, strategy.seed, strategy.epochs)
    sync(device)
    seconds = time.perf_counter() - start
    seen = len(train_idx) * len(history)
    accuracy = history[-1].get("val_accuracy", float("nan"))
    train_seconds = sum(h["epoch_train_seconds"] for h in history)
    val_seconds = sum(h.get("epoch_val_seconds", 0.0) for h in history)
    return {
        "seconds": seconds,
        "images": seen,
        "images_per_second": rate(seen, seconds),
        "train_phase_seconds": train_seconds,
        "train_phase_images_per_second": rate(seen, train_seconds),
        "val_seconds": val_seconds,
        "setup_seconds": setup_seconds,
        "cache_files_before": cached_before,
        "train_images": len(train_idx),
        "val_accuracy": accuracy,
        "notes": f"fold 0 of {cfg['folds']} x {FINETUNE['epochs']} epoch, train_rows incl. val "
        f"pass ({len(val_idx)} images, {val_seconds:.2f} s; training steps alone "
        f"{train_seconds:.2f} s = {rate(seen, train_seconds) or 0:.1f} img/s); "
        f"prepare_inputs {setup_seconds:.2f} s apart "
        f"({'warm' if cached_before else 'cold'} decode cache), val acc {accuracy:.3f}",
    }


STEP_FUNCTIONS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "floor_forward": step_floor_forward,
    "floor_train_step": step_floor_train_step,
    "reference_frozen": step_reference_frozen,
    "ours_frozen_cold": step_ours_frozen_cold,
    "ours_frozen_warm": step_ours_frozen_warm,
    "reference_finetune": step_reference_finetune,
    "ours_finetune": step_ours_finetune,
    "grid": step_grid,
}


def run_step(
    name: str,
    config: Path,
    out: Path,
    functions: dict[str, Callable[[dict[str, Any]], dict[str, Any]]],
) -> int:
    """Run step ``functions[name]`` in this process; write its result (with peak RSS) to ``out``."""
    cfg = json.loads(config.read_text())
    result = functions[name](cfg)
    import torch

    from imgcls.modeling.features import pick_device

    device = pick_device(cfg["device"])
    result["step"] = name
    result["peak_rss_bytes"] = result.get("tree_peak_rss_bytes") or self_peak_rss_bytes()
    result["self_peak_rss_bytes"] = self_peak_rss_bytes()
    result["environment"] = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
    }
    if device.type == "cuda":
        result["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    out.write_text(json.dumps(result, indent=2, default=str))
    return 0
