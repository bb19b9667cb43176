"""Latency per image: what is timed, how many images, errors, and that 03's evaluation logs it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from imgcls import tracking
from imgcls.core.names import METRIC_LATENCY
from imgcls.evaluation.evaluate import EvaluationSession
from imgcls.evaluation.latency import latency_ms_per_image
from imgcls.modeling.models import build_classifier
from imgcls.selection.incumbent import run_cost
from tests.conftest import write_dataset


@pytest.fixture()
def tiny_model():
    return build_classifier("resnet18", "none", 32, 2, 0.0, seed=0)


def _images(count: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (count, 3, size, size), dtype=np.uint8)


def test_each_timed_image_is_one_batch_of_one_after_the_warmup(tiny_model):
    model, prep = tiny_model
    seen: list[tuple[int, ...]] = []

    def predict(batch: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(batch.shape))
        return model.eval()(batch)

    ms = latency_ms_per_image(predict, _images(50), prep, "cpu", max_images=7, warmup=2)
    assert math.isfinite(ms) and ms > 0
    assert seen == [(1, 3, 32, 32)] * (2 + 7)


def test_fewer_images_than_the_maximum_are_all_timed(tiny_model):
    model, prep = tiny_model
    calls = []
    latency_ms_per_image(lambda b: calls.append(1) or model.eval()(b), _images(4), prep, "cpu")
    assert len(calls) == 3 + 4  # WARMUP_PASSES + every image


@pytest.mark.parametrize(
    "images",
    [
        np.zeros((0, 3, 32, 32), np.uint8),  # nothing to time
        np.zeros((2, 32, 32, 3), np.uint8),  # channels last: not the decoded-cache layout
        np.zeros((2, 3, 32, 32), np.float32),  # not uint8
    ],
)
def test_wrong_inputs_are_refused_with_the_shape_named(tiny_model, images):
    model, prep = tiny_model
    with pytest.raises(ValueError, match=r"\[N, 3, S, S\]"):
        latency_ms_per_image(model, images, prep, "cpu")


def test_evaluate_test_logs_the_latency_the_promotion_rule_reads(tmp_path, isolated_cache):
    tracking.configure(f"sqlite:///{tmp_path / 'm.db'}")
    experiment = MlflowClient().create_experiment(
        "lat", artifact_location=(tmp_path / "a").as_uri()
    )
    run = MlflowClient().create_run(experiment)
    model, prep = build_classifier("resnet18", "none", 32, 2, 0.0, seed=0)
    session = EvaluationSession(
        run.info.run_id, model, ["forest", "sea"], prep, {"min_accuracy": "0.7"}, tmp_path
    )
    write_dataset(tmp_path / "data" / "test", {"forest": 3, "sea": 3}, seed=2, size=48)
    session.evaluate_test(str(tmp_path / "data"))
    logged = MlflowClient().get_run(run.info.run_id).data.metrics
    assert logged[METRIC_LATENCY] > 0
    assert run_cost(logged)[1] == logged[METRIC_LATENCY]
