"""Regenerate the four pipeline notebooks (outputs stripped, kernelspec python3).

The notebooks are the source of truth once edited in JupyterLab; this script records how they
were first written and keeps their structure uniform. Run: ``.venv/bin/python tools/build_notebooks.py``.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
SETUP = 'import warnings\n\nfrom lib import plots\n\nwarnings.filterwarnings("ignore", category=UserWarning, module="mlflow")'


def notebook(cells: list) -> nbformat.NotebookNode:
    """Wrap cells into a notebook with the python3 kernelspec."""
    nb = new_notebook(cells=cells)
    for index, cell in enumerate(nb.cells):
        cell.id = f"cell-{index:02d}"  # stable ids: regenerating gives no diff
    nb.metadata = {
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
    }
    return nb


def params(source: str):
    """Return the one code cell tagged ``parameters``."""
    return new_code_cell(source, metadata={"tags": ["parameters"]})


md, code = new_markdown_cell, new_code_cell

DATA = notebook(
    [
        md(
            "# 01 · The data: what we train and test on\n\nThe Sea-vs-Forest photos as DVC versions "
            "them: class balance, image sizes, sample images, problems found, and the fold assignment "
            "that every strategy shares."
        ),
        params(
            "data_dir = None  # None means the repository data folder, fetched with dvc pull\n"
            "folds = 5\nseed = 42\nskip_bad_images = False\nsamples_per_class = 6"
        ),
        code(SETUP + "\nfrom lib import datacheck"),
        md("The dataset is scanned and every image decoded; its content hash is the data version."),
        code(
            "report = datacheck.inspect_dataset(data_dir, skip_bad_images)\nreport.version_table()"
        ),
        md("## Class balance per split"),
        code("report.counts()"),
        code(
            'plots.class_balance(report.counts().drop(index="total"), '
            'title="Images per class and split");'
        ),
        md("## Image sizes and colour modes (training split)"),
        code("datacheck.image_size_stats(report.train)"),
        md("## Sample images per class"),
        code(
            "images, captions = datacheck.sample_images(report.train, samples_per_class, seed)\n"
            'plots.image_gallery(images, captions, title="Random training images per class");'
        ),
        md(
            "## Problems found\n\nUnreadable files (skipped only with `skip_bad_images=True`) and "
            "identical images within or across splits, by content hash. An empty table means none."
        ),
        code("report.findings()"),
        md(
            "## The shared fold assignment\n\nStratified and seeded: every strategy is cross-validated "
            "on exactly these folds, so their fold scores can be compared pairwise."
        ),
        code("fold_table = datacheck.fold_balance(report.train, folds, seed)\nfold_table"),
        code(
            'plots.class_balance(fold_table, title=f"Validation images per class in each of {folds} folds");'
        ),
    ]
)

TRAIN = notebook(
    [
        md(
            "# 02 · Cross-validate one strategy, then refit it on all training data\n\n"
            "The runner injects a strategy and the MLflow run to log into; opened by hand, this "
            "notebook trains the default strategy and creates its own run."
        ),
        params(
            "strategy = {}  # fields that differ from lib.config.Strategy defaults\n"
            'strategy_name = "default"\nparent_run_id = None\n'
            'experiment_name = "sea-vs-forest"\ntracking_uri = None\ndata_dir = None\n'
            "torch_threads = 0\nskip_bad_images = False\ndevice = None"
        ),
        code(SETUP + "\nfrom lib.session import TrainingSession"),
        md("The strategy, the data version and the MLflow run this training logs to:"),
        code(
            "session = TrainingSession.start(strategy, strategy_name, parent_run_id, experiment_name,\n"
            "                                 tracking_uri, data_dir, torch_threads, skip_bad_images, device)\n"
            "session.describe()"
        ),
        md(
            "## k-fold cross-validation\n\nOne child run per fold in MLflow, with per-epoch metrics; "
            "early stopping keeps each fold's best epoch."
        ),
        code("cv = session.cross_validate()\nsession.fold_table(cv)"),
        code(
            "plots.learning_curves([fold.history for fold in cv.folds], "
            'title=f"Learning curves per fold: {session.strategy.run_name}");'
        ),
        md("## Cross-validation summary"),
        code("session.summary_table(cv)"),
        md(
            "## Refit on all training data\n\nThe strategy's model: trained on every training image for "
            "the mean best epoch of the folds, logged to MLflow as a model that takes images."
        ),
        code("refit = session.refit(cv)\nrefit"),
        code("session.finish()"),
    ]
)

EVALUATE = notebook(
    [
        md(
            "# 03 · Evaluate the strategy's model on the held-out test set\n\n"
            "The model comes from MLflow: the run id the runner injects, or the latest finished "
            "training run when opened by hand."
        ),
        params(
            'parent_run_id = None\nexperiment_name = "sea-vs-forest"\ntracking_uri = None\n'
            "data_dir = None\nextra_eval_dirs = []  # more labelled folders with the same classes\n"
            "min_accuracy = None  # None means the min_accuracy of the strategy, default 0.70\n"
            "torch_threads = 0\nskip_bad_images = False\ndevice = None"
        ),
        code(SETUP + "\nfrom lib.evaluation import EvaluationSession"),
        code(
            "evaluation = EvaluationSession.start(parent_run_id, experiment_name, tracking_uri,\n"
            "                                     torch_threads, device)\n"
            'print(f"Evaluating run {evaluation.run_id}: classes {evaluation.classes}")'
        ),
        md(
            "## Test-set scores\n\nThe accuracy interval is a 95% Wilson interval: with few test "
            "images, one image moves accuracy by several points."
        ),
        code("test = evaluation.evaluate_test(data_dir, skip_bad_images)\ntest.scores_table()"),
        code("test.per_class()"),
        code(
            'plots.confusion_matrix_plot(test.confusion(), title="Confusion matrix on the test set");'
        ),
        code(
            "plots.roc_pr_curves(test.folder.labels, test.probabilities, test.folder.classes,\n"
            '                     title="Test set: ROC and precision-recall");'
        ),
        md("## Calibration: does a confidence of 0.9 mean right 90% of the time?"),
        code(
            "from lib import metrics\n\nbins = metrics.calibration_bins(test.folder.labels, test.probabilities)\n"
            'plots.reliability_plot(bins, title="Reliability of the top-1 confidence (test set)");'
        ),
        md("## Where the model fails: misclassified, then least confident test images"),
        code(
            "images, captions = test.hardest_images()\n"
            'plots.image_gallery(images, captions, title="Misclassified and least confident test images");'
        ),
        md("## Every fold model on the test set, next to the refit model"),
        code("evaluation.fold_models_on(test)"),
        md("## Quality gate"),
        code('gate = evaluation.gate(test, min_accuracy)\nprint(gate["message"])'),
        md("## Extra evaluation folders (if any were given)"),
        code(
            "if not extra_eval_dirs:\n"
            '    print("No extra evaluation folders were given (parameter extra_eval_dirs).")\n'
            "for folder in extra_eval_dirs:\n"
            "    extra = evaluation.evaluate(evaluation.load_folder(folder, skip_bad_images), name=folder)\n"
            '    display(extra.scores_table().rename(columns={"value": folder}))\n'
            '    plots.confusion_matrix_plot(extra.confusion(), title=f"Confusion matrix: {folder}")'
        ),
    ]
)

COMPARE = notebook(
    [
        md(
            "# 04 · Compare every strategy of the grid and choose the champion\n\n"
            "All numbers come from MLflow. The champion is chosen on cross-validation only; the test "
            "score is reported, never used to choose."
        ),
        params(
            "grid_id = None  # None means the most recent grid in the experiment\n"
            'experiment_name = "sea-vs-forest"\ntracking_uri = None\n'
            "model_name = None  # registry name, None means EXPERIMENT-classifier\n"
            "register = True"
        ),
        code(SETUP + "\nfrom lib.comparison import GridComparison"),
        code(
            "grid = GridComparison.load(experiment_name, grid_id, tracking_uri)\n"
            'print(f"Grid {grid.grid_id}: {len(grid.runs)} finished grid points")'
        ),
        md(
            "## All grid points side by side\n\nCV accuracy and loss (mean ± std over the shared folds), "
            "test accuracy with its 95% interval, training time and throughput, and the p-value of a "
            "corrected resampled t-test against the best strategy (Nadeau & Bengio, 2003)."
        ),
        code("grid.display_table()"),
        code(
            'plots.strategy_bars(grid.table(), value="cv_accuracy_mean", error="cv_accuracy_std",\n'
            '                    title="Mean cross-validation accuracy (± std over folds)");'
        ),
        md("## Learning curves, averaged over folds"),
        code(
            'plots.overlaid_learning_curves(grid.curves("val_accuracy"), metric="val_accuracy",\n'
            '                               title="Validation accuracy per epoch (mean over folds)");'
        ),
        md("## Accuracy per fold: a paired comparison on identical splits"),
        code(
            'plots.fold_scores_plot(grid.fold_scores(), title="Validation accuracy per fold and strategy");'
        ),
        md("## The champion"),
        code("champion = grid.champion()\nprint(grid.champion_sentence())"),
        code("registered = grid.register_champion(model_name) if register else None\nregistered"),
    ]
)

if __name__ == "__main__":
    for name, nb in [
        ("01_data", DATA),
        ("02_train_cv", TRAIN),
        ("03_evaluate", EVALUATE),
        ("04_compare_runs", COMPARE),
    ]:
        nbformat.write(nb, NOTEBOOKS / f"{name}.ipynb")
        print(f"wrote notebooks/{name}.ipynb")
