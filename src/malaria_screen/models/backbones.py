"""ImageNet backbones from torchvision for transfer learning, built by name.

Each builder wraps a torchvision network in :class:`TransferNet`: its convolutional part split
into named **stages** (``stem``, ``stage1`` ..., ``head`` for MobileNet/EfficientNet;
``block1`` ... ``block5`` for VGG16; ``stem``, ``layer1`` ... ``layer4`` for ResNets), then
global average pooling, dropout and one new linear layer (``classifier``). The ImageNet
classifier (VGG's 4096-unit MLP, MobileNetV3's 1024-unit hidden layer) is dropped: on 64-128 px
cells the pooled features feed a small head, as in Rajaraman et al. (2018).

Models:

- ``mobilenet_v3_small``, ``mobilenet_v3_large``: Howard et al., "Searching for MobileNetV3",
  ICCV 2019.
- ``vgg16``: Simonyan & Zisserman, ICLR 2015 (the seeds' transfer-learning baseline, seed 002).
- ``resnet18``, ``resnet50``: He et al., CVPR 2016.
- ``efficientnet_b0``: Tan & Le, "EfficientNet: Rethinking Model Scaling for CNNs", ICML 2019.

No weights are downloaded. ``weights=PATH`` loads a local ImageNet file in torchvision's key
naming: ``.safetensors``, or a torch state dict read with ``torch.load(..., weights_only=True)``
(never plain pickle). The file's ImageNet classifier tensors are dropped (and listed in the log);
every other tensor must match the architecture exactly.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from malaria_screen.models.registry import register_model

__all__ = [
    "TransferNet",
    "read_state_dict",
    "load_torchvision_weights",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "vgg16",
    "resnet18",
    "resnet50",
    "efficientnet_b0",
]

log = logging.getLogger(__name__)


class TransferNet(nn.Module):
    """A backbone split into named stages, plus a pooled linear head.

    Input ``(B, in_chans, S, S)`` float32 (S >= 32); output logits ``(B, num_classes)``.

    Parameters
    ----------
    stages : OrderedDict of str to nn.Module
        Applied in order; their last output is the feature map for Grad-CAM.
    num_features : int
        Channels of the last stage.
    num_classes : int, default=2
    dropout : float, default=0.2

    Attributes
    ----------
    stages : nn.Sequential
        The backbone (frozen by ``--freeze``).
    classifier : nn.Linear
        The head (always trained).
    """

    def __init__(self, stages: "OrderedDict[str, nn.Module]", num_features: int, *, num_classes: int = 2, dropout: float = 0.2) -> None:
        super().__init__()
        self.stages = nn.Sequential(stages)
        self.num_features = num_features
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(num_features, num_classes)

    @property
    def stage_names(self) -> list[str]:
        return list(self.stages._modules)

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        """Feature maps ``(B, C_i, H_i, W_i)`` after each of :attr:`stage_names`."""
        out = []
        for m in self.stages:
            x = m(x)
            out.append(x)
        return out

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, C, S, S)`` to the last feature map ``(B, num_features, h, w)``."""
        return self.stages(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Feature map to logits ``(B, num_classes)`` (pooled ``(B, num_features)`` if ``pre_logits``)."""
        x = x.mean(dim=(2, 3))
        return x if pre_logits else self.classifier(self.dropout(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# -- weights files ------------------------------------------------------------------------------


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a weights file without unpickling arbitrary objects.

    Parameters
    ----------
    path : path
        ``.safetensors``, or a torch file (``.pth``, ``.pt``, ``.bin``) holding a state dict,
        possibly nested under ``"state_dict"`` or ``"model"``; read with ``weights_only=True``.

    Returns
    -------
    dict of str to Tensor
        A leading ``"module."`` (DataParallel) is removed from the keys.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file holds no mapping of tensors (or a pickle that ``weights_only`` refuses).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"weights file not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(p))
    else:
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError and friends: refuse, do not fall back to pickle
            raise ValueError(f"{p}: not a weights-only torch file ({type(exc).__name__}: {str(exc)[:200]})") from exc
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{p}: expected a mapping of parameter names to tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_torchvision_weights(net: nn.Module, path: str | Path, *, drop_prefixes: Sequence[str] = ("classifier.", "fc.")) -> nn.Module:
    """Load an ImageNet torchvision state dict into a torchvision model, classifier excluded.

    Parameters
    ----------
    net : nn.Module
        The torchvision model (before wrapping in :class:`TransferNet`).
    path : path
        See :func:`read_state_dict`.
    drop_prefixes : sequence of str
        Keys of the ImageNet classifier, in the file and in ``net``; dropped from both sides.

    Raises
    ------
    ValueError
        If any other key is missing from the file or not used by ``net`` (names listed), or a
        shape differs.
    """
    src = read_state_dict(path)
    dropped = sorted(k for k in src if k.startswith(tuple(drop_prefixes)))
    state = {k: v for k, v in src.items() if not k.startswith(tuple(drop_prefixes))}
    target = {k: v for k, v in net.state_dict().items() if not k.startswith(tuple(drop_prefixes))}
    missing, unexpected = sorted(set(target) - set(state)), sorted(set(state) - set(target))
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match {type(net).__name__}: missing {missing[:6]} "
                         f"({len(missing)}), unexpected {unexpected[:6]} ({len(unexpected)})")
    bad = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in target.items() if state[k].shape != v.shape]
    if bad:
        raise ValueError(f"{path}: shape mismatch: {bad[:6]}")
    net.load_state_dict(state, strict=False)  # only the dropped classifier keys are missing
    log.info("loaded %d tensors from %s; dropped the ImageNet classifier %s", len(state), path, dropped)
    return net


def _replace_first_conv(stages: "OrderedDict[str, nn.Module]", in_chans: int) -> None:
    for parent in stages.values():
        for name, mod in parent.named_modules():
            if isinstance(mod, nn.Conv2d):
                new = nn.Conv2d(in_chans, mod.out_channels, mod.kernel_size, mod.stride, mod.padding,
                                mod.dilation, mod.groups, mod.bias is not None)
                owner = parent.get_submodule(name.rpartition(".")[0]) if "." in name else parent
                setattr(owner, name.rpartition(".")[2], new)
                return


def _build(
    ctor: Callable[..., nn.Module],
    split: Callable[[nn.Module], "tuple[OrderedDict[str, nn.Module], int]"],
    *,
    num_classes: int,
    in_chans: int,
    weights: str | None,
    dropout: float,
) -> TransferNet:
    net = ctor(weights=None)
    if weights is not None:
        if weights == "imagenet":
            raise ValueError("no ImageNet weights can be downloaded here: pass weights=PATH to a local "
                             "torchvision state dict or safetensors file")
        if in_chans != 3:
            raise ValueError(f"ImageNet weights need in_chans=3, got {in_chans}")
        load_torchvision_weights(net, weights)
    else:
        # From scratch, BatchNorm running statistics must catch up within a few hundred steps:
        # torchvision's MobileNetV3/EfficientNet momentum 0.01 (tuned for long ImageNet runs)
        # leaves them far from the trained weights' statistics after a short run, and the
        # network then collapses to one class in eval mode (measured: MobileNetV3-Small, 2
        # epochs, test accuracy 0.531, all Uninfected). Use PyTorch's default 0.1 instead.
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = 0.1
    stages, num_features = split(net)
    if in_chans != 3:
        _replace_first_conv(stages, in_chans)
    return TransferNet(stages, num_features, num_classes=num_classes, dropout=dropout)


def _slices(features: nn.Sequential, bounds: Sequence[tuple[str, int, int]]) -> "OrderedDict[str, nn.Module]":
    return OrderedDict((name, nn.Sequential(*[features[i] for i in range(a, b)])) for name, a, b in bounds)


def _split_mnv3_small(m: nn.Module):
    b = [("stem", 0, 1), ("stage1", 1, 2), ("stage2", 2, 4), ("stage3", 4, 9), ("stage4", 9, 12), ("head", 12, 13)]
    return _slices(m.features, b), 576


def _split_mnv3_large(m: nn.Module):
    b = [("stem", 0, 1), ("stage1", 1, 2), ("stage2", 2, 4), ("stage3", 4, 7), ("stage4", 7, 13), ("stage5", 13, 16), ("head", 16, 17)]
    return _slices(m.features, b), 960


def _split_effnet_b0(m: nn.Module):
    b = [("stem", 0, 1)] + [(f"stage{i}", i, i + 1) for i in range(1, 8)] + [("head", 8, 9)]
    return _slices(m.features, b), 1280


def _split_vgg16(m: nn.Module):
    b = [("block1", 0, 5), ("block2", 5, 10), ("block3", 10, 17), ("block4", 17, 24), ("block5", 24, 31)]
    return _slices(m.features, b), 512


def _split_resnet(m: nn.Module):
    stages = OrderedDict(stem=nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool),
                         layer1=m.layer1, layer2=m.layer2, layer3=m.layer3, layer4=m.layer4)
    return stages, m.fc.in_features


def _tv(name: str) -> Callable[..., nn.Module]:
    import torchvision.models as tvm

    return getattr(tvm, name)


_DOC = """{title}, as a :class:`TransferNet`.

    Parameters
    ----------
    num_classes : int, default=2
    input_size : int, default={size}
        Not used by the network (fully convolutional, global pooling); S >= 32.
    in_chans : int, default=3
        Other values replace the first convolution (randomly initialised; no weights allowed).
    weights : str, optional
        Path to local ImageNet weights in torchvision naming (see :func:`load_torchvision_weights`).
    dropout : float, default=0.2

    Raises
    ------
    ValueError
        If ``weights`` does not match the architecture, is ``"imagenet"`` (nothing is downloaded),
        or is combined with ``in_chans != 3``.
    """


@register_model(default_input_size=128)
def mobilenet_v3_small(*, num_classes: int = 2, input_size: int = 128, in_chans: int = 3, weights: str | None = None, dropout: float = 0.2) -> TransferNet:
    del input_size
    return _build(_tv("mobilenet_v3_small"), _split_mnv3_small, num_classes=num_classes, in_chans=in_chans, weights=weights, dropout=dropout)


@register_model(default_input_size=128)
def mobilenet_v3_large(*, num_classes: int = 2, input_size: int = 128, in_chans: int = 3, weights: str | None = None, dropout: float = 0.2) -> TransferNet:
    del input_size
    return _build(_tv("mobilenet_v3_large"), _split_mnv3_large, num_classes=num_classes, in_chans=in_chans, weights=weights, dropout=dropout)


@register_model(default_input_size=128)
def vgg16(*, num_classes: int = 2, input_size: int = 128, in_chans: int = 3, weights: str | None = None, dropout: float = 0.2) -> TransferNet:
    del input_size
    return _build(_tv("vgg16"), _split_vgg16, num_classes=num_classes, in_chans=in_chans, weights=weights, dropout=dropout)


@register_model(default_input_size=128)
def resnet18(*, num_classes: int = 2, input_size: int = 128, in_chans: int = 3, weights: str | None = None, dropout: float = 0.0) -> TransferNet:
    del input_size
    return _build(_tv("resnet18"), _split_resnet, num_classes=num_classes, in_chans=in_chans, weights=weights, dropout=dropout)


@register_model(default_input_size=128)
def resnet50(*, num_classes: int = 2, input_size: int = 128, in_chans: int = 3, weights: str | None = None, dropout: float = 0.0) -> TransferNet:
    del input_size
    return _build(_tv("resnet50"), _split_resnet, num_classes=num_classes, in_chans=in_chans, weights=weights, dropout=dropout)


@register_model(default_input_size=128)
def efficientnet_b0(*, num_classes: int = 2, input_size: int = 128, in_chans: int = 3, weights: str | None = None, dropout: float = 0.2) -> TransferNet:
    del input_size
    return _build(_tv("efficientnet_b0"), _split_effnet_b0, num_classes=num_classes, in_chans=in_chans, weights=weights, dropout=dropout)


mobilenet_v3_small.__doc__ = _DOC.format(title="MobileNetV3-Small (Howard et al. 2019)", size=128)
mobilenet_v3_large.__doc__ = _DOC.format(title="MobileNetV3-Large (Howard et al. 2019)", size=128)
vgg16.__doc__ = _DOC.format(title="VGG16 (Simonyan & Zisserman 2015), convolutional part only", size=128)
resnet18.__doc__ = _DOC.format(title="ResNet-18 (He et al. 2016)", size=128)
resnet50.__doc__ = _DOC.format(title="ResNet-50 (He et al. 2016)", size=128)
efficientnet_b0.__doc__ = _DOC.format(title="EfficientNet-B0 (Tan & Le 2019)", size=128)
