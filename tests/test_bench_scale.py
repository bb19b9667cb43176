"""The scale table's verdicts and datasets (benchmarks/bench_scale.py, bench_scale_data.py)."""

from __future__ import annotations

import hashlib
import sys

import numpy as np
import pytest
from PIL import Image

from imgcls.core import paths
from tests.conftest import make_image

sys.path.insert(0, str(paths.REPO_ROOT / "benchmarks"))

from bench_scale import judge, render
from bench_scale_data import check_factor, make_variant


def _row(measurement: str, factor: float, seconds: float, images: int, rss: float) -> dict:
    return {
        "measurement": measurement,
        "factor": factor,
        "seconds": seconds,
        "images": images,
        "peak_rss_bytes": rss,
    }


def test_each_size_is_judged_against_the_smallest():
    rows = judge(
        [
            _row("frozen_cold", 1, 10.0, 1000, 1.0e9),
            _row("frozen_cold", 4, 44.0, 4000, 1.4e9),  # 1.1x per image, 1.4x RSS: met
            _row("frozen_cold", 16, 200.0, 16000, 2.0e9),  # 1.25x per image, 2x RSS: not met
            _row("dry_run", 4, 8.0, 4000, 0.9e9),
            _row("dry_run", 16, 9.0, 16000, 0.9e9),
        ]
    )
    verdicts = {(r["measurement"], r["factor"]): r for r in rows}
    assert verdicts["frozen_cold", 1]["time_status"] == "base"
    assert verdicts["frozen_cold", 4]["time_ratio"] == pytest.approx(1.1)
    assert (
        verdicts["frozen_cold", 4]["time_status"],
        verdicts["frozen_cold", 4]["rss_status"],
    ) == (
        "met",
        "met",
    )
    assert verdicts["frozen_cold", 16]["time_ratio"] == pytest.approx(1.25)
    assert verdicts["frozen_cold", 16]["rss_ratio"] == pytest.approx(2.0)
    assert (
        verdicts["frozen_cold", 16]["time_status"],
        verdicts["frozen_cold", 16]["rss_status"],
    ) == (
        "not met",
        "not met",
    )
    assert verdicts["dry_run", 16]["base"] == 4  # the smallest size measured is the base
    assert verdicts["dry_run", 16]["time_ratio"] == pytest.approx(9.0 / 16000 / (8.0 / 4000))


def test_machine_drift_is_shown_beside_the_unadjusted_verdict():
    base = {**_row("finetune_epoch", 1, 10.0, 1000, 1e9), "probe_seconds": 1.0}
    slower = {**_row("finetune_epoch", 16, 208.0, 16000, 1e9), "probe_seconds": 1.3}
    unprobed = _row("dry_run", 16, 9.0, 16000, 0.9e9)
    rows = judge([base, slower, _row("dry_run", 1, 1.0, 1000, 0.9e9), unprobed])
    assert rows[1]["time_ratio"] == pytest.approx(1.3)
    assert rows[1]["time_status"] == "not met"  # judged on the measured time, not the adjusted
    assert rows[1]["speed_ratio"] == pytest.approx(1.3)
    assert rows[1]["adjusted_ratio"] == pytest.approx(1.0)
    assert rows[3]["speed_ratio"] is None and rows[3]["adjusted_ratio"] is None
    table = render({"mode": "full", "created": "now", "environment": "cpu", "rows": rows})
    assert (
        "| finetune_epoch | 16x | 16,000 | 208.0 | 13.00 | 1,000 | 1.30x | not met | 1.00x | met | 1.30x | 1.00x |"
        in table
    )


def test_speed_probe_times_a_fixed_workload():
    from bench_scale import speed_probe

    one, three = speed_probe(1, repeats=1), speed_probe(1, repeats=3)
    assert 0 < one < three  # three convolutions take longer than one


def test_a_failed_measurement_has_no_verdict_and_is_named_in_the_table():
    rows = judge(
        [
            _row("finetune_epoch", 1, 10.0, 100, 1e9),
            {
                "measurement": "finetune_epoch",
                "factor": 4,
                "error": "step process exited with code 1",
            },
        ]
    )
    assert rows[1]["time_status"] == rows[1]["rss_status"] == "n/a"
    report = {"mode": "quick", "created": "now", "environment": "cpu", "rows": rows}
    table = render(report)
    assert "| finetune_epoch | 4x |" in table and "FAILED: step process exited" in table


def test_sizes_are_whole_multiples_or_fractions_for_smoke_tests():
    assert check_factor(16) == 16 and check_factor(0.25) == 0.25
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="whole number of copies"):
            check_factor(bad)


def test_copies_differ_from_each_other_and_keep_the_size(tmp_path):
    source = tmp_path / "photo.jpg"
    make_image("sea", np.random.default_rng(0), size=150).save(source, quality=90)
    made = []
    for copy in range(6):
        target = tmp_path / f"copy-{copy}.jpg"
        make_variant(source, target, "train/sea/photo.jpg", copy)
        made.append(target)
        assert Image.open(target).size == (150, 150)
    digests = {hashlib.md5(p.read_bytes()).hexdigest() for p in [source, *made]}
    assert len(digests) == 7
    again = tmp_path / "again.jpg"
    make_variant(source, again, "train/sea/photo.jpg", 3)  # seeded by (photo, copy)
    assert again.read_bytes() == made[3].read_bytes()
