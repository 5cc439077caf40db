"""Named configurations and presets: plain data, checked before anything is built."""

import os

import pytest

from keras_sd import presets


def test_named_configs_are_independent_copies():
    first = presets.resolve_model_config("sd1")
    first["unet"]["in_channels"] = 9
    assert presets.resolve_model_config("sd1")["unet"]["in_channels"] == 4
    assert sorted(first) == sorted(presets.COMPONENTS)


@pytest.mark.parametrize(
    "config, error, needle",
    [
        ("sd9", ValueError, "config must be one of"),
        (["sd1"], TypeError, "config must be a name or a dict"),
        ({"unet": {}}, ValueError, "missing"),
        ({**presets.resolve_model_config("tiny"), "extra": {}}, ValueError, "unknown"),
    ],
)
def test_bad_configs_name_the_problem(config, error, needle):
    with pytest.raises(error, match=needle):
        presets.resolve_model_config(config)


def test_preset_names_cover_bundled_and_hub_presets():
    names = presets.preset_names()
    assert set(presets.BUNDLED_PRESETS) <= set(names)
    assert set(presets.HUB_PRESETS) <= set(names)
    assert names == sorted(names)


def test_bundled_preset_file_ships_with_the_package():
    path = presets.bundled_preset_path("tiny-shapes")
    assert os.path.isfile(path) and os.path.getsize(path) > 1_000_000
    with pytest.raises(ValueError, match="not a bundled preset"):
        presets.bundled_preset_path("sd-v1-5")


@pytest.mark.parametrize("name", sorted(presets.HUB_PRESETS))
def test_hub_presets_say_where_and_how_to_load(name):
    entry = presets.HUB_PRESETS[name]
    assert entry["description"]
    assert entry["sources"] and all(len(s) == 2 for s in entry["sources"])
    assert all(f.endswith((".safetensors", ".ckpt")) for _, f in entry["sources"])
    assert entry["load"]["prediction_type"] in ("epsilon", "v_prediction")
    assert entry["load"]["img_size"] in (512, 768)
