"""CNN3 (as the seed study describes it) and ResNet18 (written here, trained from scratch).

Both split into ``features`` (up to the last convolution block's activation, the Grad-CAM target)
and ``head`` (the rest, ending in one malignancy logit), so that Grad-CAM can be computed in the
exported graph: see :mod:`models.gradcam`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812 - torch convention
from torch import Tensor, nn

Grid = tuple[tuple[float, float], tuple[float, float]]


def _pair(value: object) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    assert isinstance(value, tuple) and len(value) == 2
    return int(value[0]), int(value[1])


def receptive_grid(layers: list[nn.Module]) -> Grid:
    """(stride, offset) per axis of the last layer's cells on the input: cell ``i`` of the last
    layer is centred on input pixel ``offset + stride * i`` (receptive-field arithmetic over
    the convolutions and poolings on the main path, in forward order)."""
    stride = [1.0, 1.0]
    offset = [0.0, 0.0]
    for layer in layers:
        if not isinstance(layer, nn.Conv2d | nn.MaxPool2d):
            raise TypeError(f"no receptive-field rule for {type(layer).__name__}")
        k, s, p = _pair(layer.kernel_size), _pair(layer.stride), _pair(layer.padding)
        for axis in (0, 1):
            offset[axis] += stride[axis] * ((k[axis] - 1) / 2 - p[axis])
            stride[axis] *= s[axis]
    return (stride[0], stride[1]), (offset[0], offset[1])


class CNN3(nn.Module):
    """Three conv blocks (6x6 kernels, stride 2, padding 2, BatchNorm, ReLU, 2x2 max pool), two
    fully connected layers with BatchNorm and ReLU, and one malignancy logit.

    The Grad-CAM target is the third block's ReLU output, before its max pool.
    """

    def __init__(
        self,
        input_shape: tuple[int, int],
        channels: tuple[int, int, int] = (16, 32, 64),
        hidden: tuple[int, int] = (128, 32),
    ) -> None:
        super().__init__()
        self.input_shape = input_shape
        c1, c2, c3 = channels
        self.block1 = _conv_block(1, c1)
        self.block2 = _conv_block(c1, c2)
        self.conv3 = nn.Conv2d(c2, c3, kernel_size=6, stride=2, padding=2, bias=False)
        self.bn3 = nn.BatchNorm2d(c3)
        with torch.no_grad():
            pooled = self._pool(self._last_activation(torch.zeros(1, 1, *input_shape)))
        self.fc1 = nn.Linear(pooled.numel(), hidden[0])
        self.bn_fc1 = nn.BatchNorm1d(hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.bn_fc2 = nn.BatchNorm1d(hidden[1])
        self.out = nn.Linear(hidden[1], 1)

    @staticmethod
    def _pool(x: Tensor) -> Tensor:
        return F.max_pool2d(x, 2)

    def _last_activation(self, x: Tensor) -> Tensor:
        x = self.block2(self.block1(x))
        return F.relu(self.bn3(self.conv3(x)))

    def features(self, x: Tensor) -> Tensor:
        """The Grad-CAM target: the last conv block's activation before pooling."""
        return self._last_activation(x)

    def cam_grid(self) -> Grid:
        """(stride, offset) of the Grad-CAM cells on the input (see :func:`receptive_grid`)."""
        layers = [self.block1[0], self.block1[3], self.block2[0], self.block2[3], self.conv3]
        return receptive_grid(layers)

    def head(self, a: Tensor) -> Tensor:
        z = self._pool(a).flatten(1)
        z = F.relu(self.bn_fc1(self.fc1(z)))
        z = F.relu(self.bn_fc2(self.fc2(z)))
        logit: Tensor = self.out(z)
        return logit.squeeze(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel_size=6, stride=2, padding=2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 (He et al. 2016) for one-channel input and one logit; random initialisation
    (no pretrained weights can be downloaded here). Grad-CAM target: layer4's output."""

    def __init__(self, input_shape: tuple[int, int], width: int = 64) -> None:
        super().__init__()
        self.input_shape = input_shape
        self.stem = nn.Sequential(
            nn.Conv2d(1, width, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        layers = []
        cin = width
        for i, cout in enumerate((width, 2 * width, 4 * width, 8 * width)):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, 1)

    def features(self, x: Tensor) -> Tensor:
        result: Tensor = self.layers(self.stem(x))
        return result

    def cam_grid(self) -> Grid:
        """(stride, offset) of the Grad-CAM cells (layer4's output) on the input."""
        layers = [self.stem[0], self.stem[3]]
        for stage in self.layers:
            assert isinstance(stage, nn.Sequential)
            first = stage[0]
            assert isinstance(first, BasicBlock)
            layers += [first.conv1, first.conv2]
        return receptive_grid(layers)

    def head(self, a: Tensor) -> Tensor:
        logit: Tensor = self.fc(a.mean(dim=(2, 3)))
        return logit.squeeze(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


ARCHITECTURES: dict[str, type[CNN3] | type[ResNet18]] = {"cnn3": CNN3, "resnet18": ResNet18}
Classifier = CNN3 | ResNet18


def build(architecture: str, input_shape: tuple[int, int]) -> Classifier:
    try:
        cls = ARCHITECTURES[architecture]
    except KeyError:
        names = ", ".join(ARCHITECTURES)
        raise ValueError(f"unknown architecture {architecture!r}: use one of {names}") from None
    return cls(input_shape)
