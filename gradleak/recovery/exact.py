"""Our search: exact, deterministic, vectorised.

``t`` is bounded below (``|t| >= t_min``, from ``|p_i - y_i| <= 1``; with an unknown gradient scale, where the
feature scale is free, by the ``t`` below which the softmax is linear) and the normalised residual of every
hypothesis tends to 1 as ``|t| -> inf``, so one log-spaced grid over both signs sees every basin. The grid is
evaluated as one ``(K, C)`` softmax, its local minima are refined together by Gauss-Newton (quadratic
convergence: the residual is zero at the truth), and all refined minima are returned so that the caller can
tell a unique answer from an ambiguous one.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

from ..head import HeadProblem
from .base import SearchOutcome, register_search
from .structure import (FORMAT_STRUCTURES, STRUCTURES, Minima, Structure, describe, free_entries_of,
                        gauss_newton, grid_residuals, mask_of)


def log_grid(problem: HeadProblem, points_per_decade: int, decades: float, sign: int = 0) -> torch.Tensor:
    """Scalars ``+-t_lower * 10^k`` for ``k`` in ``[0, decades]``, ``|t|`` rising within each sign; positive half
    first. ``sign`` = +1 or -1 keeps one half only."""
    n = int(points_per_decade * decades) + 1
    magnitudes = problem.t_lower * torch.logspace(0.0, decades, n, dtype=torch.float64, device=problem.c.device)
    halves = [magnitudes, -magnitudes] if sign == 0 else [sign * magnitudes]
    return torch.cat(halves)


def _grid_minima(r: torch.Tensor, halves: int, max_starts: int) -> torch.Tensor:
    """Indices of up to ``max_starts`` lowest local minima of each half of a ``log_grid`` residual curve."""
    starts = []
    half = r.shape[0] // halves
    for offset in range(0, r.shape[0], half):
        curve = r[offset:offset + half]
        left = torch.cat([curve.new_full((1,), float("inf")), curve[:-1]])
        right = torch.cat([curve[1:], curve.new_full((1,), float("inf"))])
        is_min = (curve <= left) & (curve <= right)
        is_min[-1] = False  # the far end is the saturated, trivial limit
        index = is_min.nonzero().flatten()
        best = index[curve[index].argsort()[:max_starts]]
        starts.append(best + offset)
    return torch.cat(starts)


def find_minima(problem: HeadProblem, structures: Sequence[Structure], *, points_per_decade: int = 32,
                decades: float = 8.0, max_starts: int = 4, second_class_choices: int = 4, refine_steps: int = 5,
                same_answer_atol: float = 1e-4, sign: int = 0) -> Dict[str, Minima]:
    """Every refined local minimum of each hypothesis' residual; minima whose labels agree within
    ``same_answer_atol`` are one answer (in flat, noisy basins refinement stops at slightly different ``t``).

    Each start is refined with its free entries held fixed; a two-class structure is refined once for each of
    the ``second_class_choices`` most likely second classes, because near a small mixup weight the best second
    class changes within a grid step. A second refinement re-chooses the free entries where the first ended.
    ``sign`` = +1 or -1 searches one sign of ``t`` only (non-negative features fix it).

    Cost: one ``(2 * points_per_decade * decades, C)`` softmax (half of it with ``sign``), then two rounds of at
    most ``refine_steps`` Gauss-Newton steps on at most ``2 * max_starts * second_class_choices`` candidates per
    structure at once.
    """
    grid = log_grid(problem, points_per_decade, decades, sign)
    halves = 1 if sign else 2
    curves = grid_residuals(problem, grid, tuple(structures))
    device = grid.device
    start_t, start_structure = [], []
    for index in range(len(structures)):
        chosen = _grid_minima(curves[:, index], halves, max_starts)
        # basins at the trivial level (r ~ 1) are not worth refining; keep at least the best one
        promising = curves[chosen, index] < 0.5
        promising[curves[chosen, index].argmin()] = True
        chosen = chosen[promising]
        start_t.append(grid[chosen])
        start_structure.append(torch.full_like(chosen, index))
    t0 = torch.cat(start_t)
    which = torch.cat(start_structure)
    free_entries = torch.tensor([s.free_entries for s in structures], device=device)[which]
    offset_free = torch.tensor([s.offset_free for s in structures], device=device)[which]
    choices = min(second_class_choices, problem.num_classes - 1)
    free = free_entries_of(problem, t0, torch.softmax(problem.logits(t0), -1), free_entries, offset_free,
                           choices=choices)  # (K, choices, 2)
    # one-class structures have a single way to choose their free entry: refine them once
    keep = torch.ones_like(free[..., 0], dtype=torch.bool)
    keep[:, 1:] = (free_entries == 2).unsqueeze(-1)
    rows = keep.nonzero()[:, 0]
    free = free[keep]
    t0, which, free_entries, offset_free = t0[rows], which[rows], free_entries[rows], offset_free[rows]
    t = gauss_newton(problem, t0, mask_of(free, problem.num_classes), offset_free, steps=refine_steps)
    # polish: near the answer the best free entries are clear; refine again with them
    free = free_entries_of(problem, t, torch.softmax(problem.logits(t), -1), free_entries, offset_free)[:, 0]
    t = gauss_newton(problem, t, mask_of(free, problem.num_classes), offset_free, steps=refine_steps)
    return {name: found[distinct_answers(found.labels, same_answer_atol)]
            for name, found in describe(problem, structures, t, which).items()}


def distinct_answers(labels: torch.Tensor, atol: float) -> torch.Tensor:
    """Indices of the rows of ``labels`` (K, C), best first, that differ by more than ``atol`` (max-abs) from
    every better row: minima reached from several starting points count once."""
    distance = (labels.unsqueeze(0) - labels.unsqueeze(1)).abs().amax(-1)
    earlier_close = (distance <= atol).tril(diagonal=-1).any(-1)
    return (~earlier_close).nonzero().flatten()


@register_search("exact")
def exact_search(problem: HeadProblem, label_format: str, *, structures: Optional[Sequence[str]] = None,
                 points_per_decade: int = 32, decades: float = 8.0, max_starts: int = 4, second_class_choices: int = 4,
                 refine_steps: int = 5, same_answer_atol: float = 1e-4, sign: int = 0) -> SearchOutcome:
    """The best refined minimum over the hypotheses of ``label_format`` (or the named ``structures``);
    ``info["minima"]`` holds them all."""
    names = FORMAT_STRUCTURES[label_format] if structures is None else tuple(structures)
    chosen = [STRUCTURES[name] for name in names if STRUCTURES[name].free_entries < problem.num_classes]
    minima = find_minima(problem, chosen, points_per_decade=points_per_decade, decades=decades,
                         max_starts=max_starts, second_class_choices=second_class_choices,
                         refine_steps=refine_steps, same_answer_atol=same_answer_atol, sign=sign)
    best = min(minima.values(), key=lambda m: float(m.residual[0]))
    halves = 1 if sign else 2
    grid_size = halves * (int(points_per_decade * decades) + 1)
    refined = halves * max_starts * sum(second_class_choices if s.free_entries == 2 else 1 for s in chosen)
    return SearchOutcome(t=float(best.t[0]), objective=float(best.residual[0]),
                         evaluations=grid_size + refined * (refine_steps + 1), converged=True,
                         info={"minima": minima})
