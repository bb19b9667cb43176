"""The incumbent: the registered champion a new grid's best point must beat before the alias moves.

Two moments. At plan time (:func:`plan_incumbent`, called by :mod:`imgcls.pipeline.plan`) the
runner asks whether the incumbent's logged fold scores can be paired with this grid's: only when
its run has this grid's data version (tag ``data_md5``) and fold assignment (param
``fold_assignment``, :func:`imgcls.data.folds.fold_assignment_hash`). Otherwise the grid gets
one extra grid point named ``incumbent``: the incumbent's logged strategy (validated by the
project's strategy parser) with this grid's folds and seed, trained and evaluated like any other
point. At comparison time (:func:`incumbent_fold_scores`, notebook 04) its fold scores are taken
from wherever they are comparable: the challenger's own run, the incumbent's run, or the
``incumbent`` grid point.
"""

from __future__ import annotations

import logging
import math
import typing
from collections import Counter
from dataclasses import dataclass
from typing import Any

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

from imgcls import tracking
from imgcls.core.config import TUNABLE_FIELDS, ConfigError, Strategy, strategy_from_dict
from imgcls.core.names import METRIC_LATENCY
from imgcls.data import duplicates
from imgcls.data.folders import ImageFolder
from imgcls.data.folds import fold_assignment_hash

logger = logging.getLogger(__name__)

CHAMPION_ALIAS = "champion"
INCUMBENT_POINT = "incumbent"  # the grid point (and strategy name) of a re-trained incumbent
PARAM_FOLD_ASSIGNMENT = "fold_assignment"  # see imgcls.data.folds.fold_assignment_hash
TAG_DATA_MD5 = "data_md5"
TAG_INCUMBENT_MODEL = "incumbent_model"  # on an ``incumbent`` grid-point run: whose champion
TAG_INCUMBENT_VERSION = "incumbent_version"
TAG_INCUMBENT_RUN = "incumbent_run_id"  # the run of the registered version it re-trains
METRIC_TRAIN_SECONDS = "cv_train_seconds"


@dataclass(frozen=True)
class Incumbent:
    """The registry's current champion: its version, its run and what that run logged."""

    model_name: str
    version: int
    run_id: str
    data_md5: str | None
    fold_assignment: str | None
    params: dict[str, str]
    metrics: dict[str, float]

    @property
    def label(self) -> str:
        """``version N of <name>``, as the plan and the verdict print it."""
        return f"version {self.version} of {self.model_name}"


def current_champion(client: MlflowClient, name: str) -> Any:
    """Return the ModelVersion holding the ``champion`` alias of ``name``, or None."""
    try:
        return client.get_model_version_by_alias(name, CHAMPION_ALIAS)
    except mlflow.exceptions.MlflowException:
        return None


def find_incumbent(model_name: str) -> Incumbent | None:
    """Return the current champion of registered model ``model_name`` with its run's data, or None.

    Reads the active tracking store (``tracking.configure`` first). Raises tracking.TrackingError
    when the alias points at a version whose run no longer exists, saying how to fix it.
    """
    client = MlflowClient()
    version = current_champion(client, model_name)
    if version is None:
        return None
    try:
        run = client.get_run(version.run_id)
    except mlflow.exceptions.MlflowException as exc:
        raise tracking.TrackingError(
            f"models:/{model_name}@{CHAMPION_ALIAS} (version {version.version}) points at run "
            f"{version.run_id}, which is not in the store ({exc}); move the alias to another "
            f"version or delete it (MlflowClient().delete_registered_model_alias({model_name!r}, "
            f"{CHAMPION_ALIAS!r})), or register under another --model-name"
        ) from exc
    params = dict(run.data.params)
    return Incumbent(
        model_name=model_name,
        version=int(version.version),
        run_id=version.run_id,
        data_md5=run.data.tags.get(TAG_DATA_MD5) or None,
        fold_assignment=params.get(PARAM_FOLD_ASSIGNMENT) or None,
        params=params,
        metrics=dict(run.data.metrics),
    )


def _typed(field: str, text: str) -> Any:
    """Turn a logged param (MLflow keeps text) back into the field's type; leave bad text as is,
    so that the strategy parser refuses it with its own message."""
    annotation = Strategy.model_fields[field].annotation
    if annotation is bool:
        return {"True": True, "False": False}.get(text, text)
    for kind in (int, float):
        if annotation is kind:
            try:
                return kind(text)
            except ValueError:
                return text
    if typing.get_origin(annotation) is typing.Literal or annotation is str:
        return text
    return text


def strategy_from_logged_params(params: dict[str, str], where: str) -> Strategy:
    """Return the validated Strategy named ``incumbent`` that a grid-point run's params describe.

    ``params``: the run's MLflow params (text; every strategy field is logged, other params such
    as ``fold_assignment`` are ignored). A field the run did not log takes the schema default
    (logged as a warning). Raises ConfigError (:func:`imgcls.core.config.strategy_from_dict`),
    prefixed with ``where``, for a value the schema refuses.
    """
    missing = [f for f in TUNABLE_FIELDS if f not in params]
    if missing:
        logger.warning("%s: no logged value for %s; schema defaults used", where, missing)
    values = {f: _typed(f, params[f]) for f in TUNABLE_FIELDS if f in params}
    return strategy_from_dict({**values, "name": INCUMBENT_POINT}, where=where)


def fold_assignment_of(folder: ImageFolder, folds: int, seed: int) -> str:
    """Return the ``fold_assignment`` a grid point with ``folds``/``seed`` logs on ``folder``.

    The same call as :func:`imgcls.modeling.crossval.cross_validate` (stratified group k-fold,
    near-duplicate groups from :func:`imgcls.data.duplicates.fold_groups`), named by
    :func:`imgcls.data.folds.fold_assignment_hash`. Raises DataError as
    :func:`~imgcls.data.folds.assign_folds` does.
    """
    return fold_assignment_hash(folder.relpaths(), duplicates.split_folds(folder, folds, seed))


@dataclass(frozen=True)
class IncumbentPlan:
    """What the runner does about the incumbent: reuse its fold scores, or re-train it."""

    incumbent: Incumbent
    strategy: Strategy | None  # None: its logged fold scores are comparable and reused
    reason: str

    def sentence(self) -> str:
        """The plan's line, e.g. ``incumbent: version 3 of m re-trained on this grid's folds``."""
        if self.strategy is None:
            return (
                f"incumbent: version {self.incumbent.version}, fold scores reused ({self.reason})"
            )
        return f"incumbent: {self.incumbent.label} re-trained on this grid's folds ({self.reason})"

    def tags(self) -> dict[str, str]:
        """Tags of the ``incumbent`` grid-point run that say which registered version it is."""
        return {
            TAG_INCUMBENT_MODEL: self.incumbent.model_name,
            TAG_INCUMBENT_VERSION: str(self.incumbent.version),
            TAG_INCUMBENT_RUN: self.incumbent.run_id,
        }


def plan_incumbent(
    incumbent: Incumbent | None, folder: ImageFolder, data_md5: str, strategies: Any
) -> IncumbentPlan | None:
    """Decide whether this grid re-trains the incumbent; None when there is no incumbent.

    ``folder``: the grid's training split; ``data_md5``: its data version; ``strategies``: the
    grid's strategies (all of them, not only ``--only``'s). The fold scores are reused when the
    incumbent's run has this data version and a fold assignment equal to the one every grid
    point will log (one fold setting: folds and seed). Otherwise the returned plan holds the
    incumbent's strategy, with the folds and seed of the grid's most common fold setting, named
    ``incumbent``. Raises ConfigError when a grid strategy is named ``incumbent`` (reserved) or
    the incumbent's logged params are not a valid strategy.
    """
    strategies = list(strategies)
    if any(s.name == INCUMBENT_POINT for s in strategies):
        raise ConfigError(
            f"strategies.{INCUMBENT_POINT}: the name is reserved for the registered champion "
            "re-trained on this grid's folds; rename the strategy"
        )
    if incumbent is None:
        return None
    settings = Counter((s.folds, s.seed) for s in strategies)
    (folds, seed), _ = settings.most_common(1)[0]
    if incumbent.data_md5 != data_md5:
        reason = f"its data version {incumbent.data_md5}, this grid's {data_md5}"
    elif incumbent.fold_assignment is None:
        reason = f"its run logs no {PARAM_FOLD_ASSIGNMENT}, so its folds are unknown"
    elif len(settings) > 1:
        reason = f"this grid has {len(settings)} fold settings (folds, seed); {folds}, {seed} used"
    else:
        target = fold_assignment_of(folder, folds, seed)
        if target == incumbent.fold_assignment:
            return IncumbentPlan(incumbent, None, f"same data and {PARAM_FOLD_ASSIGNMENT} {target}")
        reason = f"its {PARAM_FOLD_ASSIGNMENT} {incumbent.fold_assignment}, this grid's {target}"
    where = f"models:/{incumbent.model_name}/{incumbent.version} (run {incumbent.run_id}) params"
    logged = strategy_from_logged_params(incumbent.params, where)
    strategy = logged.model_copy(update={"folds": folds, "seed": seed, "extra": {}})
    if (logged.folds, logged.seed) != (folds, seed):
        reason += f"; folds {logged.folds} -> {folds}, seed {logged.seed} -> {seed}"
    return IncumbentPlan(incumbent, strategy_from_dict(strategy.params(), where), reason)


@dataclass(frozen=True)
class IncumbentScores:
    """The incumbent's fold scores on the challenger's folds, its cost, and where they came from."""

    scores: list[float]
    cost: tuple[float, float]  # (training seconds, latency ms per image); NaN = unknown
    source: str


def run_cost(metrics: dict[str, float] | pd.Series) -> tuple[float, float]:
    """Return (``cv_train_seconds``, ``latency_ms_per_image``) of a run's metrics, NaN if absent."""

    def get(name: str) -> float:
        value = metrics.get(name, math.nan)
        return math.nan if value is None or pd.isna(value) else float(value)

    return (get(METRIC_TRAIN_SECONDS), get(METRIC_LATENCY))


def _history(run_id: str, metric: str) -> list[float]:
    history = MlflowClient().get_metric_history(run_id, metric)
    return [m.value for m in sorted(history, key=lambda m: m.step)]


def incumbent_fold_scores(
    incumbent: Incumbent,
    challenger: pd.Series,
    points: pd.DataFrame,
    metric: str = "fold_val_accuracy",
) -> IncumbentScores | str:
    """Return the incumbent's fold scores paired with the challenger's, or why there are none.

    ``challenger``: its row of :attr:`GridComparison.runs` (``run_id``, ``params.*``,
    ``tags.*``, ``metrics.*``); ``points``: every grid-point row of the grid (the ``incumbent``
    point among them when the runner re-trained it). Tried in order: the challenger IS the
    incumbent's run; the incumbent's run has the challenger's data version and fold assignment
    (its logged scores reused); the grid's ``incumbent`` point re-trained from this incumbent's
    run on the challenger's folds. Returns a sentence (str) when none applies.
    """
    folds = challenger.get(f"params.{PARAM_FOLD_ASSIGNMENT}")
    folds = folds if isinstance(folds, str) and folds else None
    data = challenger.get(f"tags.{TAG_DATA_MD5}")
    if incumbent.run_id == challenger["run_id"]:
        scores = _history(incumbent.run_id, metric)
        return IncumbentScores(scores, run_cost(incumbent.metrics), "the challenger's own run")
    if folds is None:
        return f"the challenger's run has no params.{PARAM_FOLD_ASSIGNMENT}: its folds are unknown"
    if incumbent.data_md5 == data and incumbent.fold_assignment == folds:
        scores = _history(incumbent.run_id, metric)
        source = f"fold scores reused (run {incumbent.run_id}: same data and folds)"
        return IncumbentScores(scores, run_cost(incumbent.metrics), source)
    if INCUMBENT_POINT in points.index:
        row = points.loc[INCUMBENT_POINT]
        same_run = row.get(f"tags.{TAG_INCUMBENT_RUN}") == incumbent.run_id
        if same_run and row.get(f"params.{PARAM_FOLD_ASSIGNMENT}") == folds:
            scores = _history(row["run_id"], metric)
            metrics = {k[8:]: v for k, v in row.items() if k.startswith("metrics.")}
            source = f"re-trained on this grid's folds (run {row['run_id']})"
            return IncumbentScores(scores, run_cost(metrics), source)
    return (
        f"no fold scores of {incumbent.label} on the challenger's folds: its run has data "
        f"{incumbent.data_md5} and {PARAM_FOLD_ASSIGNMENT} {incumbent.fold_assignment}, the "
        f"challenger {data} and {folds}, and the grid has no '{INCUMBENT_POINT}' point re-trained "
        "from it; run the grid with run_experiments.py, which re-trains the incumbent"
    )
