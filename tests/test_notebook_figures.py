"""How a prepared notebook shows figures: photographs as JPEG, charts as PNG (a real kernel)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import nbformat
import numpy as np
import papermill

from imgcls.reporting import notebook, overlays, plots
from tests.conftest import write_notebook

PREPARE = "from imgcls.reporting import notebook, overlays, plots\nnotebook.prepare()"
IMAGES = "import numpy as np\nimages = np.random.default_rng(0).integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)"
GALLERY = "plots.image_gallery(list(images), [f'image {i}' for i in range(6)], title='Gallery');"
GRADCAM = (
    "overlays.gradcam_overlays(images, np.linspace(0, 1, 6 * 64 * 64).reshape(6, 64, 64),"
    " ['sea'] * 6, ['forest'] * 6, [0.9] * 6, title='Grad-CAM');"
)
LINE = "import matplotlib.pyplot as plt\nfig, ax = plt.subplots()\nax.plot([0, 1], [1, 0])\nax.set_title('line');"


def _execute(tmp_path: Path, *sources: str) -> list[set[str]]:
    """Run the cells in a fresh kernel; return each cell's image MIME types."""
    source, output = write_notebook(tmp_path / "in.ipynb", *sources), tmp_path / "out.ipynb"
    papermill.execute_notebook(str(source), str(output), progress_bar=False, kernel_name="python3")
    return [
        {
            m
            for out in cell.get("outputs", [])
            for m in out.get("data", {})
            if m.startswith("image/")
        }
        for cell in nbformat.read(output, as_version=4).cells
    ]


def test_photographs_are_jpeg_and_charts_png_in_a_prepared_notebook(tmp_path):
    kinds = _execute(tmp_path, PREPARE, IMAGES, GALLERY, GRADCAM, LINE, PREPARE, GALLERY, LINE)
    assert kinds[2] == {"image/jpeg"}, "the gallery of photographs"
    assert kinds[3] == {"image/jpeg"}, "the Grad-CAM overlays"
    assert kinds[4] == {"image/png"}, "a line chart stays lossless"
    # prepare() again (the next notebook in a warm kernel) changes nothing
    assert kinds[6] == {"image/jpeg"} and kinds[7] == {"image/png"}


def test_without_prepare_the_inline_backend_is_untouched(tmp_path):
    kinds = _execute(tmp_path, "from imgcls.reporting import plots", IMAGES, GALLERY)
    assert kinds[2] == {"image/png"}


def test_only_marked_figures_count_as_photographs():
    images = list(np.zeros((2, 8, 8, 3), dtype=np.uint8))
    gallery = plots.image_gallery(images, ["a", "b"], title="t")
    overlay = overlays.gradcam_overlays(
        np.stack(images), np.zeros((2, 8, 8)), ["a", "b"], ["a", "a"], [0.5, 0.6], title="t"
    )
    chart, _ = plt.subplots()
    empty = plots.image_gallery([], [], title="no images")  # a message, no photograph
    try:
        assert notebook.is_photographs(gallery) and notebook.is_photographs(overlay)
        assert not notebook.is_photographs(chart) and not notebook.is_photographs(empty)
        assert not notebook.is_photographs(object())
    finally:
        plt.close("all")
