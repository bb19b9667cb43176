"""A model card per registered version, from what the pipeline measured and never guessed.

Every field is read from MLflow: the registry version (name, aliases, promotion verdict), its
grid-point run (params, lineage tags, CV and test metrics, quality gate, leakage audit) and its
LoggedModel (id, pinned requirements). A field the pipeline did not record says ``unknown``.
The card is rendered twice from Jinja2 templates (``templates/model_card.md`` and
``templates/model_card.html``, autoescaped), written next to the reports, logged to the run under
``model_card/`` and linked from the version's ``model_card`` tag. The structure follows Mitchell
et al., "Model Cards for Model Reporting" (FAT* 2019), restricted to what is measured here.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.tracking import MlflowClient

from imgcls import tracking
from imgcls.reporting.reports import environment

UNKNOWN = "unknown"
# Metrics of the test set shown with the card, in order: (metric suffix, label).
TEST_METRICS = (
    ("accuracy", "accuracy"),
    ("balanced_accuracy", "balanced accuracy"),
    ("macro_f1", "macro F1"),
    ("log_loss", "log loss"),
    ("roc_auc", "ROC AUC"),
    ("pr_auc", "PR AUC"),
)
PROMOTION_TAGS = (
    "promotion_verdict",
    "promotion_mean_difference",
    "promotion_ci_low",
    "promotion_ci_high",
    "promotion_rope",
    "promotion_alpha",
    "promotion_p_value",
    "incumbent_version",
)


@dataclass(frozen=True)
class ModelCardFiles:
    """Where a card went: the Markdown and HTML files and the run artifact folder."""

    markdown: Path
    html: Path
    run_id: str
    artifact_path: str


def _number(value: Any, digits: int = 4) -> str:
    """A finite float with ``digits`` decimals; anything missing or not finite is ``unknown``."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return UNKNOWN if value in (None, "") else str(value)
    return f"{number:.{digits}f}" if math.isfinite(number) else UNKNOWN


def _tag_value(tags: dict[str, str], key: str) -> str:
    """A registry tag; ``unknown`` when absent, ``n/a`` for a number the verdict could not have
    (a first champion has no incumbent, so no difference, interval or p-value)."""
    value = tags.get(key)
    if value is None:
        return UNKNOWN
    return "n/a" if value.lower() == "nan" else value


def _requirements(model_id: str | None) -> list[str]:
    """The logged model's pinned pip requirements (its ``requirements.txt``), [] when unknown."""
    if not model_id:
        return []
    try:
        location = MlflowClient().get_logged_model(model_id).artifact_location
        path = mlflow.artifacts.download_artifacts(artifact_uri=f"{location}/requirements.txt")
    except Exception:  # an unreadable artifact store: the card says unknown
        return []
    lines = Path(path).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def collect(name: str, version: int | str) -> dict[str, Any]:
    """Gather the facts of registered model ``name`` version ``version`` from MLflow.

    Returns a nested dict of strings (numbers formatted, missing values ``unknown``) that the
    templates render. Raises ``mlflow.exceptions.MlflowException`` when the version does not
    exist in the active tracking store.
    """
    client = MlflowClient()
    model_version = client.get_model_version(name, str(version))
    run = client.get_run(model_version.run_id)
    params, tags, values = run.data.params, run.data.tags, run.data.metrics
    folds = sorted(
        client.get_metric_history(run.info.run_id, "fold_val_accuracy"), key=lambda m: m.step
    )
    try:
        model_id = tracking.logged_model(run.info.run_id).model_id
    except tracking.TrackingError:
        model_id = None
    strategy = {k: params[k] for k in sorted(params) if k not in ("fold_assignment",)}
    point = tags.get(tracking.TAG_GRID_POINT, UNKNOWN)
    grid_yaml = yaml.safe_dump(
        {"strategies": {tags.get(tracking.TAG_STRATEGY, "reproduced"): _typed(strategy)}},
        sort_keys=True,
    )
    return {
        "title": f"{name} version {model_version.version}",
        "model": {
            "name": name,
            "version": str(model_version.version),
            "aliases": ", ".join(model_version.aliases) or "none",
            "uri": f"models:/{name}/{model_version.version}",
            "model_id": model_id or UNKNOWN,
            "run_id": run.info.run_id,
            "grid_point": point,
            "created": time.strftime(
                "%Y-%m-%d %H:%M UTC", time.gmtime(model_version.creation_timestamp / 1000)
            ),
        },
        "input": {
            "classes": tags.get("classes", UNKNOWN),
            "image_size": params.get("image_size", UNKNOWN),
            "backbone": params.get("backbone", UNKNOWN),
            "weights": params.get("weights", UNKNOWN),
            "frozen": params.get("freeze_backbone", UNKNOWN),
        },
        "data": {
            "version": tags.get("data_md5", UNKNOWN),
            "test_version": tags.get("test_data_md5", UNKNOWN),
            "train_images": _number(values.get("n_train_images"), 0),
            "test_images": _number(values.get("test_n_images"), 0),
            "skipped_train": _number(values.get("skipped_images_train"), 0),
            "skipped_test": _number(values.get("test_skipped_images"), 0),
        },
        "leakage": {
            "copies": _number(values.get("test_images_with_train_copies"), 0),
            "accuracy_without": _number(values.get("test_accuracy_without_train_copies")),
            "fold_assignment": params.get("fold_assignment", UNKNOWN),
        },
        "cv": {
            "folds": [_number(m.value) for m in folds] or [UNKNOWN],
            "mean": _number(values.get("cv_accuracy_mean")),
            "std": _number(values.get("cv_accuracy_std")),
        },
        "test": [(label, _number(values.get(f"test_{key}"))) for key, label in TEST_METRICS],
        "test_ci": (
            _number(values.get("test_accuracy_ci_low"), 3),
            _number(values.get("test_accuracy_ci_high"), 3),
        ),
        "calibration": _number(values.get("test_ece")),
        "promotion": {key: _tag_value(model_version.tags, key) for key in PROMOTION_TAGS},
        "promotion_reason": model_version.description or UNKNOWN,
        "gate": {
            "result": tags.get("quality_gate", UNKNOWN),
            "message": tags.get("quality_gate_message", UNKNOWN),
        },
        "lineage": {
            "commit": tags.get("mlflow.source.git.commit", tags.get("git_commit", UNKNOWN)),
            "dirty": tags.get("git_dirty", UNKNOWN),
            "run_key": tags.get(tracking.TAG_RUN_KEY, UNKNOWN),
            "code_version": tags.get("code_version", UNKNOWN),
            "grid_id": tags.get(tracking.TAG_GRID_ID, UNKNOWN),
        },
        "environment": _requirements(model_id) or [UNKNOWN],
        "reproduce": {
            "grid_yaml": grid_yaml,
            "commit": tags.get("mlflow.source.git.commit", UNKNOWN),
            "data_version": tags.get("data_md5", UNKNOWN),
        },
    }


def _typed(params: dict[str, str]) -> dict[str, Any]:
    """MLflow keeps params as text; give YAML the numbers and booleans back."""
    out: dict[str, Any] = {}
    for key, text in params.items():
        if key == "name":
            continue
        value: Any = yaml.safe_load(text) if text not in ("", "None") else None
        out[key] = value if isinstance(value, bool | int | float | str) or value is None else text
    return out


def write_model_card(
    name: str, version: int | str, reports_dir: Path | None = None
) -> ModelCardFiles:
    """Render the card of ``name`` version ``version`` as Markdown and HTML; return where it went.

    Files: ``<reports>/model_card/<name>-v<version>.md`` and ``.html`` (default reports folder:
    :func:`imgcls.core.paths.reports_dir`). Both are logged to the version's run under
    ``model_card/``; the HTML's artifact URI is set as the version's ``model_card`` tag and its
    path inside the reports folder as the run's ``model_card`` tag (the index links it).
    Raises ``MlflowException`` for an unknown version and OSError when the folder cannot be
    written.
    """
    from imgcls.core import paths

    facts = collect(name, version)
    folder = (reports_dir or paths.reports_dir()) / "model_card"
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-v{facts['model']['version']}"
    markdown = folder / f"{stem}.md"
    html = folder / f"{stem}.html"
    env = environment()
    markdown.write_text(env.get_template("model_card.md").render(**facts), encoding="utf-8")
    html.write_text(env.get_template("model_card.html").render(**facts), encoding="utf-8")
    run_id = facts["model"]["run_id"]
    client = MlflowClient()
    client.log_artifact(run_id, str(markdown), "model_card")
    client.log_artifact(run_id, str(html), "model_card")
    uri = f"{client.get_run(run_id).info.artifact_uri}/model_card/{html.name}"
    client.set_model_version_tag(name, facts["model"]["version"], "model_card", uri)
    # the reports index links the card from the grid point's row (path relative to reports/)
    client.set_tag(run_id, "model_card", f"model_card/{html.name}")
    return ModelCardFiles(markdown, html, run_id, "model_card")
