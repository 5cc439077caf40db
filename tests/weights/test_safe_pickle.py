"""Tests for the torch-free, code-free checkpoint reader (torch only writes the files)."""

import collections
import io
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from keras_sd.weights.safe_pickle import (  # noqa: E402
    UnsafeCheckpointError,
    load_state_dict_file,
    load_torch_file,
)

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _reference_tensors():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=gen)
    shared = torch.randn(10, generator=gen)
    return {
        "f32": torch.randn(3, 5, generator=gen),
        "f16": torch.randn(4, 3, generator=gen).half(),
        "bf16": torch.randn(2, 7, generator=gen).bfloat16(),
        "f64": torch.randn(3, generator=gen).double(),
        "i64": torch.randint(-(2**40), 2**40, (5,), generator=gen),
        "i32": torch.randint(-1000, 1000, (2, 2), generator=gen, dtype=torch.int32),
        "u8": torch.randint(0, 255, (6,), generator=gen, dtype=torch.uint8),
        "bool": torch.randn(4, generator=gen) > 0,
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
        "transposed": base.T,  # strides (1, 8)
        "sliced": base[1:4, 2:7],  # storage offset 10, not contiguous
        "stepped": base[::2, 1::3],  # strides (16, 3)
        "bf16_strided": torch.randn(4, 6, generator=gen).bfloat16()[:, ::2],
        "shared_a": shared,  # same storage as the two below
        "shared_b": shared[3:8],
        "shared_c": shared.view(2, 5),
        "param": torch.nn.Parameter(torch.randn(3, 3, generator=gen)),
    }


def _expected(tensor) -> np.ndarray:
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        return tensor.float().numpy()
    return tensor.numpy()


def _assert_bit_identical(actual, tensor):
    expected = _expected(tensor)
    assert isinstance(actual, np.ndarray)
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    assert np.ascontiguousarray(actual).tobytes() == np.ascontiguousarray(expected).tobytes()


def _checkpoint():
    tensors = _reference_tensors()
    return tensors, {
        "state_dict": collections.OrderedDict(tensors),
        "global_step": 470000,
        "nested": {"list": [tensors["f32"], 1, "x"], "tuple": (tensors["i64"], 2.5)},
        "raw": b"\x00\xffbytes",
        "names": {"a", "b"},
    }


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_tensors_load_bit_identically(tmp_path, legacy):
    tensors, ckpt = _checkpoint()
    path = tmp_path / "model.ckpt"
    torch.save(ckpt, path, _use_new_zipfile_serialization=not legacy)
    assert zipfile.is_zipfile(path) != legacy

    loaded = load_torch_file(path)

    assert isinstance(loaded["state_dict"], collections.OrderedDict)
    assert list(loaded["state_dict"]) == list(tensors)
    for name, tensor in tensors.items():
        _assert_bit_identical(loaded["state_dict"][name], tensor)
    assert loaded["state_dict"]["bf16"].dtype == np.float32
    assert loaded["global_step"] == 470000
    _assert_bit_identical(loaded["nested"]["list"][0], tensors["f32"])
    assert loaded["nested"]["list"][1:] == [1, "x"]
    _assert_bit_identical(loaded["nested"]["tuple"][0], tensors["i64"])
    assert loaded["raw"] == b"\x00\xffbytes"
    assert loaded["names"] == {"a", "b"}


def test_load_state_dict_file_unwraps_and_dispatches(tmp_path):
    from safetensors.torch import save_file

    tensors, ckpt = _checkpoint()
    torch.save(ckpt, tmp_path / "model.ckpt")
    flat = {k: v.detach().contiguous() for k, v in tensors.items() if k != "empty"}
    torch.save(flat, tmp_path / "pytorch_model.bin")
    save_file({k: v.clone() for k, v in flat.items()}, tmp_path / "model.safetensors")

    for name in ("model.ckpt", "pytorch_model.bin", "model.safetensors"):
        state_dict = load_state_dict_file(tmp_path / name)
        expected = tensors if name == "model.ckpt" else flat
        assert sorted(state_dict) == sorted(expected), name
        for key, tensor in expected.items():
            _assert_bit_identical(state_dict[key], tensor)


class _Payload:
    """Runs a shell command when unpickled by an unrestricted loader."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class ModelCheckpoint:
    """Like pytorch-lightning's callback class, which SD checkpoints reference."""


@pytest.mark.parametrize("fmt", ["zip", "legacy", "plain"])
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, fmt):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.ckpt"
    ckpt = {"state_dict": {"w": torch.ones(2)}, "evil": _Payload(marker)}
    if fmt == "plain":
        path.write_bytes(pickle.dumps(_Payload(marker), protocol=2))
    else:
        torch.save(ckpt, path, _use_new_zipfile_serialization=fmt == "zip")

    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load 'posix\.system' from model"):
        load_torch_file(path)
    with pytest.raises(UnsafeCheckpointError, match="safetensors"):
        load_state_dict_file(path)
    assert not marker.exists()

    if fmt == "plain":  # control: the payload is live under an ordinary unpickler
        pickle.loads(path.read_bytes())
        assert marker.exists()


def test_non_tensor_objects_are_refused(tmp_path):
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "callbacks": {ModelCheckpoint: {}}}, path)
    with pytest.raises(UnsafeCheckpointError, match="ModelCheckpoint.*other than tensors"):
        load_torch_file(path)


def _handmade_zip(path: Path, size, storage_bytes: bytes):
    """A torch-style zip whose tensor record is written by hand (bad views)."""
    storage = object()

    class Tensor:
        def __reduce__(self):
            hooks = collections.OrderedDict()
            return (torch._utils._rebuild_tensor_v2, (storage, 0, size, (1,), False, hooks))

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if obj is storage:
                return ("storage", torch.FloatStorage, "0", "cpu", 4)
            return None

    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump({"w": Tensor()})
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", buffer.getvalue())
        archive.writestr("archive/data/0", storage_bytes)


def test_views_outside_their_storage_are_refused(tmp_path):
    path = tmp_path / "model.pt"
    _handmade_zip(path, (4,), np.arange(4, dtype=np.float32).tobytes())
    np.testing.assert_array_equal(load_torch_file(path)["w"], np.arange(4, dtype=np.float32))

    _handmade_zip(path, (100,), np.arange(4, dtype=np.float32).tobytes())
    with pytest.raises(ValueError, match="runs past its storage"):
        load_torch_file(path)
    _handmade_zip(path, (4,), b"\x00" * 8)
    with pytest.raises(ValueError, match="truncated"):
        load_torch_file(path)


@pytest.mark.parametrize("name", ["model.ckpt", "legacy.pt", "model.safetensors"])
def test_truncated_files_give_clear_errors(tmp_path, name):
    from safetensors.torch import save_file

    path = tmp_path / name
    tensors = {"w": torch.randn(64, 64)}
    if name.endswith(".safetensors"):
        save_file(tensors, path)
    else:
        torch.save(tensors, path, _use_new_zipfile_serialization=name == "model.ckpt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{name}.*truncated") as info:
        load_state_dict_file(path)
    assert not isinstance(info.value, UnsafeCheckpointError)
    assert info.value.__cause__ is None


def test_random_bytes_and_missing_files(tmp_path):
    path = tmp_path / "noise.ckpt"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match="noise.ckpt"):
        load_state_dict_file(path)
    with pytest.raises(FileNotFoundError, match="absent.ckpt"):
        load_state_dict_file(tmp_path / "absent.ckpt")
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        load_torch_file(tmp_path / "absent.pt")
    with pytest.raises(ValueError, match="unsupported checkpoint extension '.h5'"):
        load_state_dict_file(tmp_path / "model.h5")


def test_reading_does_not_import_torch(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.arange(6.0).reshape(2, 3)}}, path)
    code = (
        "import sys; from keras_sd.weights.safe_pickle import load_state_dict_file; "
        f"w = load_state_dict_file({str(path)!r})['w']; "
        "assert w.tolist() == [[0, 1, 2], [3, 4, 5]], w; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    env = {**os.environ, "PYTHONPATH": SRC}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _fake_module(monkeypatch, name: str, **attrs) -> list[str]:
    """Register a throwaway module (and its parents) so pickle can record globals under
    `name`; returns the module names registered."""
    import types

    parts = name.split(".")
    names = [".".join(parts[: i + 1]) for i in range(len(parts))]
    for each in names:
        monkeypatch.setitem(sys.modules, each, types.ModuleType(each))
    for key, value in attrs.items():
        value.__module__, value.__qualname__ = name, key
        setattr(sys.modules[name], key, value)
    return names


def test_lightning_globals_become_inert_placeholders(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"

    class ModelCheckpoint:  # what sd-v1-4.ckpt keys its callback state by
        def __init__(self):
            self.dirpath = "logs"

    class Evil:  # under a lightning name, its reduce would run a command if called for real
        def __reduce__(self):
            return (type(self), (f"touch {marker}",))

        def __init__(self, command=None):
            if command:
                os.system(command)

    fakes = _fake_module(
        monkeypatch, "pytorch_lightning.callbacks.model_checkpoint", ModelCheckpoint=ModelCheckpoint
    )
    fakes += _fake_module(monkeypatch, "lightning.fabric", Evil=Evil)
    weight = torch.arange(4.0)
    path = tmp_path / "sd-v1-4.ckpt"
    torch.save(
        {
            "state_dict": {"w": weight},
            "callbacks": {ModelCheckpoint: {"best_model_score": None}},
            "instance": ModelCheckpoint(),
            "evil": Evil(),
        },
        path,
    )
    for name in fakes:
        monkeypatch.delitem(sys.modules, name)

    loaded = load_torch_file(path)

    (key,) = loaded["callbacks"]
    assert key.__name__ == "ModelCheckpoint" and key.__module__.startswith("pytorch_lightning")
    assert key is not ModelCheckpoint and loaded["callbacks"][key] == {"best_model_score": None}
    assert type(loaded["instance"]) is not ModelCheckpoint and not vars(loaded["instance"])
    assert not marker.exists()
    assert not any(m.split(".")[0] in ("pytorch_lightning", "lightning") for m in sys.modules)
    _assert_bit_identical(load_state_dict_file(path)["w"], weight)


def test_only_lightning_packages_are_inert(tmp_path, monkeypatch):
    class Callback:
        pass

    class ModelCheckpoint:
        pass

    _fake_module(monkeypatch, "pytorch_lightning_extra", Callback=Callback)
    _fake_module(monkeypatch, "pytorch_lightning.callbacks", ModelCheckpoint=ModelCheckpoint)
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "cb": Callback}, path)
    with pytest.raises(UnsafeCheckpointError, match="pytorch_lightning_extra.Callback"):
        load_torch_file(path)
    # Code execution stays refused in a file that also holds lightning metadata.
    marker = tmp_path / "pwned"
    torch.save({"cb": {ModelCheckpoint: 1}, "evil": _Payload(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match="system"):
        load_torch_file(path)
    assert not marker.exists()
