"""Read diffusers-layout weights (the `unet`, `vae`, `text_encoder` state dicts).

Our models name their layers after the diffusers/transformers modules, so each
component loads with one `load_state_dict` call; the VAE state dict is split
between our separate encoder and decoder models by key prefix.
"""

from __future__ import annotations

from keras_sd.weights.state_dict import CheckpointError, export_state_dict, load_state_dict

# Buffers that some transformers versions save next to the weights.
TEXT_ENCODER_IGNORED = ("position_ids",)
TEXT_ENCODER_PREFIX = "text_model."
VAE_ENCODER_PREFIXES = ("encoder.", "quant_conv.")
VAE_DECODER_PREFIXES = ("decoder.", "post_quant_conv.")


def _select(state_dict: dict, prefixes: tuple[str, ...]) -> dict:
    return {k: v for k, v in state_dict.items() if k.startswith(prefixes)}


def load_unet(unet, state_dict: dict) -> None:
    """Load a diffusers `UNet2DConditionModel` state dict into a keras-sd `UNet`."""
    load_state_dict(unet, state_dict)


def load_vae(encoder, decoder, state_dict: dict) -> None:
    """Load a diffusers `AutoencoderKL` state dict into `VAEEncoder`/`VAEDecoder`.

    Either model may be None to load only the other half.
    """
    known = VAE_ENCODER_PREFIXES + VAE_DECODER_PREFIXES
    stray = sorted(k for k in state_dict if not k.startswith(known))
    if stray:
        raise CheckpointError(
            f"VAE state dict has {len(stray)} unexpected keys: {', '.join(stray[:8])}"
        )
    if encoder is not None:
        load_state_dict(encoder, _select(state_dict, VAE_ENCODER_PREFIXES))
    if decoder is not None:
        load_state_dict(decoder, _select(state_dict, VAE_DECODER_PREFIXES))


def load_text_encoder(text_encoder, state_dict: dict) -> None:
    """Load a transformers `CLIPTextModel` state dict into a keras-sd `CLIPTextEncoder`.

    Files on disk (and transformers 4 models) prefix every key with `text_model.`;
    live transformers 5 models do not. Both are accepted.
    """
    prefixed = any(k.startswith(TEXT_ENCODER_PREFIX) for k in state_dict)
    load_state_dict(
        text_encoder,
        state_dict,
        prefix=TEXT_ENCODER_PREFIX if prefixed else "",
        ignore=TEXT_ENCODER_IGNORED,
    )


def load_components(sd, unet=None, vae=None, text_encoder=None) -> None:
    """Load any of the three diffusers state dicts into a `StableDiffusion`.

    Example:
    >>> load_components(sd, unet=pipe.unet.state_dict(), vae=pipe.vae.state_dict(),
    ...                 text_encoder=pipe.text_encoder.state_dict())  # doctest: +SKIP
    """
    if unet is not None:
        load_unet(sd.diffusion_model, unet)
    if vae is not None:
        load_vae(sd.image_encoder, sd.decoder, vae)
    if text_encoder is not None:
        load_text_encoder(sd.text_encoder, text_encoder)


def export_components(sd) -> dict[str, dict]:
    """The inverse of `load_components`: diffusers-layout numpy state dicts.

    Example:
    >>> from keras_sd import StableDiffusion
    >>> parts = export_components(StableDiffusion(32, 32, config="tiny"))
    >>> sorted(parts), "conv_in.weight" in parts["unet"]
    (['text_encoder', 'unet', 'vae'], True)
    """
    vae = export_state_dict(sd.image_encoder)
    vae.update(export_state_dict(sd.decoder))
    return {
        "unet": export_state_dict(sd.diffusion_model),
        "vae": vae,
        "text_encoder": export_state_dict(sd.text_encoder, prefix=TEXT_ENCODER_PREFIX),
    }
