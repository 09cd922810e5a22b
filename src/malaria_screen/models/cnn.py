"""The seeds' plain CNNs: the Keras-style 3-conv CNN (seed 000) and the BatchNorm CNN (seed 004).

``basic_cnn``: seed 000 (Sarkar's Keras CNN on the NIH cells, 100x100x3 input): three blocks of
conv 3x3 (32, 64, 128 filters, ReLU) each followed by 2x2 max-pool and dropout, flatten, two dense
layers of 512 units each followed by dropout, output layer.

``bn_cnn``: seed 004 (50x50x3 input): conv32-pool-BN, conv64-pool-BN, conv64-pool-BN, flatten,
dense 110, dense 2; 310,412 trainable parameters as in the seed's Keras summary.
"""

from __future__ import annotations

from torch import Tensor, nn

from malaria_screen.models.registry import register_model

__all__ = ["BasicCNN", "BNCNN", "basic_cnn", "bn_cnn"]


class BasicCNN(nn.Module):
    """Seed 000's 3-conv CNN. Input ``(B, 3, S, S)`` float32; output logits ``(B, num_classes)``."""

    def __init__(self, *, num_classes: int = 2, input_size: int = 100, in_chans: int = 3, dropout: float = 0.3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c, s = in_chans, input_size
        for out in (32, 64, 128):
            layers += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.Dropout(dropout)]
            c, s = out, s // 2
        self.features = nn.Sequential(*layers)
        self.num_features = c * s * s
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(self.num_features, 512), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(512, 512), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(512, num_classes),
        )

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward_head(self, x: Tensor) -> Tensor:
        return self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


class BNCNN(nn.Module):
    """Seed 004's BatchNorm CNN. Input ``(B, 3, S, S)`` float32; output ``(B, num_classes)``."""

    def __init__(self, *, num_classes: int = 2, input_size: int = 50, in_chans: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c, s = in_chans, input_size
        for out in (32, 64, 64):
            layers += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.BatchNorm2d(out)]
            c, s = out, s // 2
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c * s * s, 110), nn.ReLU(inplace=True), nn.Linear(110, num_classes))

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward_head(self, x: Tensor) -> Tensor:
        return self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


@register_model(default_input_size=100)
def basic_cnn(*, num_classes: int = 2, input_size: int = 100, in_chans: int = 3, dropout: float = 0.3) -> BasicCNN:
    """Seed 000's Keras-style CNN (about 9.5 M parameters at 100x100, mostly in the first dense layer)."""
    return BasicCNN(num_classes=num_classes, input_size=input_size, in_chans=in_chans, dropout=dropout)


@register_model(default_input_size=50)
def bn_cnn(*, num_classes: int = 2, input_size: int = 50, in_chans: int = 3) -> BNCNN:
    """Seed 004's BatchNorm CNN (310,412 parameters at 50x50, 2 classes)."""
    return BNCNN(num_classes=num_classes, input_size=input_size, in_chans=in_chans)
