import json

import pytest

from malaria_screen.config import TrainConfig


def test_round_trip(tmp_path):
    cfg = TrainConfig(model="bn_cnn", input_size=50, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6), lr=1e-3, scheduler="plateau")
    p = tmp_path / "config.json"
    cfg.to_json(p)
    back = TrainConfig.from_json(p)
    assert back == cfg
    assert json.loads(p.read_text())["class_names"] == ["Parasitized", "Uninfected"]
    assert back.positive_index == 0 and back.num_classes == 2


def test_validation():
    with pytest.raises(ValueError, match="scheduler"):
        TrainConfig(scheduler="cosine")
    with pytest.raises(ValueError, match="threshold"):
        TrainConfig(threshold=1.5)
    with pytest.raises(ValueError, match="unknown config keys"):
        TrainConfig.from_dict({"modle": "x"})
    assert TrainConfig(class_names=("a", "b", "c")).positive_index is None
    with pytest.raises(ValueError, match="color_jitter"):
        TrainConfig(color_jitter=1.2)
    with pytest.raises(ValueError, match="color_augment"):
        TrainConfig(color_augment="hsv")
    assert TrainConfig(color_augment="hed", hed_sigma=0.2).hed_sigma == 0.2
    with pytest.raises(ValueError, match="hed_sigma"):
        TrainConfig(hed_sigma=1.0)
    assert TrainConfig(color_augment="hed", blur_sigma=1.5).blur_sigma == 1.5
    with pytest.raises(ValueError, match="blur_sigma must be"):
        TrainConfig(color_augment="hed", blur_sigma=5.0)
    with pytest.raises(ValueError, match="blur_sigma needs color_augment='hed'"):
        TrainConfig(blur_sigma=1.0)
    with pytest.raises(ValueError, match="extra_negatives"):
        TrainConfig(extra_negative_fields=("1",))
    with pytest.raises(ValueError, match="synthetic_positives needs extra_negatives"):
        TrainConfig(synthetic_positives=0.5)
    with pytest.raises(ValueError, match=r"synthetic_positives must be in \[0, 1\]"):
        TrainConfig(extra_negatives="x", synthetic_positives=1.5)
    assert TrainConfig(mixstyle=0.5).mixstyle_layers == ("features.0", "features.2")
    with pytest.raises(ValueError, match=r"mixstyle must be in \[0, 1\]"):
        TrainConfig(mixstyle=1.5)


def test_config_without_new_keys_loads_with_defaults(tmp_path):
    """Runs saved before a field existed (the bundled model's config.json) still load."""
    d = TrainConfig().to_dict()
    del d["color_jitter"], d["color_augment"]
    cfg = TrainConfig.from_dict(d)
    assert cfg.color_jitter == 0.1 and cfg.color_augment == "jitter"
