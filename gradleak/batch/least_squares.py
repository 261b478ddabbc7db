"""Levenberg-Marquardt from many points at once: the one damped least-squares loop of the batch's solves.

The joint solve (:mod:`gradleak.batch.joint`, closed-form normal equations, tens of starts at once) and the
second-order class-mean fit (:mod:`gradleak.batch.spread`, complex-step Jacobians, one start) run it alike. Every point
keeps its own damping, relative to its normal matrix's diagonal, eased after a step that lowers its cost and
stiffened after one that does not; points that are done keep stepping until all are (a step that does not lower the
cost is never taken), so each point's path depends on itself alone.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch

#: The damping a point starts with, relative to its normal matrix's diagonal; divided by EASE after a step taken
#: (down to LEAST_DAMPING), multiplied by STIFFEN after one refused. A point whose damping passes MOST_DAMPING is done.
START_DAMPING = 1e-3
EASE, STIFFEN = 3.0, 4.0
LEAST_DAMPING, MOST_DAMPING = 1e-12, 1e10
#: Added to the diagonal that the damping scales: an unknown the residuals barely depend on is still damped.
DIAGONAL_FLOOR = 1e-12
#: A point below ``settled`` is done once a step gains less than this part of its cost.
SETTLED_GAIN = 1e-2

Residuals = Callable[[torch.Tensor], torch.Tensor]
NormalEquations = Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]


def levenberg_marquardt(residuals: Residuals, normal_equations: NormalEquations, x: torch.Tensor, iterations: int,
                        *, stalled: float, give_up: float = math.inf, give_up_after: int = 0, settled: float = 0.0,
                        finished: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Minimise ``||residuals(x)||`` from every point ``x`` (K, P) at once.

    Args:
        residuals: points ``(K, P)`` to residuals ``(K, R)``.
        normal_equations: points ``(K, P)`` and their residuals ``(K, R)`` to ``J^T J`` ``(K, P, P)`` and ``J^T r``
            ``(K, P)``.
        iterations: steps at most.
        stalled: a point is done once a step it takes gains less than this part of its cost.
        give_up, give_up_after: stop after ``give_up_after`` steps when no point's residual norm is below
            ``give_up`` by then.
        settled: a point whose residual norm is below it is done once a step gains less than :data:`SETTLED_GAIN`
            of its cost.
        finished: points and their residual norms ``(K,)`` to the points that need no more steps as they stand
            ``(K,)`` bool (asked before each step).

    Returns:
        ``(x (K, P), residual norms (K,))``.
    """
    r = residuals(x)
    cost = r.square().sum(-1)
    damping, done = torch.full_like(cost, START_DAMPING), torch.zeros_like(cost, dtype=torch.bool)
    floor = DIAGONAL_FLOOR * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    for iteration in range(iterations):
        if iteration == give_up_after and not bool((cost < give_up ** 2).any()):
            break
        if bool((done if finished is None else done | finished(x, cost.sqrt())).all()):
            break
        normal, pull = normal_equations(x, r)
        scaled = damping[:, None, None] * (normal.diagonal(dim1=-2, dim2=-1).diag_embed() + floor)
        step = -torch.linalg.solve(normal + scaled, pull.unsqueeze(-1)).squeeze(-1)
        trial = x + step
        trial_r = residuals(trial)
        trial_cost = trial_r.square().sum(-1)
        better = trial_cost < cost
        gain = torch.where(better, cost - trial_cost, 0.0)
        x = torch.where(better[:, None], trial, x)
        r = torch.where(better[:, None], trial_r, r)
        done = done | (better & (gain <= stalled * cost))
        if settled > 0:
            done = done | ((cost <= settled ** 2) & (gain <= SETTLED_GAIN * cost))
        cost = torch.where(better, trial_cost, cost)
        damping = torch.where(better, (damping / EASE).clamp_min(LEAST_DAMPING), damping * STIFFEN)
        done = done | (damping > MOST_DAMPING)
    return x, cost.sqrt()
