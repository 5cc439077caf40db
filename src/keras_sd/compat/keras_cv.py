"""`keras_cv.models.StableDiffusion` and friends, as a drop-in backed by keras-sd.

    from keras_sd.compat import keras_cv
    sd = keras_cv.models.StableDiffusion(img_width=512, img_height=512)
    sd = keras_cv.models.StableDiffusion.from_keras_cv(kcv_model)  # KerasCV's weights

The names, signatures, component call forms and semi-private helpers are KerasCV
0.9's (the ones the keras.io guides use), and so are the outputs: sampling uses
the "keras_cv" scheduler, the starting noise comes from `keras.random.normal` with
the given seed, and images are truncated to uint8 as KerasCV does. Differences:
constructors never download (load weights with `from_keras_cv`, `from_checkpoint`
or `from_preset`), and classifier-free guidance runs as one batched UNet call.
"""

from __future__ import annotations

import types

import keras
import numpy as np
from keras import ops

from keras_sd import pipeline, presets
from keras_sd.compat import keras_cv_components as parts
from keras_sd.compat.noise_scheduler import NoiseScheduler
from keras_sd.models.clip_text import SD1_CONFIG as _TEXT_CONFIG
from keras_sd.models.clip_text import CLIPTextEncoder
from keras_sd.models.layers import timestep_embedding
from keras_sd.models.unet import UNet
from keras_sd.models.vae import VAEDecoder, VAEEncoder

MAX_PROMPT_LENGTH = _TEXT_CONFIG["max_length"]
# KerasCV rounds image sides to its UNet's granularity (2 ** 7 pixels).
_SIZE_STEP = 128


def _kerascv_size(value):
    """KerasCV's rounding of an image side to a multiple of 128, never below 128."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value  # the base class reports the type error
    return max(_SIZE_STEP, round(value / _SIZE_STEP) * _SIZE_STEP)


def _component(role: str):
    """A property reading `self._<role>` (KerasCV's slot), wrapped in KerasCV's call form."""
    slot = f"_{role}"

    def get(self):
        value = getattr(self, slot)
        wrapped = parts.wrap(role, value)
        if wrapped is not value:
            setattr(self, slot, wrapped)
        return wrapped

    def set_(self, value):
        setattr(self, slot, value)

    return property(get, set_, doc=f"The {role}, called as in KerasCV (see keras_cv_components).")


class StableDiffusion(pipeline.StableDiffusion):
    """KerasCV's `StableDiffusion` (SD 1.x) on keras-sd.

    Args:
        img_height, img_width: image size, rounded to a multiple of 128 as KerasCV does.
        jit_compile: compile the denoising loop with XLA (KerasCV's default, True).
        **kwargs: keras-sd's `StableDiffusion` arguments (`config`, components,
            `scheduler`; "keras_cv" by default).

    Example:
    >>> from keras_sd.compat import keras_cv  # doctest: +SKIP
    >>> sd = keras_cv.models.StableDiffusion(img_width=512, img_height=512)  # doctest: +SKIP
    >>> images = sd.text_to_image("photograph of an astronaut", batch_size=3)  # doctest: +SKIP
    """

    model_config = "sd1"

    tokenizer = _component("tokenizer")
    text_encoder = _component("text_encoder")
    diffusion_model = _component("diffusion_model")
    decoder = _component("decoder")
    image_encoder = _component("image_encoder")

    def __init__(
        self,
        img_height=512,
        img_width=512,
        jit_compile=True,
        *,
        config=None,
        tokenizer=None,
        scheduler="keras_cv",
        **kwargs,
    ):
        config = presets.resolve_model_config(config or self.model_config)
        if tokenizer is None:  # KerasCV pads with the end token for every version
            tokenizer = parts.SimpleTokenizer(
                **{**config["tokenizer"], "pad_token": parts.END_TOKEN}
            )
        super().__init__(
            _kerascv_size(img_height),
            _kerascv_size(img_width),
            jit_compile,
            config=config,
            tokenizer=tokenizer,
            scheduler=scheduler,
            **kwargs,
        )

    # ------------------------------------------------------------ KerasCV API
    def encode_text(self, prompt):
        """Encode a prompt ([1, 77, D]); longer than 77 tokens is refused, as in KerasCV."""
        for text in [prompt] if isinstance(prompt, str) else prompt:
            count = len(self.tokenizer.encode(text))
            if count > self.tokenizer.max_length:
                raise ValueError(
                    f"Prompt is too long ({count} tokens; should be <= "
                    f"{self.tokenizer.max_length} tokens)."
                )
        return super().encode_text(prompt)

    def generate_image(
        self,
        encoded_text,
        negative_prompt=None,
        batch_size=1,
        num_steps=50,
        unconditional_guidance_scale=7.5,
        diffusion_noise=None,
        seed=None,
        **kwargs,
    ):
        """KerasCV's `generate_image`: the starting noise comes from
        `_get_initial_diffusion_noise(batch_size, seed)` unless given."""
        if diffusion_noise is not None and seed is not None:
            raise ValueError("Pass either diffusion_noise or seed, not both.")
        if diffusion_noise is None:
            diffusion_noise = self._get_initial_diffusion_noise(batch_size, seed)
        return super().generate_image(
            encoded_text,
            negative_prompt=negative_prompt,
            batch_size=batch_size,
            num_steps=num_steps,
            unconditional_guidance_scale=unconditional_guidance_scale,
            diffusion_noise=diffusion_noise,
            **kwargs,
        )

    def decode_latents(self, latents) -> np.ndarray:
        """Decode UNet-scale latents to uint8 images, truncating as KerasCV does."""
        program, weights = self._stateless_program("decoder")  # the decoder scales itself
        pixels = program(weights, ops.cast(latents, "float32"))
        pixels = np.asarray(ops.convert_to_numpy(ops.cast(pixels, "float32")))
        return np.clip((pixels + 1.0) / 2.0 * 255.0, 0.0, 255.0).astype(np.uint8)

    def _encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Images [B, H, W, 3] in [0, 1] -> latents; KerasCV's image encoder returns them
        already scaled (the base class scales the mean of keras-sd's encoder)."""
        program, weights = self._stateless_program("image_encoder")
        latents = program(weights, ops.convert_to_tensor(pixels * 2 - 1))
        return np.asarray(ops.convert_to_numpy(ops.cast(latents, "float32")))

    def _get_unconditional_context(self):
        """The text encoding of the empty prompt, [1, 77, D]."""
        length = self.tokenizer.max_length
        tokens = [[self.tokenizer.start_of_text] + [self.tokenizer.end_of_text] * (length - 1)]
        return self.text_encoder([ops.convert_to_tensor(tokens, "int32"), self._get_pos_ids()])

    def _expand_tensor(self, text_embedding, batch_size):
        """Repeat an unbatched (or batch-1) tensor to `batch_size`."""
        text_embedding = ops.squeeze(text_embedding)
        if len(text_embedding.shape) == 2:
            text_embedding = ops.repeat(ops.expand_dims(text_embedding, 0), batch_size, axis=0)
        return text_embedding

    def _get_timestep_embedding(self, timestep, batch_size, dim=320, max_period=10000):
        """The UNet's sinusoidal timestep features for one timestep, [batch_size, dim]."""
        t = ops.convert_to_tensor([timestep], "float32")
        return ops.repeat(timestep_embedding(t, dim, max_period), batch_size, axis=0)

    def _get_initial_alphas(self, timesteps):
        """alpha_prod at each timestep and at the one before it (1 for the first)."""
        table = self.scheduler.alphas_cumprod
        alphas = [float(table[t]) for t in timesteps]
        return alphas, [1.0] + alphas[:-1]

    def _get_initial_diffusion_noise(self, batch_size, seed):
        """Standard normal latents from `keras.random.normal` (KerasCV's draw for a seed)."""
        factor = self.latent_factor
        shape = (batch_size, self.img_height // factor, self.img_width // factor)
        return keras.random.normal((*shape, self.latent_channels), seed=seed)

    @staticmethod
    def _get_pos_ids():
        return ops.expand_dims(ops.arange(MAX_PROMPT_LENGTH, dtype="int32"), 0)


class StableDiffusionV2(StableDiffusion):
    """KerasCV's `StableDiffusionV2` (SD 2.1-base, 512 px) on keras-sd; see `StableDiffusion`.

    Example:
    >>> sd = StableDiffusionV2(img_width=512, img_height=512)  # doctest: +SKIP
    >>> images = sd.text_to_image("photograph of an astronaut", batch_size=1)  # doctest: +SKIP
    """

    model_config = "sd2-base"


def _no_download(cls):
    def build(*args, download_weights=False, **kwargs):
        if download_weights:
            raise ValueError(
                "keras-sd's constructors never download: pass download_weights=False and load "
                "weights with StableDiffusion.from_keras_cv / from_checkpoint / from_preset."
            )
        return cls(*args, **kwargs)

    return build


def _text_encoder(max_length=MAX_PROMPT_LENGTH, vocab_size=None, config="sd1", **kwargs):
    settings = dict(presets.resolve_model_config(config)["text_encoder"], max_length=max_length)
    if vocab_size is not None:
        settings["vocab_size"] = vocab_size
    return parts.TextEncoder(CLIPTextEncoder(**settings), **kwargs)


def _diffusion_model(img_height=None, img_width=None, max_text_length=None, name=None, **kwargs):
    """KerasCV's `DiffusionModel(img_height, img_width, max_text_length)`; keras-sd's UNet
    takes any size, so the sizes are accepted and not needed."""
    config = presets.resolve_model_config(kwargs.pop("config", "sd1"))
    return parts.DiffusionModel(UNet(**config["unet"]), name=name, **kwargs)


def _decoder(img_height=None, img_width=None, name=None, config="sd1"):
    return parts.Decoder(VAEDecoder(**presets.resolve_model_config(config)["vae"]), name=name)


def _image_encoder(img_height=None, img_width=None, config="sd1"):
    """KerasCV 0.9's `ImageEncoder()` (earlier versions took the image size first)."""
    return parts.image_encoder(VAEEncoder(**presets.resolve_model_config(config)["vae"]))


def _v2(build):
    return _no_download(lambda *args, **kwargs: build(*args, config="sd2-base", **kwargs))


_TextEncoder = _no_download(_text_encoder)
_TextEncoderV2 = _v2(_text_encoder)
_DiffusionModel = _no_download(_diffusion_model)
_DiffusionModelV2 = _v2(_diffusion_model)
_Decoder = _no_download(_decoder)
_ImageEncoder = _no_download(_image_encoder)

# KerasCV's module paths as well as its exports, as the guides import from both.
stable_diffusion = types.SimpleNamespace(
    MAX_PROMPT_LENGTH=MAX_PROMPT_LENGTH,
    NoiseScheduler=NoiseScheduler,
    SimpleTokenizer=parts.SimpleTokenizer,
    StableDiffusion=StableDiffusion,
    StableDiffusionV2=StableDiffusionV2,
    TextEncoder=_TextEncoder,
    TextEncoderV2=_TextEncoderV2,
    DiffusionModel=_DiffusionModel,
    DiffusionModelV2=_DiffusionModelV2,
    Decoder=_Decoder,
    ImageEncoder=_ImageEncoder,
    clip_tokenizer=types.SimpleNamespace(SimpleTokenizer=parts.SimpleTokenizer),
    decoder=types.SimpleNamespace(Decoder=_Decoder),
    diffusion_model=types.SimpleNamespace(
        DiffusionModel=_DiffusionModel, DiffusionModelV2=_DiffusionModelV2
    ),
    image_encoder=types.SimpleNamespace(ImageEncoder=_ImageEncoder),
    noise_scheduler=types.SimpleNamespace(NoiseScheduler=NoiseScheduler),
    text_encoder=types.SimpleNamespace(TextEncoder=_TextEncoder, TextEncoderV2=_TextEncoderV2),
    stable_diffusion=types.SimpleNamespace(
        MAX_PROMPT_LENGTH=MAX_PROMPT_LENGTH,
        StableDiffusion=StableDiffusion,
        StableDiffusionV2=StableDiffusionV2,
    ),
)
models = types.SimpleNamespace(
    StableDiffusion=StableDiffusion,
    StableDiffusionV2=StableDiffusionV2,
    stable_diffusion=stable_diffusion,
)

__all__ = ["MAX_PROMPT_LENGTH", "NoiseScheduler", "StableDiffusion", "StableDiffusionV2", "models"]
