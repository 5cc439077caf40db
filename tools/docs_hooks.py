"""mkdocs hooks (mkdocs.yml `hooks:`): the workflow pages' pictures, drawn by the bundled
tiny-shapes model while the site builds, and the benchmark status table, copied from
benchmarks/RESULTS.md so the speed guide never states a stale figure.

Each picture is one row: the input image (if any), then the outputs, scaled up by
`SCALE` with nearest-neighbour so 64-pixel images stay sharp. The prompts, seeds and
masks are the ones the workflow pages print beside the pictures.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
from mkdocs.structure.files import File
from PIL import Image

ROOT = Path(__file__).parents[1]
IMAGES = "images/generated"
SCALE = 4
STATUS_MARKER = "<!-- benchmark-status-table -->"
STEPS = 20


def _row(images: list[np.ndarray]) -> bytes:
    """PNG bytes of `images` side by side, 4 px apart, scaled by SCALE."""
    height = max(image.shape[0] for image in images)
    gap = np.full((height, 4, 3), 255, np.uint8)
    tiles = []
    for image in images:
        pad = np.full((height - image.shape[0], image.shape[1], 3), 255, np.uint8)
        tiles += [np.concatenate([image, pad]), gap]
    row = Image.fromarray(np.concatenate(tiles[:-1], axis=1))
    row = row.resize((row.width * SCALE, row.height * SCALE), Image.NEAREST)
    out = io.BytesIO()
    row.save(out, format="PNG", optimize=True)
    return out.getvalue()


def workflow_images() -> dict[str, bytes]:
    """{file name: PNG bytes} for each workflow page."""
    import keras_sd
    from keras_sd.shapes import dataset

    sd = keras_sd.StableDiffusion.from_preset("tiny-shapes")
    red = dataset.render(dataset.Combination("circle", "red", "blue"))  # uint8 [64, 64, 3]
    mask = np.zeros((64, 64), bool)
    mask[10:54, 10:54] = True  # True / white: repaint
    common = {"num_steps": STEPS, "seed": 1, "progress": False}
    text = sd.text_to_image("a red circle on a blue background", batch_size=4, **common)
    image = sd.image_to_image(
        "a green circle on a blue background", red, strength=0.75, batch_size=3, **common
    )
    inpaint = sd.inpaint("a yellow square on a blue background", red, mask, batch_size=3, **common)
    outpaint = sd.outpaint(
        "a red circle on a blue background", red, extend=(0, 16, 0, 16), batch_size=2, **common
    )
    mask_image = np.repeat(mask[..., None], 3, axis=-1).astype(np.uint8) * 255
    return {
        "text_to_image.png": _row(list(text)),
        "image_to_image.png": _row([red, *image]),
        "inpaint.png": _row([red, mask_image, *inpaint]),
        "outpaint.png": _row([red, *outpaint]),
    }


def status_table() -> str:
    """The status table at the top of benchmarks/RESULTS.md, its links made plain text
    (they point into benchmarks/, outside the site)."""
    lines = (ROOT / "benchmarks" / "RESULTS.md").read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| target"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    table = "\n".join(lines[start:end])
    return re.sub(r"\[([^\]]+)\]\([^)]+\)", r"\1", table)


def on_files(files, config):
    for name, data in workflow_images().items():
        files.append(File.generated(config, f"{IMAGES}/{name}", content=data))
    return files


def on_page_markdown(markdown, page, config, files):
    if STATUS_MARKER in markdown:
        markdown = markdown.replace(STATUS_MARKER, status_table())
    return markdown
