"""The real Sea-vs-Forest photos (DVC): the default frozen strategy must score well."""

from __future__ import annotations

import pytest

from imgcls.core.config import Strategy
from imgcls.data.folders import data_version, scan_image_folder
from imgcls.modeling.crossval import cross_validate


@pytest.mark.realdata
def test_five_fold_frozen_efficientnet_reaches_95_percent(real_data):
    folder = scan_image_folder(real_data / "train")
    strategy = Strategy()  # efficientnet_lite0, ImageNet weights, frozen, 5 folds
    assert (strategy.backbone, strategy.freeze_backbone, strategy.folds) == (
        "efficientnet_lite0",
        True,
        5,
    )
    result = cross_validate(strategy, folder, data_version(real_data), progress=False)
    summary = result.summary()
    assert summary["cv_accuracy_mean"] >= 0.95, summary
    assert len(result.folds) == 5 and all(f.val_accuracy >= 0.9 for f in result.folds)
