"""KerasCV Stable Diffusion weights: live `keras_cv` models and their `.h5` weight files.

KerasCV builds each component as a fixed-size functional or Sequential model
with auto-generated layer names, so its weights are matched by position: the
`_*_order` functions list, for a keras-sd model, the PyTorch-style names of its
variables in the order KerasCV keeps them (its `model.weights` order, which is
also the order of layers and weights in its legacy `.h5` files). Every weight's
shape is checked. Both sides are Keras layouts, so values copy over unchanged,
except the VAE attention projections, which KerasCV stores as 1x1 convolutions.

KerasCV's weights are SD 1.4 (v1 classes) and SD 2.1-base (V2 classes; 512 px,
noise prediction). Its models differ slightly from the reference ones keras-sd
follows: tanh-approximated GELU in the UNet feed-forward and in the SD 2.x text
encoder, and GroupNorm epsilon 1e-5 in the VAE (1e-6 in the original).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from keras_sd import presets
from keras_sd.models import clip_text
from keras_sd.weights import deferred, h5_safety, precision, safetensors_io
from keras_sd.weights.state_dict import CheckpointError, named_variables, stand_in

COMPONENTS = ("text_encoder", "diffusion_model", "decoder", "image_encoder")
# KerasCV hard-codes these image/text sizes into its models; any works for building.
_KERAS_CV_BUILD_SIZE, _MAX_LENGTH = 64, 77


def _params(*modules) -> list[str]:
    return [f"{m}.{p}" for m in modules for p in ("weight", "bias")]


def _resnet(prefix: str, time: bool, shortcut: bool) -> list[str]:
    modules = [f"{prefix}.norm1", f"{prefix}.conv1"]
    modules += [f"{prefix}.time_emb_proj"] if time else []
    modules += [f"{prefix}.norm2", f"{prefix}.conv2"]
    modules += [f"{prefix}.conv_shortcut"] if shortcut else []  # built last, in build()
    return _params(*modules)


def _vae_attention(prefix: str) -> list[str]:
    return _params(*(f"{prefix}.{m}" for m in ("group_norm", "to_q", "to_k", "to_v", "to_out.0")))


def _transformer(prefix: str) -> list[str]:
    block = f"{prefix}.transformer_blocks.0"
    names = _params(f"{prefix}.norm", f"{prefix}.proj_in", f"{block}.norm1")
    for attn, norm in (("attn1", "norm2"), ("attn2", "norm3")):
        names += [f"{block}.{attn}.to_{x}.weight" for x in "qkv"]  # no biases
        names += _params(f"{block}.{attn}.to_out.0", f"{block}.{norm}")
    return names + _params(f"{block}.ff.net.0.proj", f"{block}.ff.net.2", f"{prefix}.proj_out")


def _text_encoder_order(model, names) -> list[str]:
    order = ["embeddings.token_embedding.weight", "embeddings.position_embedding.weight"]
    for i in range(model.num_layers):
        layer = f"encoder.layers.{i}"
        attention = [f"{layer}.self_attn.{p}_proj" for p in ("q", "k", "v", "out")]
        order += _params(f"{layer}.layer_norm1", *attention, f"{layer}.layer_norm2")
        order += _params(f"{layer}.mlp.fc1", f"{layer}.mlp.fc2")
    return order + _params("final_layer_norm")


def _unet_order(model, names) -> list[str]:
    def resnet(prefix):
        return _resnet(prefix, True, f"{prefix}.conv_shortcut.weight" in names)

    levels = len(model.block_out_channels)
    # Functional-model order: the first time MLP layer and conv_in share a depth.
    order = _params("time_embedding.linear_1", "conv_in", "time_embedding.linear_2")
    for i in range(levels):
        for j in range(model.layers_per_block):
            order += resnet(f"down_blocks.{i}.resnets.{j}")
            if model.attention_levels[i]:
                order += _transformer(f"down_blocks.{i}.attentions.{j}")
        if i < levels - 1:
            order += _params(f"down_blocks.{i}.downsamplers.0.conv")
    order += resnet("mid_block.resnets.0") + _transformer("mid_block.attentions.0")
    order += resnet("mid_block.resnets.1")
    for u in range(levels):
        for j in range(model.layers_per_block + 1):
            order += resnet(f"up_blocks.{u}.resnets.{j}")
            if model.attention_levels[levels - 1 - u]:
                order += _transformer(f"up_blocks.{u}.attentions.{j}")
        if u < levels - 1:
            order += _params(f"up_blocks.{u}.upsamplers.0.conv")
    return order + _params("conv_norm_out", "conv_out")


def _vae_resnet(prefix, names):
    return _resnet(prefix, False, f"{prefix}.conv_shortcut.weight" in names)


def _decoder_order(model, names) -> list[str]:
    levels = len(model.block_out_channels)
    order = _params("post_quant_conv", "decoder.conv_in")
    order += _vae_resnet("decoder.mid_block.resnets.0", names)
    order += _vae_attention("decoder.mid_block.attentions.0")
    order += _vae_resnet("decoder.mid_block.resnets.1", names)
    for u in range(levels):
        for j in range(model.layers_per_block + 1):
            order += _vae_resnet(f"decoder.up_blocks.{u}.resnets.{j}", names)
        if u < levels - 1:
            order += _params(f"decoder.up_blocks.{u}.upsamplers.0.conv")
    return order + _params("decoder.conv_norm_out", "decoder.conv_out")


def _encoder_order(model, names) -> list[str]:
    levels = len(model.block_out_channels)
    order = _params("encoder.conv_in")
    for i in range(levels):
        for j in range(model.layers_per_block):
            order += _vae_resnet(f"encoder.down_blocks.{i}.resnets.{j}", names)
        if i < levels - 1:
            order += _params(f"encoder.down_blocks.{i}.downsamplers.0.conv")
    order += _vae_resnet("encoder.mid_block.resnets.0", names)
    order += _vae_attention("encoder.mid_block.attentions.0")
    order += _vae_resnet("encoder.mid_block.resnets.1", names)
    return order + _params("encoder.conv_norm_out", "encoder.conv_out", "quant_conv")


_ORDERS = {
    "text_encoder": _text_encoder_order,
    "diffusion_model": _unet_order,
    "decoder": _decoder_order,
    "image_encoder": _encoder_order,
}


def _fit(value, variable):
    shape = tuple(variable.shape)
    if tuple(value.shape) == (1, 1, *shape):  # 1x1 convolution where we use Dense
        return value[0, 0]
    return value


def match_keras_cv(component: str, model, arrays: list, source: str) -> list:
    """Pair the variables of a keras-sd `model` with KerasCV's weights, given in order.

    Args:
        component: "text_encoder", "diffusion_model", "decoder" or "image_encoder".
        model: the keras-sd model receiving the weights.
        arrays: KerasCV's weights in its order (arrays or `LazyTensor`s).
        source: names the origin in error messages.

    Returns:
        `[(variable, value function)]`, as `transpose.match_torch_state` returns.

    Raises:
        CheckpointError: the count or any shape differs, naming the first difference.
    """
    variables = named_variables(model)
    order = _ORDERS[component](model, variables)
    if len(arrays) != len(order) or set(order) != set(variables):
        raise CheckpointError(
            f"{source} holds {len(arrays)} weights; a KerasCV {component} for this "
            f"{type(model).__name__} has {len(order)}. Is it the {component} of an SD 1.x "
            "or 2.x KerasCV model?"
        )
    pairs = []
    for position, (name, array) in enumerate(zip(order, arrays, strict=True)):
        variable = variables[name]
        if tuple(_fit(stand_in(array.shape, array.dtype), variable).shape) != tuple(variable.shape):
            raise CheckpointError(
                f"{source}: KerasCV {component} weight #{position} has shape "
                f"{tuple(array.shape)} where {name} needs {tuple(variable.shape)}."
            )
        value = lambda a=array, v=variable: np.asarray(_fit(np.asarray(a), v), v.dtype)  # noqa: E731
        pairs.append((variable, value))
    return pairs


# ------------------------------------------------------------------- h5 files
def _lazy_dataset(path: str, name: str, shape, dtype):
    def load():
        import h5py

        with h5py.File(path, "r") as f:
            return np.asarray(f[name])

    return safetensors_io.LazyTensor(load, shape, dtype)


def _decode(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def read_keras_cv_h5(path) -> list:
    """KerasCV weights of one `.h5` file, in KerasCV's order, read lazily.

    Legacy files (what KerasCV published and what Keras 2 `save_weights` wrote:
    layer names and weight names as attributes) are read with h5py alone. Keras 3
    `.weights.h5` files record no order, so they are loaded into the matching
    KerasCV model, which needs keras-cv installed.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: the file is not a readable HDF5 weights file.

    Example:
    >>> weights = read_keras_cv_h5("kcv_diffusion_model.h5")  # doctest: +SKIP
    >>> [w.shape for w in weights[:2]]  # doctest: +SKIP
    """
    import h5py

    path = str(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"KerasCV weights file not found: {path}")
    try:
        with h5py.File(path, "r") as f:
            h5_safety.check_links(f, path)
            root = f["model_weights"] if "model_weights" in f else f
            if "layer_names" not in root.attrs:
                return _read_keras3_weights(path, f)
            arrays = []
            for layer in (_decode(n) for n in root.attrs["layer_names"]):
                group = root[layer]
                for weight in (_decode(n) for n in group.attrs["weight_names"]):
                    data = group[weight]
                    name = data.name
                    arrays.append(_lazy_dataset(path, name, data.shape, data.dtype))
            return arrays
    except OSError as err:
        raise ValueError(
            f"cannot read {path} as an HDF5 weights file: {err}. The file may be truncated "
            "or corrupted."
        ) from None


def _read_keras3_weights(path: str, f) -> list:
    """Weights of a Keras 3 `.weights.h5` file, through the matching KerasCV model."""
    try:
        from keras_cv.src.models.stable_diffusion import (
            decoder,
            diffusion_model,
            image_encoder,
            text_encoder,
        )
    except ImportError:
        raise ValueError(
            f"{path} is a Keras 3 weights file, whose weight order only the KerasCV model "
            "itself knows; install keras-cv to read it, or build the KerasCV model, load "
            "the file into it and use from_keras_cv(model)."
        ) from None
    layers = set(f["layers"]) if "layers" in f else set()
    size = _KERAS_CV_BUILD_SIZE
    if "clip_embedding" in layers:
        candidates = [text_encoder.TextEncoder, text_encoder.TextEncoderV2]
        candidates = [lambda c=c: c(_MAX_LENGTH, download_weights=False) for c in candidates]
    elif "res_block" in layers:
        candidates = [diffusion_model.DiffusionModel, diffusion_model.DiffusionModelV2]
        candidates = [
            lambda c=c: c(size, size, _MAX_LENGTH, download_weights=False) for c in candidates
        ]
    else:
        candidates = [
            lambda: decoder.Decoder(size, size, download_weights=False),
            lambda: image_encoder.ImageEncoder(download_weights=False),
        ]
    for build in candidates:
        model = build()
        try:
            model.load_weights(path)
        except ValueError:
            continue
        return [np.asarray(w.numpy()) for w in model.weights]
    raise ValueError(f"{path} matches no KerasCV Stable Diffusion component.")


def _identify(arrays: list) -> str:
    """Which component a KerasCV weights list belongs to, from its first weights."""
    first = tuple(arrays[0].shape)
    if len(first) == 2 and first[0] == clip_text.SD1_CONFIG["vocab_size"]:
        return "text_encoder"
    if len(first) == 2:
        return "diffusion_model"  # starts with the timestep MLP
    if len(first) == 4 and first[:2] == (1, 1):
        return "decoder"  # starts with post_quant_conv
    return "image_encoder"


# ------------------------------------------------------------------ public API
def _assemble(weights: dict, source: str, img_width, img_height, dtype=None) -> dict:
    policy = precision.load_policy(dtype)  # checked before any model is built
    missing = [c for c in ("text_encoder", "diffusion_model", "decoder") if c not in weights]
    if missing:
        raise CheckpointError(
            f"{source}: no KerasCV {', '.join(missing)} weights; a complete model needs the "
            "text encoder, diffusion model and decoder (the image encoder is optional)."
        )
    # KerasCV's v1 weights are SD 1.4; its V2 weights are SD 2.1-base (512 px, noise
    # prediction). The one whose shapes fit is the one.
    errors = []
    for name in ("sd1", "sd2-base"):
        config = presets.resolve_model_config(name)
        models = deferred.build_models_deferred(config, policy=policy)
        try:
            pairs = []
            for component, arrays in weights.items():
                pairs += match_keras_cv(component, models[component], arrays, source)
            break
        except CheckpointError as err:
            deferred.forget_deferred(models.values())
            errors.append(str(err))
    else:
        raise CheckpointError(f"{errors[0]} (as SD 2.x: {errors[1]})")
    if "image_encoder" not in weights:
        warnings.warn(
            f"{source}: no KerasCV image encoder weights; image_encoder keeps random weights "
            "(text-to-image works, image-to-image does not).",
            stacklevel=3,
        )
        deferred.forget_deferred([models["image_encoder"]])
        models["image_encoder"] = deferred.build_model("image_encoder", config, policy)
    deferred.initialize_deferred([models[c] for c in weights], pairs)
    return {
        "config": config,
        "img_width": img_width or 512,
        "img_height": img_height or 512,
        **models,
    }


def keras_cv_checkpoint_kwargs(paths, img_width=None, img_height=None, dtype=None) -> dict:
    """The `StableDiffusion(...)` arguments for KerasCV `.h5` weight files (one per
    component): config, image size and the loaded components.

    Args:
        paths: one `.h5` path or several (text encoder, diffusion model, decoder and
            optionally image encoder, in any order: each file's component is recognised
            from its first weights, SD 1.x vs 2.x from which configuration's shapes fit).
        img_width, img_height: default image size (512).
        dtype: the models' dtype policy, as for `checkpoint.checkpoint_kwargs`.

    Example:
    >>> parts = keras_cv_checkpoint_kwargs(["kcv_encoder.h5", "kcv_diffusion_model.h5",
    ...                                "kcv_decoder.h5", "vae_encoder.h5"])  # doctest: +SKIP
    """
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    weights = {}
    for path in paths:
        arrays = read_keras_cv_h5(path)
        component = _identify(arrays)
        if component in weights:
            raise CheckpointError(f"two KerasCV {component} files given: {paths}.")
        weights[component] = arrays
    source = ", ".join(Path(p).name for p in paths)
    return _assemble(weights, source, img_width, img_height, dtype)


def load_keras_cv_weights(
    sd, text_encoder=None, diffusion_model=None, decoder=None, image_encoder=None
) -> None:
    """Load KerasCV `.h5` weight files into the components of an existing `StableDiffusion`.

    Args:
        sd: a `StableDiffusion` whose configuration matches the files (e.g. config="sd1"
            for KerasCV's v1 weights, "sd2-base" for its V2 weights).
        text_encoder, diffusion_model, decoder, image_encoder: `.h5` paths; None skips.

    Example:
    >>> load_keras_cv_weights(sd, diffusion_model="kcv_diffusion_model.h5")  # doctest: +SKIP
    """
    given = dict(
        text_encoder=text_encoder,
        diffusion_model=diffusion_model,
        decoder=decoder,
        image_encoder=image_encoder,
    )
    pairs = []
    for component, path in given.items():
        if path is not None:
            pairs += match_keras_cv(
                component, getattr(sd, component), read_keras_cv_h5(path), str(path)
            )
    for variable, value in pairs:
        variable.assign(value())


@deferred.paused_gc()
def keras_cv_kwargs(
    model=None,
    *,
    text_encoder=None,
    diffusion_model=None,
    decoder=None,
    image_encoder=None,
    img_width=None,
    img_height=None,
    dtype=None,
) -> dict:
    """The `StableDiffusion(...)` arguments that convert an in-memory KerasCV Stable
    Diffusion model: config, image size and keras-sd components with its weights.

    Args:
        model: a `keras_cv.models.StableDiffusion` or `StableDiffusionV2`. KerasCV builds
            its components on first access (downloading their weights); the ones already
            built are used as they are.
        text_encoder, diffusion_model, decoder, image_encoder: KerasCV component models,
            instead of (or overriding) those of `model`.
        img_width, img_height: default image size; default `model`'s, else 512.
        dtype: the models' dtype policy, as for `checkpoint.checkpoint_kwargs`.

    Returns:
        The arguments, with the SD 1.x or 2.x-base configuration that fits the weights.

    Example:
    >>> import keras_cv  # doctest: +SKIP
    >>> sd = StableDiffusion.from_keras_cv(keras_cv.models.StableDiffusion())  # doctest: +SKIP
    """
    given = dict(
        text_encoder=text_encoder,
        diffusion_model=diffusion_model,
        decoder=decoder,
        image_encoder=image_encoder,
    )
    for component in COMPONENTS:
        if given[component] is None and model is not None:
            # Built components live in `_<name>`; the public property would build the
            # missing image encoder and download its weights just to convert it.
            built = getattr(model, f"_{component}", None)
            if built is None and component != "image_encoder":
                built = getattr(model, component)
            given[component] = built
    weights = {
        c: [safetensors_io.LazyTensor(w.numpy, w.shape, w.dtype) for w in m.weights]
        for c, m in given.items()
        if m is not None
    }
    img_width = img_width or getattr(model, "img_width", None)
    img_height = img_height or getattr(model, "img_height", None)
    return _assemble(weights, "KerasCV model", img_width, img_height, dtype)


__all__ = [
    "keras_cv_checkpoint_kwargs",
    "keras_cv_kwargs",
    "load_keras_cv_weights",
    "read_keras_cv_h5",
]
