"""Load and save whole Stable Diffusion checkpoints: CompVis single files, diffusers folders
and keras-sd's keras-layout files (`keras_sd.weights.native`, mapped without conversion).

The architecture comes from the weights (levels, channels, layers, context width,
4- or 9-channel UNet, linear or convolutional projections); what weights cannot
tell (attention heads, GroupNorm groups, prediction type, image size) comes from
the SD 1.x or 2.x configuration detected, a diffusers folder's json files, or the
caller's overrides. Tensors stream from the file into the models one at a time
(`keras_sd.weights.deferred`), so loading costs about one read of the file and
memory stays near the model's own size.
"""

from __future__ import annotations

import re
from pathlib import Path

from keras_sd import presets
from keras_sd.weights import (
    atomic,
    bundle,
    deferred,
    diffusers_folder,
    keras_cv,
    native,
    precision,
    safetensors_io,
    transpose,
)
from keras_sd.weights import diffusers as diffusers_io
from keras_sd.weights.compvis import (
    CLIP_PREFIX,
    OPENCLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    compvis_to_diffusers,
    detect_variant,
    diffusers_to_compvis,
)
from keras_sd.weights.prefetch import Prefetch
from keras_sd.weights.state_dict import (
    CheckpointError,
    check_stored_weights,
    refusing,
    select_entries,
)

LAYOUTS = ("compvis", "diffusers", "keras")
_NOT_SD = "the weights do not form a Stable Diffusion 1.x/2.x layout"
COMPONENTS = tuple(deferred.MODELS)  # the StableDiffusion attributes that hold weights


# ------------------------------------------------------------------ loading
def _check_compvis(state: dict, source: str) -> None:
    """Refuse files that are not SD 1.x/2.x single files, naming what they look like."""
    keys = list(state)
    if any(k.startswith("conditioner.") for k in keys):
        raise CheckpointError(
            f"{source} is an SDXL checkpoint; keras-sd implements Stable Diffusion 1.x and 2.x."
        )
    if UNET_PREFIX + "input_blocks.0.0.weight" not in state:
        diffusers_like = [
            k for k in keys if k.split(".")[0] in ("conv_in", "down_blocks", "encoder")
        ]
        hint = (
            " It looks like one component of a diffusers folder: load the folder that holds "
            "unet/, vae/ and text_encoder/ instead."
            if diffusers_like or any(k.startswith("text_model.") for k in keys)
            else ""
        )
        raise CheckpointError(
            f"{source} is not a Stable Diffusion checkpoint: none of its {len(keys)} keys "
            f"(e.g. {', '.join(sorted(keys)[:3])}) is a CompVis UNet weight "
            f"'{UNET_PREFIX}*'.{hint}"
        )
    for prefixes, what in (
        ((VAE_PREFIX,), "VAE (first_stage_model.*)"),
        ((CLIP_PREFIX, OPENCLIP_PREFIX), "text encoder (cond_stage_model.*)"),
    ):
        if not any(k.startswith(prefixes) for k in keys):
            raise CheckpointError(
                f"{source} has UNet weights but no {what} weights; keras-sd needs a complete "
                "Stable Diffusion checkpoint (UNet, VAE and text encoder in one file)."
            )


def _count(state: dict, pattern: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
    # Counts only as far as the keys go: a lone "layers.99999" must not build 10**5 layers.
    if found and len(found) != max(found) + 1:
        raise CheckpointError(
            f"the indices of {pattern!r} in the weights' names skip numbers "
            f"({sorted(found)[:8]}...): not a layout keras-sd knows"
        )
    return max(found) + 1 if found else 0


def _unet_config(state: dict, base: dict) -> dict:
    levels = _count(state, r"down_blocks\.(\d+)\.")
    channels = tuple(
        int(state[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0]) for i in range(levels)
    )
    attention = tuple(
        any(k.startswith(f"down_blocks.{i}.attentions.") for k in state) for i in range(levels)
    )
    transformer_layers = tuple(
        _count(state, rf"down_blocks\.{i}\.attentions\.0\.transformer_blocks\.(\d+)\.") or 1
        for i in range(levels)
    )
    context = [v.shape[1] for k, v in state.items() if k.endswith("attn2.to_k.weight")]
    proj_in = [v for k, v in state.items() if k.endswith(".proj_in.weight")]
    heads = base["num_heads"]
    if tuple(base["block_out_channels"]) != channels and isinstance(heads, (list, tuple)):
        # Per-level heads (SD 2.x) mean a constant head width; keep that width.
        width = base["block_out_channels"][0] // heads[0]
        heads = tuple(c // width for c in channels)
    return {
        **base,
        "in_channels": int(state["conv_in.weight"].shape[1]),
        "out_channels": int(state["conv_out.weight"].shape[0]),
        "block_out_channels": channels,
        "layers_per_block": _count(state, r"down_blocks\.0\.resnets\.(\d+)\."),
        "attention_levels": attention,
        "num_heads": heads,
        "cross_attention_dim": int(context[0]) if context else base["cross_attention_dim"],
        "transformer_layers_per_block": transformer_layers,
        "use_linear_projection": bool(proj_in) and proj_in[0].ndim == 2,
    }


def _vae_config(state: dict, base: dict) -> dict:
    levels = _count(state, r"encoder\.down_blocks\.(\d+)\.")
    return {
        **base,
        "in_channels": int(state["encoder.conv_in.weight"].shape[1]),
        "out_channels": int(state["decoder.conv_out.weight"].shape[0]),
        "latent_channels": int(state["post_quant_conv.weight"].shape[0]),
        "block_out_channels": tuple(
            int(state[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0])
            for i in range(levels)
        ),
        "layers_per_block": _count(state, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."),
    }


def _text_config(state: dict, base: dict) -> dict:
    prefix = diffusers_io.TEXT_ENCODER_PREFIX
    vocab, hidden = state[prefix + "embeddings.token_embedding.weight"].shape
    head_width = base["hidden_dim"] // base["num_heads"]  # 64 in both SD 1.x and 2.x
    return {
        **base,
        "vocab_size": int(vocab),
        "max_length": int(state[prefix + "embeddings.position_embedding.weight"].shape[0]),
        "hidden_dim": int(hidden),
        "num_layers": _count(state, rf"{re.escape(prefix)}encoder\.layers\.(\d+)\."),
        "num_heads": max(1, int(hidden) // head_width),
        "intermediate_dim": int(state[prefix + "encoder.layers.0.mlp.fc1.weight"].shape[0]),
    }


def _sd2_prediction_type(path: Path, in_channels: int) -> str:
    # The weights do not say whether a 2.x UNet predicts noise or velocity. The 768 px
    # models (2.0-v, 2.1) predict v; the 512 px base and inpainting models predict
    # noise, and their release files say so ("512-base-ema", "v2-1_512-ema-pruned").
    name = path.name.lower()
    if in_channels != 4 or "512" in name or "base" in name:
        return "epsilon"
    return "v_prediction"


def _merge(config: dict, overrides: dict) -> dict:
    unknown = sorted(set(overrides) - set(presets.COMPONENTS))
    if unknown:
        raise TypeError(
            f"unexpected keyword arguments {unknown}; component overrides are dicts named "
            f"{list(presets.COMPONENTS)}."
        )
    for component, values in overrides.items():
        if not isinstance(values, dict):
            raise TypeError(
                f"{component}= must be a dict of constructor arguments; got {values!r}."
            )
        config[component] = {**config[component], **values}
    return config


def _single_file(path: Path, use_ema: bool, config, prediction_type):
    """(diffusers-layout parts, model config, prediction type) of a CompVis file."""
    source = str(path)
    state = diffusers_folder.read_weights_file(path)
    _check_compvis(state, source)
    with refusing(source, _NOT_SD):
        variant = detect_variant(state)
        parts = compvis_to_diffusers(state, use_ema=use_ema)
    if config is None and variant["version"] == "sd2":
        prediction_type = prediction_type or _sd2_prediction_type(path, variant["unet_in_channels"])
        config = "sd2" if prediction_type == "v_prediction" else "sd2-base"
    config = presets.resolve_model_config(config or "sd1")
    with refusing(source, _NOT_SD):
        config["unet"] = _unet_config(parts["unet"], config["unet"])
        config["vae"] = _vae_config(parts["vae"], config["vae"])
        config["text_encoder"] = _text_config(parts["text_encoder"], config["text_encoder"])
    return parts, config, prediction_type


def _select(state: dict, prefixes: tuple) -> dict:
    return {k: v for k, v in state.items() if k.startswith(prefixes)}


def component_states(parts: dict) -> list:
    """`(StableDiffusion attribute, state dict, key prefix, ignored key suffixes)` for each
    model, from diffusers-layout `parts`, in the order the models are filled."""
    text, vae_state = parts["text_encoder"], parts["vae"]
    prefix = diffusers_io.TEXT_ENCODER_PREFIX
    prefix = prefix if any(k.startswith(prefix) for k in text) else ""
    decoder_state = _select(vae_state, diffusers_io.VAE_DECODER_PREFIXES)
    # The encoder also gets every stray VAE key, so they are reported as unexpected.
    encoder_state = {k: v for k, v in vae_state.items() if k not in decoder_state}
    return [
        ("text_encoder", text, prefix, diffusers_io.TEXT_ENCODER_IGNORED),
        ("diffusion_model", parts["unet"], "", ()),
        ("decoder", decoder_state, "", ()),
        ("image_encoder", encoder_state, "", ()),
    ]


def _load_models(config: dict, parts: dict, source: str, policy: str) -> dict:
    """Build the models under the dtype policy `policy` and stream `parts`
    (diffusers-layout state dicts) into them.

    The tensors are read and converted in a worker that starts before the build (see
    `prefetch`), in the order the variables are filled.
    """
    order = component_states(parts)
    for _, state, key_prefix, ignore in order:
        check_stored_weights(select_entries(state, key_prefix, ignore), source)
    dtypes = precision.variable_dtypes(config, policy)
    with Prefetch([s[1:] for s in order], [dtypes[s[0]] for s in order]) as prefetch:
        models = deferred.build_models_deferred(config, source, policy)
        try:
            pairs = [
                pair
                for attr, state, key_prefix, ignore in order
                for pair in transpose.match_torch_state(
                    models[attr], state, source, key_prefix, ignore, prefetch.take
                )
            ]
        except CheckpointError as err:
            deferred.forget_deferred(models.values())
            raise CheckpointError(
                f"{err} The architecture was inferred from the weights and the detected SD "
                "version; pass config=... or a component override (e.g. unet={...}) for "
                "values weights cannot show (attention heads, GroupNorm groups)."
            ) from None
        deferred.initialize_deferred(models.values(), pairs)
    return models


@deferred.paused_gc()
def checkpoint_kwargs(
    path,
    *,
    config=None,
    prediction_type: str | None = None,
    img_size: int | None = None,
    img_width: int | None = None,
    img_height: int | None = None,
    use_ema: bool = False,
    dtype: str | None = None,
    **overrides,
) -> dict:
    """Load a Stable Diffusion 1.x/2.x checkpoint: the `StableDiffusion(...)` arguments
    (config, default image size and the components with the checkpoint's weights).

    `StableDiffusion.from_checkpoint` is the usual entry point; this function is the
    file-reading half of it, for code that builds its own pipeline class.

    Reads CompVis single files (`.safetensors`, `.ckpt`, `.pt`, `.bin`; pickles through
    the safe unpickler, so nothing in the file can run), diffusers folders (configs from
    their json files), KerasCV `.h5` weights (a list of files or a folder of them) and
    keras-layout files written by `save_checkpoint(..., layout="keras")` (the fastest to
    load: mapped, nothing converted). No torch import is needed.

    Args:
        path: a single file, a diffusers folder, a KerasCV `.h5` file, or a list of
            KerasCV `.h5` files.
        config: a configuration name or dict (see `keras_sd.presets`) supplying what
            the weights cannot show (attention heads, GroupNorm groups, activation).
            Default: "sd1", "sd2-base" or "sd2" (768 px, v-prediction) by the detected
            version and prediction type; a diffusers folder's json files take precedence.
        prediction_type: "epsilon" or "v_prediction". Default: from the folder's scheduler
            config; for single files "epsilon" for SD 1.x and SD 2.x files named 512/base
            or with a 9-channel UNet, else "v_prediction" (the 2.x 768 models).
        img_size: default square image size. Default: 768 for v-prediction SD 2.x, the
            UNet's `sample_size` for diffusers folders, else 512.
        img_width, img_height: override `img_size` per side.
        use_ema: take the UNet from the file's `model_ema.*` copy (single files).
        dtype: the models' dtype policy: None, "float32", "float16", "bfloat16",
            "mixed_float16" or "mixed_bfloat16". None follows the global Keras policy,
            except that a mixed policy loads the weights in its compute dtype (float16
            or bfloat16 variables: half the memory, for inference); "mixed_*" keeps
            float32 variables with low-precision compute, which training needs. See
            `keras_sd.weights.precision`.
        **overrides: per-component dicts of constructor arguments applied last, e.g.
            `unet={"num_heads": 2}`, `scheduler={"timestep_spacing": "trailing"}`.

    Returns:
        A dict with "config", "img_width", "img_height" and the components
        "text_encoder", "diffusion_model", "decoder", "image_encoder" (variables in the
        variable dtype of the policy `dtype` selects, whatever the file stores) and, for
        files that store one, "tokenizer".

    Raises:
        FileNotFoundError: `path` does not exist.
        UnsafeCheckpointError: a pickle-based file holds objects other than tensors.
        CheckpointError: the file is not an SD 1.x/2.x checkpoint, a folder lacks a
            component, or the weights do not fit the model (names every mismatch).
        ValueError: a truncated or unreadable file, or invalid arguments.

    Example:
    >>> parts = checkpoint_kwargs("v1-5-pruned-emaonly.safetensors")  # doctest: +SKIP
    >>> sd = StableDiffusion(**parts)  # doctest: +SKIP
    """
    policy = precision.load_policy(dtype)
    if isinstance(path, (list, tuple)) or str(path).lower().endswith(".h5"):
        return keras_cv.keras_cv_checkpoint_kwargs(
            path, img_width=img_width or img_size, img_height=img_height or img_size, dtype=dtype
        )
    if prediction_type not in (None, "epsilon", "v_prediction"):
        raise ValueError(
            f"prediction_type must be 'epsilon' or 'v_prediction'; received {prediction_type!r}."
        )
    path = Path(path)
    folder_size = None
    if path.is_dir() and not (path / "unet").is_dir() and any(path.glob("*.h5")):
        return checkpoint_kwargs(
            sorted(path.glob("*.h5")),
            img_size=img_size,
            img_width=img_width,
            img_height=img_height,
            dtype=dtype,
        )
    if native.is_keras_layout(path) or bundle.is_bundle(path):
        if config is not None or overrides or use_ema:
            raise ValueError(
                f"{path} is a keras-layout checkpoint, which stores its own config; "
                "config=, use_ema= and component overrides do not apply to it."
            )
        size = {"img_width": img_width or img_size, "img_height": img_height or img_size}
        read = native.keras_layout_kwargs if native.is_keras_layout(path) else bundle.bundle_kwargs
        return read(path, prediction_type=prediction_type, policy=policy, **size)
    if path.is_dir():
        parts, configs = diffusers_folder.read_folder(path)
        config, folder_size = diffusers_folder.model_config(configs, config or "sd1", str(path))
    elif path.is_file():
        parts, config, prediction_type = _single_file(path, use_ema, config, prediction_type)
    else:
        raise FileNotFoundError(f"no checkpoint file or folder at {path}")
    if prediction_type is not None:
        config["scheduler"] = {**config["scheduler"], "prediction_type": prediction_type}
    config = _merge(config, overrides)
    models = _load_models(config, parts, str(path), policy)
    v_prediction = config["scheduler"].get("prediction_type") == "v_prediction"
    default_height, default_width = folder_size or (768 if v_prediction else 512,) * 2
    return {
        "config": config,
        "img_width": img_width or img_size or default_width,
        "img_height": img_height or img_size or default_height,
        **models,
    }


# ----------------------------------------------------------------------- saving
def export_parts_lazy(models: dict) -> dict:
    """Diffusers-layout state dicts of `{StableDiffusion attribute: model}`, read lazily.

    Example:
    >>> from keras_sd import StableDiffusion
    >>> sd = StableDiffusion(32, 32, config="tiny")
    >>> names = ("diffusion_model", "image_encoder", "decoder", "text_encoder")
    >>> sorted(export_parts_lazy({n: getattr(sd, n) for n in names}))
    ['text_encoder', 'unet', 'vae']
    """
    return {
        "unet": transpose.export_lazy(models["diffusion_model"]),
        "vae": {
            **transpose.export_lazy(models["image_encoder"]),
            **transpose.export_lazy(models["decoder"]),
        },
        "text_encoder": transpose.export_lazy(
            models["text_encoder"], diffusers_io.TEXT_ENCODER_PREFIX
        ),
    }


def _text_layout(sd) -> str:
    # OpenCLIP towers (SD 2.x) use exact GELU, OpenAI CLIP (SD 1.x) quick_gelu.
    return "sd2" if sd.text_encoder.get_config()["activation"] == "gelu" else "sd1"


def save_checkpoint(sd, path, layout: str = "compvis", dtype: str | None = None) -> None:
    """Write a `StableDiffusion`'s weights as a CompVis single file or a diffusers folder.

    Tensors are written one at a time (memory stays near the model's own size) to
    a temporary name that replaces the target only when complete; a folder too is
    written whole under a temporary name first (`keras_sd.weights.atomic`), so an
    interrupted write leaves the previous folder or file as it was.

    Args:
        sd: a `StableDiffusion`.
        path: the `.safetensors` file ("compvis") or the folder ("diffusers") to write.
        layout: "compvis" (the keys of the original SD releases; SD 2.x text encoders in
            the OpenCLIP layout), "diffusers" (`unet/`, `vae/`, `text_encoder/`,
            `tokenizer/`, `scheduler/` with json configs and `model_index.json`) or
            "keras" (a `.safetensors` file in keras-sd's own layout with its config:
            read only by keras-sd, and loaded fastest; see `keras_sd.weights.native`).
        dtype: None keeps the variables' dtype; "float16" or "float32" converts.

    Example:
    >>> save_checkpoint(sd, "model.safetensors")  # doctest: +SKIP
    >>> save_checkpoint(sd, "model-keras.safetensors", layout="keras")  # doctest: +SKIP
    >>> save_checkpoint(sd, "sd-folder", layout="diffusers", dtype="float16")  # doctest: +SKIP
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}; received {layout!r}.")
    if dtype not in (None, "float16", "float32"):
        raise ValueError(f"dtype must be None, 'float16' or 'float32'; received {dtype!r}.")
    path = Path(path)
    if layout == "keras":  # the variables as they are, no PyTorch-layout export
        native.save_keras_layout(sd, path, dtype)
        return
    parts = export_parts_lazy({c: getattr(sd, c) for c in COMPONENTS})
    if layout == "diffusers":
        atomic.write_folder(
            path, lambda folder: diffusers_folder.write_folder(sd, folder, parts, dtype)
        )
    elif path.suffix.lower() != ".safetensors":
        raise ValueError(f"a compvis checkpoint is written as .safetensors; received {path}.")
    else:
        safetensors_io.write_safetensors(path, diffusers_to_compvis(parts, _text_layout(sd)), dtype)


__all__ = ["checkpoint_kwargs", "export_parts_lazy", "save_checkpoint"]
