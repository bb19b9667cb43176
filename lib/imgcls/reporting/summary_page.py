"""``reports/summary.html``: the whole grid in one self-contained file to send.

One HTML file that opens from a CI artifact or an e-mail attachment: no server, no script, no
external URL (figures are inlined PNGs as ``data:`` URIs, the styles are inline, the model card
is embedded), and relative links to every notebook report and the index for whoever has the
whole ``reports/`` folder. It holds the ranking with a critical-difference view over the folds,
the fold scores (one line per grid point), only the parameters that differ, the promotion
verdict with its numbers, the noise floor, the champion's model card, and the links. Every
number is read from MLflow (:mod:`imgcls.reporting.summary_data`); a piece that cannot be read
says so on the page instead of failing the run.
"""

from __future__ import annotations

import base64
import io
import logging
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from imgcls.reporting import plots, summary_data
from imgcls.reporting.reports import NOTEBOOK_REPORTS, environment
from imgcls.selection.comparison import GridComparison

logger = logging.getLogger(__name__)

SUMMARY_FILE = "summary.html"
DATA_TAG = "data_md5"  # the data version tag of every grid-point run (imgcls.tracking)
SECTIONS = ("ranking", "cd", "folds", "parameters", "verdict", "noise", "card")
SINGLE_REPORTS = (
    ("index.html", "index of all reports"),
    ("data/01_data.html", "01 · Data checks and folds"),
    ("comparison/04_compare_runs.html", "04 · Comparison of all strategies and the champion"),
)


def figure_uri(fig: Figure, dpi: int = 110) -> str:
    """Return ``fig`` as a ``data:image/png;base64,...`` URI (and close it).

    ``dpi``: dots per inch of the PNG (an 8 x 4.5 inch figure at 110 dpi is 880 x 495 pixels).
    """
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _section(name: str, build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one section's builder; on any error return ``{"missing": why}`` for the page."""
    try:
        return {"missing": None, **build()}
    except Exception as exc:  # one unreadable piece must not cost the rest of the page
        logger.warning("summary: %s not shown: %s: %s", name, type(exc).__name__, exc)
        return {"missing": f"{type(exc).__name__}: {exc}"}


def _number(value: Any, digits: int = 4) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "–"
    return f"{number:.{digits}f}" if math.isfinite(number) else "–"


def _ranking(grid: GridComparison, cd: dict[str, Any], closer: Sequence[str]) -> dict[str, Any]:
    table = grid.table()
    mean_ranks = cd.get("mean_ranks")
    rows = []
    for position, (point, row) in enumerate(table.iterrows(), start=1):
        rank = mean_ranks.get(point) if mean_ranks is not None else None
        rows.append(
            {
                "position": position,
                "point": str(point),
                "strategy": str(row["strategy"]),
                "champion": bool(row["is_champion"]),
                "cv": f"{_number(row['cv_accuracy_mean'])} ± {_number(row['cv_accuracy_std'])}",
                "mean_rank": _number(rank, 2),
                "test": (
                    f"{_number(row['test_accuracy'])} [{_number(row['test_accuracy_ci_low'], 3)}, "
                    f"{_number(row['test_accuracy_ci_high'], 3)}]"
                ),
                "train_seconds": _number(row["train_seconds"], 1),
                "p": _number(row["p_value_vs_best"]),
                "p_holm": _number(row["p_holm_vs_best"]),
                "closer": point in closer,
            }
        )
    champion = grid.champion()
    data_version = grid.runs.get(f"tags.{DATA_TAG}", {}).get(champion)
    return {
        "rows": rows,
        "champion": champion,
        "sentence": grid.champion_sentence(),
        "data_version": str(data_version or "not recorded"),
    }


def _cd_view(cd: dict[str, Any]) -> dict[str, Any]:
    figure = plots.critical_difference_plot(
        cd["mean_ranks"],
        cd["p_values"],
        cd["alpha"],
        "Mean rank over folds; a bar joins points not significantly different",
    )
    names = list(cd["mean_ranks"].index)
    return {
        "image": figure_uri(figure),
        "alpha": cd["alpha"],
        "k": len(cd["ranks"]),
        "n_train": _number(cd["n_train"], 1),
        "n_test": _number(cd["n_test"], 1),
        "excluded": cd["excluded"],
        "names": names,
        "p_rows": [
            (a, [_number(cd["p_values"].loc[a, b]) if a != b else "" for b in names]) for a in names
        ],
    }


def _folds_view(grid: GridComparison, cd: dict[str, Any]) -> dict[str, Any]:
    scores = cd.get("scores") or grid.fold_scores()
    figure = plots.fold_scores_plot(
        scores, title="Validation accuracy per fold (one line per grid point)"
    )
    k = max((len(v) for v in scores.values()), default=0)
    return {
        "image": figure_uri(figure),
        "folds": list(range(1, k + 1)),
        "rows": [(p, [_number(x) for x in v]) for p, v in scores.items()],
        "paired": bool(cd.get("scores")),
    }


def _parameters_view(grid: GridComparison) -> dict[str, Any]:
    table, same = summary_data.differing_parameters(grid.runs)
    return {
        "columns": list(table.columns),
        "rows": [(str(point), list(values)) for point, values in table.iterrows()],
        "same": same,
    }


def _noise_view(grid: GridComparison, alpha: float, alpha_note: str) -> dict[str, Any]:
    floor = summary_data.noise(grid, alpha)
    figure = plots.champion_gaps_plot(
        floor["gaps"],
        floor["mdd_points"],
        floor["closer"],
        "Mean CV accuracy minus the champion's\n(dashed: ± the smallest detectable difference)",
    )
    return {**floor, "image": figure_uri(figure), "alpha_note": alpha_note}


def _card_view(name: str | None, run_id: str, reports: Path) -> dict[str, Any]:
    from imgcls.reporting import modelcard

    version = summary_data.registry_version(name, run_id)
    if version is None:
        raise LookupError(
            f"the champion's run {run_id} is no version of "
            f"{name or 'a registered model (registration was off)'}: no model card"
        )
    facts = modelcard.collect(name, version.version)  # type: ignore[arg-type]
    page = environment().get_template("model_card.html").render(**facts)
    body = re.search(r"<body>(.*)</body>", page, re.DOTALL)
    if body is None:
        raise ValueError("templates/model_card.html has no <body>...</body> to embed")
    stem = f"{name}-v{version.version}"
    return {
        "body": body.group(1),
        "title": facts["title"],
        "links": [
            _link(reports / "model_card" / f"{stem}.html", reports, "model card (HTML)"),
            _link(reports / "model_card" / f"{stem}.md", reports, "model card (Markdown)"),
        ],
    }


def _link(target: Path, reports: Path, label: str) -> dict[str, str | None]:
    """A link relative to ``reports``; ``href`` None when the file is not there."""
    href = os.path.relpath(target, reports) if target.is_file() else None
    return {"label": label, "href": href}


def _links(reports: Path, points: Sequence[str]) -> dict[str, Any]:
    return {
        "singles": [_link(reports / path, reports, label) for path, label in SINGLE_REPORTS],
        "points": [
            (point, [_link(reports / point / f"{n}.html", reports, n) for n in NOTEBOOK_REPORTS])
            for point in points
        ],
    }


def _sections(
    grid: GridComparison, model_name: str | None, comparison_run_id: str | None, reports: Path
) -> dict[str, dict[str, Any]]:
    """Every section of the page for a loaded grid (see :func:`write_summary`)."""
    verdict = _section("verdict", lambda: summary_data.verdict(grid, model_name, comparison_run_id))
    try:
        alpha = float(verdict["alpha"])
        note = "the grid file's promotion.alpha, as recorded with the verdict"
    except (KeyError, TypeError, ValueError):
        alpha = summary_data.DEFAULT_ALPHA
        note = "the default promotion.alpha: no verdict recorded one"
    cd = _section("critical difference", lambda: summary_data.critical_difference(grid, alpha))
    noise = _section("noise floor", lambda: _noise_view(grid, alpha, note))
    closer = noise.get("closer", [])

    def card() -> dict[str, Any]:
        return _card_view(model_name, str(grid.runs.loc[grid.champion(), "run_id"]), reports)

    return {
        "verdict": verdict,
        "noise": noise,
        "ranking": _section("ranking", lambda: _ranking(grid, cd, closer)),
        "cd": cd if cd["missing"] else _section("critical difference", lambda: _cd_view(cd)),
        "folds": _section("fold scores", lambda: _folds_view(grid, cd)),
        "parameters": _section("parameters", lambda: _parameters_view(grid)),
        "card": _section("model card", card),
    }


def write_summary(
    reports: Path,
    experiment_name: str,
    grid_id: str | None = None,
    *,
    model_name: str | None = None,
    comparison_run_id: str | None = None,
    grid_points: Sequence[str] = (),
    tracking_uri: str | None = None,
    run_keys: Sequence[str] | None = None,
) -> Path:
    """Write ``<reports>/summary.html`` for grid ``grid_id`` and return its path.

    ``experiment_name`` / ``grid_id`` / ``tracking_uri``: as :meth:`GridComparison.load`
    (``grid_id`` None: the newest grid). ``model_name``: the registered model (None: not
    registered, so no verdict from the registry and no model card). ``comparison_run_id``:
    04's run holding this grid's verdict (None: the newest such run of the grid).
    ``grid_points``: every grid point of the plan, so that failed ones are linked too (finished
    ones are added from MLflow). ``run_keys``: the plan's run keys, so that points reused from
    an earlier grid are shown (:meth:`GridComparison.load`). Every section that cannot be built says why on the page; the
    page itself is always written. Raises OSError when ``reports`` cannot be written.
    """
    reports.mkdir(parents=True, exist_ok=True)
    loaded = _section(
        "grid",
        lambda: {"grid": GridComparison.load(experiment_name, grid_id, tracking_uri, run_keys)},
    )
    grid: GridComparison | None = loaded.get("grid")
    points = list(dict.fromkeys([*grid_points, *(grid.runs.index if grid is not None else [])]))
    if grid is None:
        why = f"no grid-point runs to show ({loaded['missing']})"
        sections = {key: {"missing": why} for key in SECTIONS}
    else:
        sections = _sections(grid, model_name, comparison_run_id, reports)
    page = (
        environment()
        .get_template(SUMMARY_FILE)
        .render(
            experiment=experiment_name,
            grid_id=grid.grid_id if grid is not None else (grid_id or "newest"),
            tracking_uri=tracking_uri or "the default store",
            generated=time.strftime("%Y-%m-%d %H:%M:%S"),
            links=_links(reports, points),
            **sections,
        )
    )
    target = reports / SUMMARY_FILE
    target.write_text(page, encoding="utf-8")
    return target
