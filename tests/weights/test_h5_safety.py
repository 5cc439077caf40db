"""KerasCV `.h5` weight files are data: links, external storage and virtual datasets that
would read another file are refused before anything is read, and sizes are bounded."""

import h5py
import numpy as np
import pytest

from keras_sd import CheckpointError
from keras_sd.weights.keras_cv import read_keras_cv_h5


def _legacy_file(path, add):
    """A Keras 2 style weights file (layer_names / weight_names attributes) plus `add`."""
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [b"dense"]
        group = f.create_group("dense")
        group.attrs["weight_names"] = [b"dense/kernel:0"]
        add(f, group)


def _external_link(f, group, marker):
    group["dense/kernel:0"] = h5py.ExternalLink(str(marker), "/data")


def _soft_link(f, group, marker):
    f["elsewhere"] = np.ones(3, "float32")
    group["dense/kernel:0"] = h5py.SoftLink("/elsewhere")


def _external_storage(f, group, marker):
    group.create_dataset("dense/kernel:0", shape=(4,), dtype="f4", external=[(str(marker), 0, 16)])


def _virtual(f, group, marker):
    layout = h5py.VirtualLayout(shape=(4,), dtype="f4")
    layout[:] = h5py.VirtualSource(str(marker), "data", shape=(4,))
    group.create_virtual_dataset("dense/kernel:0", layout)


def _huge(f, group, marker):
    group.create_dataset("dense/kernel:0", shape=(10**12,), dtype="f4", chunks=(1024,))


@pytest.mark.parametrize(
    "add",
    [_external_link, _soft_link, _external_storage, _virtual, _huge],
    ids=lambda f: f.__name__.strip("_"),
)
def test_h5_reaching_outside_the_file_is_refused(tmp_path, add):
    marker = tmp_path / "outside" / "marker.h5"
    marker.parent.mkdir()
    with h5py.File(marker, "w") as f:
        f["data"] = np.arange(4, dtype="float32")
    path = tmp_path / "weights.h5"
    _legacy_file(path, lambda f, group: add(f, group, marker))
    with pytest.raises(CheckpointError, match="only data stored in the file itself"):
        [np.asarray(w) for w in read_keras_cv_h5(path)]


def test_plain_legacy_h5_still_reads(tmp_path):
    path = tmp_path / "weights.h5"
    value = np.arange(6, dtype="float32").reshape(2, 3)
    _legacy_file(path, lambda f, group: group.create_dataset("dense/kernel:0", data=value))
    (weights,) = read_keras_cv_h5(path)
    np.testing.assert_array_equal(
        np.asarray(weights.load() if hasattr(weights, "load") else weights), value
    )
