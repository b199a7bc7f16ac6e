"""Grad-CAM before and after unlearning, via captum's LayerGradCam on the last conv stage.

For Fashion-MNIST with the CIFAR stem the last stage (layer4) is 7x7; maps are
upsampled bilinearly to the image size. Before/after maps of one image are normalised
with a shared scale, so evidence that fades after unlearning shows as fading instead
of being stretched back to full intensity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from captum.attr import LayerAttribution, LayerGradCam

__all__ = ["GradCamResult", "grad_cam", "grad_cam_before_after", "last_conv_stage", "normalize_pair", "overlay"]


@dataclass
class GradCamResult:
    cams: np.ndarray         # [N, H, W] float32, ReLU'd, not normalised
    target: np.ndarray       # [N] class the map explains
    pred: np.ndarray         # [N] predicted class
    prob_target: np.ndarray  # [N] softmax probability of `target`


def last_conv_stage(model: nn.Module) -> nn.Module:
    """layer4 of a core.models.ResNet, or of the innermost ResNet of an unlearned model (`.base()`)."""
    base = model.base() if callable(getattr(model, "base", None)) else None
    for owner in (base, getattr(model, "backbone", None), model):
        if owner is not None and hasattr(owner, "layer4"):
            return owner.layer4
    raise ValueError(f"{type(model).__name__} has no layer4 (nor backbone.layer4) to attribute to")


def grad_cam(model: nn.Module, images: torch.Tensor | np.ndarray, targets: np.ndarray | list[int] | None = None, *,
             layer: nn.Module | None = None, batch_size: int = 32, device: torch.device | str | None = None
             ) -> GradCamResult:
    """Grad-CAM of `model` for `images` [N, C, H, W] in [0, 1], explaining `targets` (default: predicted class).

    `model(x)` must return logits. Runs in eval mode (BatchNorm statistics untouched) and
    restores the model's mode afterwards.
    """
    x_all = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images).float()
    if x_all.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W], got {tuple(x_all.shape)}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    layer = layer or last_conv_stage(model)
    was_training = model.training
    model.eval()
    explainer = LayerGradCam(model, layer)
    h, w = x_all.shape[-2:]
    cams, tgts, preds, probs = [], [], [], []
    try:
        for s in range(0, len(x_all), batch_size):
            x = x_all[s:s + batch_size].to(device)
            with torch.no_grad():
                logits = model(x)
            pred = logits.argmax(1)
            tgt = pred if targets is None else \
                torch.as_tensor(np.asarray(targets)[s:s + batch_size], device=device).long()
            with torch.enable_grad():
                attr = explainer.attribute(x, target=tgt, relu_attributions=True)
            attr = LayerAttribution.interpolate(attr.detach(), (h, w), interpolate_mode="bilinear")
            cams.append(attr[:, 0].clamp_min(0).cpu().numpy())
            tgts.append(tgt.cpu().numpy())
            preds.append(pred.cpu().numpy())
            probs.append(torch.softmax(logits.float(), 1).gather(1, tgt[:, None])[:, 0].cpu().numpy())
    finally:
        model.train(was_training)
    if not cams:
        return GradCamResult(np.zeros((0, h, w), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64),
                             np.zeros(0, np.float32))
    return GradCamResult(np.concatenate(cams).astype(np.float32), np.concatenate(tgts).astype(np.int64),
                         np.concatenate(preds).astype(np.int64), np.concatenate(probs).astype(np.float32))


def normalize_pair(before: np.ndarray, after: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale each image's before and after maps by their joint maximum, into [0, 1]."""
    m = np.maximum(before.reshape(len(before), -1).max(1, initial=0), after.reshape(len(after), -1).max(1, initial=0))
    m = np.where(m > 0, m, 1.0)[:, None, None]
    return (before / m).astype(np.float32), (after / m).astype(np.float32)


def grad_cam_before_after(model_before: nn.Module, model_after: nn.Module, images: torch.Tensor | np.ndarray,
                          targets: np.ndarray | list[int], **kw) -> tuple[GradCamResult, GradCamResult]:
    """Both models explain the same `targets` (usually the true labels); maps share one scale per image."""
    b = grad_cam(model_before, images, targets, **kw)
    a = grad_cam(model_after, images, targets, **kw)
    b.cams, a.cams = normalize_pair(b.cams, a.cams)
    return b, a


# 'jet'-like ramp, enough for an overlay without pulling in matplotlib
_RAMP = np.array([[0, 0, 0.5], [0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0], [0.5, 0, 0]], dtype=np.float32)


def overlay(images: np.ndarray | torch.Tensor, cams: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend heat maps (values in [0, 1]) over images [N, C, H, W] in [0, 1] -> uint8 RGB [N, H, W, 3].

    The heat colour is weighted by the map value itself, so zero evidence leaves the image visible.
    """
    img = np.asarray(images.detach().cpu() if torch.is_tensor(images) else images, dtype=np.float32)
    if img.shape[1] == 1:
        img = np.repeat(img, 3, axis=1)
    img = img.transpose(0, 2, 3, 1)
    c = np.clip(np.asarray(cams, np.float32), 0, 1)
    pos = c * (len(_RAMP) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(_RAMP) - 2)
    frac = (pos - lo)[..., None]
    heat = _RAMP[lo] * (1 - frac) + _RAMP[lo + 1] * frac
    a = alpha * c[..., None]
    return np.clip((1 - a) * img + a * heat, 0, 1).__mul__(255).round().astype(np.uint8)
