"""keras-sd's components with KerasCV's call forms, sharing their variables.

KerasCV's models take differently shaped inputs than keras-sd's: the text encoder
`[tokens, positions]`, the UNet `[latents, timestep_embedding, context]` (the
sinusoidal features, computed by the caller), a decoder that divides by the VAE
scaling factor itself, and an image encoder that returns the scaled latent mean.
Each wrapper here holds the keras-sd model (trained, saved and converted as
usual) and also accepts keras-sd's own call form, so the pipeline can use it.
"""

from __future__ import annotations

import keras
from keras import ops

from keras_sd.models.clip_text import CLIPTextEncoder
from keras_sd.models.unet import UNet
from keras_sd.models.vae import VAEDecoder, VAEEncoder
from keras_sd.tokenizer import END_TOKEN, START_TOKEN, CLIPTokenizer
from keras_sd.weights import keras_cv as keras_cv_weights

# The attribute of each wrapper that holds the keras-sd model.
_INNER = {"text_encoder": "encoder", "diffusion_model": "unet", "decoder": "decoder"}


def _unpack(inputs, names):
    if isinstance(inputs, dict):
        return [inputs[n] for n in names]
    return list(inputs)


class SimpleTokenizer(CLIPTokenizer):
    """keras-sd's CLIP tokenizer with KerasCV's attribute names; pads with `<|endoftext|>`
    as KerasCV does for both its model versions.

    Example:
    >>> tokenizer = SimpleTokenizer()
    >>> tokenizer.encode("a cat")[0] == tokenizer.start_of_text
    True
    """

    def __init__(self, bpe_path=None, *, max_length: int = 77, pad_token=END_TOKEN, **kwargs):
        super().__init__(vocab_path=bpe_path, max_length=max_length, pad_token=pad_token, **kwargs)

    @property
    def vocab(self) -> list[str]:
        """Every token, in id order (added tokens last); `len(vocab)` is the id count."""
        return [*self._id_to_token, *self._added]

    @property
    def start_of_text(self) -> int:
        return self.start_token_id

    @property
    def end_of_text(self) -> int:
        return self.end_token_id

    def decode(self, tokens) -> str:
        """KerasCV's decode: every id's text, the start and end tokens included, word
        ends as spaces (keras-sd's `CLIPTokenizer.decode` stops at the end token)."""
        vocab = self.vocab
        return self._symbols_to_text([vocab[int(i)] for i in tokens])

    def add_tokens(self, tokens) -> int:
        """Add whole-word tokens; returns how many were new (KerasCV skips known ones)."""
        tokens = [tokens] if isinstance(tokens, str) else list(tokens)
        new = [t for t in tokens if t not in self._added and t not in (START_TOKEN, END_TOKEN)]
        super().add_tokens(new)
        return len(new)


class CLIPEmbedding:
    """KerasCV's `text_encoder.layers[2]`: the token and position embeddings as one
    layer named "clip_embedding" (a view on the keras-sd encoder's two `Embedding`s,
    so what is set here is set on the encoder)."""

    name = "clip_embedding"

    def __init__(self, encoder: CLIPTextEncoder):
        self.token_embedding = encoder.token_embedding
        self.position_embedding = encoder.position_embedding

    @property
    def trainable(self) -> bool:
        return self.token_embedding.trainable or self.position_embedding.trainable

    @trainable.setter
    def trainable(self, value: bool) -> None:
        self.token_embedding.trainable = value
        self.position_embedding.trainable = value

    @property
    def weights(self) -> list:
        return [*self.token_embedding.weights, *self.position_embedding.weights]

    def get_weights(self) -> list:
        return [ops.convert_to_numpy(w) for w in self.weights]

    def set_weights(self, weights) -> None:
        for variable, value in zip(self.weights, weights, strict=True):
            variable.assign(value)


class _KerasCVWeightFiles:
    """What the wrappers share: the wrapped keras-sd model's attributes, and
    `load_weights` that also reads KerasCV's `.h5` weight files (matched by KerasCV's
    weight order, as `StableDiffusion.from_checkpoint` does)."""

    role = ""

    def __getattr__(self, name):
        # Only reached for names the wrapper lacks: the keras-sd model's attributes
        # (`block_out_channels`, `in_channels`, ...) that keras-sd's own code reads.
        inner = self.__dict__.get(_INNER[type(self).role])
        if inner is None or name.startswith("__"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(inner, name)

    def load_weights(self, filepath, *args, **kwargs):
        try:
            arrays = keras_cv_weights.read_keras_cv_h5(filepath)
        except ValueError:  # not a KerasCV file: Keras' own format
            return super().load_weights(filepath, *args, **kwargs)
        inner = getattr(self, _INNER[self.role])
        for variable, value in keras_cv_weights.match_keras_cv(
            self.role, inner, arrays, str(filepath)
        ):
            variable.assign(value())


class TextEncoder(_KerasCVWeightFiles, keras.Model):
    """`text_encoder([tokens, positions])` or `({"tokens": ..., "positions": ...})`
    -> `[B, L, D]`; `text_encoder(tokens)` as keras-sd's `CLIPTextEncoder`.

    `layers` lists what KerasCV's functional text encoder holds, in its order: the two
    inputs, the embeddings (`CLIPEmbedding`), the transformer blocks, the final norm.
    """

    role = "text_encoder"

    def __init__(self, encoder: CLIPTextEncoder, **kwargs):
        super().__init__(dtype=encoder.dtype_policy, **kwargs)
        self.encoder = encoder
        self.built = True

    @property
    def vocab_size(self) -> int:
        return self.encoder.vocab_size

    @property
    def layers(self) -> list:
        inputs = [
            keras.layers.InputLayer(shape=(self.encoder.max_length,), dtype="int32", name=name)
            for name in ("tokens", "positions")
        ]
        encoder = self.encoder
        return [*inputs, CLIPEmbedding(encoder), *encoder.encoder_layers, encoder.final_layer_norm]

    def call(self, inputs):
        if isinstance(inputs, (dict, list, tuple)):
            tokens, positions = _unpack(inputs, ("tokens", "positions"))
            return self.encoder(tokens, position_ids=positions)
        return self.encoder(inputs)


class DiffusionModel(_KerasCVWeightFiles, keras.Model):
    """`diffusion_model([latent, timestep_embedding, context])` (or the dict with those
    keys) -> predicted noise; `diffusion_model(latents, timesteps, context)` as
    keras-sd's `UNet`."""

    role = "diffusion_model"

    def __init__(self, unet: UNet, **kwargs):
        super().__init__(dtype=unet.dtype_policy, **kwargs)
        self.unet = unet
        self.built = True

    def call(self, inputs, timesteps=None, context=None):
        if timesteps is not None:
            return self.unet(inputs, timesteps, context)
        latent, features, context = _unpack(inputs, ("latent", "timestep_embedding", "context"))
        return self.unet.call_with_timestep_features(latent, features, context)


class Decoder(_KerasCVWeightFiles, keras.Model):
    """`decoder(latents)` on UNet-scale latents (KerasCV divides by the VAE scaling
    factor inside its decoder) -> images in [-1, 1]."""

    role = "decoder"

    def __init__(self, decoder: VAEDecoder, **kwargs):
        super().__init__(dtype=decoder.dtype_policy, **kwargs)
        self.decoder = decoder
        self.built = True

    @property
    def scaling_factor(self) -> float:
        return self.decoder.scaling_factor

    @property
    def downsample_factor(self) -> int:
        return self.decoder.downsample_factor

    @property
    def latent_channels(self) -> int:
        return self.decoder.latent_channels

    def call(self, latents):
        return self.decoder(latents / self.decoder.scaling_factor)


@keras.saving.register_keras_serializable(package="keras_sd")
class ScaledMean(keras.layers.Layer):
    """The first `channels` channels (the latent mean) times `scale`."""

    def __init__(self, channels: int, scale: float, **kwargs):
        super().__init__(**kwargs)
        self.channels, self.scale = channels, scale

    def call(self, moments):
        return moments[..., : self.channels] * ops.cast(self.scale, moments.dtype)

    def get_config(self):
        return {**super().get_config(), "channels": self.channels, "scale": self.scale}


def image_encoder(encoder: VAEEncoder) -> keras.Model:
    """KerasCV's image encoder: images [B, H, W, 3] in [-1, 1] -> the scaled latent
    mean [B, H/8, W/8, 4]. Its `layers[-2]` is `encoder`, whose output is the mean
    and log-variance, as in KerasCV (the guides read `layers[-2].output`)."""
    images = keras.Input((None, None, encoder.in_channels), name="images")
    moments = encoder(images)
    latents = ScaledMean(encoder.latent_channels, encoder.scaling_factor)(moments)
    return keras.Model(images, latents, name="image_encoder")


def wrap(role: str, model):
    """The KerasCV-form wrapper of a keras-sd component (others are returned as given)."""
    wrappers = {
        "text_encoder": (CLIPTextEncoder, TextEncoder),
        "diffusion_model": (UNet, DiffusionModel),
        "decoder": (VAEDecoder, Decoder),
        "image_encoder": (VAEEncoder, image_encoder),
    }
    base, wrapper = wrappers.get(role, (type(None), None))
    return wrapper(model) if isinstance(model, base) and wrapper else model
