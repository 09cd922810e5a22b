"""ResNet9 of seed 002 (the PyTorch malaria notebook; after Myrtle.ai's DAWNBench ResNet9).

conv(64) - conv(128)+pool - residual[conv(128), conv(128)] - conv(256)+pool - conv(512)+pool -
residual[conv(512), conv(512)] - global max-pool - dropout 0.2 - linear. Each conv is
3x3 conv, BatchNorm, ReLU. The seed pools with a fixed 4x4 window at 32x32 input; the global
max-pool here is the same at that size and serves any input size.
"""

from __future__ import annotations

from torch import Tensor, nn

from malaria_screen.models.registry import register_model

__all__ = ["ResNet9", "resnet9"]


def _conv_block(cin: int, cout: int, pool: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class ResNet9(nn.Module):
    """Input ``(B, 3, S, S)`` float32 (S >= 8); output logits ``(B, num_classes)``."""

    def __init__(self, *, num_classes: int = 2, in_chans: int = 3, dropout: float = 0.2) -> None:
        super().__init__()
        self.conv1 = _conv_block(in_chans, 64)
        self.conv2 = _conv_block(64, 128, pool=True)
        self.res1 = nn.Sequential(_conv_block(128, 128), _conv_block(128, 128))
        self.conv3 = _conv_block(128, 256, pool=True)
        self.conv4 = _conv_block(256, 512, pool=True)
        self.res2 = nn.Sequential(_conv_block(512, 512), _conv_block(512, 512))
        self.head = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(512, num_classes))

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.conv2(self.conv1(x))
        x = self.res1(x) + x
        x = self.conv4(self.conv3(x))
        return self.res2(x) + x

    def forward_head(self, x: Tensor) -> Tensor:
        return self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


@register_model(default_input_size=64)
def resnet9(*, num_classes: int = 2, input_size: int = 64, in_chans: int = 3, dropout: float = 0.2) -> ResNet9:
    """Seed 002's ResNet9 (about 6.6 M parameters). ``input_size`` is accepted for a uniform API."""
    del input_size
    return ResNet9(num_classes=num_classes, in_chans=in_chans, dropout=dropout)
