"""Our search: exact, deterministic, vectorised.

``t`` is bounded below (``|t| >= t_min``, from ``|p_i - y_i| <= 1``; with an unknown gradient scale, where the
feature scale is free, by the ``t`` below which the softmax is linear) and the normalised residual of every
hypothesis tends to 1 as ``|t| -> inf``, so one log-spaced grid over both signs sees every basin. The grid is
evaluated as one ``(N, K, C)`` softmax for N examples at once, its local minima are refined together by
Gauss-Newton (quadratic convergence: the residual is zero at the truth), and all refined minima are returned so
that the caller can tell a unique answer from an ambiguous one. Examples have different numbers of minima: the
candidate sets are padded (:class:`~gradleak.recovery.structure.Minima` ``live``).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch

from ..head import HeadBatch, HeadProblem, examples_per_block
from .base import SearchOutcome, register_search
from .structure import (FORMAT_STRUCTURES, STRUCTURES, Minima, Structure, describe, free_entries_of,
                        gauss_newton, grid_residuals, hypotheses, mask_of)


def log_grid(problem: HeadBatch, points_per_decade: int, decades: float, sign: torch.Tensor, halves: int = 2
             ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scalars ``+-t_lower * 10^k`` for ``k`` in ``[0, decades]``, ``|t|`` rising within each sign; positive half
    first. ``sign`` (N,) = +1 or -1 keeps one half only for that example.

    Returns:
        ``(grid, live)``, ``(N, halves * n)`` each: with ``halves`` = 2 (needed when some example searches both
        signs) the second half of an example that searches one is padding (``live`` False).
    """
    n = int(points_per_decade * decades) + 1
    steps = torch.logspace(0.0, decades, n, dtype=torch.float64, device=problem.c.device)
    magnitudes = problem.t_lower.unsqueeze(-1) * steps
    first = torch.where(sign.unsqueeze(-1) < 0, -magnitudes, magnitudes)
    live = torch.ones_like(first, dtype=torch.bool)
    if halves == 1:
        return first, live
    both = (sign == 0).unsqueeze(-1)
    return torch.cat([first, torch.where(both, -magnitudes, first)], -1), torch.cat([live, both.expand_as(live)], -1)


def _grid_minima(r: torch.Tensor, live: torch.Tensor, halves: int, max_starts: int
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Up to ``max_starts`` lowest local minima of each half of each ``log_grid`` residual curve ``r`` (..., G)
    (``live`` (..., G) marks the real grid points): ``(indices, found)``, ``(..., halves * max_starts)`` each,
    lowest first within each half (ties: the smaller ``|t|`` first), ``found`` False where a half has fewer
    minima."""
    size = r.shape[-1] // halves
    curve, alive = r.unflatten(-1, (halves, size)), live.unflatten(-1, (halves, size))
    edge = curve.new_full((*curve.shape[:-1], 1), float("inf"))
    left, right = torch.cat([edge, curve[..., :-1]], -1), torch.cat([curve[..., 1:], edge], -1)
    is_min = (curve <= left) & (curve <= right) & alive
    is_min[..., -1] = False  # the far end is the saturated, trivial limit
    key = torch.where(is_min, curve, math.inf)
    # a partial selection sort, max_starts rounds of argmin (the first of equal values): cheaper than sorting
    # the whole grid for the few minima it has
    chosen = []
    for _ in range(max_starts):
        index = key.argmin(-1, keepdim=True)
        chosen.append(index)
        key.scatter_(-1, index, float("inf"))
    index = torch.cat(chosen, -1)
    found = is_min.gather(-1, index)
    index = index + torch.arange(halves, device=r.device).unsqueeze(-1) * size
    return index.flatten(-2), found.flatten(-2)


def _grid_starts(problem: HeadBatch, structures: Sequence[Structure], sign: torch.Tensor, halves: int, *,
                 points_per_decade: int, decades: float, max_starts: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Where to start refining: ``(t, live)``, ``(N, len(structures) * halves * max_starts)`` each, the grid's
    lowest local minima of each structure (structure by structure), ``live`` False for padding."""
    grid, alive = log_grid(problem, points_per_decade, decades, sign, halves)
    curves = grid_residuals(problem, grid, tuple(structures))                  # (N, S, G)
    chosen, found = _grid_minima(curves, alive.unsqueeze(1), halves, max_starts)  # (N, S, halves * max_starts)
    value = torch.where(found, curves.gather(-1, chosen), 2.0)
    # basins at the trivial level (r ~ 1) are not worth refining; keep at least the best one of each structure
    promising = found & (value < 0.5)
    promising.scatter_(-1, value.argmin(-1, keepdim=True), True)
    starts = grid.unsqueeze(1).expand_as(curves).gather(-1, chosen)
    return starts.flatten(1), promising.flatten(1)


def find_minima(problem: HeadBatch, structures: Sequence[Structure], *, points_per_decade: int = 32,
                decades: float = 8.0, max_starts: int = 4, second_class_choices: int = 4, refine_steps: int = 5,
                same_answer_atol: float = 1e-4, sign: Optional[torch.Tensor] = None) -> Dict[str, Minima]:
    """Every refined local minimum of each hypothesis' residual, for each example; minima whose labels agree
    within ``same_answer_atol`` are one answer (in flat, noisy basins refinement stops at slightly different
    ``t``).

    Each start is refined with its free entries held fixed; a two-class structure is refined once for each of
    the ``second_class_choices`` most likely second classes, because near a small mixup weight the best second
    class changes within a grid step. A second refinement re-chooses the free entries where the first ended.
    ``sign`` (N,) = +1 or -1 searches one sign of ``t`` only (non-negative features fix it), 0 both (default).

    Cost: one ``(N, 2 * points_per_decade * decades, C)`` softmax (half of it when every example has a sign),
    then two rounds of at most ``refine_steps`` Gauss-Newton steps on at most ``2 * max_starts *
    second_class_choices`` candidates per structure and example at once.
    """
    sign = torch.zeros(len(problem), dtype=torch.long, device=problem.c.device) if sign is None else sign
    halves = 1 if bool((sign != 0).all()) else 2
    grid_size = halves * (int(points_per_decade * decades) + 1)
    # the grid is the biggest pass: block by block of examples (see gradleak.head.examples_per_block)
    size = examples_per_block(grid_size * problem.num_classes)
    blocks = [_grid_starts(part, structures, part_sign, halves, points_per_decade=points_per_decade,
                           decades=decades, max_starts=max_starts)
              for part, part_sign in zip(problem.split(size), sign.split(size))]
    t0, live = torch.cat([b[0] for b in blocks]), torch.cat([b[1] for b in blocks])
    which = torch.arange(len(structures), device=t0.device).repeat_interleave(t0.shape[-1] // len(structures))
    # most examples have one promising basin per structure: drop the starts that are padding for every example
    # (padding never changes a real candidate's answer, so this changes nobody's)
    used = live.any(0)
    t0, live, which = t0[:, used], live[:, used], which[used]
    free_entries, offset_free = hypotheses(structures, which)
    choices = min(second_class_choices, problem.num_classes - 1)
    free = free_entries_of(problem, t0, problem.softmax(t0), free_entries, offset_free, choices=choices)  # (N, K, k, 2)
    # one-class structures have a single way to choose their free entry: refine them once
    keep = torch.ones(free.shape[1:3], dtype=torch.bool, device=t0.device)
    keep[:, 1:] = (free_entries == 2).unsqueeze(-1)
    columns = keep.nonzero()[:, 0]
    free = free[:, keep]
    t0, live, which = t0[:, columns], live[:, columns], which[columns]
    free_entries, offset_free = free_entries[columns], offset_free[columns]
    t = gauss_newton(problem, t0, mask_of(free, problem.num_classes), offset_free, steps=refine_steps, live=live)
    # polish: near the answer the best free entries are clear; refine again with them
    free = free_entries_of(problem, t, problem.softmax(t), free_entries, offset_free)[..., 0, :]
    t = gauss_newton(problem, t, mask_of(free, problem.num_classes), offset_free, steps=refine_steps, live=live)
    return {name: found.distinct(same_answer_atol)
            for name, found in describe(problem, structures, t, which, live=live).items()}


def search_evaluations(structures: Sequence[Structure], sign: torch.Tensor, *, points_per_decade: int = 32,
                       decades: float = 8.0, max_starts: int = 4, second_class_choices: int = 4,
                       refine_steps: int = 5) -> torch.Tensor:
    """Candidate scalars :func:`find_minima` evaluates at most per example, ``(N,)``, given the ``sign`` (N,) of
    ``t`` each searches (0: both)."""
    signs = torch.where(sign == 0, 2, 1)
    grid_size = signs * (int(points_per_decade * decades) + 1)
    refined = signs * max_starts * sum(second_class_choices if s.free_entries == 2 else 1 for s in structures)
    return grid_size + refined * (refine_steps + 1)


@register_search("exact")
def exact_search(problem: HeadProblem, label_format: str, *, structures: Optional[Sequence[str]] = None,
                 points_per_decade: int = 32, decades: float = 8.0, max_starts: int = 4, second_class_choices: int = 4,
                 refine_steps: int = 5, same_answer_atol: float = 1e-4, sign: int = 0) -> SearchOutcome:
    """The best refined minimum over the hypotheses of ``label_format`` (or the named ``structures``);
    ``info["minima"]`` holds them all (a batch of one: see :func:`find_minima`)."""
    names = FORMAT_STRUCTURES[label_format] if structures is None else tuple(structures)
    chosen = [STRUCTURES[name] for name in names if STRUCTURES[name].free_entries < problem.num_classes]
    batch = HeadBatch.of(problem)
    signs = torch.tensor([sign], device=problem.c.device)
    options = dict(points_per_decade=points_per_decade, decades=decades, max_starts=max_starts,
                   second_class_choices=second_class_choices, refine_steps=refine_steps)
    minima = find_minima(batch, chosen, same_answer_atol=same_answer_atol, sign=signs, **options)
    best = min(minima.values(), key=lambda m: float(m.residual[0, 0]))
    evaluations = search_evaluations(chosen, signs, **options)
    return SearchOutcome(t=float(best.t[0, 0]), objective=float(best.residual[0, 0]),
                         evaluations=int(evaluations[0]), converged=True, info={"minima": minima})
