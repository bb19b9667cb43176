"""reports/index.html: rendered from the Jinja2 template, escaped, linking only pages that exist."""

from __future__ import annotations

import tomllib
from html.parser import HTMLParser
from pathlib import Path

import jinja2
import mlflow
import pytest
from mlflow.tracking import MlflowClient

from imgcls.core import paths
from imgcls.core.config import Grid, Strategy
from imgcls.pipeline.plan import GridPoint, Plan
from imgcls.reporting import reports
from imgcls.reporting.reports import write_index

HOSTILE = "<script>alert(1)&x"  # no "/": it is also a file name below


class Page(HTMLParser):
    """The tags, link targets, texts of ``<span class="skip">`` and table rows of a page."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: set[str] = set()
        self.hrefs: list[str] = []
        self.skipped: list[str] = []
        self.rows: list[list[str]] = []
        self._in_skip = False
        self._cell: list[str] | None = None
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        attributes = dict(attrs)
        if tag == "a":
            self.hrefs.append(attributes["href"] or "")
        elif tag == "span" and attributes.get("class") == "skip":
            self._in_skip = True
            self.skipped.append("")
        elif tag == "tr":
            self.rows.append([])
        elif tag == "td":
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "span":
            self._in_skip = False
        elif tag == "td" and self._cell is not None:
            self.rows[-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._in_skip:
            self.skipped[-1] += data
        if self._cell is not None:
            self._cell.append(data)


def _pages(reports_dir: Path, *relative: str) -> None:
    for name in relative:
        (reports_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (reports_dir / name).write_text("<html></html>")


def test_index_escapes_hostile_names_and_links_only_pages_that_exist(tmp_path):
    grid_file = tmp_path / f"{HOSTILE}.yaml"
    grid_file.write_text("strategies: {}\n")
    hostile = Strategy(name=HOSTILE, extra={"grid_values": {"lr": 0.1}})
    ok = Strategy(name="baseline")
    points = [
        GridPoint(hostile, key="k1", result={"status": "FAILED", "run_id": None, "error": HOSTILE}),
        GridPoint(ok, key="k2", result={"status": "FINISHED", "run_id": None}),
    ]
    plan = Plan(
        Grid(grid_file, (hostile, ok)), "gid&1", "md5", "code", "sqlite:///m.db", "1", points
    )
    out = tmp_path / "reports"
    # written: 01, both pages of "baseline", 02 of the hostile point; not written: 04, its 03
    _pages(
        out,
        "data/01_data.html",
        "baseline/02_train_cv.html",
        "baseline/03_evaluate.html",
        f"{hostile.run_name}/02_train_cv.html",
    )
    failed = {"status": "FAILED", "run_id": None, "error": f"{HOSTILE} failed"}
    text = write_index(plan, {"status": "FINISHED", "run_id": "r01"}, failed, out).read_text()

    assert "<script" not in text.lower()
    escaped = HOSTILE.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    assert f"{escaped}.yaml</code>" in text and f"{escaped} failed" in text
    page = Page(text)
    assert "script" not in page.tags
    joined = "".join(page.text)
    assert str(grid_file) in joined  # escaped in the source, the original text once parsed
    assert f"{HOSTILE} failed" in joined and "gid&1" in joined
    assert {p.strip() for p in page.skipped} == {
        "04 · Comparison of all strategies and the champion (missing)",
        "03_evaluate (missing)",
    }
    assert sorted(page.hrefs) == sorted(
        [
            "data/01_data.html",
            "baseline/02_train_cv.html",
            "baseline/03_evaluate.html",
            f"{hostile.run_name}/02_train_cv.html",
        ]
    )
    for href in page.hrefs:
        assert (out / href).is_file(), href
    names = [row[0] for row in page.rows if row]
    assert names == [hostile.run_name, "baseline"]
    assert [row[-1] for row in page.rows if row] == [HOSTILE, ""]


@pytest.fixture()
def store(tmp_path: Path):
    """A real SQLite MLflow store in tmp_path, the active tracking URI during the test."""
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    experiment = client.create_experiment("reports", artifact_location=(tmp_path / "a").as_uri())
    yield client, experiment
    mlflow.set_tracking_uri(before)


def test_index_shows_metrics_champion_and_gate_from_mlflow(store, tmp_path):
    client, experiment = store
    champion = client.create_run(experiment, tags={"champion": "true", "quality_gate": "passed"})
    other = client.create_run(experiment, tags={"quality_gate": "failed"})
    for run, (mean, std, test) in ((champion, (0.99, 0.004, 0.9714)), (other, (0.5, 0.25, 0.5))):
        for key, value in (("cv_accuracy_mean", mean), ("cv_accuracy_std", std)):
            client.log_metric(run.info.run_id, key, value)
        client.log_metric(run.info.run_id, "test_accuracy", test)
        client.set_terminated(run.info.run_id, "FINISHED")
    a, b, c = Strategy(name="a"), Strategy(name="b"), Strategy(name="c")
    points = [
        GridPoint(a, "k1", result={"status": "FINISHED", "run_id": champion.info.run_id}),
        GridPoint(b, "k2", action="skip", existing_run_id=other.info.run_id),
        GridPoint(c, "k3", result={"status": "KILLED", "run_id": None, "error": "interrupted"}),
    ]
    plan = Plan(
        Grid(tmp_path / "g.yaml", (a, b, c)), "g", "m", "c", "sqlite:///x", experiment, points
    )
    done = {"status": "FINISHED", "run_id": "r"}
    page = Page(write_index(plan, done, done, tmp_path / "reports").read_text())
    rows = [row[:5] + row[6:] for row in page.rows if row]  # without the links column
    assert rows == [
        ["a ★ champion", "FINISHED", "0.9900 ± 0.0040", "0.9714", "passed", champion.info.run_id, ""],
        ["b", "FINISHED", "0.5000 ± 0.2500", "0.5000", "failed", other.info.run_id,
         "resumed: finished earlier"],
        ["c", "KILLED", "– ± –", "–", "–", "None", "interrupted"],
    ]  # fmt: skip


def test_a_name_the_template_uses_but_the_code_does_not_pass_is_an_error():
    with pytest.raises(jinja2.UndefinedError, match="grid_id"):
        reports.environment().get_template("index.html").render()


def test_every_template_ships_with_the_package():
    config = tomllib.loads((paths.REPO_ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["imgcls.reporting"]
    package = Path(reports.__file__).parent
    templates = sorted(p for p in (package / "templates").rglob("*") if p.is_file())
    assert templates
    for template in templates:
        relative = template.relative_to(package)
        assert any(relative.match(pattern) for pattern in patterns), relative
