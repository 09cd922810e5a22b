"""CellNet: the small default model of malaria-screen (ours), for laptops and small boards.

Design goals: <= 100 k parameters, <= 20 MFLOPs per 64x64 cell, plain dense 3x3 convolutions
(fast on CPUs and friendly to int8 quantisation; depthwise convolutions are not).

Layout (64x64 input): a stride-2 3x3 stem (16 ch), then two stages of [3x3 stride-2 conv,
3x3 conv] at 32 and 64 channels, each conv followed by BatchNorm and ReLU, for an 8x8 feature map.
The head concatenates global average and global max pooling: a parasite is a small local
object, and "is there one anywhere in the cell" is a max over positions, which average pooling
alone dilutes. Dropout, then one linear layer.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from malaria_screen.models.registry import register_model

__all__ = ["CellNet", "cellnet"]


def _cbr(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class CellNet(nn.Module):
    """Input ``(B, in_chans, S, S)`` float32 (any S >= 8; designed for 64); output ``(B, num_classes)``.

    Parameters
    ----------
    num_classes : int, default=2
    in_chans : int, default=3
    widths : tuple of 3 ints, default=(16, 32, 64)
        Channels of the stem and of the two stages.
    dropout : float, default=0.2
    """

    def __init__(self, *, num_classes: int = 2, in_chans: int = 3, widths: tuple[int, int, int] = (16, 32, 64), dropout: float = 0.2) -> None:
        super().__init__()
        w0, w1, w2 = widths
        self.features = nn.Sequential(
            _cbr(in_chans, w0, 2),
            _cbr(w0, w1, 2), _cbr(w1, w1),
            _cbr(w1, w2, 2), _cbr(w2, w2),
        )
        self.num_features = 2 * w2
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, C, S, S)`` to the last feature map ``(B, widths[2], S/8, S/8)``."""
        return self.features(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Feature map to logits ``(B, num_classes)`` (or pooled features if ``pre_logits``)."""
        x = torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)
        return x if pre_logits else self.classifier(self.dropout(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


@register_model(default_input_size=64)
def cellnet(*, num_classes: int = 2, input_size: int = 64, in_chans: int = 3, dropout: float = 0.2,
            widths: tuple[int, int, int] = (16, 32, 64)) -> CellNet:
    """The default malaria-screen cell model (about 70 k parameters, about 15 MFLOPs at 64x64)."""
    del input_size
    return CellNet(num_classes=num_classes, in_chans=in_chans, dropout=dropout, widths=tuple(widths))
