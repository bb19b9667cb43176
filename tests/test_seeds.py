"""Seed repetitions for the noise floor: same folds, other seeds, and what 04 reads from MLflow."""

from __future__ import annotations

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from imgcls.core.config import Strategy
from imgcls.data.folders import data_version, scan_image_folder
from imgcls.modeling import seeds
from imgcls.modeling.crossval import cross_validate, prepare_inputs
from imgcls.pipeline.session import TrainingSession
from imgcls.selection.comparison import GridComparison

TINY = {"image_size": 32, "folds": 3, "epochs": 3, "batch_size": 8, "patience": 0}


def test_the_logged_seed_reproduces_the_cv_and_other_seeds_differ_on_the_same_folds(
    image_dataset, isolated_cache
):
    folder = scan_image_folder(image_dataset / "train")
    md5 = data_version(folder.root)
    strategy = Strategy(weights="none", backbone="resnet18", dropout=0.5, **TINY)
    inputs, _ = prepare_inputs(strategy, folder, md5)
    cv = cross_validate(strategy, folder, md5, progress=False, inputs=inputs)
    assert seeds.can_repeat_cheaply(inputs)
    all_seeds = seeds.repetition_seeds(strategy.seed, 3)
    assert all_seeds == [strategy.seed, strategy.seed + 1000, strategy.seed + 2000]
    scores = seeds.seed_fold_scores(inputs, cv.fold_assignment, all_seeds, strategy.epochs)
    assert scores.shape == (3, 3)
    # repetition 0 is the cross-validation itself, fold by fold
    assert scores[0].tolist() == [fold.val_accuracy for fold in cv.folds]
    assert ((scores >= 0.0) & (scores <= 1.0)).all()


def test_seed_repetitions_refuse_what_has_no_spread(image_dataset, isolated_cache):
    folder = scan_image_folder(image_dataset / "train")
    strategy = Strategy(weights="none", backbone="resnet18", **TINY)
    inputs, _ = prepare_inputs(strategy, folder, data_version(folder.root))
    with pytest.raises(ValueError, match="at least 2 repetitions"):
        seeds.repetition_seeds(1, 1)
    with pytest.raises(ValueError, match="at least 2 folds"):
        seeds.seed_fold_scores(inputs, np.zeros(len(folder), int), [1], 1)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        seeds.seed_fold_scores(inputs, np.array([0, 1, 0]), [1], 1)
    finetuned = Strategy(weights="none", backbone="resnet18", freeze_backbone=False, **TINY)
    assert not seeds.can_repeat_cheaply(prepare_inputs(finetuned, folder, "md5")[0])
    # an ensemble's or a mirrored score is not one plain head's: its repeats would measure
    # another model, so those keep the fold spread
    for other in ({"ensemble": "folds"}, {"tta": "flip"}):
        strategy = Strategy(weights="none", backbone="resnet18", **TINY, **other)
        assert not seeds.can_repeat_cheaply(prepare_inputs(strategy, folder, "md5")[0])


def test_02_logs_the_repetitions_and_04_uses_them_as_the_noise_floor(
    image_dataset, isolated_cache, tmp_path
):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    session = TrainingSession.start(
        {"weights": "none", "backbone": "resnet18", **TINY},
        "frozen",
        None,
        "seeds",
        uri,
        str(image_dataset),
    )
    session.cross_validate(progress=False)
    session.finish()
    metrics = MlflowClient().get_run(session.run_id).data.metrics
    assert metrics["seed_repetition_seconds"] > 0
    histories = [
        [m.value for m in MlflowClient().get_metric_history(session.run_id, name)]
        for name in ["fold_val_accuracy"] + [seeds.seed_metric(i) for i in range(1, 5)]
    ]
    assert [len(h) for h in histories] == [3] * 5
    grid = GridComparison.load("seeds", None, uri)
    floor, _ = grid.noise_floor()
    assert floor.source == "seeds" and floor.n_runs == 5 and floor.k == 3
    expected = np.sqrt(np.array(histories).var(axis=0, ddof=1).mean())
    assert floor.run_sd == pytest.approx(expected, rel=1e-12)
