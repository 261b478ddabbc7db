"""The class means of a batch fitted to both of the head's gradients, to second order in the examples' spread.

:mod:`gradleak.batch.mass` reads each class's mean logits off its row of ``G W^T`` with every example's prediction
taken at the batch's mean feature (``sum_n p_nc h_n ~ (sum_n p_nc) h_bar``), and the summed predictions with every
example at its class mean. Both drop the spread of the logits: between the classes in the rows, and within each
class everywhere. On an untrained ResNet18 those are what cost eps (the true counts held, 20 smoothed batches per
``B`` of 16, 32 and 64: eps within 1e-3 in 14, 15 and 17 of them; from the true class means and within-class
covariances to second order, within 1.5e-5 in each of 10 batches per ``B``).

The covariance within a class is not in the gradient as a whole matrix, but most of it has one direction: on
ResNet18 (B = 16 and 64) 88-91 % of the within-class covariance of the logits lies along one axis, at cosine
0.97-0.99 with the batch's mean logits ``f = W h_bar`` (bias aside). So each class's examples are modelled as
spread about their class mean ``mu_k`` along ``f``, with one variance ``s`` for the batch. Along a direction ``f``
the softmax has gradient ``p (f - m)`` and curvature ``p ((f - m)^2 - v)`` (``m = p . f``, ``v = p . f^2 - m^2``),
so to second order

    sum_{n in k} p_n           = n_k (p_k + s/2 p_k ((f - m_k)^2 - v_k))
    sum_{n in k} p_n z_n^T     = (sum_{n in k} p_n) mu_k^T + n_k s (p_k (f - m_k)) f^T

with ``p_k = softmax(mu_k + b)`` and ``z = W h`` (bias aside), and the head's gradients ``B G W^T = sum_n (p_n -
y_n) z_n^T`` (C x C) and ``B dL/db = sum_n (p_n - y_n)`` (C) become functions of the held classes' means, ``s``,
eps (and the inverse gradient scale ``u``, when it is unknown): ``K C + 2`` unknowns (``K`` classes held, one more
for ``u``) for ``C^2 + C`` equations, fitted by Levenberg-Marquardt from the first-order estimate. Measured on 80
ResNet18 batches (``benchmarks/bench_batch_mean_feature.py``, 20 per ``B`` of 16 to 128, the true counts held): eps
within 1e-3 in all 80 (largest error 8.6e-4; 64 from the first-order estimate). On LeNet and FCN-4, whose
first-order eps was within 1e-4 already, it stays there (the batch experiment's smoothed batches from B = 16:
largest error 2.4e-7 and 7.0e-5, against 5.1e-7 and 8.1e-5). The fit assumes the counts' smoothed labels, so
:func:`gradleak.recover_batch` reads only a smoothed answer's eps from it.

Held at eps = 0 (``hard``), the same fit is the rival of smoothed labels: on the batch experiment's ResNet18
batches of B = 16, 32 and 64 (20 smoothed and 20 hard ones each), hard batches are met 1.00-1.25 times as closely
with eps free as at 0, smoothed ones 10.9 times and more (from eps 0.014 up). That holds only where the gradients
pin the unknowns (:func:`spread_identified`): of the ``C^2 + C`` equations ``C^2 - 1`` are independent, and with
every class held the fit at eps = 0 meets smoothed labels to rounding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .least_squares import levenberg_marquardt

#: Levenberg-Marquardt steps at most.
SPREAD_STEPS = 30
#: Largest number of unknowns fitted (a dense ``(C^2 + C) x unknowns`` Jacobian): every held class's mean logits
#: and the scalars. Ten classes need at most 103; a hundred classes with more than three of them held exceed it
#: and keep the first-order estimate.
SPREAD_UNKNOWNS = 400
#: The fit is done when a step gains less than this part of the misfit.
STALLED = 1e-10
#: The imaginary step of the Jacobian's complex-step derivatives (any tiny value gives the same columns).
COMPLEX_STEP = 1e-30


@dataclass(frozen=True)
class SpreadFit:
    """The batch's class means fitted to second order in the examples' spread (see the module's docstring).

    Attributes:
        eps: the smoothing mass, in [0, 1).
        inverse_scale: ``u`` (1 at a known scale).
        spread: ``s``, the variance of the examples' logits along the batch's mean logits (in units of them).
        misfit: the head's gradients' relative misfit at the fit (each of ``G W^T`` and ``dL/db`` relative to its
            norm at the scale fitted, together), or where it stopped below ``enough``; ``start_misfit`` at the
            first-order estimate it started from.
    """

    eps: float
    inverse_scale: float
    spread: float
    misfit: float
    start_misfit: float


def spread_unknowns(counts: torch.Tensor, scale_known: bool) -> int:
    """How many unknowns :func:`fit_spread` fits for ``counts`` (C,): compare with :data:`SPREAD_UNKNOWNS`."""
    return int((counts > 0).sum()) * counts.shape[-1] + 2 + int(not scale_known)


def spread_identified(counts: torch.Tensor, scale_known: bool) -> bool:
    """Whether the gradients pin every unknown of :func:`fit_spread` for ``counts`` (C,). Of its ``C^2 + C``
    equations only ``C^2 - 1`` are independent (each example's prediction and label both sum to one), so with every
    class held the class means can trade with eps and the spread: on an untrained LeNet (B = 32, all ten classes
    held) the fit with eps held at 0 met the gradients as closely as with eps free, whatever the true eps."""
    return spread_unknowns(counts, scale_known) <= counts.shape[-1] ** 2 - 1


def fit_spread(logits_grad: torch.Tensor, bias_grad: torch.Tensor, bias: torch.Tensor, class_logits: torch.Tensor,
               counts: torch.Tensor, eps: float, batch_size: int, *, inverse_scale: Optional[float] = None,
               hard: bool = False, enough: float = 0.0) -> SpreadFit:
    """Fit the held classes' mean logits, the spread ``s``, eps (held at 0 when ``hard``) and ``u`` (unless the
    scale is known: ``inverse_scale`` None) to ``B G W^T`` and ``B dL/db`` of a batch of smoothed labels, from the
    first-order estimate; stop early once the misfit is at most ``enough`` (a rival need only be shown to come that
    close).

    Args:
        logits_grad: ``(C, C)`` ``G W^T``; bias_grad, bias: ``(C,)``; all float64, as observed (``u`` scales them).
        class_logits: ``(C, C)`` the first-order estimate: row ``c`` is class ``c``'s mean logits (bias aside).
        counts: ``(C,)`` the examples per class (held); eps, inverse_scale: the first-order estimate's.
    """
    held = counts > 0
    num_classes = counts.shape[-1]
    weights = counts[held].to(logits_grad.dtype)                                        # n_k (K,)
    labels = torch.eye(num_classes, dtype=logits_grad.dtype, device=logits_grad.device)[held]  # e_k (K, C)
    rows_target, mass_target = batch_size * logits_grad, batch_size * bias_grad
    rows_norm = torch.linalg.vector_norm(rows_target).clamp_min(torch.finfo(rows_target.dtype).tiny)
    mass_norm = torch.linalg.vector_norm(mass_target).clamp_min(torch.finfo(mass_target.dtype).tiny)
    means = class_logits[held]
    scalars = [0.0] + ([] if hard else [eps]) + ([] if inverse_scale is None else [inverse_scale])
    start = torch.cat([means.flatten(), means.new_tensor(scalars)])
    size = means.numel()

    def unpack(x: torch.Tensor):
        # points x (T, unknowns): the class means (T, K, C), then s, eps and u (T, 1, 1) each, as far as unknown
        s, *rest = x[:, size:, None, None].unbind(1)
        smoothing = torch.zeros_like(s) if hard else rest.pop(0)
        return x[:, :size].view(len(x), *means.shape), s, smoothing, rest[0] if rest else torch.ones_like(s)

    def predictions(mu: torch.Tensor, s: torch.Tensor):
        # each class's predictions to second order in the spread along f (T, K, C), their slope along f, and f
        f = (weights.to(mu.dtype) @ mu / batch_size).unsqueeze(-2)
        logits = mu + bias
        p = (logits - logits.real.amax(-1, keepdim=True)).exp()
        p = p / p.sum(-1, keepdim=True)
        centred = f - (p * f).sum(-1, keepdim=True)
        slope = p * centred
        curvature = slope * centred - p * (slope * centred).sum(-1, keepdim=True)
        return p + 0.5 * s * curvature, slope, f

    def misfit(x: torch.Tensor) -> torch.Tensor:
        # (T, C^2 + C): both gradients' misfits at points x (T, unknowns), each relative to the gradient's norm
        mu, s, smoothing, u = unpack(x)
        p, slope, f = predictions(mu, s)
        errors = weights[:, None] * (p - (1 - smoothing) * labels - smoothing / num_classes)
        rows = errors.transpose(-1, -2) @ mu + s * (weights.to(mu.dtype) @ slope).unsqueeze(-1) * f
        return torch.cat([((rows - u * rows_target) / rows_norm).flatten(1),
                          (errors.sum(-2) - u[..., 0] * mass_target) / mass_norm], -1)

    def normal_equations(x: torch.Tensor, residual: torch.Tensor):
        # J^T J and J^T r at points x (T, unknowns), the Jacobian by complex steps: the misfit is analytic in x, and
        # a step of i h along each unknown gives its column as Im(misfit) / h, exact to rounding for any small h
        # (no difference cancels)
        steps = x.unsqueeze(1) + COMPLEX_STEP * 1j * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
        jacobian = misfit(steps.flatten(0, 1)).imag.unflatten(0, steps.shape[:2]) / COMPLEX_STEP  # (T, unknowns, R)
        return jacobian @ jacobian.transpose(-1, -2), (jacobian @ residual.unsqueeze(-1))[..., 0]

    def relative(x: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        # relative to the gradients at the scale of x (u times those observed): misfits then compare across scales
        return norm / unpack(x)[3].flatten().abs()

    x, norm = levenberg_marquardt(misfit, normal_equations, start[None], SPREAD_STEPS, stalled=STALLED,
                                  finished=(lambda x, norm: relative(x, norm) <= enough) if enough > 0 else None)
    start_misfit = relative(start[None], torch.linalg.vector_norm(misfit(start[None]), dim=-1))
    _, s, smoothing, u = unpack(x)
    return SpreadFit(eps=float(smoothing.clamp(0.0, 0.999)), inverse_scale=float(u), spread=float(s),
                     misfit=float(relative(x, norm)), start_misfit=float(start_misfit))
