"""Outpainting: widen a 64x64 image to 64x96 (tiny-shapes, offline).

    python examples/outpaint.py [OUT_DIR]

Writes outpaint_input.png and outpaint.png (four results). `extend` is (top, right,
bottom, left) in pixels, rounded up to multiples of `sd.size_multiple`; the new border
is inpainted and the original pixels are kept exactly.
"""

import sys
from pathlib import Path

import keras_sd
from keras_sd.shapes import dataset
from keras_sd.utils import save_images

out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
combination = dataset.Combination("circle", "red", "blue")
image = dataset.render(combination)  # uint8 [64, 64, 3]

sd = keras_sd.StableDiffusion.from_preset("tiny-shapes")
images = sd.outpaint(
    combination.caption, image, extend=(0, 16, 0, 16), batch_size=4, num_steps=20, seed=1
)  # uint8 [4, 64, 96, 3]

save_images(image, out_dir / "outpaint_input.png")
print(save_images(images, out_dir / "outpaint.png"))
print("original pixels kept:", bool((images[:, :, 16:80] == image).all()))
