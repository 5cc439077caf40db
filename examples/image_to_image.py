"""Image to image: redraw a red circle as a green one (tiny-shapes, offline).

    python examples/image_to_image.py [OUT_DIR]

Writes image_to_image_input.png and image_to_image.png (four variations). `strength`
is the share of the denoising steps run: 0 returns the input (through the VAE), 1
redraws it from almost pure noise.
"""

import sys
from pathlib import Path

import keras_sd
from keras_sd.shapes import checker, dataset
from keras_sd.utils import save_images

out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
image = dataset.render(dataset.Combination("circle", "red", "blue"))  # uint8 [64, 64, 3]
prompt = "a green circle on a blue background"

sd = keras_sd.StableDiffusion.from_preset("tiny-shapes")
images = sd.image_to_image(prompt, image, strength=0.75, batch_size=4, num_steps=20, seed=1)

save_images(image, out_dir / "image_to_image_input.png")
print(save_images(images, out_dir / "image_to_image.png"))
for result in images:
    print(checker.read(result))
