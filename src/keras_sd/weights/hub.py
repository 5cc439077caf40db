"""Named Stable Diffusion releases, downloaded from the Hugging Face Hub and cached.

`huggingface_hub.hf_hub_download` does the downloading: resumable, atomic (a
partial file is renamed into the cache only when complete), with a progress bar,
and offline it reuses the cache. A preset whose file is neither cached nor
downloadable fails with one message naming the file, the repository and how to
supply it.
"""

from __future__ import annotations

from pathlib import Path

from keras_sd.presets import HUB_PRESETS as PRESETS
from keras_sd.weights.checkpoint import checkpoint_kwargs


class PresetUnavailableError(FileNotFoundError):
    """A preset's weights are not in the cache and cannot be downloaded now.

    Example:
    >>> issubclass(PresetUnavailableError, FileNotFoundError)  # one `except` for both
    True
    """


def _check_name(name: str) -> dict:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; hub presets: {sorted(PRESETS)}.")
    return PRESETS[name]


def _unavailable(name: str, sources, cache_dir, reasons: list[str]) -> PresetUnavailableError:
    from huggingface_hub import constants

    repo, filename = sources[0]
    cache = cache_dir or constants.HF_HUB_CACHE
    command = f"hf download {repo} {filename}" + (f" --cache-dir {cache_dir}" if cache_dir else "")
    return PresetUnavailableError(
        f"Preset {name!r} needs the file {filename} from the Hugging Face repository {repo}, "
        f"which is not in the cache ({cache}) and could not be downloaded: {'; '.join(reasons)}. "
        f"Run `{command}` where there is network access (and copy the cache folder here), or "
        f"get {filename} any other way and load it with "
        f"StableDiffusion.from_checkpoint('path/to/{filename}')."
    )


def download_preset(name: str, cache_dir=None, token=None, local_files_only: bool = False) -> Path:
    """Path of a preset's checkpoint file in the cache, downloading it if needed.

    Args:
        name: a key of `PRESETS`.
        cache_dir: the Hugging Face cache to use (default: `HF_HUB_CACHE`,
            ~/.cache/huggingface/hub).
        token: a Hugging Face token for gated repositories (default: the one stored
            by `hf auth login`, or `HF_TOKEN`).
        local_files_only: never touch the network (also implied by `HF_HUB_OFFLINE=1`).

    Raises:
        ValueError: an unknown preset name.
        PresetUnavailableError: not cached and not downloadable (offline, no network,
            a gated repository without access); the message says how to supply it.

    Example:
    >>> download_preset("sd-v1-5")  # doctest: +SKIP
    PosixPath('/root/.cache/huggingface/hub/models--stable-diffusion-v1-5--.../v1-5-pruned-emaonly.safetensors')
    """
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError

    sources = _check_name(name)["sources"]
    offline = local_files_only or constants.is_offline_mode()
    reasons = []
    for repo, filename in sources:
        try:
            return Path(
                hf_hub_download(
                    repo, filename, cache_dir=cache_dir, token=token, local_files_only=offline
                )
            )
        except LocalEntryNotFoundError:
            why = "offline mode (HF_HUB_OFFLINE or local_files_only)" if offline else "no network"
            reasons.append(f"{repo}: {why}")
        except GatedRepoError:
            reasons.append(
                f"{repo} is gated: accept its license on huggingface.co and log in "
                "(`hf auth login`) or pass token="
            )
        except (HfHubHTTPError, OSError) as err:
            reasons.append(f"{repo}: {str(err).splitlines()[0]}")
    raise _unavailable(name, sources, cache_dir, reasons) from None


def preset_kwargs(
    name: str, cache_dir=None, *, token=None, local_files_only: bool = False, **kwargs
) -> dict:
    """The `StableDiffusion(...)` arguments for a named release's weights (downloaded
    once, then cached): its config, default image size and loaded components.

    Args:
        name: one of `PRESETS`: "sd-v1-4", "sd-v1-5", "sd-v1-5-inpainting",
            "sd-v2-1-base", "sd-v2-1".
        cache_dir, token, local_files_only: as for `download_preset`.
        **kwargs: passed to `checkpoint_kwargs` (`img_width`, `config`, ...), over
            the preset's own settings (prediction type, image size).

    Example:
    >>> sd = StableDiffusion(**preset_kwargs("sd-v1-5"))  # doctest: +SKIP
    """
    settings = dict(_check_name(name)["load"])
    if "img_width" in kwargs or "img_height" in kwargs:
        settings.pop("img_size")
    path = download_preset(name, cache_dir, token=token, local_files_only=local_files_only)
    return checkpoint_kwargs(path, **{**settings, **kwargs})


__all__ = ["PRESETS", "PresetUnavailableError", "download_preset", "preset_kwargs"]
