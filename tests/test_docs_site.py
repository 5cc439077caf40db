"""The documentation site builds with `mkdocs build --strict` (any warning, broken link
or unresolved API reference fails it), its workflow pages show pictures the bundled
model drew during the build, and the speed guide carries the benchmark status table."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from keras_sd.shapes import dataset
from keras_sd.shapes.checker import check, read

ROOT = Path(__file__).parents[1]
SCALE = 4  # tools/docs_hooks.py scales the 64-pixel images up by this
GAP = 4


def _mkdocs(config: Path, site: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "CUDA_VISIBLE_DEVICES": "",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("site")
    result = _mkdocs(ROOT / "mkdocs.yml", site)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]
    assert "WARNING -" not in log, log[-5000:]
    return site


def _tiles(path: Path, widths: list[int]) -> list[np.ndarray]:
    """The images of one generated row, back at their own size."""
    row = np.asarray(Image.open(path).convert("RGB"))[::SCALE, ::SCALE]
    tiles, x = [], 0
    for width in widths:
        tiles.append(row[:64, x : x + width])
        x += width + GAP
    assert x - GAP == row.shape[1], "the row holds other images than expected"
    return tiles


def test_every_page_of_the_nav_is_built(site):
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())

    def pages(nav):
        for entry in nav:
            value = next(iter(entry.values())) if isinstance(entry, dict) else entry
            yield from pages(value) if isinstance(value, list) else [value]

    for page in pages(config["nav"]):
        html = site / ("index.html" if page == "index.md" else page[:-3] + "/index.html")
        assert html.is_file(), page


def test_workflow_pages_show_images_drawn_at_build_time(site):
    red = dataset.render(dataset.Combination("circle", "red", "blue"))
    images = site / "images" / "generated"
    for page in ("text-to-image", "image-to-image", "inpaint", "outpaint"):
        html = (site / "workflows" / page / "index.html").read_text()
        assert f"../../images/generated/{page.replace('-', '_')}.png" in html, page

    text = _tiles(images / "text_to_image.png", [64] * 4)
    assert sum(check(t, "a red circle on a blue background").ok for t in text) >= 3
    source, *green = _tiles(images / "image_to_image.png", [64] * 4)
    np.testing.assert_array_equal(source, red)
    assert sum(read(t).color == "green" for t in green) >= 2
    source, mask, *squares = _tiles(images / "inpaint.png", [64] * 5)
    np.testing.assert_array_equal(source, red)
    assert mask[32, 32].tolist() == [255] * 3 and mask[0, 0].tolist() == [0] * 3
    assert sum(check(t, "a yellow square on a blue background").ok for t in squares) >= 2
    source, *wide = _tiles(images / "outpaint.png", [64, 96, 96])
    for image in wide:  # the original pixels are pasted back unchanged
        np.testing.assert_array_equal(image[:, 16:80], red)


def test_api_reference_and_benchmark_table_are_rendered(site):
    api = (site / "api" / "pipeline" / "index.html").read_text()
    assert "keras_sd.pipeline.StableDiffusion" in api and "text_to_image" in api
    assert "language-pycon" in api or "highlight" in api  # examples rendered as code
    results = (ROOT / "benchmarks" / "RESULTS.md").read_text().splitlines()
    header = next(i for i, line in enumerate(results) if line.startswith("| target"))
    first_target = results[header + 2].split("|")[1].strip()
    speed = (site / "speed" / "index.html").read_text()
    assert first_target.split(",")[0].replace(">=", "&gt;=") in speed
    assert "benchmark-status-table" not in speed


def test_strict_build_fails_on_a_broken_link(tmp_path):
    """The project's own config (strict, validation levels) with one bad page and no
    hooks or API plugin, so the check is cheap."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# Home\n\nSee [the missing page](missing.md).\n")
    config.update(docs_dir=str(docs), nav=["index.md"], plugins=["search"])
    config.pop("hooks")
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config))

    result = _mkdocs(tmp_path / "mkdocs.yml", tmp_path / "site")

    assert result.returncode != 0
    assert "missing.md" in result.stdout + result.stderr


def test_docstring_examples_are_fenced_as_code():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from griffe_doctest import fence_examples
    finally:
        sys.path.remove(str(ROOT / "tools"))
    text = "Example:\n>>> x = [[1]]\n>>> x[0][0]\n1\n\nAfter."
    assert fence_examples(text) == (
        "Example:\n```pycon\n>>> x = [[1]]\n>>> x[0][0]\n1\n```\n\nAfter."
    )
    assert fence_examples("No example [a][b].") == "No example [a][b]."
