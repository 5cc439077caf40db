"""Interrupted writes leave the previous checkpoint as it was (or nothing), never a mix."""

import hashlib
import os
import subprocess

import numpy as np
import pytest

from keras_sd import StableDiffusion
from keras_sd.conversion import convert
from keras_sd.weights import atomic, diffusers_folder
from keras_sd.weights.checkpoint import save_checkpoint


def _tiny(seed: int) -> StableDiffusion:
    sd = StableDiffusion(img_width=32, img_height=32, jit_compile=False, config="tiny")
    rng = np.random.default_rng(seed)
    for variable in sd.diffusion_model.weights + sd.decoder.weights:
        variable.assign(rng.normal(0, 0.05, variable.shape).astype("float32"))
    return sd


def _digest(folder) -> dict:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


@pytest.fixture(scope="module")
def models():
    return _tiny(0), _tiny(1)


class _Fault(Exception):
    pass


def _fail_on_call(monkeypatch, module, name: str, number: int) -> None:
    original, calls = getattr(module, name), []

    def failing(*args, **kwargs):
        calls.append(args)
        if len(calls) == number:
            raise _Fault(f"injected fault in call {number} of {name}")
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, failing)


@pytest.mark.parametrize("component", [2, 3])  # after the UNet; after the UNet and the VAE
def test_fault_between_components_keeps_the_previous_folder(
    tmp_path, models, monkeypatch, component
):
    old, new = models
    target = tmp_path / "model"
    save_checkpoint(old, target, layout="diffusers")
    before = _digest(target)
    _fail_on_call(monkeypatch, diffusers_folder, "write_safetensors", component)
    with pytest.raises(_Fault):
        save_checkpoint(new, target, layout="diffusers")
    assert _digest(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]

    fresh = tmp_path / "fresh"
    monkeypatch.undo()
    _fail_on_call(monkeypatch, diffusers_folder, "write_safetensors", component)
    with pytest.raises(_Fault):
        save_checkpoint(new, fresh, layout="diffusers")
    assert not fresh.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["model"]

    monkeypatch.undo()
    convert_src = tmp_path / "new.safetensors"
    save_checkpoint(new, convert_src, layout="keras")
    convert(convert_src, target, layout="diffusers")  # what `convert --overwrite` runs
    after = _digest(target)
    assert after.keys() == before.keys()
    assert (
        after["unet/diffusion_pytorch_model.safetensors"]
        != before["unet/diffusion_pytorch_model.safetensors"]
    )
    loaded = StableDiffusion.from_checkpoint(target, config="tiny")
    for a, b in zip(loaded.decoder.weights, new.decoder.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_failed_swap_puts_the_previous_folder_back(tmp_path, monkeypatch):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.json").write_text("{}")
    _fail_on_call(monkeypatch, os, "rename", 2)  # moving the new folder into place
    with pytest.raises(_Fault):
        atomic.write_folder(target, lambda folder: (folder / "new.json").write_text("[]"))
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert [p.name for p in target.iterdir()] == ["old.json"]
    atomic.write_folder(target, lambda folder: (folder / "new.json").write_text("[]"))
    assert [p.name for p in target.iterdir()] == ["new.json"]


def test_leftovers_of_killed_writers_are_cleaned_up(tmp_path):
    dead, alive = _dead_pid(), os.getppid()  # another process that runs
    target = tmp_path / "model"
    for pid in (dead, alive):
        (tmp_path / f".model.partial-{pid}").mkdir()
        (tmp_path / f".model.partial-{pid}" / "half.safetensors").write_bytes(b"x")
        (tmp_path / f".model.safetensors.partial-{pid}").write_bytes(b"x")
    atomic.write_folder(target, lambda folder: (folder / "a.json").write_text("{}"))
    from keras_sd.weights.safetensors_io import write_safetensors

    write_safetensors(tmp_path / "model.safetensors", {"w": np.ones(2, "float32")})
    kept = [f".model.partial-{alive}", f".model.safetensors.partial-{alive}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["model", "model.safetensors", *kept]
    )
    # A writer killed between moving the old folder aside and moving the new one in.
    os.rename(target, tmp_path / f".model.old-{dead}")
    assert atomic.clean_stale(target) == []
    assert [p.name for p in target.iterdir()] == ["a.json"]
