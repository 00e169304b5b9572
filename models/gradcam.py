"""Grad-CAM inside the exported graph.

ONNX has no autograd and torch's exporters cannot trace ``autograd.grad``, so the gradient of
the malignancy logit with respect to the last conv block's activation is written out as forward
operations: eval-mode BatchNorm is an affine map, a ReLU passes the gradient where its input was
positive, a linear layer multiplies by its transposed weight, and max pooling routes each
gradient back to the position its maximum came from (``max_unpool2d`` on the pooling indices).

Grad-CAM (Selvaraju et al. 2017): ``alpha_k = mean_ij dlogit/dA_kij``,
``cam = ReLU(sum_k alpha_k A_k)``. HiResCAM (Draelos and Carin 2020) keeps the gradient per
position: ``cam = ReLU(sum_k dlogit/dA_kij * A_kij)``. Both are normalised per image to [0, 1].

Behind global average pooling and one linear layer (ResNet18) the gradient is the same at every
position and the two maps are equal. Behind CNN3's fully connected head each position has its
own weights, and averaging them (Grad-CAM) can point where the model did not look: on phantoms
with one spiculated mass, the shipped CNN3's Grad-CAM peak lies within half a cell of the lesion
in 14 of 22 views, its HiResCAM peak in 22 of 22 (docs/classifier.md, "Saliency"). The graph
outputs both; the card's ``saliency`` names the one the service shows.
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


def _normalised(cam: Tensor) -> Tensor:
    peak = cam.flatten(1).amax(dim=1).reshape(-1, 1, 1)
    return cam / peak.clamp(min=1e-8)  # an exporter may fold away "+ eps", not a clamp


def cam_from(a: Tensor, grad: Tensor) -> Tensor:
    """Grad-CAM: channel weights are the gradient averaged over positions."""
    alpha = grad.mean(dim=(2, 3), keepdim=True)
    return _normalised(F.relu((alpha * a).sum(dim=1)))


def hirescam_from(a: Tensor, grad: Tensor) -> Tensor:
    """HiResCAM: the gradient times the activation at each position, summed over channels."""
    return _normalised(F.relu((grad * a).sum(dim=1)))


class WithGradCam(nn.Module):
    """What gets exported: image [N,1,H,W] -> (malignancy [N], gradcam [N,h,w]) and, with
    ``hirescam``, also hirescam [N,h,w]."""

    def __init__(self, model: Classifier, hirescam: bool = True) -> None:
        super().__init__()
        self.model: Classifier = model
        self.hirescam = hirescam

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        a = self.model.features(image)
        logit = self.model.head(a)
        grad = head_gradient(self.model, a)
        if self.hirescam:
            return torch.sigmoid(logit), cam_from(a, grad), hirescam_from(a, grad)
        return torch.sigmoid(logit), cam_from(a, grad)


def autograd_cams(model: Classifier, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Reference probability, Grad-CAM and HiResCAM with torch autograd (parity tests)."""
    a = model.features(image).detach().requires_grad_(True)
    logit = model.head(a)
    (grad,) = torch.autograd.grad(logit.sum(), a)
    detached = a.detach()
    return torch.sigmoid(logit).detach(), cam_from(detached, grad), hirescam_from(detached, grad)


def autograd_gradcam(model: Classifier, image: Tensor) -> tuple[Tensor, Tensor]:
    """Reference Grad-CAM with torch autograd (for the parity tests)."""
    prob, gradcam, _ = autograd_cams(model, image)
    return prob, gradcam
