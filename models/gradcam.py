"""Grad-CAM inside the exported graph.

ONNX has no autograd and torch's exporters cannot trace ``autograd.grad``, so the gradient of
the malignancy logit with respect to the last conv block's activation is written out as forward
operations: eval-mode BatchNorm is an affine map, a ReLU passes the gradient where its input was
positive, a linear layer multiplies by its transposed weight, and max pooling routes each
gradient back to the position its maximum came from (``max_unpool2d`` on the pooling indices).

Grad-CAM (Selvaraju et al. 2017): ``alpha_k = mean_ij dlogit/dA_kij``,
``cam = ReLU(sum_k alpha_k A_k)``, here normalised per image to [0, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812 - torch convention
from torch import Tensor, nn

from models.architectures import CNN3, Classifier, ResNet18


def _bn_scale(bn: nn.BatchNorm1d) -> Tensor:
    assert bn.running_var is not None
    return bn.weight / torch.sqrt(bn.running_var + bn.eps)


def cnn3_head_gradient(model: CNN3, a: Tensor) -> Tensor:
    """d logit / d a for CNN3's head, as forward operations (eval mode)."""
    pooled, indices = F.max_pool2d(a, 2, return_indices=True)
    z0 = pooled.flatten(1)
    y1 = model.bn_fc1(model.fc1(z0))
    r1 = F.relu(y1)
    y2 = model.bn_fc2(model.fc2(r1))
    g2 = model.out.weight[0] * (y2 > 0).to(a.dtype) * _bn_scale(model.bn_fc2)
    g1 = (g2 @ model.fc2.weight) * (y1 > 0).to(a.dtype) * _bn_scale(model.bn_fc1)
    g0 = (g1 @ model.fc1.weight).reshape(pooled.shape)
    return F.max_unpool2d(g0, indices, (2, 2), output_size=list(a.shape[-2:]))


def resnet18_head_gradient(model: ResNet18, a: Tensor) -> Tensor:
    """d logit / d a for global average pooling and one linear layer: w_k / (h * w) everywhere."""
    n, c, h, w = a.shape
    weights = model.fc.weight[0] / (h * w)
    return weights.reshape(1, c, 1, 1).expand(n, c, h, w)


def head_gradient(model: Classifier, a: Tensor) -> Tensor:
    if isinstance(model, CNN3):
        return cnn3_head_gradient(model, a)
    if isinstance(model, ResNet18):
        return resnet18_head_gradient(model, a)
    raise TypeError(f"no hand-written head gradient for {type(model).__name__}")


def cam_from(a: Tensor, grad: Tensor) -> Tensor:
    alpha = grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((alpha * a).sum(dim=1))
    peak = cam.flatten(1).amax(dim=1).reshape(-1, 1, 1)
    return cam / peak.clamp(min=1e-8)  # an exporter may fold away "+ eps", not a clamp


class WithGradCam(nn.Module):
    """What gets exported: image [N,1,H,W] -> (malignancy [N], gradcam [N,h,w])."""

    def __init__(self, model: Classifier) -> None:
        super().__init__()
        self.model: Classifier = model

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        a = self.model.features(image)
        logit = self.model.head(a)
        return torch.sigmoid(logit), cam_from(a, head_gradient(self.model, a))


def autograd_gradcam(model: Classifier, image: Tensor) -> tuple[Tensor, Tensor]:
    """Reference Grad-CAM with torch autograd (for the parity tests)."""
    a = model.features(image).detach().requires_grad_(True)
    logit = model.head(a)
    (grad,) = torch.autograd.grad(logit.sum(), a)
    return torch.sigmoid(logit).detach(), cam_from(a.detach(), grad)
