"""The scheduler registry: names in configs, folders and calls map to classes."""

import pytest

from keras_sd.schedulers import DDIMScheduler, build_scheduler, get_scheduler, registry


def test_names_and_diffusers_class_names():
    assert type(get_scheduler("ddim")) is DDIMScheduler
    assert type(get_scheduler("DDIMScheduler")) is DDIMScheduler
    assert type(get_scheduler(None)) is DDIMScheduler
    instance = DDIMScheduler(eta=0.2)
    assert get_scheduler(instance) is instance
    with pytest.raises(ValueError, match="not an instance"):
        get_scheduler(instance, eta=0.1)
    with pytest.raises(ValueError, match="scheduler must be one of"):
        get_scheduler("no-such")
    with pytest.raises(TypeError, match="scheduler must be"):
        get_scheduler(3)


def test_build_from_config_and_rename_keeps_only_accepted_settings():
    built = build_scheduler({"class_name": "ddim", "prediction_type": "v_prediction", "eta": 0.3})
    assert built.prediction_type == "v_prediction" and built.eta == 0.3
    renamed = build_scheduler({"prediction_type": "v_prediction", "not_ddim": 1}, name="ddim")
    assert renamed.prediction_type == "v_prediction"


def test_diffusers_folder_config_maps_known_classes_and_falls_back_to_ddim():
    sd15 = {"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear", "steps_offset": 1}
    config = registry.config_from_diffusers(sd15)
    assert config["class_name"] == "ddim" and config["steps_offset"] == 1
    ddim = registry.config_from_diffusers({"_class_name": "DDIMScheduler", "clip_sample": False})
    assert ddim["class_name"] == "ddim" and ddim["clip_sample"] is False
    assert type(build_scheduler(config)) is DDIMScheduler


def test_register_refuses_non_schedulers():
    with pytest.raises(TypeError, match="Scheduler subclass"):
        registry.register_scheduler("bad", dict)
