"""How close a recovered label or a reconstructed image is to the truth (evaluation only).

Image metrics work on images in display space: de-normalised and clamped to ``[0, 1]`` (the official code lets
out-of-range pixels wrap around when it converts to uint8; we clamp instead). Pass normalised images together
with the ``mean`` and ``std`` that normalised them, or images already in ``[0, 1]``.

Every metric reduces the trailing example dimensions and returns a Python ``float`` for one example, or a tensor
of shape ``(B,)`` for a batch.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ._checks import as_tensor, check_finite

MetricValue = Union[float, torch.Tensor]
ChannelStats = Union[Sequence[float], torch.Tensor, None]

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03

# torchvision checkpoint names of the LPIPS backbones (looked up in the local torch hub cache, never downloaded).
_LPIPS_BACKBONES = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}


def _scalar_or_batch(value: torch.Tensor) -> MetricValue:
    return float(value) if value.dim() == 0 else value


# ----------------------------------------------------------------------------------------------- label metrics


def _label_pair(pred: torch.Tensor, true: torch.Tensor):
    pred = as_tensor(pred, "pred")
    true = as_tensor(true, "true")
    if pred.shape != true.shape:
        raise ValueError(f"pred has shape {tuple(pred.shape)} but true has {tuple(true.shape)}")
    if pred.dim() not in (1, 2):
        raise ValueError(f"labels must be (C,) or (B, C), got shape {tuple(pred.shape)}")
    check_finite(pred, "pred")
    check_finite(true, "true")
    return pred.detach().to(torch.float64), true.detach().to(device=pred.device, dtype=torch.float64)


def label_error(pred: torch.Tensor, true: torch.Tensor) -> MetricValue:
    """Largest absolute entry-wise difference ``max_i |pred_i - true_i|``; labels ``(C,)`` or ``(B, C)``."""
    pred, true = _label_pair(pred, true)
    return _scalar_or_batch((pred - true).abs().amax(dim=-1))


def label_l1(pred: torch.Tensor, true: torch.Tensor) -> MetricValue:
    """L1 distance ``sum_i |pred_i - true_i|``; labels ``(C,)`` or ``(B, C)``."""
    pred, true = _label_pair(pred, true)
    return _scalar_or_batch((pred - true).abs().sum(dim=-1))


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> MetricValue:
    """Cosine of the angle between two vectors ``(D,)`` or two batches ``(B, D)``; 0 if either is zero."""
    a, b = _label_pair(a, b)
    norms = a.norm(dim=-1) * b.norm(dim=-1)
    dots = (a * b).sum(dim=-1)
    return _scalar_or_batch(torch.where(norms > 0, dots / norms.clamp_min(1e-300), torch.zeros_like(dots)))


# ----------------------------------------------------------------------------------------------- image metrics


def to_display(images: torch.Tensor, mean: ChannelStats = None, std: ChannelStats = None) -> torch.Tensor:
    """De-normalise ``images * std + mean`` (per channel) and clamp to ``[0, 1]``, in float64.

    Args:
        images: ``(C, H, W)`` or ``(B, C, H, W)``.
        mean, std: per-channel statistics ``(C,)`` that normalised the images, or None for images already
            in ``[0, 1]``.
    """
    images = as_tensor(images, "images")
    if images.dim() not in (3, 4):
        raise ValueError(f"images must be (C, H, W) or (B, C, H, W), got shape {tuple(images.shape)}")
    check_finite(images, "images")
    out = images.detach().to(torch.float64)
    channels = out.shape[-3]
    if (mean is None) != (std is None):
        raise ValueError("pass both mean and std, or neither")
    if mean is not None:
        mean_t = torch.as_tensor(mean, dtype=torch.float64, device=out.device).reshape(-1)
        std_t = torch.as_tensor(std, dtype=torch.float64, device=out.device).reshape(-1)
        if mean_t.numel() not in (1, channels) or std_t.numel() not in (1, channels):
            raise ValueError(f"mean and std need 1 or {channels} entries, got {mean_t.numel()} and {std_t.numel()}")
        out = out * std_t.reshape(-1, 1, 1) + mean_t.reshape(-1, 1, 1)
    return out.clamp(0.0, 1.0)


def _image_pair(pred, true, mean, std):
    pred = to_display(pred, mean, std)
    true = to_display(true, mean, std).to(pred.device)
    if pred.shape != true.shape:
        raise ValueError(f"pred has shape {tuple(pred.shape)} but true has {tuple(true.shape)}")
    return pred, true


def psnr(pred: torch.Tensor, true: torch.Tensor, *, mean: ChannelStats = None, std: ChannelStats = None
         ) -> MetricValue:
    """Peak signal-to-noise ratio in dB, ``10 log10(1 / MSE)`` on display images (data range 1).

    Args:
        pred, true: ``(C, H, W)`` or ``(B, C, H, W)``; see :func:`to_display` for ``mean`` and ``std``.

    Returns:
        ``inf`` for identical images.
    """
    pred, true = _image_pair(pred, true, mean, std)
    mse = (pred - true).pow(2).mean(dim=(-3, -2, -1))
    return _scalar_or_batch(10.0 * torch.log10(1.0 / mse))


@functools.lru_cache(maxsize=None)
def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    weights = torch.exp(-offsets.pow(2) / (2 * sigma ** 2))
    return weights / weights.sum()


def ssim(pred: torch.Tensor, true: torch.Tensor, *, mean: ChannelStats = None, std: ChannelStats = None
         ) -> MetricValue:
    """Structural similarity (Wang et al. 2004) on display images, averaged over pixels and channels.

    Gaussian window of 11 pixels with sigma 1.5, ``K1 = 0.01``, ``K2 = 0.03``, data range 1, population
    statistics, each channel separately, over the pixels whose window lies inside the image (what
    ``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=1)`` computes).

    Args:
        pred, true: ``(C, H, W)`` or ``(B, C, H, W)`` with ``H, W >= 11``.
    """
    pred, true = _image_pair(pred, true, mean, std)
    if min(pred.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, "
                         f"got {tuple(pred.shape[-2:])}")
    batched = pred.dim() == 4
    if not batched:
        pred, true = pred.unsqueeze(0), true.unsqueeze(0)
    batch, channels, height, width = pred.shape
    window = _gaussian_window(SSIM_WINDOW, SSIM_SIGMA).to(pred.device)
    # One depthwise separable filter for the five local statistics of every channel of every image.
    stack = torch.stack([pred, true, pred * pred, true * true, pred * true], dim=1)
    stack = stack.reshape(batch * 5 * channels, 1, height, width)
    stack = F.conv2d(stack, window.reshape(1, 1, 1, -1))
    stack = F.conv2d(stack, window.reshape(1, 1, -1, 1))
    mu_p, mu_t, e_pp, e_tt, e_pt = stack.reshape(batch, 5, channels, *stack.shape[-2:]).unbind(dim=1)
    var_p = e_pp - mu_p * mu_p
    var_t = e_tt - mu_t * mu_t
    cov = e_pt - mu_p * mu_t
    c1 = SSIM_K1 ** 2
    c2 = SSIM_K2 ** 2
    index = ((2 * mu_p * mu_t + c1) * (2 * cov + c2)) / ((mu_p ** 2 + mu_t ** 2 + c1) * (var_p + var_t + c2))
    values = index.mean(dim=(-3, -2, -1))
    return _scalar_or_batch(values if batched else values[0])


def lpips_available(net: str = "alex") -> bool:
    """Whether LPIPS can run offline: the ``lpips`` package, its linear weights and the backbone checkpoint."""
    if net not in _LPIPS_BACKBONES:
        raise ValueError(f"unknown LPIPS network {net!r}; valid: {sorted(_LPIPS_BACKBONES)}")
    spec = importlib.util.find_spec("lpips")
    if spec is None or spec.origin is None:
        return False
    linear = os.path.join(os.path.dirname(spec.origin), "weights", "v0.1", f"{net}.pth")
    backbone = os.path.join(torch.hub.get_dir(), "checkpoints", _LPIPS_BACKBONES[net])
    return os.path.isfile(linear) and os.path.isfile(backbone)


@functools.lru_cache(maxsize=None)
def _lpips_model(net: str):
    import lpips  # only reached when lpips_available(net); the backbone then loads from the local cache

    return lpips.LPIPS(net=net, verbose=False).eval()


def lpips(pred: torch.Tensor, true: torch.Tensor, *, mean: ChannelStats = None, std: ChannelStats = None,
          net: str = "alex") -> Optional[MetricValue]:
    """Learned perceptual distance (lower is closer), or None when LPIPS cannot run offline.

    Never downloads anything: returns None unless :func:`lpips_available` finds the package and both weight files.
    Images ``(3, H, W)`` or ``(B, 3, H, W)``.
    """
    if not lpips_available(net):
        return None
    pred, true = _image_pair(pred, true, mean, std)
    batched = pred.dim() == 4
    if not batched:
        pred, true = pred.unsqueeze(0), true.unsqueeze(0)
    model = _lpips_model(net).to(pred.device)
    with torch.no_grad():
        values = model(pred.float() * 2 - 1, true.float() * 2 - 1).reshape(-1).to(torch.float64)
    return _scalar_or_batch(values if batched else values[0])


@dataclass(frozen=True)
class ImageScores:
    """PSNR (dB), SSIM and LPIPS (None when unavailable) of one reconstruction."""

    psnr: float
    ssim: float
    lpips: Optional[float]

    def as_dict(self) -> dict:
        return {"psnr": self.psnr, "ssim": self.ssim, "lpips": self.lpips}


def image_scores(pred: torch.Tensor, true: torch.Tensor, *, mean: ChannelStats = None, std: ChannelStats = None,
                 lpips_net: Optional[str] = "alex") -> ImageScores:
    """All image metrics of one reconstruction ``(C, H, W)`` against the truth (LPIPS skipped if ``lpips_net`` is
    None or its weights are not on disk)."""
    if pred.dim() != 3:
        raise ValueError(f"image_scores takes one (C, H, W) image, got shape {tuple(pred.shape)}")
    perceptual = None
    if lpips_net is not None and pred.shape[0] == 3:
        perceptual = lpips(pred, true, mean=mean, std=std, net=lpips_net)
    return ImageScores(psnr=psnr(pred, true, mean=mean, std=std), ssim=ssim(pred, true, mean=mean, std=std),
                       lpips=perceptual)
