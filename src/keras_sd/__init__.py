"""keras-sd: Stable Diffusion in Keras 3.

Example:
>>> import keras_sd
>>> sd = keras_sd.StableDiffusion(64, 64, config="tiny")
>>> sd.text_to_image("a red circle", num_steps=2, seed=0).shape
(1, 64, 64, 3)
"""

# First: TensorFlow reads its allocator choice when it makes its first tensor.
from keras_sd import _host_memory  # noqa: F401
from keras_sd.models.clip_text import CLIPTextEncoder
from keras_sd.models.unet import UNet
from keras_sd.models.vae import VAEDecoder, VAEEncoder
from keras_sd.pipeline import StableDiffusion
from keras_sd.schedulers import DDIMScheduler
from keras_sd.tokenizer import CLIPTokenizer
from keras_sd.weights.diffusers import export_components, load_components

__version__ = "0.1.0"

__all__ = [
    "CLIPTextEncoder",
    "CLIPTokenizer",
    "DDIMScheduler",
    "StableDiffusion",
    "UNet",
    "VAEDecoder",
    "VAEEncoder",
    "export_components",
    "load_components",
]
