"""Names that reach MLflow: one rule per kind of name, checked before anything runs.

MLflow refuses some names only when it is handed them, which here means at the end of a long run
(a per-class metric is logged after training, the champion is registered after the whole grid).
Every name that reaches MLflow is therefore made or checked here, and the runner checks them all
while it builds the plan (``--dry-run`` included).

* Metric keys (``mlflow.utils.validation.validate_param_and_metric_name`` and
  ``path_not_unique``): only ``[/\\w.\\- :]`` (no ``:`` on Windows), at most 250 characters
  (``MAX_ENTITY_KEY_LENGTH``), and unchanged by ``posixpath.normpath``. Class folder names and
  evaluation-set names become key fragments through :func:`metric_key`, a stricter, portable
  rule (ASCII letters, digits, ``_ . -``), so that a key means the same on every platform, file
  store and shell. The original names stay what people read: reports, per-class tables,
  confusion-matrix labels and the model's class list.
* Registered model names (``mlflow.utils.validation._validate_model_name`` and the file
  registry store's ``_validate_model_name``): not empty, no ``/``, ``:``, ``\\`` or ``%``, and
  unchanged by ``posixpath.normpath``; this project also needs them inside the URI
  ``models:/<name>@champion``, which a ``?`` cuts short. See :func:`registered_model_name`.
* Experiment names (``mlflow.utils.validation._validate_experiment_name``): not empty, at most
  500 characters. See :func:`check_experiment_name`.
* Run names come from ``imgcls.core.config.Strategy.run_name``, already reduced to a safe alphabet.

Nothing here imports MLflow: the rules are restated, and tests/test_names.py holds them against a
real MLflow store.
"""

from __future__ import annotations

import posixpath
import re
import shlex
import unicodedata
from collections.abc import Sequence

MAX_METRIC_KEY_LENGTH = 250  # mlflow.utils.validation.MAX_ENTITY_KEY_LENGTH
MAX_EXPERIMENT_NAME_LENGTH = 500  # mlflow.utils.validation.MAX_EXPERIMENT_NAME_LENGTH
MAX_MODEL_NAME_LENGTH = 256  # registered_models.name is String(256) in MLflow's database schema

PER_CLASS_METRICS = (
    "precision",
    "recall",
    "f1",
)  # <metric>_<class key>, see lib/imgcls/evaluation/metrics.py
TEST_PREFIX = "test"  # the test split's metrics: test_accuracy, test_precision_<class key>, ...
# Metrics logged under an evaluation-set prefix that are not per class are named by
# lib/imgcls/evaluation/metrics.py and lib/imgcls/evaluation/evaluate.py; the longest today, fold_models_accuracy_mean, has 25
# characters. Key lengths are checked against this bound.
LONGEST_FIXED_METRIC = 32
# Logged by notebook 03 (imgcls.evaluation.latency) and read by the promotion rule and the
# comparison (imgcls.selection): named here so that the runner, which plans promotion, reads it
# without importing torch.
METRIC_LATENCY = "latency_ms_per_image"

_OUTSIDE_KEY = re.compile(r"[^A-Za-z0-9_.\-]+")
_KEY_ENDS = "_."
_MLFLOW_METRIC_KEY = re.compile(r"^[/\w.\- ]*$")  # the Windows form: no colon anywhere
_REGISTRY_REFUSED = re.compile(r"[/:\\%?\x00-\x1f\x7f]")
_REGISTRY_REFUSED_RUN = re.compile(r"\s*(?:[/:\\%?\x00-\x1f\x7f]\s*)+")
_MODEL_NAME_ENDS = "-. "


class InvalidNameError(ValueError):
    """A name MLflow would refuse (or two names it would confuse); the message names its source."""


def _drop_accents(name: str) -> str:
    """Return ``name`` NFKD-normalised without combining marks (``forêt`` -> ``foret``)."""
    return "".join(c for c in unicodedata.normalize("NFKD", name) if not unicodedata.combining(c))


def path_not_unique(name: str) -> bool:
    """Return True when MLflow would refuse ``name`` as a path (``mlflow.utils.validation``)."""
    norm = posixpath.normpath(name)
    return norm != name or norm == "." or norm.startswith("..") or norm.startswith("/")


def metric_key(name: str) -> str:
    """Return the MLflow metric-key fragment for a class or evaluation-set name.

    The rule: NFKD-normalise and drop combining accents (``forêt`` -> ``foret``), replace each
    run of characters outside ``A-Z a-z 0-9 _ . -`` (spaces included) by one ``_``, then strip
    ``_`` and ``.`` at both ends (a leading ``..`` is refused by MLflow's path rule):
    ``sea (coast)`` -> ``sea_coast``, ``../phone photos`` -> ``phone_photos``.

    Raises InvalidNameError when nothing is left (``'()'``, ``'森林'``, ``'.'``).
    """
    key = _OUTSIDE_KEY.sub("_", _drop_accents(name)).strip(_KEY_ENDS)
    if not key:
        raise InvalidNameError(
            f"{name!r} gives no MLflow metric key: nothing is left once accents and characters "
            "other than A-Z a-z 0-9 _ . - are dropped"
        )
    return key


def class_metric_keys(classes: Sequence[str], where: str) -> dict[str, str]:
    """Return ``{class name: metric-key fragment}`` for every class, by :func:`metric_key`.

    ``where`` is the folder the classes were read from; every message names it. Raises
    InvalidNameError for a class that gives no key, or for two class folders that give the same
    key (their metrics, e.g. ``precision_<key>``, would overwrite each other in MLflow).
    """
    keys: dict[str, str] = {}
    owner: dict[str, str] = {}
    for name in classes:
        try:
            key = metric_key(name)
        except InvalidNameError as exc:
            raise InvalidNameError(
                f"{where}: class folder {exc}; rename the folder (the name is kept for display, "
                "the metric key is only its plain-ASCII form)"
            ) from None
        if key in owner:
            raise InvalidNameError(
                f"{where}: class folders {owner[key]!r} and {name!r} both give the MLflow metric "
                f"key {key!r} (precision_{key}, ...); rename one of them"
            )
        owner[key] = name
        keys[name] = key
    return keys


def eval_set_prefixes(names: Sequence[str], option: str = "--eval-dir") -> dict[str, str]:
    """Return ``{evaluation-set name: metric prefix}`` for extra evaluation folders.

    Prefixes follow :func:`metric_key` (``data/phone photos`` -> ``data_phone_photos``, logged as
    ``data_phone_photos_accuracy``, ...). Raises InvalidNameError, naming ``option``, for a name
    that gives no prefix, a name given twice, two names with the same prefix, or a prefix equal
    to ``test`` (it would overwrite the test split's metrics).
    """
    prefixes: dict[str, str] = {}
    owner: dict[str, str] = {TEST_PREFIX: "the test split"}
    for name in names:
        if name in prefixes:
            raise InvalidNameError(f"{option} {name!r} is given twice")
        try:
            prefix = metric_key(name)
        except InvalidNameError as exc:
            raise InvalidNameError(f"{option} {exc}; give the folder another path") from None
        if prefix in owner:
            other = owner[prefix]
            other = other if other == "the test split" else f"{option} {other!r}"
            raise InvalidNameError(
                f"{option} {name!r} would log its metrics as '{prefix}_*', like {other}; "
                "give the folder another path"
            )
        owner[prefix] = name
        prefixes[name] = prefix
    return prefixes


def check_metric_key(key: str, what: str) -> str:
    """Return ``key`` if MLflow accepts it as a metric key on every platform, else raise.

    MLflow's rule (``mlflow.utils.validation``): characters ``[/\\w.\\- ]`` (a colon is refused
    on Windows), at most 250 characters, unchanged by ``posixpath.normpath``. ``what`` says where
    the key comes from. Raises InvalidNameError.
    """
    if not _MLFLOW_METRIC_KEY.match(key):
        raise InvalidNameError(f"{what}: MLflow refuses the characters of metric key {key!r}")
    if len(key) > MAX_METRIC_KEY_LENGTH:
        raise InvalidNameError(
            f"{what}: metric key {key[:40]!r}... has {len(key)} characters, MLflow allows "
            f"{MAX_METRIC_KEY_LENGTH}; use a shorter name"
        )
    if path_not_unique(key):
        raise InvalidNameError(f"{what}: MLflow refuses metric key {key!r} (a path name)")
    return key


def check_metric_names(
    classes: Sequence[str], where: str, eval_sets: Sequence[str], option: str = "--eval-dir"
) -> dict[str, str]:
    """Check every metric key a grid point will log; return ``{class name: key fragment}``.

    Runs :func:`class_metric_keys` and :func:`eval_set_prefixes`, then checks the longest keys
    of the test split and of each evaluation set: ``<prefix>_precision_<longest class key>``
    with :func:`check_metric_key`, and ``<prefix>_`` plus :data:`LONGEST_FIXED_METRIC`
    characters against MLflow's 250-character limit. Raises InvalidNameError.
    """
    keys = class_metric_keys(classes, where)
    prefixes = {"the test split": TEST_PREFIX, **eval_set_prefixes(eval_sets, option)}
    longest = max(keys.values(), key=len, default="")
    for name, prefix in prefixes.items():
        source = name if name == "the test split" else f"{option} {name!r}"
        check_metric_key(f"{prefix}_{PER_CLASS_METRICS[0]}_{longest}", f"{source}, {where}")
        if len(prefix) + 1 + LONGEST_FIXED_METRIC > MAX_METRIC_KEY_LENGTH:
            raise InvalidNameError(
                f"{source}: metric prefix {prefix[:40]!r}... leaves no room in MLflow's "
                f"{MAX_METRIC_KEY_LENGTH}-character metric keys; give the folder a shorter path"
            )
    return keys


def check_experiment_name(name: str, option: str = "--experiment") -> str:
    """Return ``name`` if MLflow accepts it as an experiment name, else raise InvalidNameError.

    MLflow's rule (``mlflow.utils.validation._validate_experiment_name``): not empty, at most
    500 characters.
    """
    if not name or not name.strip():
        raise InvalidNameError(f"{option} {name!r}: MLflow refuses an empty experiment name")
    if len(name) > MAX_EXPERIMENT_NAME_LENGTH:
        raise InvalidNameError(
            f"{option} {name[:40]!r}... has {len(name)} characters; MLflow allows "
            f"{MAX_EXPERIMENT_NAME_LENGTH}"
        )
    return name


def registry_refusal(name: str) -> str | None:
    """Return why MLflow's model registry would refuse ``name`` (None when it accepts it).

    Mirrors ``mlflow.utils.validation._validate_model_name`` (not blank, no ``/`` or ``:``,
    unchanged by ``posixpath.normpath``), the file registry store (no ``\\`` or ``%``), the
    database column (at most 256 characters), and the ``models:/<name>@champion`` URI (no ``?``,
    no control characters).
    """
    if not name.strip():
        return "a registered model name cannot be empty"
    refused = sorted(set(_REGISTRY_REFUSED.findall(name)))
    if refused:
        shown = " and ".join(", ".join(repr(c) for c in refused).rsplit(", ", 1))
        return f"MLflow's model registry refuses {shown} in a registered model name"
    if path_not_unique(name):
        return "MLflow's model registry refuses a name that resolves to another path"
    if len(name) > MAX_MODEL_NAME_LENGTH:
        return f"it has {len(name)} characters; MLflow allows {MAX_MODEL_NAME_LENGTH}"
    return None


def _registry_form(name: str) -> str:
    """Map each run of refused characters (and spaces around it) to ``-``; strip ``- .`` ends."""
    return _REGISTRY_REFUSED_RUN.sub("-", name).strip(_MODEL_NAME_ENDS)


def registered_model_name(experiment: str, explicit: str | None = None) -> str:
    """Return the name the champion is registered under; raise InvalidNameError if unusable.

    Default (``explicit`` is None): ``<experiment>-classifier``, where every run of
    characters MLflow's registry refuses (``/ : \\ % ?``, control characters; see
    :func:`registry_refusal`), with the spaces around it, becomes one ``-``, and ``-``, ``.``
    and spaces are stripped at the ends (a leading ``..`` is a path to MLflow):
    ``vision-team/sea-forest`` -> ``vision-team-sea-forest-classifier``. Names MLflow accepts
    are kept as they are.

    An explicit ``--model-name`` is never changed: one MLflow would refuse raises
    InvalidNameError naming the option and suggesting the mapped name. A default that maps to
    nothing, or is too long, raises InvalidNameError naming ``--experiment``.
    """
    if explicit is not None:
        reason = registry_refusal(explicit)
        if reason is None:
            return explicit
        suggestion = _registry_form(explicit)
        hint = (
            f"use --model-name {shlex.quote(suggestion)}"
            if suggestion and registry_refusal(suggestion) is None
            else "choose another --model-name"
        )
        raise InvalidNameError(f"--model-name {explicit!r}: {reason}; {hint}")
    stem = _registry_form(experiment)
    name = f"{stem}-classifier"
    if not stem or registry_refusal(name) is not None:
        raise InvalidNameError(
            f"--experiment {experiment[:60]!r}: gives no usable registered model name "
            f"({name[:60]!r}); pass --model-name NAME or --no-register"
        )
    return name
