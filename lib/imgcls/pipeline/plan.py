"""The plan of a grid run: the command-line options, validation of everything, run or skip per point.

``build_plan`` checks the grid file, the data, every name that reaches MLflow and the tracking
store before anything runs, and decides per grid point whether it runs or is skipped (a finished
run with the same run key exists); ``print_plan`` prints it. Nothing here executes a notebook.

When the champion will be registered and the registry already has one whose fold scores cannot
be paired with this grid's (another data version or fold assignment), the plan gets one extra
grid point, ``incumbent``: that champion's logged strategy trained on this grid's folds
(:func:`imgcls.selection.incumbent.plan_incumbent`), so notebook 04 can judge the new champion
against it. It is never registered itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgcls import tracking
from imgcls.core import names
from imgcls.core.config import (
    ConfigError,
    Grid,
    Strategy,
    check_against_data,
    load_grid,
    run_key,
    stable_hash,
)
from imgcls.data.folders import (
    ImageFolder,
    cache_version,
    check_same_classes,
    require_split,
    scan_image_folder,
)
from imgcls.data.primer import DecodePrimer
from imgcls.pipeline.gridpoint import log
from imgcls.selection.incumbent import IncumbentPlan, find_incumbent, plan_incumbent


@dataclass
class RunnerOptions:
    """Everything the command line can set."""

    grid: Path
    only: list[str] | None = None
    dry_run: bool = False
    force: bool = False
    tracking_uri: str | None = None
    experiment: str = tracking.DEFAULT_EXPERIMENT
    workers: int = 1
    executor: str = "local"
    scheduler: str | None = None
    data_dir: str | None = None
    skip_bad_images: bool = False
    extra_eval_dirs: list[str] = field(default_factory=list)
    gate: bool = False
    register: bool = True
    model_name: str | None = None
    device: str | None = None


@dataclass
class GridPoint:
    """One grid point in the plan: its strategy, run key and what the runner will do with it."""

    strategy: Strategy
    key: str
    action: str = "run"  # run | skip
    existing_run_id: str | None = None
    result: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)  # extra run tags (the incumbent's)


@dataclass
class Plan:
    """A validated plan: grid id, data version, tracking target and grid points."""

    grid: Grid
    grid_id: str
    data_md5: str
    code_version: str
    tracking_uri: str
    experiment_id: str
    points: list[GridPoint]
    model_name: str | None = None  # the registered model name; None with --no-register
    incumbent: IncumbentPlan | None = None  # the registry's champion, reused or re-trained
    # the run key of every point of the whole grid (also under --only) and of the incumbent: the
    # grid that 04 compares, whichever grid first ran a reused point
    member_keys: tuple[str, ...] = ()


def _load_grid(path: Path, only: list[str] | None = None) -> Grid:
    try:
        return load_grid(path, only)
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})"
        ) from exc


def _model_name(options: RunnerOptions) -> str | None:
    """Return the name the champion will be registered under (None with --no-register).

    A ``--model-name`` is checked even with ``--no-register``: it was typed, so it is meant.
    """
    if not options.register and options.model_name is None:
        return None
    name = names.registered_model_name(options.experiment, options.model_name)
    return name if options.register else None


def _scan_data(options: RunnerOptions, grid: Grid) -> tuple[ImageFolder, str]:
    """Scan and validate every split; return the train split and the data version.

    Unless the grid points run on a remote Dask cluster (whose workers have their own caches),
    the validation pass also fills the decoded-image cache of each split at
    the grid's image sizes (:class:`imgcls.data.primer.DecodePrimer`), under the data version
    its reader keys it by: notebook 02 reads ``train`` under the dataset's version, notebook 03
    each evaluated folder (``test``, ``--eval-dir``) under that folder's own. A photo validated
    here is then not decoded again; the runner says what it wrote. Raises DataError or
    InvalidNameError naming the folder.
    """
    root = Path(options.data_dir) if options.data_dir else None
    remote = options.executor == "dask" and options.scheduler
    # A dry run primes too: it decodes every new photo anyway, and the run after it finds them
    # recorded as validated, so it would not decode them in its own pass.
    sizes = [] if remote else [s.image_size for s in grid.strategies]
    primed: list[tuple[ImageFolder, DecodePrimer]] = []

    def scan(path: Path) -> ImageFolder:
        primer = DecodePrimer(sizes)
        try:
            folder = scan_image_folder(path, skip_bad=options.skip_bad_images, sink=primer)
        except BaseException:
            primer.discard()
            raise
        primed.append((folder, primer))
        return folder

    try:
        train = scan(require_split("train", root))
        names.check_metric_names(train.classes, str(train.root), options.extra_eval_dirs)
        check_same_classes(train, scan(require_split("test", root)))
        for extra in options.extra_eval_dirs:
            check_same_classes(train, scan(Path(extra)))
        md5 = cache_version(train, training=True)  # also the run key's data version
        for folder, primer in primed:
            if not primer.ready(folder):
                continue
            version = md5 if folder is train else cache_version(folder, training=False)
            written = primer.publish(folder, version)
            if written:
                log(
                    f"decoded {len(folder)} {folder.root.name} images for the model at "
                    f"{', '.join(f'{s} px' for s in primer.sizes)} in the validation pass: "
                    f"{', '.join(str(path) for path in written)}"
                )
    finally:
        for _, primer in reversed(primed):  # the first primer made the cache folders, if anyone
            primer.discard()
    return train, md5


def build_plan(options: RunnerOptions) -> Plan:
    """Validate grid, data and tracking target before anything runs; decide run or skip per point.

    Every name that reaches MLflow is checked here (lib/imgcls/core/names.py): the experiment name, the
    registered model name (default or ``--model-name``), the class folder names and the
    ``--eval-dir`` names (metric keys). Raises ConfigError, DataError, InvalidNameError or
    TrackingError, whose messages name the file, folder or option.
    """
    names.check_experiment_name(options.experiment)
    model_name = _model_name(options)
    full_grid = _load_grid(options.grid)
    grid = _load_grid(options.grid, options.only) if options.only else full_grid
    train, md5 = _scan_data(options, grid)
    for strategy in full_grid.strategies:
        check_against_data(
            strategy, train.class_counts(), f"{options.grid}: strategies.{strategy.name}"
        )
    code = tracking.code_version()
    uri = tracking.configure(options.tracking_uri)
    if options.executor == "dask" and options.scheduler and tracking.is_local_store(uri):
        raise tracking.TrackingError(
            f"{uri}: a remote Dask cluster needs a shared MLflow server; pass --tracking-uri "
            "http://HOST:PORT (see README: MLflow server)"
        )
    tracking.check_reachable(uri)
    experiment_id = tracking.get_experiment_id(options.experiment)
    member_keys = [run_key(s, md5, code) for s in full_grid.strategies]
    grid_id = stable_hash(sorted(member_keys), 10)
    points = []
    for strategy in grid.strategies:
        key = run_key(strategy, md5, code)
        existing = None if options.force else tracking.find_completed_run(experiment_id, key)
        points.append(GridPoint(strategy, key, "skip" if existing else "run", existing))
    incumbent = plan_incumbent(
        find_incumbent(model_name) if model_name else None, train, md5, full_grid.strategies
    )
    if incumbent is not None and incumbent.strategy is not None:
        key = run_key(incumbent.strategy, md5, code)
        existing = None if options.force else tracking.find_completed_run(experiment_id, key)
        action = "skip" if existing else "run"
        points.append(GridPoint(incumbent.strategy, key, action, existing, tags=incumbent.tags()))
        member_keys.append(key)
    return Plan(
        grid,
        grid_id,
        md5,
        code,
        uri,
        experiment_id,
        points,
        model_name,
        incumbent,
        tuple(member_keys),
    )


def print_plan(plan: Plan) -> None:
    """Print the plan: one line per grid point with its action."""
    todo = sum(p.action == "run" for p in plan.points)
    log(
        f"grid {plan.grid.path} -> grid id {plan.grid_id}, data {plan.data_md5}, "
        f"code {plan.code_version}, tracking {plan.tracking_uri}"
    )
    for i, point in enumerate(plan.points, 1):
        what = "run" if point.action == "run" else f"skip (finished run {point.existing_run_id})"
        deltas = point.strategy.extra.get("grid_values") or {}
        log(f"  {i:2d}. {point.strategy.run_name:<40} key {point.key}  {what} {deltas or ''}")
    if plan.incumbent is not None:
        log(plan.incumbent.sentence())
    if plan.model_name:
        log(f"champion will be registered as models:/{plan.model_name}@champion")
    else:
        log("champion will not be registered (--no-register)")
    log(f"plan: {todo} to run, {len(plan.points) - todo} already finished")
