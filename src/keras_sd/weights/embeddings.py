"""Textual-inversion embedding files: read the layouts people share, write diffusers' and
AUTOMATIC1111's.

| layout | file | contents |
|---|---|---|
| diffusers | `learned_embeds.safetensors` / `.bin` | `{token: [D] or [N, D]}` |
| AUTOMATIC1111 | `.pt` (torch pickle) | `{"string_to_param": {"*": [N, D]}, "name": ..., ...}` |
| AUTOMATIC1111 | `.safetensors` | `{"emb_params": [N, D]}` (the token is the file's stem) |

Pickled files go through `keras_sd.weights.safe_pickle`, which rebuilds tensors and plain
containers only, so no code in the file runs. Vectors are returned exactly as stored
(float16 files stay float16 until the caller casts them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from keras_sd.weights.safe_pickle import load_torch_file
from keras_sd.weights.safetensors_io import read_safetensors, write_safetensors

LAYOUTS = ("diffusers", "a1111")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_SUFFIXES = (".safetensors", *_PICKLE_SUFFIXES)
# AUTOMATIC1111 keys its vectors by this placeholder in `string_to_param`.
_A1111_KEY = "*"


def _vectors(value, path, key: str) -> np.ndarray:
    array = np.asarray(value)
    if array.ndim == 1:  # diffusers writes one-vector tokens as [D]
        array = array[None]
    if array.ndim != 2 or array.dtype.kind != "f" or not array.size:
        raise ValueError(
            f"{path}: entry {key!r} is not an embedding (a float array [D] or [N, D]); "
            f"it has shape {array.shape} and dtype {array.dtype}."
        )
    return array


def _no_embedding(path, keys) -> ValueError:
    return ValueError(
        f"{path} holds no textual-inversion embedding: expected one tensor keyed by its "
        f"token (diffusers), 'string_to_param' (AUTOMATIC1111 .pt) or 'emb_params' "
        f"(AUTOMATIC1111 .safetensors); found keys {sorted(map(str, keys))[:10]}."
    )


def read_embedding(path) -> tuple[str, np.ndarray]:
    """Read one textual-inversion embedding file in any of the layouts above.

    Args:
        path: a `.safetensors`, `.bin`, `.pt` or `.pth` file.

    Returns:
        `(token, vectors)`: the token the file names (diffusers: its key; AUTOMATIC1111:
        its `name` entry, else the file's stem) and the vectors [N, D].

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: an unsupported extension, a file that holds no embedding (or several
            diffusers tokens), or one that is not a readable checkpoint.
        keras_sd.weights.safe_pickle.UnsafeCheckpointError: a pickle naming code objects.

    Example:
    >>> token, vectors = read_embedding("learned_embeds.safetensors")  # doctest: +SKIP
    >>> token, vectors.shape  # doctest: +SKIP
    ('<cat-toy>', (1, 768))
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _SUFFIXES:
        raise ValueError(
            f"path={str(path)!r}: unsupported embedding file extension {suffix!r}; "
            f"use one of {', '.join(_SUFFIXES)}."
        )
    if suffix == ".safetensors":
        lazy, _ = read_safetensors(path)
        data = {key: tensor.read() for key, tensor in lazy.items()}
    else:
        data = load_torch_file(path)
    if "emb_params" in data:
        return path.stem, _vectors(data["emb_params"], path, "emb_params")
    if isinstance(data.get("string_to_param"), dict):
        params = data["string_to_param"]
        if _A1111_KEY not in params:
            raise _no_embedding(path, params)
        name = data.get("name")
        token = name if isinstance(name, str) and name else path.stem
        return token, _vectors(params[_A1111_KEY], path, "string_to_param")
    arrays = {k: v for k, v in data.items() if isinstance(v, np.ndarray)}
    if len(arrays) != 1 or not isinstance(next(iter(arrays)), str):
        raise _no_embedding(path, data)
    token, value = next(iter(arrays.items()))
    return token, _vectors(value, path, token)


def write_embedding(path, token: str, vectors, layout: str = "diffusers") -> None:
    """Write one embedding as a `.safetensors` file, in diffusers' or AUTOMATIC1111's layout.

    Args:
        path: the `.safetensors` file to write.
        token: the placeholder token (diffusers stores it as the key; AUTOMATIC1111 uses
            the file's stem, so name the file after the token).
        vectors: float array [N, D] (or [D]), written in its own dtype.
        layout: "diffusers" (`{token: [N, D]}`) or "a1111" (`{"emb_params": [N, D]}`).

    Example:
    >>> write_embedding("learned_embeds.safetensors", "<s1>", np.zeros((1, 768)))  # doctest: +SKIP
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not supported; use one of {LAYOUTS}.")
    if Path(path).suffix.lower() != ".safetensors":
        raise ValueError(
            f"path={str(path)!r}: embeddings are written as .safetensors only (a name "
            "ending in .safetensors); pickled .bin/.pt files are read, never written."
        )
    array = _vectors(vectors, path, token)
    key = token if layout == "diffusers" else "emb_params"
    write_safetensors(path, {key: array})


__all__ = ["LAYOUTS", "read_embedding", "write_embedding"]
