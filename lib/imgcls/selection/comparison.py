"""What notebook 04 does: every grid point side by side from MLflow, the champion, the registry.

The champion is chosen on cross-validation (highest mean CV accuracy; ties: lower CV loss, then
faster) among the grid's points, never the ``incumbent`` point (the previous champion re-trained
on this grid's folds); test scores are shown but never used to choose. The champion is then
judged against the registry's incumbent (:mod:`imgcls.selection.verdict`): the alias
``champion`` moves to its version only on PROMOTE or EQUIVALENT_CHEAPER.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from imgcls import tracking
from imgcls.core import names
from imgcls.core.names import METRIC_LATENCY
from imgcls.evaluation import metrics
from imgcls.modeling import seeds
from imgcls.modeling.seeds import SEED_REPETITIONS
from imgcls.selection import verdict as verdicts
from imgcls.selection.incumbent import (
    CHAMPION_ALIAS,
    INCUMBENT_POINT,
    PARAM_FOLD_ASSIGNMENT,
    current_champion,
    find_incumbent,
)
from imgcls.selection.noisefloor import NoiseFloor, noise_floor
from imgcls.selection.promotion import with_holm

logger = logging.getLogger(__name__)

# PARAM_FOLD_ASSIGNMENT: the MLflow param of a grid-point run naming its folds
# (imgcls.data.folds.fold_assignment_hash): fold scores of two runs are paired only when both
# carry the same value. Re-exported here with CHAMPION_ALIAS and INCUMBENT_POINT.
__all__ = ["CHAMPION_ALIAS", "INCUMBENT_POINT", "PARAM_FOLD_ASSIGNMENT", "GridComparison"]
_current_champion = current_champion
SIGNIFICANCE_COLUMNS = ["mean_difference", "t", "p_value", "pairing"]


@dataclass
class GridComparison:
    """The finished grid-point runs of one grid, with their metrics."""

    experiment_name: str
    grid_id: str
    runs: pd.DataFrame  # one row per grid point (index), columns = metrics/params/tags
    _memo: dict = field(default_factory=dict, repr=False)  # MLflow lookups are done once

    @classmethod
    def load(
        cls,
        experiment_name: str = tracking.DEFAULT_EXPERIMENT,
        grid_id: str | None = None,
        tracking_uri: str | None = None,
        run_keys: Sequence[str] | None = None,
    ) -> GridComparison:
        """Load the latest finished run of every grid point of ``grid_id`` (default: newest grid).

        With ``run_keys`` (the runner's plan: every grid point's run key, see
        :func:`imgcls.pipeline.plan.run_key`), the grid is exactly the newest finished run of
        each key, whichever grid first ran it: a point reused from an earlier grid (same
        strategy, data and code) carries that grid's id tag but belongs to this one too. Without,
        the grid is every finished run tagged ``grid_id`` (04 opened by hand). Raises
        tracking.TrackingError when the experiment or every run is missing.
        """
        tracking.configure(tracking_uri)
        experiment = MlflowClient().get_experiment_by_name(experiment_name)
        if experiment is None:
            raise tracking.TrackingError(f"experiment {experiment_name!r} not found")
        base = f"tags.{tracking.TAG_KIND} = 'grid_point' and attributes.status = 'FINISHED'"
        if grid_id is None:
            newest = mlflow.search_runs(
                [experiment.experiment_id],
                filter_string=base,
                max_results=1,
                order_by=["attributes.start_time DESC"],
            )
            if newest.empty:
                raise tracking.TrackingError(
                    f"no finished grid-point runs in experiment {experiment_name!r}; "
                    "run run_experiments.py or notebooks 02 and 03 first"
                )
            grid_id = newest[f"tags.{tracking.TAG_GRID_ID}"].iloc[0]
        if run_keys is None:
            frame = mlflow.search_runs(
                [experiment.experiment_id],
                filter_string=f"{base} and tags.{tracking.TAG_GRID_ID} = '{grid_id}'",
                order_by=["attributes.start_time DESC"],
                max_results=5000,
            )
        else:
            found = [
                mlflow.search_runs(
                    [experiment.experiment_id],
                    filter_string=f"{base} and tags.{tracking.TAG_RUN_KEY} = '{key}'",
                    order_by=["attributes.start_time DESC"],
                    max_results=1,
                )
                for key in dict.fromkeys(run_keys)
            ]
            found = [f for f in found if not f.empty]
            frame = pd.concat(found, ignore_index=True) if found else pd.DataFrame()
        if frame.empty:
            raise tracking.TrackingError(
                f"grid {grid_id}: no finished grid-point runs in experiment {experiment_name!r} "
                "(every grid point failed?); see reports/index.html for the errors"
            )
        point_col = f"tags.{tracking.TAG_GRID_POINT}"
        frame = frame.drop_duplicates(point_col).set_index(point_col).sort_index()
        frame.index.name = "grid point"
        return cls(experiment_name, str(grid_id), frame)

    def _metric(self, name: str) -> pd.Series:
        column = f"metrics.{name}"
        if column in self.runs:
            return self.runs[column].astype(float)
        return pd.Series(np.nan, index=self.runs.index)

    def fold_assignments(self) -> dict[str, str | None]:
        """Return each grid point's ``params.fold_assignment`` (None where the run has none)."""
        column = f"params.{PARAM_FOLD_ASSIGNMENT}"
        values = self.runs.get(column, {})
        return {
            point: value if isinstance(value := values.get(point), str) and value else None
            for point in self.runs.index
        }

    def fold_scores(
        self, metric: str = "fold_val_accuracy", same_folds_as: str | None = None
    ) -> dict[str, list[float]]:
        """Return per-fold ``metric`` values (fractions, in fold order) for each grid point.

        With ``same_folds_as`` (a grid point), only the points whose runs carry that point's
        ``params.fold_assignment`` are returned (none when it has no such param): fold k of
        two such points scored the same images, so their lists may be paired by index.
        Raises KeyError for a ``same_folds_as`` that is not a grid point of this grid.
        """
        if ("fold_scores", metric) not in self._memo:
            client = MlflowClient()
            scores = {}
            for point, run_id in self.runs["run_id"].items():
                history = sorted(client.get_metric_history(run_id, metric), key=lambda m: m.step)
                scores[point] = [m.value for m in history]
            self._memo[("fold_scores", metric)] = scores
        scores = self._memo[("fold_scores", metric)]
        if same_folds_as is None:
            return dict(scores)
        assignments = self.fold_assignments()
        if same_folds_as not in assignments:
            raise KeyError(f"{same_folds_as!r} is not a grid point of grid {self.grid_id}")
        reference = assignments[same_folds_as]
        return {
            point: values
            for point, values in scores.items()
            if reference is not None and assignments[point] == reference
        }

    def curves(self, metric: str = "val_accuracy") -> dict[str, list[dict[str, float]]]:
        """Return, per grid point, the per-epoch mean of ``metric`` over its fold child runs."""
        client = MlflowClient()
        experiment_id = self.runs["experiment_id"].iloc[0]
        curves = {}
        for point, run_id in self.runs["run_id"].items():
            children = client.search_runs(
                [experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'"
            )
            per_epoch: dict[int, list[float]] = {}
            for child in children:
                for m in client.get_metric_history(child.info.run_id, metric):
                    per_epoch.setdefault(m.step, []).append(m.value)
            curves[point] = [
                {"epoch": e, metric: float(np.mean(v))} for e, v in sorted(per_epoch.items())
            ]
        return curves

    def table(self) -> pd.DataFrame:
        """Return one row per grid point: CV scores, test accuracy and interval, time, p-value."""
        if "table" not in self._memo:
            self._memo["table"] = self._build_table()
        return self._memo["table"].copy()

    def _build_table(self) -> pd.DataFrame:
        table = pd.DataFrame(
            {
                "strategy": self.runs[f"tags.{tracking.TAG_STRATEGY}"],
                "cv_accuracy_mean": self._metric("cv_accuracy_mean"),
                "cv_accuracy_std": self._metric("cv_accuracy_std"),
                "cv_loss_mean": self._metric("cv_loss_mean"),
                "cv_loss_std": self._metric("cv_loss_std"),
                "test_accuracy": self._metric("test_accuracy"),
                "test_accuracy_ci_low": self._metric("test_accuracy_ci_low"),
                "test_accuracy_ci_high": self._metric("test_accuracy_ci_high"),
                "train_seconds": self._metric("cv_train_seconds")
                + self._metric("refit_seconds").fillna(0),
                "images_per_second": self._metric("cv_images_per_second"),
                "latency_ms_per_image": self._metric(METRIC_LATENCY),
                "gate": self.runs.get("tags.quality_gate", pd.Series("", index=self.runs.index)),
                "run_id": self.runs["run_id"],
            }
        )
        significance = with_holm(self.significance())
        table["p_value_vs_best"] = significance["p_value"]
        table["p_holm_vs_best"] = significance["p_holm"]
        table["pairing_vs_best"] = significance["pairing"]
        table["is_champion"] = table.index == self.champion()
        return table.sort_values("cv_accuracy_mean", ascending=False)

    def display_table(self) -> pd.DataFrame:
        """Return :meth:`table` formatted for reading: one compact, rounded row per grid point."""
        t = self.table()
        return pd.DataFrame(
            {
                "strategy": t["strategy"],
                "CV accuracy": [
                    f"{m:.4f} ± {s:.4f}"
                    for m, s in zip(t["cv_accuracy_mean"], t["cv_accuracy_std"], strict=True)
                ],
                "CV loss": [
                    f"{m:.4f} ± {s:.4f}"
                    for m, s in zip(t["cv_loss_mean"], t["cv_loss_std"], strict=True)
                ],
                "test accuracy [95% CI]": [
                    f"{a:.3f} [{lo:.3f}, {hi:.3f}]"
                    for a, lo, hi in zip(
                        t["test_accuracy"],
                        t["test_accuracy_ci_low"],
                        t["test_accuracy_ci_high"],
                        strict=True,
                    )
                ],
                "train s": t["train_seconds"].round(1),
                "img/s": t["images_per_second"].round(0),
                "ms/image": t["latency_ms_per_image"].round(2),
                "p vs champion": t["p_value_vs_best"].round(4),
                "p Holm": t["p_holm_vs_best"].round(4),
                "paired on": t["pairing_vs_best"],
                "gate": t["gate"],
                "champion": t["is_champion"].map({True: "★", False: ""}),
            },
            index=t.index,
        )

    def champion(self) -> str:
        """Return the grid point chosen on cross-validation (accuracy, then loss, then time).

        The ``incumbent`` point (the previous champion re-trained on this grid's folds) is never
        chosen: it is what the champion is judged against (:meth:`register_champion`).
        """
        candidates = pd.DataFrame(
            {
                "cv_accuracy_mean": self._metric("cv_accuracy_mean"),
                "cv_loss_mean": self._metric("cv_loss_mean"),
                "train_seconds": self._metric("cv_train_seconds"),
            }
        ).dropna(subset=["cv_accuracy_mean"])
        return metrics.choose_champion(candidates.drop(index=INCUMBENT_POINT, errors="ignore"))

    def fold_sizes(self, point: str) -> tuple[float, float]:
        """Return (n_train, n_test): the training and validation images per fold of ``point``.

        Its ``n_train_images`` metric split into as many folds as it logged fold scores; NaN
        when either is missing.
        """
        k = len(self.fold_scores()[point])
        n_total = float(self._metric("n_train_images").get(point, np.nan))
        n_test = n_total / k if k else np.nan
        return (n_total - n_test, n_test)

    def noise_floor(self, alpha: float = 0.05, power: float = 0.8) -> tuple[NoiseFloor, list[str]]:
        """Return the champion's noise floor and the grid points inside it.

        :func:`imgcls.selection.noisefloor.noise_floor` on the champion's seed repetitions
        (its ``fold_val_accuracy``, then ``fold_val_accuracy_seed<i>``, which notebook 02 logs
        for heads on cached features: :mod:`imgcls.modeling.seeds`) when it has them, otherwise
        on its fold spread (fine-tuned strategies), and :func:`~imgcls.selection.noisefloor.closer_than_floor`
        over mean CV accuracy (the grid points whose distance to the champion is below the
        smallest detectable difference). Raises ValueError when the champion has fewer than 2
        fold scores or no n_train_images.
        """
        best = self.champion()
        client, run_id = MlflowClient(), self.runs.loc[best, "run_id"]
        repeats = [self.fold_scores()[best]]
        for i in range(1, SEED_REPETITIONS):
            history = client.get_metric_history(run_id, seeds.seed_metric(i))
            scores = [m.value for m in sorted(history, key=lambda m: m.step)]
            if len(scores) == len(repeats[0]):
                repeats.append(scores)
        floor = noise_floor(
            repeats if len(repeats) >= 2 else None,
            self.fold_scores()[best],
            *self.fold_sizes(best),
            alpha,
            power,
        )
        means = self._metric("cv_accuracy_mean").to_dict()
        return floor, floor.closer_than_floor(means, best)

    def significance(self) -> pd.DataFrame:
        """Return the corrected resampled t-test of the champion against every other grid point.

        One row per grid point: mean_difference (champion - other, mean fold accuracy as a
        fraction), t, p_value (two-sided; :func:`imgcls.evaluation.metrics.compare_to_best`,
        Nadeau & Bengio 2003) and pairing, a sentence saying which folds were paired or why the
        point is not comparable. Fold scores are paired by fold index only between runs whose
        ``params.fold_assignment`` is equal; a point with a different or missing assignment, or
        another number of folds, gets NaNs and its reason. n_train / n_test per fold come from
        the champion's ``n_train_images`` metric split into k folds.
        """
        best = self.champion()
        scores = self.fold_scores()
        assignments = self.fold_assignments()
        reference, k = assignments[best], len(scores[best])
        n_total = float(self._metric("n_train_images").get(best, np.nan))
        pairing = {best: "champion (the reference)"}
        paired = []
        for point in self.runs.index.drop(best):
            reason = _why_not_paired(assignments[point], reference, len(scores[point]), k, n_total)
            if reason is None:
                paired.append(point)
                pairing[point] = f"same folds ({PARAM_FOLD_ASSIGNMENT} {reference})"
            else:
                pairing[point] = f"not comparable: {reason}"
        frame = pd.DataFrame(np.nan, index=self.runs.index, columns=SIGNIFICANCE_COLUMNS[:3])
        if paired:
            n_test = n_total / k
            result = metrics.compare_to_best(
                {p: scores[p] for p in [best, *paired]}, best, int(n_total - n_test), int(n_test)
            )
            frame.loc[paired] = result.loc[paired, SIGNIFICANCE_COLUMNS[:3]].to_numpy()
        frame["pairing"] = pd.Series(pairing)
        if len(paired) < len(self.runs) - 1:
            logger.info(
                "grid %s: grid points not compared with the champion %s: %s",
                self.grid_id,
                best,
                "; ".join(f"{p}: {t}" for p, t in pairing.items() if t.startswith("not")),
            )
        return frame

    def champion_sentence(self) -> str:
        """Return a sentence naming the champion and why, with its test score."""
        table = self.table()
        best = table.loc[self.champion()]
        return (
            f"Champion: {self.champion()} (strategy {best['strategy']}), chosen on cross-validation: "
            f"accuracy {best['cv_accuracy_mean']:.4f} ± {best['cv_accuracy_std']:.4f}, loss "
            f"{best['cv_loss_mean']:.4f}. Test accuracy (reported, not used to choose): "
            f"{best['test_accuracy']:.4f} [{best['test_accuracy_ci_low']:.3f}, "
            f"{best['test_accuracy_ci_high']:.3f}]."
        )

    def register_champion(
        self,
        model_name: str | None = None,
        rope: float = 0.005,
        alpha: float = 0.05,
        comparison_run_id: str | None = None,
    ) -> dict[str, Any]:
        """Judge the champion against the registry's incumbent, register it, move the alias if it
        wins; return the details and the verdict.

        The name is :func:`imgcls.core.names.registered_model_name`: ``model_name`` if MLflow's
        registry accepts it, else (None) ``<experiment>-classifier`` with the characters the
        registry refuses mapped to ``-``. ``rope`` / ``alpha``: the grid file's ``promotion:``
        settings (:func:`imgcls.selection.promotion.decide_promotion`). The verdict is written to
        the champion's registry version (:func:`imgcls.selection.verdict.apply_verdict`: a KEEP
        registers it without the alias) and, with ``comparison_run_id``, to that run's tags and
        metrics. Returns :func:`~imgcls.selection.verdict.apply_verdict`'s dict plus
        ``judgement``. Raises imgcls.core.names.InvalidNameError (a ValueError) for a
        ``model_name`` the registry would refuse, before anything is registered, and
        tracking.TrackingError when the champion's run has no logged model.
        """
        name = names.registered_model_name(self.experiment_name, model_name)
        point = self.champion()
        run = self.runs.loc[point]
        try:
            model_uri = tracking.logged_model(run["run_id"]).model_uri
        except tracking.TrackingError as exc:
            raise tracking.TrackingError(f"{point}: {exc}") from exc
        judgement = verdicts.judge(run, self.runs, find_incumbent(name), rope, alpha)
        result = verdicts.apply_verdict(name, model_uri, run, point, self.grid_id, judgement)
        if comparison_run_id:
            verdicts.log_to_run(comparison_run_id, judgement)
        return {**result, "judgement": judgement}


def _why_not_paired(
    own: str | None, reference: str | None, n_scores: int, k: int, n_total: float
) -> str | None:
    """Return why a point's fold scores cannot be paired with the champion's, None if they can.

    ``own`` / ``reference``: the point's and the champion's fold assignment (None if unknown);
    ``n_scores`` / ``k``: their numbers of fold scores; ``n_total``: the champion's
    ``n_train_images`` (NaN if not logged).
    """
    if reference is None:
        return f"the champion's run has no params.{PARAM_FOLD_ASSIGNMENT}, so its folds are unknown"
    if own is None:
        return f"the run has no params.{PARAM_FOLD_ASSIGNMENT}, so its folds are unknown"
    if own != reference:
        return f"other folds ({PARAM_FOLD_ASSIGNMENT} {own}, champion {reference})"
    if n_scores != k:
        return f"{n_scores} fold scores, the champion has {k}"
    if k < 2:
        return f"{k} fold score(s), the t-test needs 2"
    if not n_total > 0:
        return "the champion's run has no n_train_images metric"
    return None
