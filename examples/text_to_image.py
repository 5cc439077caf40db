"""Text to image with the bundled tiny-shapes model (offline, 64x64).

    python examples/text_to_image.py [OUT_DIR]

Writes text_to_image.png (a grid of four images) and prints what the shapes checker
reads in each.
"""

import sys
from pathlib import Path

import keras_sd
from keras_sd.shapes import checker
from keras_sd.utils import save_images

out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
prompt = "a red circle on a blue background"

sd = keras_sd.StableDiffusion.from_preset("tiny-shapes")
images = sd.text_to_image(prompt, batch_size=4, num_steps=20, seed=1)  # uint8 [4, 64, 64, 3]

print(save_images(images, out_dir / "text_to_image.png"))
for image in images:
    print(checker.read(image))
