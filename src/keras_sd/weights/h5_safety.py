"""HDF5 files are data: nothing in one may make us read another file or allocate more
than the file can hold."""

from __future__ import annotations

from pathlib import Path

from keras_sd.weights.state_dict import CheckpointError


def check_links(f, path: str) -> None:
    """Refuse HDF5 features that read outside the file or beyond its size: external and
    soft links, external raw storage, virtual datasets, data larger than the file holds.

    Example:
    >>> import os, tempfile, h5py
    >>> path = os.path.join(tempfile.mkdtemp(), "w.h5")
    >>> with h5py.File(path, "w") as f:
    ...     f["kernel"] = h5py.ExternalLink("/etc/passwd", "/")
    >>> with h5py.File(path, "r") as f:
    ...     check_links(f, path)
    Traceback (most recent call last):
    ...
    keras_sd.weights.state_dict.CheckpointError: ...'kernel' is a ExternalLink; only data...
    """
    import h5py

    limit = Path(path).stat().st_size * 1100  # deflate expands at most ~1032-fold

    # h5py cannot raise through its visit callback: a returned message stops the walk.
    def problem(name, link):
        if not isinstance(link, h5py.HardLink):
            return f"{name!r} is a {type(link).__name__}"
        item = f.get(name)
        if isinstance(item, h5py.Dataset):
            if item.external or item.is_virtual:
                return f"dataset {name!r} stores its data in other files"
            if item.size * item.dtype.itemsize > limit:
                return f"dataset {name!r} claims more data than the file can hold"
        return None

    found = f.visititems_links(problem)
    if found:
        raise CheckpointError(f"{path}: {found}; only data stored in the file itself is read.")
