"""Label structures as residuals on the candidate family ``y(t)``.

Each hypothesis says that the ``C - m`` smallest entries of the label are equal: to zero (``offset_free`` false)
or to a common unknown value (true). Its residual at ``t`` is scale-normalised::

    r(t) = || P (t * y_S(t)) || / || P c_S ||        t * y(t) = t * p(t) - c

with ``S`` the ``C - m`` smallest entries of ``y(t)`` and ``P`` the centring over ``S`` when the offset is free
(identity otherwise). The normalisation matters: as ``|t| -> inf`` the softmax saturates and the plain variance
of ``y_S`` goes to zero for any gradient, but ``r -> 1`` there, while ``r = 0`` exactly at the true ``t``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import torch

from ..head import HeadProblem


@dataclass(frozen=True)
class Structure:
    """A label hypothesis: the ``C - free_entries`` smallest entries share one value (zero unless offset_free)."""

    name: str
    free_entries: int
    offset_free: bool
    label_format: str

    def degrees_of_freedom(self, num_classes: int) -> int:
        """Equations left over once ``t`` (and the offset) are fitted; below 1 the structure cannot pin ``t``."""
        return num_classes - self.free_entries - 1 - int(self.offset_free)


STRUCTURES: Dict[str, Structure] = {s.name: s for s in (
    Structure("hard", 1, False, "hard"),
    Structure("smoothing", 1, True, "smoothing"),
    Structure("mixup", 2, False, "mixup"),
    Structure("mixup_smoothing", 2, True, "mixup"),
)}
# From the simplest to the most general; auto-detection takes the first that fits.
ORDER: Tuple[str, ...] = ("hard", "smoothing", "mixup", "mixup_smoothing")
# The hypotheses tried for each requested label format, simplest first.
FORMAT_STRUCTURES: Dict[str, Tuple[str, ...]] = {
    "hard": ("hard",),
    "smoothing": ("smoothing",),
    "mixup": ("mixup", "mixup_smoothing"),
    "auto": ORDER,
}


def grid_residuals(problem: HeadProblem, t: torch.Tensor, structures: Tuple[Structure, ...]) -> torch.Tensor:
    """Residuals ``(K, len(structures))`` of many candidates ``t`` (K,) at once, for locating basins.

    One pass over the ``(K, C)`` softmax: the largest entries are zeroed in place and the centring uses sums,
    which loses precision for residuals far below 1e-8; refinement uses :func:`residuals`, which does not.
    """
    error = t.unsqueeze(-1) * torch.softmax(problem.logits(t), dim=-1) - problem.c
    # positions of the largest entries of y = error / t
    top_index = (error * t.sign().unsqueeze(-1)).topk(2, dim=-1).indices
    top_c = problem.c[top_index]
    sums = {}
    for m in (1, 2):
        error.scatter_(-1, top_index[:, m - 1:m], 0.0)
        c_kept_sq = 1.0 - top_c[:, :m].square().sum(-1)
        sums[m] = (error.sum(-1), error.square().sum(-1), problem.c.sum() - top_c[:, :m].sum(-1), c_kept_sq)
    out = []
    for structure in structures:
        total, total_sq, c_total, c_total_sq = sums[structure.free_entries]
        if structure.offset_free:
            size = problem.num_classes - structure.free_entries
            total_sq = total_sq - total.square() / size
            c_total_sq = c_total_sq - c_total.square() / size
        out.append((total_sq.clamp_min(0) / c_total_sq.clamp_min(torch.finfo(t.dtype).tiny)).sqrt())
    return torch.stack(out, dim=-1)


def structured_mask(y: torch.Tensor, free_entries: torch.Tensor) -> torch.Tensor:
    """Boolean ``(K, C)`` mask of the structured entries: all but the ``free_entries[k]`` largest of ``y[k]``."""
    top2 = y.topk(2, dim=-1).indices
    mask = torch.ones_like(y, dtype=torch.bool)
    rows = torch.arange(y.shape[0], device=y.device)
    mask[rows, top2[:, 0]] = False
    mask[rows, top2[:, 1]] = free_entries < 2
    return mask


def _project(values: torch.Tensor, mask: torch.Tensor, offset_free: torch.Tensor) -> torch.Tensor:
    """Zero outside ``mask``; subtract the mean over ``mask`` where ``offset_free``. All ``(K, C)``."""
    masked = values * mask
    mean = masked.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp_min(1)
    return masked - (mean * offset_free.unsqueeze(-1)) * mask


def residuals(problem: HeadProblem, t: torch.Tensor, free_entries: torch.Tensor, offset_free: torch.Tensor
              ) -> torch.Tensor:
    """Normalised residuals ``r(t)`` of shape ``(K,)``.

    Args:
        t: ``(K,)`` candidate scalars (float64, non-zero).
        free_entries, offset_free: ``(K,)`` the hypothesis of each candidate (int 1 or 2, bool).
    """
    return residuals_of_labels(problem, t, problem.label(t), free_entries, offset_free)


def residuals_of_labels(problem: HeadProblem, t: torch.Tensor, y: torch.Tensor, free_entries: torch.Tensor,
                        offset_free: torch.Tensor) -> torch.Tensor:
    """:func:`residuals` for candidate labels ``y = problem.label(t)`` (K, C) already computed."""
    mask = structured_mask(y, free_entries)
    error = _project(t.unsqueeze(-1) * y, mask, offset_free)
    scale = _project(problem.c.expand_as(y), mask, offset_free)
    return error.norm(dim=-1) / scale.norm(dim=-1).clamp_min(torch.finfo(y.dtype).tiny)


def gauss_newton(problem: HeadProblem, t: torch.Tensor, free_entries: torch.Tensor, offset_free: torch.Tensor,
                 steps: int = 30) -> Tuple[torch.Tensor, torch.Tensor]:
    """Refine candidates ``t`` (K,) by Gauss-Newton on the residual vector ``P(t p(t) - c)``.

    The residual is zero at the true ``t`` and smooth around it, so convergence is quadratic. A step that does
    not lower ``r`` is halved; ``t`` keeps its sign and stays admissible (``|t| >= problem.t_min``).

    Returns:
        ``(t, r)``: the refined scalars and their residuals, both ``(K,)``.
    """
    t_min = problem.t_min
    r = residuals(problem, t, free_entries, offset_free)
    step_scale = torch.ones_like(t)
    for _ in range(steps):
        p = torch.softmax(problem.logits(t), dim=-1)
        y = p - problem.c / t.unsqueeze(-1)
        mask = structured_mask(y, free_entries)
        error = _project(t.unsqueeze(-1) * p - problem.c, mask, offset_free)
        slope = p * (problem.a - (p * problem.a).sum(-1, keepdim=True))
        jacobian = _project(p + t.unsqueeze(-1) * slope, mask, offset_free)
        step = -(error * jacobian).sum(-1) / (jacobian * jacobian).sum(-1).clamp_min(torch.finfo(t.dtype).tiny)
        step = (step * step_scale).clamp(-0.5 * t.abs(), 0.5 * t.abs())
        trial = torch.where(t > 0, (t + step).clamp_min(t_min), (t + step).clamp_max(-t_min))
        r_trial = residuals(problem, trial, free_entries, offset_free)
        better = r_trial < r
        t = torch.where(better, trial, t)
        r = torch.where(better, r_trial, r)
        settled = (~better & (step_scale < 0.1)) | (step.abs() <= 1e-15 * t.abs())
        step_scale = torch.where(better, torch.ones_like(step_scale), step_scale * 0.25)
        if bool(settled.all()):
            break
    return t, r
