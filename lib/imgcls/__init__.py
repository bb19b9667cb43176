"""imgcls: image-classification experiments (data, training, evaluation, tracking, serving).

The package is split into layers whose imports flow one way: a module may import from its own
layer and the layers before it in :data:`LAYERS`, never from a later one
(``tests/test_architecture.py`` enforces it; README, "Architecture", draws it).

- ``core``: paths, the grid-file schema, names MLflow accepts
- ``data``: reading images, listing a dataset folder, validation records, decoded-image caches
- ``modeling``: backbones, feature caches, the training loop and folds, checkpoints
- ``tracking``: the MLflow adapter (store, tags, run keys, lineage)
- ``evaluation``: metrics, test-set evaluation of a grid point
- ``selection``: grid points compared on shared folds, the champion, promotion, noise floor
- ``serving``: the pyfunc model and the predict CLI
- ``reporting``: figures and HTML pages
- ``pipeline``: the training session, notebook execution, grid points, the runner, Dask

``RESULT_LAYERS`` are the layers whose code decides a grid point's numbers; their source is part
of the run key (``imgcls.tracking.code_version``).
"""

LAYERS: tuple[str, ...] = (
    "core",
    "data",
    "modeling",
    "tracking",
    "evaluation",
    "selection",
    "serving",
    "reporting",
    "pipeline",
)
RESULT_LAYERS: tuple[str, ...] = ("core", "data", "modeling", "evaluation")
