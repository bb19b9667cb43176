"""What the one-file report shows, read from what the pipeline logged in MLflow, never guessed.

Sources: the grid's finished grid-point runs (:class:`imgcls.selection.comparison.GridComparison`:
metrics, params, per-fold ``fold_val_accuracy``), the comparison run of notebook 04 (tags
``promotion_*`` written by :func:`imgcls.selection.verdict.log_to_run`) and the registry version
of the champion's run (tags ``promotion_*``, description, model card facts). Each function
returns plain values for the template; :mod:`imgcls.reporting.summary_page` turns a failure into
a sentence on the page.

The critical-difference view ranks the grid points on every fold (rank 1 = best, ties averaged)
and joins the points whose difference is not significant by the project's own test: the
corrected resampled t-test of Nadeau & Bengio (2003), "Inference for the Generalization Error",
Machine Learning 52(3) (:func:`imgcls.evaluation.metrics.corrected_resampled_ttest`), for every
pair, Holm-adjusted over all pairs (Holm 1979; :func:`imgcls.selection.promotion.holm`). Not
Friedman/Nemenyi (Demsar 2006): those treat the folds as independent data sets, which
cross-validation folds are not (their training sets overlap, the variance Nadeau & Bengio
correct), and 04 and the promotion verdict use the corrected test, so the page agrees with them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient
from scipy import stats

from imgcls import tracking
from imgcls.evaluation.metrics import corrected_resampled_ttest
from imgcls.selection.comparison import GridComparison
from imgcls.selection.incumbent import CHAMPION_ALIAS, PARAM_FOLD_ASSIGNMENT, current_champion
from imgcls.selection.promotion import holm
from imgcls.selection.verdict import NUMBER_TAGS, TAG_INCUMBENT_VERSION, TAG_VERDICT

DEFAULT_ALPHA = 0.05  # the grid file's promotion.alpha default (imgcls.core.strategy)
POWER = 0.8  # the noise floor's power, as notebook 04 uses it


def fold_ranks(scores: Mapping[str, Sequence[float]]) -> pd.DataFrame:
    """Return the rank of every grid point on every fold: [k folds x m points], 1 = best.

    ``scores``: grid point -> its k fold scores (higher is better; all of the same k folds).
    Ties on a fold share the mean of their ranks (``scipy.stats.rankdata``, method "average"),
    as in Demsar (2006), JMLR 7, 1-30. Raises ValueError for fewer than 2 points or lists of
    different lengths (not the same folds).
    """
    lengths = {name: len(values) for name, values in scores.items()}
    if len(lengths) < 2 or len(set(lengths.values())) != 1:
        raise ValueError(f"need >= 2 grid points with the same number of folds, got {lengths}")
    frame = pd.DataFrame({name: np.asarray(v, dtype=float) for name, v in scores.items()})
    ranks = np.vstack([stats.rankdata(-row, method="average") for row in frame.to_numpy()])
    out = pd.DataFrame(ranks, columns=frame.columns, index=range(1, len(frame) + 1))
    out.index.name = "fold"
    return out


def pairwise_p_values(
    scores: Mapping[str, Sequence[float]], n_train: float, n_test: float
) -> pd.DataFrame:
    """Return the Holm-adjusted p-value of every pair of grid points: [m x m], diagonal 1.

    Each pair: the two-sided corrected resampled t-test over their paired fold scores
    (Nadeau & Bengio 2003; ``n_train`` / ``n_test`` images per fold), then Holm (1979) over the
    m (m - 1) / 2 pairs. Raises ValueError (from the t-test) for lists of different lengths,
    fewer than 2 folds or non-positive fold sizes.
    """
    names = list(scores)
    raw: dict[str, float] = {}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            raw[f"{i}|{names.index(b)}"] = corrected_resampled_ttest(
                scores[a], scores[b], int(n_train), int(n_test)
            )[1]
    adjusted = holm(raw)
    matrix = pd.DataFrame(1.0, index=names, columns=names)
    for key, p in adjusted.items():
        i, j = (int(x) for x in key.split("|"))
        matrix.iloc[i, j] = matrix.iloc[j, i] = p
    return matrix


def differing_parameters(runs: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Return (the params that differ between grid points, the names of those that do not).

    ``runs``: :attr:`GridComparison.runs` (one row per grid point, columns ``params.<name>``).
    A param a run did not log counts as ``–`` (so logged vs not logged differs). The table has
    one row per grid point and one column per differing param, sorted by name.
    """
    columns = sorted(c for c in runs.columns if c.startswith("params."))
    table = runs[columns].astype(object).where(runs[columns].notna(), "–").astype(str)
    table.columns = [c.removeprefix("params.") for c in columns]
    varying = [c for c in table.columns if table[c].nunique() > 1]
    same = [c for c in table.columns if c not in varying]
    return table[varying], same


def critical_difference(grid: GridComparison, alpha: float) -> dict[str, Any]:
    """Return the grid points paired on the champion's folds with their ranks and p-values.

    Keys: ``scores`` (point -> fold scores), ``ranks`` ([k x m], :func:`fold_ranks`),
    ``mean_ranks`` (point -> mean rank), ``p_values`` ([m x m], :func:`pairwise_p_values`),
    ``excluded`` (point -> why it cannot be paired), ``n_train`` / ``n_test``. Raises
    ValueError when fewer than 2 points share the champion's folds (the reason named).
    """
    champion = grid.champion()
    everything = grid.fold_scores()
    paired = grid.fold_scores(same_folds_as=champion)
    k = len(everything[champion])
    scores = {p: v for p, v in paired.items() if len(v) == k}
    excluded = {}
    for point in everything:
        if point in scores:
            continue
        if point in paired:
            excluded[point] = f"{len(paired[point])} fold scores, the champion has {k}"
        else:
            excluded[point] = f"other or unknown folds (params.{PARAM_FOLD_ASSIGNMENT})"
    if len(scores) < 2 or k < 2:
        raise ValueError(
            f"no ranking over folds: {len(scores)} grid point(s) share the champion's {k} folds "
            f"(params.{PARAM_FOLD_ASSIGNMENT}); not paired: {excluded or 'none'}"
        )
    n_train, n_test = grid.fold_sizes(champion)
    if not (n_train > 0 and n_test > 0):
        raise ValueError(f"the champion {champion}'s run has no n_train_images metric")
    ranks = fold_ranks(scores)
    return {
        "scores": scores,
        "ranks": ranks,
        "mean_ranks": ranks.mean().sort_values(),
        "p_values": pairwise_p_values(scores, n_train, n_test),
        "excluded": excluded,
        "n_train": n_train,
        "n_test": n_test,
        "alpha": alpha,
    }


def registry_version(name: str | None, run_id: str) -> Any:
    """Return the newest version of registered model ``name`` made from ``run_id``, or None."""
    if not name:
        return None
    found = MlflowClient().search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return max(found, key=lambda v: int(v.version)) if found else None


def comparison_run(grid_id: str, experiment_id: str, run_id: str | None) -> Any:
    """Return the comparison run ``run_id``, else the newest comparison run of ``grid_id`` that
    holds a verdict; None when there is none."""
    client = MlflowClient()
    if run_id:
        return client.get_run(run_id)
    found = client.search_runs(
        [experiment_id],
        filter_string=(
            f"tags.{tracking.TAG_KIND} = 'comparison' and tags.{tracking.TAG_GRID_ID} = "
            f"'{grid_id}' and tags.{TAG_VERDICT} != ''"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return found[0] if found else None


def _points(text: str | None, signed: bool = True, scale: float = 100.0, digits: int = 2) -> str:
    """A fraction tag (``'0.0123'``) as accuracy points (``+1.23``); ``n/a`` when NaN/absent.

    ``scale`` 1 and ``digits`` 4 show a p-value as it is, to 4 decimals."""
    try:
        value = scale * float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "n/a"
    if not math.isfinite(value):
        return "n/a"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def verdict(
    grid: GridComparison, model_name: str | None, comparison_run_id: str | None
) -> dict[str, Any]:
    """Return the promotion verdict of the grid's champion as recorded, with its numbers.

    This grid's judgement is read from the comparison run's tags (04 writes them when it
    registers); without them, from the registry version of the champion's run. Numbers are
    shown in accuracy points. Raises LookupError when neither holds a verdict, saying why.
    """
    champion = grid.champion()
    run_id = str(grid.runs.loc[champion, "run_id"])
    version = registry_version(model_name, run_id)
    compared = comparison_run(
        grid.grid_id, str(grid.runs["experiment_id"].iloc[0]), comparison_run_id
    )
    if compared is not None and TAG_VERDICT in compared.data.tags:
        tags, source = compared.data.tags, f"comparison run {compared.info.run_id} (tags)"
        reason = tags.get("promotion_reason", "")
    elif version is not None and TAG_VERDICT in version.tags:
        tags, source = version.tags, f"registry: {model_name} version {version.version} (tags)"
        reason = version.description or ""
    else:
        raise LookupError(
            f"no promotion verdict recorded for grid {grid.grid_id}: neither its comparison run "
            f"nor a registry version of the champion's run {run_id} carries {TAG_VERDICT} "
            "(run without --no-register, and see 04's report if it failed)"
        )
    holder = current_champion(MlflowClient(), model_name) if model_name else None
    alpha = float(tags.get("promotion_alpha", "nan"))
    level = f"{100 * (1 - 2 * alpha):.0f}%" if math.isfinite(alpha) else "unknown"
    return {
        "verdict": tags[TAG_VERDICT],
        # the recorded reason starts with the verdict, which the page shows beside it already
        "reason": reason.removeprefix(f"{tags[TAG_VERDICT]}: ") or "not recorded",
        "source": source,
        "champion": champion,
        "model_name": model_name or "not registered",
        "version": str(version.version) if version is not None else "not registered",
        "alias_holder": str(holder.version) if holder is not None else "none",
        "alias": CHAMPION_ALIAS,
        "incumbent_version": tags.get(TAG_INCUMBENT_VERSION, "not recorded"),
        "mean_difference": _points(tags.get("promotion_mean_difference")),
        "interval": (
            _points(tags.get("promotion_ci_low")),
            _points(tags.get("promotion_ci_high")),
        ),
        "level": level,
        "rope": _points(tags.get("promotion_rope"), signed=False),
        "alpha": tags.get("promotion_alpha", "not recorded"),
        "p_value": _points(tags.get("promotion_p_value"), signed=False, scale=1.0, digits=4),
        "number_tags": sorted(NUMBER_TAGS),
    }


def noise(grid: GridComparison, alpha: float) -> dict[str, Any]:
    """Return the champion's noise floor, as 04 computes it, in accuracy points.

    :meth:`GridComparison.noise_floor` on the logged fold scores (``alpha``: the recorded
    ``promotion_alpha``; power 0.8). Keys: the floor's numbers, ``closer`` (grid points closer
    to the champion than the smallest detectable difference) and ``gaps`` (point -> mean CV
    accuracy minus the champion's, in points). Raises ValueError (from the floor) when the
    champion has fewer than 2 fold scores or no n_train_images.
    """
    floor, closer = grid.noise_floor(alpha=alpha, power=POWER)
    table = grid.table()
    gaps = 100 * (table["cv_accuracy_mean"] - table.loc[grid.champion(), "cv_accuracy_mean"])
    return {
        "run_sd": f"{100 * floor.run_sd:.2f}",
        "source": floor.source,
        "n_runs": floor.n_runs,
        "k": floor.k,
        "mdd": f"{100 * floor.min_detectable_difference:.2f}",
        "mdd_points": 100 * floor.min_detectable_difference,
        "alpha": floor.alpha,
        "power": floor.power,
        "closer": closer,
        "gaps": gaps,
    }
