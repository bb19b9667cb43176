"""A user's own folder: six unbalanced classes with long names that MLflow would refuse as keys.

The unchanged grid runner runs end to end on it with tiny settings; every notebook finishes,
the champion is registered and loads, and every class has its metrics, confusion row and curves.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from imgcls.core import paths
from imgcls.evaluation import metrics
from imgcls.reporting import plots

# Long, unbalanced, and full of characters MLflow refuses in metric keys: spaces, parentheses,
# '&', '+', ',', "'", '@' and accents.
CLASSES = {
    "sea (coast)": 9,
    "forêt & bois de feuillus": 7,
    "mountain + snow, alpine": 6,
    "l'été @ la plage": 5,
    "désert — dunes": 8,
    "city skyline at night": 4,
}
HUES = [0.58, 0.3, 0.0, 0.12, 0.08, 0.75]


def colour_photo(hue: float, rng: np.random.Generator, size: int = 40) -> Image.Image:
    """A noisy image of one dominant hue (each class its own colour, so it is learnable)."""
    hsv = np.empty((size, size, 3), dtype=np.float32)
    hsv[..., 0] = (hue + rng.normal(0, 0.02, (size, size))) % 1.0
    hsv[..., 1] = 0.7 + rng.normal(0, 0.05, (size, size))
    hsv[..., 2] = 0.8 + rng.normal(0, 0.05, (size, size))
    pixels = (np.clip(hsv, 0, 1) * 255).astype(np.uint8)
    return Image.fromarray(pixels, mode="HSV").convert("RGB")


def write_six_classes(root, counts: dict[str, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    for (name, count), hue in zip(counts.items(), HUES, strict=False):
        (root / name).mkdir(parents=True)
        for i in range(count):
            colour_photo(hue, rng).save(root / name / f"photo {i:02d}.jpg", quality=90)


def test_confusion_matrix_with_six_long_names_is_legible():
    names = list(CLASSES)
    y = np.repeat(np.arange(6), 3)
    predictions = (y + np.array([0, 0, 1] * 6)) % 6
    fig = plots.confusion_matrix_plot(metrics.confusion(y, predictions, names), "confusion")
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        ax = fig.axes[0]
        figure_box = fig.bbox
        for axis_labels in (ax.get_xticklabels(), ax.get_yticklabels()):
            boxes = [label.get_window_extent(renderer) for label in axis_labels]
            assert len(boxes) == 6
            texts = [label.get_text().replace("\n", " ") for label in axis_labels]
            assert texts == names  # full names, no "true: " prefix, nothing cut off
            for i, box in enumerate(boxes):
                assert figure_box.contains(box.x0, box.y0) and figure_box.contains(box.x1, box.y1)
                for other in boxes[i + 1 :]:
                    assert not box.overlaps(other), texts
    finally:
        plt.close(fig)


def test_roc_and_pr_curves_are_one_vs_rest_for_every_class():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(6), 4)
    probabilities = rng.dirichlet(np.ones(6), size=len(y))
    fig = plots.roc_pr_curves(y, probabilities, list(CLASSES), "six classes")
    try:
        for ax in fig.axes:
            legend = [t.get_text() for t in ax.get_legend().get_texts()]
            for name in CLASSES:
                assert any(entry.startswith(f"{name} (") for entry in legend), (name, legend)
    finally:
        plt.close(fig)


GRID = """
defaults:
  backbone: resnet18
  weights: none
  image_size: 32
  folds: 2
  epochs: 2
  batch_size: 8
  lr: 0.01
strategies:
  tiny probe: {}
"""


@pytest.mark.slow
def test_six_class_folder_runs_end_to_end_with_the_unchanged_runner(tmp_path):
    from imgcls.core.names import class_metric_keys

    data = tmp_path / "my photos"
    write_six_classes(data / "train", CLASSES, seed=1)
    write_six_classes(data / "test", {name: 2 for name in CLASSES}, seed=2)
    grid = tmp_path / "grid.yaml"
    grid.write_text(GRID)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {
        **os.environ,
        "IMGCLS_REPORTS_DIR": str(tmp_path / "reports"),
        "IMGCLS_ARTIFACT_ROOT": str(tmp_path / "artifacts"),
        "IMGCLS_CACHE_DIR": str(tmp_path / "cache"),
    }
    command = [
        sys.executable,
        str(paths.REPO_ROOT / "run_experiments.py"),
        "--grid",
        str(grid),
        "--data-dir",
        str(data),
        "--tracking-uri",
        uri,
        "--experiment",
        "vision-team/six classes",
    ]
    result = subprocess.run(
        command, cwd=paths.REPO_ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("vision-team/six classes")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    assert runs and all(r.info.status == "FINISHED" for r in runs)
    parent = next(r for r in runs if r.data.tags.get("run_kind") == "grid_point")
    keys = class_metric_keys(list(CLASSES), str(data / "train"))
    for name, key in keys.items():
        for metric in ("precision", "recall", "f1"):
            assert f"test_{metric}_{key}" in parent.data.metrics, (name, key)
    registered = client.search_registered_models()
    assert len(registered) == 1
    model_name = registered[0].name
    assert "/" not in model_name and model_name in result.stdout
    version = client.get_model_version_by_alias(model_name, "champion")
    assert version.run_id == parent.info.run_id or version.tags.get("run_id") == (
        parent.info.run_id
    )

    files = sorted((data / "test").glob("*/*.jpg"))
    script = (
        "import base64, json, sys, mlflow, pandas as pd\n"
        f"mlflow.set_tracking_uri({uri!r})\n"
        f"model = mlflow.pyfunc.load_model('models:/{model_name}@champion')\n"
        "values = json.loads(sys.stdin.read())\n"
        "out = model.predict(pd.DataFrame({'image': values}))\n"
        "print(json.dumps({'columns': list(out.columns), "
        "'predicted': list(out['predicted_class'])}))\n"
    )
    values = [base64.b64encode(f.read_bytes()).decode() for f in files]
    loaded = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps(values),
        capture_output=True,
        text=True,
        cwd="/",
        env=env,
        timeout=300,
    )
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    answer = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert answer["columns"][2:] == [f"prob_{name}" for name in sorted(CLASSES)]
    assert set(answer["predicted"]) <= set(CLASSES)

    evaluated = tmp_path / "reports" / "tiny_probe" / "03_evaluate.ipynb"
    reports = sorted((tmp_path / "reports").rglob("03_evaluate.ipynb"))
    assert reports, list((tmp_path / "reports").rglob("*"))
    evaluated = reports[0]
    text = evaluated.read_text()
    for name in CLASSES:
        assert json.dumps(name)[1:-1] in text or name in text, name


def _dry_run(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "IMGCLS_CACHE_DIR": str(tmp_path / "cache")}
    command = [sys.executable, str(paths.REPO_ROOT / "run_experiments.py"), *args, "--dry-run"]
    return subprocess.run(
        command, cwd=paths.REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_user_folder_litter_and_a_bomb_through_the_runner(tmp_path):
    """The runner's own validation: litter ignored, a bomb named and skippable, no traceback."""
    from tests.test_data import _jupyter_and_os_litter
    from tests.test_images import one_bit_png

    data = tmp_path / "photos"
    write_six_classes(data / "train", dict.fromkeys(list(CLASSES)[:2], 4), seed=3)
    write_six_classes(data / "test", dict.fromkeys(list(CLASSES)[:2], 2), seed=4)
    sea = data / "train" / "sea (coast)"
    _jupyter_and_os_litter(sea, sorted(sea.glob("*.jpg"))[0])
    one_bit_png(sea / "scan.png", 13400)
    grid = tmp_path / "grid.yaml"
    grid.write_text(GRID.replace("folds: 2", "folds: 2\n  epochs: 1").replace("  epochs: 2\n", ""))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["--grid", str(grid), "--data-dir", str(data), "--tracking-uri", uri]
    refused = _dry_run(args, tmp_path)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "scan.png: 179,560,000 pixels exceeds Pillow's decompression-bomb limit" in (
        refused.stderr
    )
    assert "Traceback" not in refused.stderr and "checkpoint" not in refused.stderr
    skipped = _dry_run([*args, "--skip-bad-images"], tmp_path)
    assert skipped.returncode == 0, skipped.stdout + skipped.stderr
    assert "dry run: nothing executed" in skipped.stdout

    twice = tmp_path / "twice.yaml"
    twice.write_text(GRID + "  tiny probe:\n    epochs: 3\n")
    duplicate = _dry_run(["--grid", str(twice), *args[2:]], tmp_path)
    assert duplicate.returncode == 2
    assert f"{twice}:12: duplicate key 'tiny probe' (first defined at line 11)" in (
        duplicate.stderr
    ), duplicate.stderr
