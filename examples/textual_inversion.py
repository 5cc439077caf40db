"""Textual inversion on the bundled tiny-shapes model (offline, CPU): teach it a new word.

    python examples/textual_inversion.py [OUT_DIR] [STEPS]

Renders five yellow stars, adds the token "<s1>" (starting from the word "circle") and
trains only its embedding, then draws "a red <s1> on a blue background". Writes
textual_inversion_input.png, textual_inversion.png and learned_embeds.safetensors, and
prints what the shapes checker reads before and after training.
"""

import sys
from pathlib import Path

import keras
import numpy as np

import keras_sd
from keras_sd.shapes import checker
from keras_sd.shapes.dataset import Combination, render
from keras_sd.training import TextualInversionTrainer, textual_inversion_dataset
from keras_sd.utils import save_images

out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 200
prompt = "a red <s1> on a blue background"

rng = np.random.default_rng(0)
stars = np.stack([render(Combination("star", "yellow", "black"), 64, rng) for _ in range(5)])
print(save_images(stars, out_dir / "textual_inversion_input.png"))

sd = keras_sd.StableDiffusion.from_preset("tiny-shapes")
trainer = TextualInversionTrainer(sd, "<s1>", initializer_token="circle", seed=0)
before = sd.text_to_image(prompt, batch_size=4, seed=1, progress=False)
print("before:", [checker.read(image).shape for image in before])

# Captions in the model's own wording, so that the new word takes only the shape's place.
data = textual_inversion_dataset(
    list(stars),
    "<s1>",
    sd.tokenizer,
    templates=("a yellow {} on a black background",),
    size=64,
    repeats=steps,
    batch_size=5,
)
trainer.compile(optimizer=keras.optimizers.Adam(1e-2))
trainer.fit(data, epochs=1, verbose=0)  # writes the learned rows into sd's text encoder
trainer.save_embedding(out_dir / "learned_embeds.safetensors")

images = sd.text_to_image(prompt, batch_size=4, seed=1, progress=False)
print(save_images(images, out_dir / "textual_inversion.png"))
print("after:", [checker.read(image).shape for image in images])
