"""Inpainting: repaint the middle of an image (tiny-shapes, offline).

    python examples/inpaint.py [OUT_DIR]

Writes inpaint_input.png, inpaint_mask.png and inpaint.png (four results). White in
the mask is repainted; everything outside it keeps the input's pixels exactly
(`keep_unmasked=True`, the default).
"""

import sys
from pathlib import Path

import numpy as np

import keras_sd
from keras_sd.shapes import checker, dataset
from keras_sd.utils import save_images

out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
image = dataset.render(dataset.Combination("circle", "red", "blue"))  # uint8 [64, 64, 3]
mask = np.zeros((64, 64), np.uint8)
mask[10:54, 10:54] = 255  # the circle's bounding box, enlarged
prompt = "a yellow square on a blue background"

sd = keras_sd.StableDiffusion.from_preset("tiny-shapes")
images = sd.inpaint(prompt, image, mask, batch_size=4, num_steps=20, seed=1)

save_images(image, out_dir / "inpaint_input.png")
save_images(np.repeat(mask[..., None], 3, axis=-1), out_dir / "inpaint_mask.png")
print(save_images(images, out_dir / "inpaint.png"))
print("unmasked pixels kept:", bool((images[:, mask == 0] == image[mask == 0]).all()))
for result in images:
    print(checker.read(result))
