"""The one-file report: every section, numbers from a real MLflow store, nothing loaded from outside.

Grid-point runs are logged with mlflow the way the training session logs them (fold scores as
``fold_val_accuracy`` with step = fold, ``params.fold_assignment``, ``n_train_images``); the
verdict is made by the real ``register_champion`` (notebook 04's call) into a comparison run, and
the model card by ``write_model_card``. The browser test opens the page in headless Chromium
with every network request sent to a closed port and reads Chromium's own network log.
"""

from __future__ import annotations

import base64
import json
import math
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from scipy import stats

from imgcls import tracking
from imgcls.reporting import modelcard, summary_data
from imgcls.reporting.summary_page import write_summary
from imgcls.selection.comparison import GridComparison

N_IMAGES = 100.0  # 5 folds of 20: n_train 80, n_test 20 per fold
FOLDS = "f0f0f0f0f0f0"
BASE = [0.90, 0.91, 0.89, 0.90, 0.92]
BETTER = [0.93, 0.945, 0.92, 0.93, 0.955]  # BASE + [3, 3.5, 3, 3, 3.5] points: mean +3.2
MIDDLE = [0.91, 0.93, 0.90, 0.92, 0.93]
LOWER = [0.905, 0.92, 0.895, 0.91, 0.925]
SECTIONS = {
    "ranking": "Ranking of the grid points",
    "critical-difference": "Critical-difference view over the folds",
    "fold-scores": "Fold scores",
    "parameters": "Parameters that differ between grid points",
    "verdict": "Promotion verdict against the previous champion",
    "noise-floor": "Noise floor",
    "model-card": "Model card of the champion",
    "reports": "Notebook reports",
}


class _Constant(mlflow.pyfunc.PythonModel):
    """A stand-in model: the registry only needs a logged model to version."""

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return pd.DataFrame({"predicted_class": ["sea"] * len(model_input)})


def _point(experiment_id, grid, point, folds, params, model=False, assignment=FOLDS) -> str:
    """Log one finished grid-point run; return its run id."""
    tags = {
        tracking.TAG_KIND: "grid_point",
        tracking.TAG_GRID_ID: grid,
        tracking.TAG_GRID_POINT: point,
        tracking.TAG_STRATEGY: point.split("-")[0],
        "data_md5": "data-v1",
        "quality_gate": "passed",
    }
    with mlflow.start_run(experiment_id=experiment_id, tags=tags) as run:
        if model:
            # explicit requirements: MLflow would otherwise infer them in a subprocess (~40 s)
            mlflow.pyfunc.log_model(
                name="model", python_model=_Constant(), pip_requirements=["mlflow"]
            )
        mlflow.log_params({"backbone": "resnet18", "fold_assignment": assignment, **params})
        mean = sum(folds) / len(folds)
        mlflow.log_metrics(
            {
                "cv_accuracy_mean": mean,
                "cv_accuracy_std": float(pd.Series(folds).std()),
                "cv_loss_mean": 0.2,
                "cv_loss_std": 0.01,
                "cv_train_seconds": 10.0,
                "n_train_images": N_IMAGES,
                "test_accuracy": mean,
                "test_accuracy_ci_low": mean - 0.05,
                "test_accuracy_ci_high": min(1.0, mean + 0.03),
            }
        )
        for step, value in enumerate(folds):
            mlflow.log_metric("fold_val_accuracy", value, step=step)
    return run.info.run_id


@pytest.fixture()
def store(tmp_path: Path) -> str:
    """A fresh SQLite store with experiment ``summary``; returns the experiment id."""
    tracking.configure(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return MlflowClient().create_experiment("summary", (tmp_path / "artifacts").as_uri())


@pytest.fixture(scope="module")
def judged_store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Grid g0 registered a champion (BASE); grid g2 has four points, its champion (BETTER) is
    judged against it by 04's call into a comparison run, and its model card is written.
    Built once for the module (logging and registering models takes seconds)."""
    tmp_path = tmp_path_factory.mktemp("judged")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.configure(uri)
    store = MlflowClient().create_experiment("summary", (tmp_path / "artifacts").as_uri())
    _point(store, "g0", "base", BASE, {"name": "base", "lr": "1e-05"}, model=True)
    GridComparison.load("summary", "g0").register_champion("m")
    _point(store, "g2", "base", BASE, {"name": "base", "lr": "1e-05"})
    _point(store, "g2", "better", BETTER, {"name": "better", "lr": "0.001"}, model=True)
    _point(store, "g2", "middle", MIDDLE, {"name": "middle", "lr": "0.0001"})
    _point(store, "g2", "elsewhere", LOWER, {"name": "elsewhere", "lr": "1e-05"}, assignment="e")
    client = MlflowClient()
    comparison = client.create_run(
        store, tags={tracking.TAG_KIND: "comparison", tracking.TAG_GRID_ID: "g2"}
    ).info.run_id
    result = GridComparison.load("summary", "g2").register_champion("m", 0.005, 0.05, comparison)
    reports = tmp_path / "reports"
    modelcard.write_model_card("m", result["version"], reports)
    for page in ("index.html", "data/01_data.html", "comparison/04_compare_runs.html"):
        (reports / page).parent.mkdir(parents=True, exist_ok=True)
        (reports / page).write_text("<html></html>")
    for point in ("base", "better", "middle", "elsewhere"):
        (reports / point).mkdir()
        (reports / point / "02_train_cv.html").write_text("<html></html>")
        if point != "middle":  # 03 of "middle" was never written
            (reports / point / "03_evaluate.html").write_text("<html></html>")
    return {"reports": reports, "comparison": comparison, "result": result, "uri": uri}


@pytest.fixture()
def judged(judged_store: dict) -> dict:
    """:func:`judged_store`, made the active tracking store again (other tests move it)."""
    tracking.configure(judged_store["uri"])
    return judged_store


class _Resources(HTMLParser):
    """Every src/href attribute, every <img> src and every inline style of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.images: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href", "srcset", "poster", "data", "action") and value:
                self.urls.append(value)
            if tag == "img" and name == "src":
                self.images.append(value)


def _external(url: str) -> bool:
    """A URL a browser would fetch from elsewhere: any scheme but data:, or //host."""
    return url.startswith("//") or bool(
        re.match(r"[a-z][a-z0-9+.-]*:", url, re.I) and not url.startswith("data:")
    )


def _write(judged: dict, **kwargs) -> str:
    path = write_summary(
        judged["reports"],
        "summary",
        "g2",
        model_name="m",
        comparison_run_id=judged["comparison"],
        grid_points=["base", "better", "middle", "elsewhere"],
        **kwargs,
    )
    assert path == judged["reports"] / "summary.html"
    return path.read_text(encoding="utf-8")


def test_page_has_every_section_from_the_store_and_loads_nothing_from_outside(judged):
    page = _write(judged)
    for anchor, title in SECTIONS.items():
        assert f'<h2 id="{anchor}">{title}</h2>' in page, title
    assert "Not available" not in page
    parser = _Resources()
    parser.feed(page)
    assert "script" not in parser.tags and "iframe" not in parser.tags and "link" not in parser.tags
    assert not [u for u in parser.urls if _external(u)], "an external URL"
    assert not re.search(r"url\(|@import", page), "a style that loads something"
    # three figures (critical difference, fold lines, noise floor), each an inlined PNG
    assert len(parser.images) == 3
    for src in parser.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    # relative links to every notebook report; one never written says so instead of linking
    hrefs = {u for u in parser.urls if not u.startswith(("data:", "#"))}
    assert {"index.html", "data/01_data.html", "comparison/04_compare_runs.html"} <= hrefs
    assert {
        "better/02_train_cv.html",
        "better/03_evaluate.html",
        "middle/02_train_cv.html",
    } <= hrefs
    assert "middle/03_evaluate.html" not in hrefs and "03_evaluate (missing)" in page
    assert "model_card/m-v2.html" in hrefs


def test_verdict_and_ranking_are_the_recorded_numbers(judged):
    page = _write(judged)
    verdict = judged["result"]["verdict"]
    assert verdict.verdict.value == "PROMOTE"
    # BETTER - BASE = [3, 3.5, 3, 3, 3.5] points: mean +3.20, as the comparison run recorded it
    assert '<span class="PROMOTE">PROMOTE</span>: the challenger is better' in page
    assert "<td>+3.20 accuracy points</td>" in page
    low, high = 100 * verdict.ci_low, 100 * verdict.ci_high
    assert f"<td>[{low:+.2f}, {high:+.2f}] points</td>" in page and "±0.50 points" in page
    assert f"comparison run {judged['comparison']} (tags)" in page
    assert "<td>version 1</td>" in page  # the incumbent; the alias is on version 2 now
    assert "<th><code>champion</code> alias now on</th><td>version 2</td>" in page
    # ranking by mean CV accuracy, the champion first
    order = [page.index(f"<td>{p}") for p in ("better ★ champion", "middle", "elsewhere", "base")]
    assert order == sorted(order)


def test_parameters_table_shows_only_what_differs(judged):
    page = _write(judged)
    section = page.split('<h2 id="parameters">', 1)[1].split("<h2", 1)[0]
    header = re.findall(r"<th>([^<]+)</th>", section.split("</thead>", 1)[0])
    assert header == ["grid point", "fold_assignment", "lr", "name"]  # backbone is shared
    assert "The same for every grid point (1): backbone." in section
    runs = GridComparison.load("summary", "g2").runs
    table, same = summary_data.differing_parameters(runs)
    assert same == ["backbone"] and table.loc["elsewhere", "fold_assignment"] == "e"


def test_fold_ranks_average_ties_and_pairwise_p_values_are_holm_adjusted():
    ranks = summary_data.fold_ranks({"a": [0.9, 0.8, 0.7], "b": [0.9, 0.7, 0.8]})
    assert ranks.to_numpy().tolist() == [[1.5, 1.5], [1.0, 2.0], [2.0, 1.0]]
    with pytest.raises(ValueError, match="same number of folds"):
        summary_data.fold_ranks({"a": [0.9, 0.8], "b": [0.9]})
    p = summary_data.pairwise_p_values({"base": BASE, "better": BETTER, "middle": MIDDLE}, 80, 20)
    # base vs better, by hand: d = [.03, .035, .03, .03, .035], mean .032, var 7.5e-6,
    # se = sqrt((1/5 + 20/80) * 7.5e-6) = 1.8371e-3, t = 17.419 with 4 degrees of freedom
    t = 0.032 / math.sqrt(0.45 * 7.5e-6)
    assert t == pytest.approx(17.419, abs=1e-3)
    raw = 2 * stats.t.sf(t, 4)
    # Holm over 3 pairs: the smallest raw p (this one) is multiplied by 3
    assert p.loc["base", "better"] == pytest.approx(3 * raw, rel=1e-9)
    assert p.loc["better", "base"] == p.loc["base", "better"] and p.loc["base", "base"] == 1.0


def test_critical_difference_ranks_only_points_on_the_champions_folds(judged):
    grid = GridComparison.load("summary", "g2")
    cd = summary_data.critical_difference(grid, 0.05)
    assert cd["mean_ranks"].to_dict() == {"better": 1.0, "middle": 2.0, "base": 3.0}
    assert (
        set(cd["excluded"]) == {"elsewhere"}
        and "other or unknown folds" in cd["excluded"]["elsewhere"]
    )
    page = _write(judged)
    assert "Not ranked (folds cannot be paired with the champion's): elsewhere" in page


def test_missing_pieces_say_so_on_the_page(store, tmp_path):
    # a grid never registered (--no-register): no verdict, no card; the rest is there
    _point(store, "g1", "a", BASE, {"name": "a", "lr": "1e-05"})
    _point(store, "g1", "b", MIDDLE, {"name": "b", "lr": "0.001"})
    page = write_summary(tmp_path / "reports", "summary", "g1").read_text()
    verdict = page.split('<h2 id="verdict">', 1)[1].split("<h2", 1)[0]
    assert "Not available: LookupError: no promotion verdict recorded for grid g1" in verdict
    card = page.split('<h2 id="model-card">', 1)[1].split("<h2", 1)[0]
    assert "Not available" in card and "no model card" in card
    assert "alpha: the default promotion.alpha: no verdict recorded one" in page
    assert page.count("Not available") == 2 and "index of all reports (missing)" in page
    # nothing logged at all: the page is still written, every section saying why
    empty = write_summary(tmp_path / "empty", "summary", "no-such-grid").read_text()
    for anchor in SECTIONS:
        assert f'<h2 id="{anchor}">' in empty
    # seven sections and the headline above them
    assert empty.count("Not available: no grid-point runs to show") == 8


def _chromium(page: Path, workdir: Path) -> tuple[str, list[str]]:
    """Open ``page`` in headless Chromium with every request sent to a closed port; return the
    DOM it built and the URLs the page itself asked the network for (from Chromium's net log:
    requests whose network isolation key is the file:// page, not Chromium's own background
    requests, which have none)."""
    netlog = workdir / "netlog.json"
    command = [
        "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--proxy-server=127.0.0.1:9",
        f"--user-data-dir={workdir / 'profile'}", f"--log-net-log={netlog}",
        "--virtual-time-budget=3000", "--dump-dom", page.as_uri(),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    log = json.loads(netlog.read_text(errors="replace"))
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    asked = [
        event["params"]["url"]
        for event in log["events"]
        if event["type"] == start_job
        and "file://" in event["params"].get("network_isolation_key", "")
        and not event["params"]["url"].startswith(("file:", "data:"))
    ]
    return done.stdout, asked


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_page_renders_in_headless_chromium_with_the_network_off(judged, tmp_path):
    _write(judged)
    dom, asked = _chromium(judged["reports"] / "summary.html", tmp_path / "summary")
    for title in SECTIONS.values():
        assert title in dom  # parsed and laid out by the browser, not only in the file
    assert dom.count('src="data:image/png;base64,') == 3
    assert asked == [], f"the page asked the network for {asked}"
    # the same check sees a page that does load something from outside
    control = tmp_path / "control.html"
    control.write_text('<html><body><img src="http://example.com/x.png"></body></html>')
    assert _chromium(control, tmp_path / "control")[1][:1] == ["http://example.com/x.png"]


def test_index_links_the_summary_once_it_is_written(tmp_path):
    from imgcls.core.config import Grid, Strategy
    from imgcls.pipeline.plan import GridPoint, Plan
    from imgcls.reporting.reports import write_index

    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text("strategies: {}\n")
    point = GridPoint(Strategy(name="a"), key="k", result={"status": "FAILED", "run_id": None})
    plan = Plan(Grid(grid_file, (point.strategy,)), "g", "md5", "c", "sqlite:///m.db", "1", [point])
    reports, done = tmp_path / "reports", {"status": "FINISHED", "run_id": None}
    assert 'href="summary.html"' not in write_index(plan, done, done, reports).read_text()
    (reports / "summary.html").write_text("<html></html>")
    assert 'href="summary.html"' in write_index(plan, done, done, reports).read_text()


def test_a_first_champion_shows_its_reason_not_empty_numbers(judged, tmp_path):
    page = write_summary(tmp_path / "g0", "summary", "g0", model_name="m").read_text()
    headline = page.split('<div class="headline">', 1)[1].split("</div>", 1)[0]
    assert '<span class="PROMOTE">PROMOTE</span>,\nno previous champion.' in headline
    assert "n/a" not in headline
    verdict = page.split('<h2 id="verdict">', 1)[1].split("<h2", 1)[0]
    assert "<td>version none</td>" in verdict and "<td>n/a accuracy points</td>" in verdict
