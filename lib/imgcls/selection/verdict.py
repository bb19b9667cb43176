"""The promotion verdict of a grid's champion against the incumbent, and where it is written.

:func:`judge` pairs the challenger's fold scores with the incumbent's
(:func:`imgcls.selection.incumbent.incumbent_fold_scores`) and calls
:func:`imgcls.selection.promotion.decide_promotion`; :func:`apply_verdict` registers the
challenger and moves the ``champion`` alias only on PROMOTE or EQUIVALENT_CHEAPER.

Decision on KEEP: the challenger is still registered, as a version WITHOUT the alias, so that
every verdict has a registry version holding it (description and tags); the alias stays on the
incumbent. A challenger whose run is already a version of the model is not registered twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import math
from dataclasses import dataclass
from typing import Any

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

from imgcls import tracking
from imgcls.selection.incumbent import (
    CHAMPION_ALIAS,
    Incumbent,
    IncumbentScores,
    incumbent_fold_scores,
    run_cost,
)
from imgcls.selection.promotion import PromotionVerdict, Verdict, decide_promotion

logger = logging.getLogger(__name__)

TAG_VERDICT = "promotion_verdict"
TAG_INCUMBENT_VERSION = "incumbent_version"
# registry-version / comparison-run tag -> PromotionVerdict field (fractions of accuracy)
NUMBER_TAGS = {
    "promotion_mean_difference": "mean_difference",
    "promotion_ci_low": "ci_low",
    "promotion_ci_high": "ci_high",
    "promotion_rope": "rope",
    "promotion_alpha": "alpha",
    "promotion_p_value": "p_value",
}


@dataclass(frozen=True)
class Judgement:
    """A verdict with its context: the incumbent (None: there was none) and its scores' source."""

    verdict: PromotionVerdict
    incumbent: Incumbent | None
    source: str  # where the incumbent's fold scores came from, or why there are none
    identical: bool = False  # the challenger's run is the incumbent's run

    @property
    def incumbent_version(self) -> str:
        """The incumbent's version number as text, ``none`` without an incumbent."""
        return "none" if self.incumbent is None else str(self.incumbent.version)


def _unmeasured(
    kind: Verdict, reason: str, k: int, rope: float, alpha: float, cost: Any
) -> PromotionVerdict:
    """A verdict without paired numbers (no incumbent, or no comparable incumbent scores)."""
    nan = math.nan
    return PromotionVerdict(
        kind, reason, nan, nan, nan, confidence=1.0 - 2.0 * alpha, t=nan, p_value=nan,
        p_equivalence=nan, t_difference=nan, p_difference=nan, rope=rope, alpha=alpha, k=k,
        n_train=nan, n_test=nan, fold_differences=(), challenger_cost=cost, incumbent_cost=None,
        challenger_cheaper=None, metric="fold_val_accuracy",
    )  # fmt: skip


def _scores(run_id: str, metric: str) -> list[float]:
    history = MlflowClient().get_metric_history(run_id, metric)
    return [m.value for m in sorted(history, key=lambda m: m.step)]


def judge(
    challenger: pd.Series,
    points: pd.DataFrame,
    incumbent: Incumbent | None,
    rope: float = 0.005,
    alpha: float = 0.05,
    metric: str = "fold_val_accuracy",
) -> Judgement:
    """Return the verdict of the challenger (a row of ``GridComparison.runs``) vs the incumbent.

    Paired on the challenger's k folds; n_train / n_test per fold are its ``n_train_images``
    split into k folds (as :meth:`GridComparison.significance`). Costs are
    (``cv_train_seconds``, ``latency_ms_per_image``), NaN when not logged. Without an incumbent:
    PROMOTE. Without comparable incumbent scores: KEEP, the reason saying why and how to get
    them. When the challenger's run is the incumbent's: KEEP (the identical model). Raises
    ValueError (from :func:`decide_promotion`) for an invalid ``rope`` or ``alpha``.
    """
    scores = _scores(challenger["run_id"], metric)
    k = len(scores)
    n_total = float(challenger.get("metrics.n_train_images", math.nan))
    n_test = n_total / k if k else math.nan
    cost = run_cost({k_[8:]: v for k_, v in challenger.items() if k_.startswith("metrics.")})
    usable = k >= 2 and n_total > 0
    if incumbent is None:
        if usable:
            verdict = decide_promotion(
                scores, None, n_total - n_test, n_test, rope, alpha, cost, metric=metric
            )
        else:
            verdict = _unmeasured(
                Verdict.PROMOTE, "PROMOTE: no previous champion", k, rope, alpha, cost
            )
        return Judgement(verdict, None, "no previous champion")
    if incumbent.run_id == challenger["run_id"]:
        reason = f"KEEP: the challenger is {incumbent.label} itself (same run): nothing to promote"
        same = _unmeasured(Verdict.KEEP, reason, k, rope, alpha, cost)
        same = dataclasses.replace(same, mean_difference=0.0, ci_low=0.0, ci_high=0.0)
        return Judgement(same, incumbent, "the challenger's own run", identical=True)
    found = incumbent_fold_scores(incumbent, challenger, points, metric)
    if not isinstance(found, IncumbentScores) or not usable:
        why = found if isinstance(found, str) else "the challenger has < 2 fold scores or no size"
        reason = f"KEEP: {why}"
        return Judgement(_unmeasured(Verdict.KEEP, reason, k, rope, alpha, cost), incumbent, why)
    try:
        verdict = decide_promotion(
            scores, found.scores, n_total - n_test, n_test, rope, alpha, cost, found.cost,
            metric=metric,
        )  # fmt: skip
    except ValueError as exc:
        if not 0.0 <= rope < 1.0 or not 0.0 < alpha < 0.5:
            raise
        reason = f"KEEP: the fold scores cannot be paired: {exc}"
        return Judgement(_unmeasured(Verdict.KEEP, reason, k, rope, alpha, cost), incumbent, reason)
    return Judgement(verdict, incumbent, found.source)


def verdict_tags(judgement: Judgement) -> dict[str, str]:
    """Return the tags of a verdict: kind, numbers (fractions, ``nan`` when unmeasured), version."""
    verdict = judgement.verdict
    tags = {TAG_VERDICT: verdict.verdict.value, TAG_INCUMBENT_VERSION: judgement.incumbent_version}
    tags.update({tag: repr(float(getattr(verdict, f))) for tag, f in NUMBER_TAGS.items()})
    return tags


def description(judgement: Judgement) -> str:
    """Return the registry version's description: the reason and the incumbent's scores' source."""
    if judgement.incumbent is None:
        return judgement.verdict.reason
    return (
        f"{judgement.verdict.reason} Incumbent: {judgement.incumbent.label}; its fold scores: "
        f"{judgement.source}."
    )


def log_to_run(run_id: str, judgement: Judgement) -> None:
    """Write the verdict to a run (the comparison run): its tags, and its finite numbers as
    metrics of the same names."""
    tags = {**verdict_tags(judgement), "promotion_reason": description(judgement)[:5000]}
    numbers = {
        tag: float(getattr(judgement.verdict, field))
        for tag, field in NUMBER_TAGS.items()
        if math.isfinite(float(getattr(judgement.verdict, field)))
    }
    tracking.log_batch(run_id, metrics=numbers, tags=tags)


def _version_of_run(client: MlflowClient, name: str, run_id: str) -> Any:
    """Return an existing version of ``name`` made from ``run_id`` (the newest), or None."""
    try:
        found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    except mlflow.exceptions.MlflowException:
        return None
    return max(found, key=lambda v: int(v.version)) if found else None


def _register(model_uri: str, name: str, tags: dict[str, str]) -> Any:
    """``mlflow.register_model`` with its two stderr lines ("Successfully registered model ...",
    "Created version ...") sent to this module's logger instead: on stderr they show as a red
    error box in every notebook report although nothing went wrong."""
    captured = io.StringIO()
    with contextlib.redirect_stderr(captured):
        version = mlflow.register_model(model_uri, name, tags=tags)
    for line in captured.getvalue().splitlines():
        if line.strip():
            logger.info("%s", line.strip())
    return version


def apply_verdict(
    name: str, model_uri: str, challenger: pd.Series, point: str, grid_id: str, judgement: Judgement
) -> dict[str, Any]:
    """Register the challenger and move the alias as the verdict says; return what happened.

    The challenger's run becomes a version of ``name`` (reused when one exists), with the
    verdict in its description and tags (:func:`verdict_tags`), except when it is the incumbent
    itself (its version keeps the verdict it got when it was promoted). The ``champion`` alias
    moves to it only when the verdict promotes; the run tag ``champion`` says which run holds the
    alias. Returns name, version (the challenger's), alias, uri, run_id, grid_point, verdict
    (PromotionVerdict), promoted, champion_version (holding the alias now), incumbent_version
    and incumbent_source.
    """
    client = MlflowClient()
    run_id = challenger["run_id"]
    incumbent = judgement.incumbent
    if judgement.identical and incumbent is not None:
        version = client.get_model_version(name, str(incumbent.version))
    else:
        version = _version_of_run(client, name, run_id) or _register(
            model_uri,
            name,
            tags={tracking.TAG_GRID_ID: grid_id, "run_id": run_id, "grid_point": point},
        )
        client.update_model_version(name, version.version, description=description(judgement))
        for key, value in verdict_tags(judgement).items():
            client.set_model_version_tag(name, version.version, key, value)
    promoted = judgement.verdict.promoted and not judgement.identical
    if promoted:
        client.set_registered_model_alias(name, CHAMPION_ALIAS, version.version)
        if incumbent is not None:  # the alias moved: the previous champion's run is no longer one
            with contextlib.suppress(mlflow.exceptions.MlflowException):
                client.set_tag(incumbent.run_id, "champion", "false")
    holder = version.version if promoted or incumbent is None else incumbent.version
    client.set_tag(run_id, "champion", "true" if int(holder) == int(version.version) else "false")
    uri = f"models:/{name}@{CHAMPION_ALIAS}"
    logger.info(
        "%s: challenger %s (run %s) is version %s; %s models:/%s/%s holds %s",
        judgement.verdict.verdict.value, point, run_id, version.version,
        "the alias moved:" if promoted else "the alias stays:", name, holder, uri,
    )  # fmt: skip
    return {
        "name": name,
        "version": int(version.version),
        "alias": CHAMPION_ALIAS,
        "uri": uri,
        "run_id": run_id,
        "grid_point": point,
        "verdict": judgement.verdict,
        "promoted": promoted,
        "champion_version": int(holder),
        "incumbent_version": judgement.incumbent_version,
        "incumbent_source": judgement.source,
    }


def verdict_table(judgement: Judgement) -> pd.DataFrame:
    """Return the verdict as one readable row: kind, difference and interval in accuracy points,
    rope, one-sided p, folds, incumbent version and where its scores came from."""
    v = judgement.verdict
    return pd.DataFrame(
        {
            "verdict": [v.verdict.value],
            "mean difference (points)": [round(100 * v.mean_difference, 3)],
            f"{100 * v.confidence:.0f}% interval (points)": [
                f"[{100 * v.ci_low:+.3f}, {100 * v.ci_high:+.3f}]"
            ],
            "rope (points)": [round(100 * v.rope, 3)],
            "p (gain > rope)": [round(v.p_value, 4)],
            "folds": [v.k],
            "incumbent": [judgement.incumbent_version],
            "incumbent scores": [judgement.source],
        },
        index=["challenger vs incumbent"],
    )
