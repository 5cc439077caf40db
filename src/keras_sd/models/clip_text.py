"""CLIP text encoder: token ids -> per-token context for the UNet's cross-attention.

A pre-LayerNorm causal transformer, the text tower of CLIP. Stable Diffusion
1.x uses OpenAI's ViT-L/14 text tower (quick_gelu); 2.x uses OpenCLIP's
ViT-H/14 tower (exact gelu) with its last layer dropped, which is how the
diffusers `text_encoder` folder stores it (23 of 24 layers).

Sublayers are named after the modules of transformers' `CLIPTextModel`, so
`keras_sd.weights.state_dict.load_state_dict(encoder, sd, prefix="text_model.",
ignore=("position_ids",))` loads a transformers/diffusers checkpoint directly.

Reference: Radford et al., "Learning Transferable Visual Models From Natural
Language Supervision", 2021 (https://arxiv.org/abs/2103.00020).
"""

from __future__ import annotations

import keras
import numpy as np
from keras import layers, ops

from keras_sd import backend
from keras_sd.models import validation
from keras_sd.models.attention import dot_product_attention

SD1_CONFIG = {
    "vocab_size": 49408,
    "max_length": 77,
    "hidden_dim": 768,
    "num_layers": 12,
    "num_heads": 12,
    "intermediate_dim": 3072,
    "activation": "quick_gelu",
    "layer_norm_epsilon": 1e-5,
}
SD2_CONFIG = {
    "vocab_size": 49408,
    "max_length": 77,
    "hidden_dim": 1024,
    "num_layers": 23,
    "num_heads": 16,
    "intermediate_dim": 4096,
    "activation": "gelu",
    "layer_norm_epsilon": 1e-5,
}
TINY_CONFIG = {
    "vocab_size": 49408,
    "max_length": 77,
    "hidden_dim": 32,
    "num_layers": 2,
    "num_heads": 4,
    "intermediate_dim": 37,
    "activation": "quick_gelu",
    "layer_norm_epsilon": 1e-5,
}


def quick_gelu(x):
    """Sigmoid approximation of GELU used by OpenAI CLIP: `x * sigmoid(1.702 x)`.

    The constant is part of the trained model's definition, not a tuning knob:
    SD 1.x weights were trained with exactly this function.
    """
    return x * ops.sigmoid(1.702 * x)


def _exact_gelu(x):
    # OpenCLIP (SD 2.x) uses the erf form; keras' default tanh form differs by ~1e-3.
    return ops.gelu(x, approximate=False)


_ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": _exact_gelu}


@keras.saving.register_keras_serializable(package="keras_sd")
class CLIPEncoderLayer(layers.Layer):
    """One pre-LN transformer block: causal self-attention, then an MLP.

    Args:
        hidden_dim: width of the residual stream.
        num_heads: attention heads; must divide `hidden_dim`.
        intermediate_dim: width of the MLP's hidden layer.
        activation: `"quick_gelu"` (SD 1.x) or `"gelu"` (exact erf, SD 2.x).
        layer_norm_epsilon: epsilon of both layer norms.
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Returns (call):
        `[B, L, hidden_dim]`, the residual stream after this block.

    Example:
    >>> block = CLIPEncoderLayer(32, 4, 37, name="encoder-layers-0")
    >>> tuple(block(keras.ops.zeros((1, 5, 32))).shape)
    (1, 5, 32)
    """

    def __init__(
        self,
        hidden_dim: int,
        num_heads: int,
        intermediate_dim: int,
        activation: str = "quick_gelu",
        layer_norm_epsilon: float = 1e-5,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"activation={activation!r} is not supported; use one of {sorted(_ACTIVATIONS)}."
            )
        if hidden_dim % num_heads:
            raise ValueError(f"hidden_dim={hidden_dim} must be divisible by num_heads={num_heads}.")
        self.hidden_dim = hidden_dim
        self.num_heads = num_heads
        self.intermediate_dim = intermediate_dim
        self.activation = activation
        self.layer_norm_epsilon = layer_norm_epsilon
        self.head_dim = hidden_dim // num_heads
        self._activation_fn = _ACTIVATIONS[activation]

        def dense(units, name):
            return layers.Dense(units, name=name, dtype=self.dtype_policy)

        def norm(name):
            return layers.LayerNormalization(
                epsilon=layer_norm_epsilon, name=name, dtype=self.dtype_policy
            )

        self.layer_norm1 = norm("layer_norm1")
        self.q_proj = dense(hidden_dim, "self_attn-q_proj")
        self.k_proj = dense(hidden_dim, "self_attn-k_proj")
        self.v_proj = dense(hidden_dim, "self_attn-v_proj")
        self.out_proj = dense(hidden_dim, "self_attn-out_proj")
        self.layer_norm2 = norm("layer_norm2")
        self.fc1 = dense(intermediate_dim, "mlp-fc1")
        self.fc2 = dense(hidden_dim, "mlp-fc2")

    def build(self, input_shape):
        hidden_shape = (None, None, self.hidden_dim)
        for layer in (self.layer_norm1, self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            layer.build(hidden_shape)
        for layer in (self.layer_norm2, self.fc1):
            layer.build(hidden_shape)
        self.fc2.build((None, None, self.intermediate_dim))

    def _split_heads(self, x):
        batch, length = ops.shape(x)[0], ops.shape(x)[1]
        return ops.reshape(x, (batch, length, self.num_heads, self.head_dim))  # [B, L, N, H]

    def call(self, x):
        batch, length = ops.shape(x)[0], ops.shape(x)[1]
        h = self.layer_norm1(x)
        q = self._split_heads(self.q_proj(h))
        k = self._split_heads(self.k_proj(h))
        v = self._split_heads(self.v_proj(h))
        # On TensorFlow and JAX the softmax runs in float32 even for float16 inputs, so
        # no explicit upcast is needed here; is_causal keeps each token blind to later
        # ones, as in CLIP's text tower.
        attn = dot_product_attention(q, k, v, is_causal=True)  # [B, L, N, H]
        x = x + self.out_proj(ops.reshape(attn, (batch, length, self.hidden_dim)))
        h = self.fc2(self._activation_fn(self.fc1(self.layer_norm2(x))))
        return x + h

    def get_config(self):
        config = super().get_config()
        config.update(
            hidden_dim=self.hidden_dim,
            num_heads=self.num_heads,
            intermediate_dim=self.intermediate_dim,
            activation=self.activation,
            layer_norm_epsilon=self.layer_norm_epsilon,
        )
        return config


@backend.register_shareable
@keras.saving.register_keras_serializable(package="keras_sd")
class CLIPTextEncoder(keras.Model):
    """CLIP text transformer returning the final-layer-norm hidden states.

    Matches transformers' `CLIPTextModel(...).last_hidden_state`. All weights
    exist right after construction, so checkpoints can be loaded before any call.

    Args:
        vocab_size: number of token embeddings.
        max_length: number of learned positions (longest accepted sequence).
        hidden_dim: width of the token features.
        num_layers: transformer blocks.
        num_heads: attention heads per block; must divide `hidden_dim`.
        intermediate_dim: MLP hidden width.
        activation: `"quick_gelu"` (SD 1.x) or `"gelu"` (exact erf, SD 2.x).
        layer_norm_epsilon: epsilon of every layer norm.
        **kwargs: base model arguments (`name`, `dtype`, ...).

    Returns (call):
        `[B, L, hidden_dim]` context for the UNet. `call(token_ids, clip_skip=k)`
        stops `k` blocks early and still applies the final layer norm, the same
        meaning as diffusers' `clip_skip`; `position_ids` ([B or 1, L]) replace
        the default positions 0 .. L-1; `token_embeddings` ([B, L, hidden_dim])
        replace the table lookup of `token_ids`.

    Example:
    >>> enc = CLIPTextEncoder(**TINY_CONFIG)
    >>> tuple(enc(keras.ops.zeros((2, 77), "int32")).shape)
    (2, 77, 32)
    """

    def __init__(
        self,
        vocab_size: int,
        max_length: int,
        hidden_dim: int,
        num_layers: int,
        num_heads: int,
        intermediate_dim: int,
        activation: str = "quick_gelu",
        layer_norm_epsilon: float = 1e-5,
        **kwargs,
    ):
        validation.check_config("text_encoder", locals())  # before anything is built
        super().__init__(**kwargs)
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.hidden_dim = hidden_dim
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.intermediate_dim = intermediate_dim
        self.activation = activation
        self.layer_norm_epsilon = layer_norm_epsilon

        self.token_embedding = layers.Embedding(
            vocab_size, hidden_dim, name="embeddings-token_embedding", dtype=self.dtype_policy
        )
        self.position_embedding = layers.Embedding(
            max_length, hidden_dim, name="embeddings-position_embedding", dtype=self.dtype_policy
        )
        self.encoder_layers = [
            CLIPEncoderLayer(
                hidden_dim,
                num_heads,
                intermediate_dim,
                activation=activation,
                layer_norm_epsilon=layer_norm_epsilon,
                name=f"encoder-layers-{i}",
                dtype=self.dtype_policy,
            )
            for i in range(num_layers)
        ]
        self.final_layer_norm = layers.LayerNormalization(
            epsilon=layer_norm_epsilon, name="final_layer_norm", dtype=self.dtype_policy
        )
        self.build((None, max_length))

    def build(self, input_shape):
        self.token_embedding.build(input_shape)
        self.position_embedding.build(input_shape)
        hidden_shape = (None, None, self.hidden_dim)
        for layer in self.encoder_layers:
            layer.build(hidden_shape)
        self.final_layer_norm.build(hidden_shape)

    def grow_token_embedding(self, new_rows) -> list[int]:
        """Append rows to the token-embedding table (tokens added to the tokenizer).

        The layer is replaced by a larger one holding the old rows unchanged; every other
        weight keeps its variable, so nothing else needs rebuilding.

        Args:
            new_rows: array-like [N, hidden_dim], the embeddings of the new ids.

        Returns:
            The new ids: `vocab_size`, ..., `vocab_size + N - 1` before the call.

        Example:
        >>> enc = CLIPTextEncoder(**TINY_CONFIG)
        >>> enc.grow_token_embedding(np.zeros((2, 32), "float32"))
        [49408, 49409]
        """
        rows = np.asarray(new_rows, dtype="float32")
        if rows.ndim != 2 or rows.shape[1] != self.hidden_dim or not len(rows):
            raise ValueError(
                f"new_rows must have shape [N >= 1, {self.hidden_dim}] (the text encoder's "
                f"width); received shape {rows.shape}."
            )
        old = self.token_embedding
        table = ops.convert_to_numpy(ops.cast(old.embeddings, "float32"))
        grown = layers.Embedding(
            len(table) + len(rows), self.hidden_dim, name=old.name, dtype=old.dtype_policy
        )
        with keras.name_scope(self.name):  # the same variable path as the original table
            grown.build((None, self.max_length))
        grown.embeddings.assign(np.concatenate([table, rows]).astype(old.embeddings.dtype))
        grown.trainable = old.trainable
        # The encoder is built (its tracker locked): swap the sublayer in place.
        self._tracker.replace_tracked_value("layers", old, grown)
        object.__setattr__(self, "token_embedding", grown)
        self.vocab_size = len(table) + len(rows)
        return list(range(len(table), self.vocab_size))

    def call(self, token_ids, clip_skip: int = 0, position_ids=None, token_embeddings=None):
        if not 0 <= clip_skip < self.num_layers:
            raise ValueError(f"clip_skip={clip_skip} must be in [0, {self.num_layers - 1}].")
        length = token_ids.shape[1]
        if length is not None and length > self.max_length:
            raise ValueError(
                f"token_ids has length {length}, more than max_length={self.max_length}."
            )
        if position_ids is None:  # KerasCV's text encoder takes them as a second input
            position_ids = ops.arange(ops.shape(token_ids)[1])[None]  # [1, L]
        if token_embeddings is None:  # given by textual-inversion training
            token_embeddings = self.token_embedding(token_ids)  # [B, L, hidden_dim]
        x = token_embeddings + self.position_embedding(position_ids)
        for layer in self.encoder_layers[: self.num_layers - clip_skip]:
            x = layer(x)  # [B, L, hidden_dim]
        return self.final_layer_norm(x)

    def compute_output_shape(self, input_shape):
        return (*input_shape, self.hidden_dim)

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "dtype": keras.dtype_policies.serialize(self.dtype_policy),
            "vocab_size": self.vocab_size,
            "max_length": self.max_length,
            "hidden_dim": self.hidden_dim,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "intermediate_dim": self.intermediate_dim,
            "activation": self.activation,
            "layer_norm_epsilon": self.layer_norm_epsilon,
        }


# transformers' CLIPTextConfig field -> our constructor argument, and the
# CLIPTextConfig default used when a config.json omits the field (transformers
# drops fields equal to their defaults when it saves).
_TRANSFORMERS_FIELDS = {
    "vocab_size": ("vocab_size", 49408),
    "max_position_embeddings": ("max_length", 77),
    "hidden_size": ("hidden_dim", 512),
    "num_hidden_layers": ("num_layers", 12),
    "num_attention_heads": ("num_heads", 8),
    "intermediate_size": ("intermediate_dim", 2048),
    "hidden_act": ("activation", "quick_gelu"),
    "layer_norm_eps": ("layer_norm_epsilon", 1e-5),
}


def config_from_transformers(cfg: dict) -> dict:
    """Turn a transformers `CLIPTextConfig` dict into `CLIPTextEncoder` kwargs.

    Args:
        cfg: the parsed `config.json` of a diffusers `text_encoder` folder (or
            `CLIPTextConfig.to_dict()`). Missing fields take transformers' defaults.

    Returns:
        A dict of constructor arguments, e.g. equal to `SD1_CONFIG` for SD 1.5.

    Raises:
        ValueError: for settings this encoder does not implement (an unknown
            `hidden_act`, or heads that do not divide the width).

    Example:
    >>> cfg = json.load(open("text_encoder/config.json"))  # doctest: +SKIP
    >>> kwargs = config_from_transformers(cfg)  # doctest: +SKIP
    >>> encoder = CLIPTextEncoder(**kwargs)  # doctest: +SKIP
    """
    out = {
        ours: cfg.get(theirs, default) for theirs, (ours, default) in _TRANSFORMERS_FIELDS.items()
    }
    if out["activation"] not in _ACTIVATIONS:
        raise ValueError(
            f"hidden_act={out['activation']!r} is not supported; use one of {sorted(_ACTIVATIONS)}."
        )
    if out["hidden_dim"] % out["num_heads"]:
        raise ValueError(
            f"hidden_size={out['hidden_dim']} is not divisible by "
            f"num_attention_heads={out['num_heads']}."
        )
    return out
