"""A batch of up to ``C - 1`` examples solved as one system, once its counts are known.

The head's gradient ``G = (1/B) sum_n e_n h_n^T`` (C, d) of a batch of ``B <= C - 1`` examples has rank ``B``: the
features span its row space (an orthonormal basis ``V``, d x B) and the ``e_n = p_n - y_n`` its column space
(``U``, C x B). Write each feature as ``h_n = V a_n``. With labels smoothed by one eps (hard labels: eps = 0),
``y_n = theta e_{k_n} + (1 - theta) / C`` with ``theta = 1 - eps``, and ``e_n = softmax(W V a_n + b) - y_n``:

    sum_n (U^T e_n) a_n^T = B U^T G V        (B^2 equations)
    sum_n e_n             = B dL/db           (B more, in the span of U)
    (I - U U^T) e_n       = 0                 (C - B - 1 per example)

in the ``B^2 + 1`` unknowns ``a_n`` and ``theta``. One example alone has ``C - B - 1`` equations for ``B + 1``
unknowns, too few beyond ``B = (C - 3) / 2`` (see :mod:`gradleak.batch.by_labels`); together the examples have
``B (C - B) - 1`` to spare, at ``B = C - 1`` too.

The classes ``k_n`` are the counts' (from the class mass): the examples are exchangeable, so the ``n``-th slot
takes the ``n``-th class of the sorted list. Wrong counts leave no solution, since the system is overdetermined.

**The solve.** Levenberg-Marquardt on all unknowns at once (forward-mode Jacobians: ``B^2 + 1`` columns), from
:data:`STARTS` starts spread around the batch's mean feature (:func:`gradleak.batch.mass.mean_feature`), all
starts together. A start converges when its residual is within :data:`CONVERGED_UNITS` rounding units of the
gradient (more over more residual rows). The best one is the batch only when every start that ended at another
batch (up to the order of the examples of one class) misses by :data:`AMBIGUITY_RATIO` times more and does not
converge itself; a start that ends near the rounding apart from the best is first followed further, since along a
flat valley it may still be on its way. The caller judges the answer like any split: each example's own fit test
and the joint reproductions.

Where it holds (``gradleak experiment batch``, in the README): untrained ResNet18 at ``B = 8`` of CIFAR-10's 10
classes, features at cosine > 0.999999 and eps within 1e-7. LeNet with PyTorch's init, whose sigmoid features are
nearly parallel, leaves a flat valley (refused); with the paper's init, whose logits spread widely, starts can miss.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
from torch.func import jacfwd, vmap

from .by_labels import LabelSplit, _spans
from .mass import mean_feature

#: Starts of the solve, spread around the mean feature.
STARTS = 32
#: Spreads of the starts around the mean feature (relative to its norm), log-spaced over the starts.
START_SPREADS = (0.03, 3.0)
#: Levenberg-Marquardt iterations at most; and for the starts that end near the rounding apart from the best.
ITERATIONS = 100
POLISH_ITERATIONS = 1000
#: A solve whose best start is still above this many rounding units after EARLY_ITERATIONS steps stops there: the
#: counts or the label model do not fit (measured: starts that converge are below 3e3 units by step 10; wrong counts
#: stay at 1e5 to 1e6 and a mixup batch at 7e6 after 100 steps).
HOPELESS_UNITS = 1e4
EARLY_ITERATIONS = 20
#: A start has converged when its residual norm is at most this many rounding units of the gradient, over up to
#: MEASURED_ROWS residual rows (measured on ResNet18 and LeNet batches of 8 and 9 of 10 classes, 154 to 181 rows: the
#: batch itself at 0.5 to 1.9 units, wrong batches from 2.9 units up). The norm of R rows of rounding grows as
#: sqrt(R), and so does the bound beyond them (measured on LeNet with 100 classes at B = 8, 964 rows: the batch itself
#: at 7.9 to 12.4 units, and no start at another batch).
CONVERGED_UNITS = 10.0
MEASURED_ROWS = 181
#: Converged starts whose features differ by more than this (relative) are different batches.
SAME_BATCH = 1e-3
#: The batch is unique when every start that ended at another one misses by this many times more (and does not
#: converge itself): the single example's rule for a unique answer.
AMBIGUITY_RATIO = 3.0
#: A start is done when a step gains less than this part of its cost (SETTLED_GAIN once it has converged), or its
#: damping exceeds MOST_DAMPING.
STALLED = 1e-12
SETTLED_GAIN = 1e-2
MOST_DAMPING = 1e10
#: Initial ``theta = 1 - eps``.
THETA_START = 0.9


def largest_joint_batch(num_classes: int) -> int:
    """The largest ``B`` the joint system reads: the head's gradient holds every feature while ``B <= C - 1``."""
    return num_classes - 1


def solve_jointly(weight_grad: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, bias_grad: torch.Tensor,
                  counts: torch.Tensor, *, precision: float, scale_known: bool = True, seed: int = 0) -> LabelSplit:
    """Every example's feature and label of a batch gradient whose counts are known, by solving the batch at once.

    Args:
        weight_grad: ``(C, d)`` ``G`` of the batch (rank ``B``); weight: ``(C, d)``; bias, bias_grad: ``(C,)``.
        counts: ``(C,)`` integers summing to ``B <= C - 1``: the examples per class (smoothing or hard labels with
            one eps).
        precision: the gradient's rounding (relative).
        scale_known: False when the gradients are ``s`` times the true ones for an unknown ``s`` (a weight update):
            the spans do not depend on ``s``, and ``s`` is fitted by least squares at every step (the right-hand
            sides scale with it), so that each start solves for the features and ``theta`` only.
        seed: seeds the starts.

    Returns:
        :class:`~gradleak.batch.by_labels.LabelSplit`: features ``(B, d)`` and errors ``(B, C)`` when the solve
        converged to one batch, else None for both; ``candidates`` is the number of converged starts, ``misfit``
        the best residual norm, ``runner_up`` the best of the starts that ended at a different batch (inf if none)
        and ``gradient_scale`` the fitted ``s`` (1.0 at a known scale).
    """
    g, w, b, db = weight_grad.double(), weight.double(), bias.double(), bias_grad.double()
    num_classes = w.shape[0]
    size = int(counts.sum())
    if not 2 <= size <= largest_joint_batch(num_classes):
        raise ValueError(f"the joint solve reads 2 <= B <= C - 1 = {num_classes - 1} examples, got B = {size}")
    columns, rows = _spans(g, size)
    weight_reduced = w @ rows                                                        # (C, B)
    target = size * columns.T @ g @ rows                                             # (B, B)
    bias_target = size * db
    scale, bias_scale = torch.linalg.vector_norm(target), torch.linalg.vector_norm(bias_target).clamp_min(1e-300)
    classes = torch.repeat_interleave(torch.arange(num_classes, device=g.device), counts.to(g.device))
    one_hot = torch.eye(num_classes, dtype=g.dtype, device=g.device)[classes]        # (B, C)

    def errors_of(a: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return torch.softmax(a @ weight_reduced.T + b, -1) - (theta * one_hot + (1 - theta) / num_classes)

    wanted = torch.cat([target.flatten() / scale, bias_target / bias_scale])

    def gradient_scale(rebuilt: torch.Tensor) -> torch.Tensor:
        """``s``: 1 at a known scale, else the least-squares factor from the right-hand sides the features rebuild
        to the observed ones (the residual stays relative to the observed gradient)."""
        return rebuilt.new_ones(()) if scale_known else (rebuilt @ wanted) / rebuilt.square().sum()

    def rebuilt_of(a: torch.Tensor, e: torch.Tensor, along: torch.Tensor) -> torch.Tensor:
        """The right-hand sides the features ``a`` and errors ``e`` rebuild (``along = U^T e_n``, (B, B))."""
        return torch.cat([(along.T @ a).flatten() / scale, e.sum(0) / bias_scale])

    def residual(x: torch.Tensor) -> torch.Tensor:
        a, theta = x[:-1].reshape(size, size), x[-1]
        e = errors_of(a, theta)
        along = e @ columns
        rebuilt = rebuilt_of(a, e, along)
        return torch.cat([gradient_scale(rebuilt) * rebuilt - wanted, (e - along @ columns.T).flatten()])

    residual_rows = size * size + num_classes + size * num_classes
    settled = CONVERGED_UNITS * precision * max(1.0, math.sqrt(residual_rows / MEASURED_ROWS))
    x = _starts(rows.T @ mean_feature(g, db, counts == 0), size, seed)
    x, norm = _levenberg_marquardt(residual, x, ITERATIONS, give_up=HOPELESS_UNITS * precision, settled=settled)
    x, norm, apart = _ranked(x, norm, classes)
    # a start near the rounding that has not reached the best batch may still be on its way there along a flat
    # valley (measured: one at 4.6 units went on to the best one): it is followed further before it counts as a
    # second batch
    slow = (apart & (norm <= settled)).nonzero().flatten()
    if len(slow):
        x[slow], norm[slow] = _levenberg_marquardt(residual, x[slow], POLISH_ITERATIONS)
        x, norm, apart = _ranked(x, norm, classes)
    converged = norm <= settled
    best, runner_up = float(norm[0]), float(norm[apart][0]) if bool(apart.any()) else math.inf
    if not (bool(converged.any()) and runner_up > max(AMBIGUITY_RATIO * best, settled)):
        return LabelSplit(None, None, int(converged.sum()), best, runner_up)
    a = x[0, :-1].reshape(size, size)
    errors = errors_of(a, x[0, -1])
    return LabelSplit(a @ rows.T, errors, int(converged.sum()), best, runner_up,
                      float(gradient_scale(rebuilt_of(a, errors, errors @ columns))))


def _starts(mean: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """``(STARTS, B^2 + 1)``: every example at the mean feature's coordinates ``mean`` (B,), moved by a spread of
    :data:`START_SPREADS` (one spread per start) in random directions, and ``theta`` at :data:`THETA_START`."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(STARTS, size, size, generator=generator, dtype=torch.float64).to(mean.device)
    spread = torch.logspace(math.log10(START_SPREADS[0]), math.log10(START_SPREADS[1]), STARTS,
                            dtype=torch.float64, device=mean.device)
    a = mean + (spread * torch.linalg.vector_norm(mean) / math.sqrt(size))[:, None, None] * noise
    return torch.cat([a.flatten(1), mean.new_full((STARTS, 1), THETA_START)], -1)


def _ranked(x: torch.Tensor, norm: torch.Tensor, classes: torch.Tensor
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The solutions ``x`` (K, P) best first, their residual norms (K,), and which are apart from the best (K,)."""
    order = norm.argsort()
    x, norm = x[order], norm[order]
    size = classes.shape[0]
    a = x[:, :-1].unflatten(-1, (size, size))
    return x, norm, _distance(a, a[0], classes) > SAME_BATCH * torch.linalg.vector_norm(a[0])


def _levenberg_marquardt(residual, x: torch.Tensor, iterations: int, give_up: float = math.inf,
                         settled: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Minimise ``||residual(x)||`` from every start ``x`` (K, P) at once, for at most ``iterations`` steps, or
    :data:`EARLY_ITERATIONS` when no start is below ``give_up`` by then; a start below ``settled`` is done once a
    step gains less than :data:`SETTLED_GAIN` of its cost: ``(x, residual norms (K,))``."""
    residuals, jacobians = vmap(residual), vmap(jacfwd(residual))
    r = residuals(x)
    cost = r.square().sum(-1)
    damping, done = torch.full_like(cost, 1e-3), torch.zeros_like(cost, dtype=torch.bool)
    identity = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    for iteration in range(iterations):
        if iteration == EARLY_ITERATIONS and not bool((cost < give_up ** 2).any()):
            break
        jacobian = jacobians(x)
        normal = jacobian.transpose(-1, -2) @ jacobian
        scaled = damping[:, None, None] * (normal.diagonal(dim1=-2, dim2=-1).diag_embed() + 1e-12 * identity)
        step = -torch.linalg.solve(normal + scaled, (jacobian.transpose(-1, -2) @ r.unsqueeze(-1))).squeeze(-1)
        trial = x + step
        trial_r = residuals(trial)
        trial_cost = trial_r.square().sum(-1)
        better = trial_cost < cost
        gain = torch.where(better, cost - trial_cost, 0.0)
        stalled = (better & (gain <= STALLED * cost)) | ((cost <= settled ** 2) & (gain <= SETTLED_GAIN * cost))
        x = torch.where(better[:, None], trial, x)
        r = torch.where(better[:, None], trial_r, r)
        cost = torch.where(better, trial_cost, cost)
        damping = torch.where(better, (damping / 3).clamp_min(1e-12), damping * 4)
        # a start is done when its steps no longer gain (at the gradient's rounding) or keep failing
        done = done | stalled | (damping > MOST_DAMPING)
        if bool(done.all()):
            break
    return x, cost.sqrt()


def _distance(a: torch.Tensor, best: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """How far each solution's features ``a`` (K, B, B) are from ``best`` (B, B) as batches, whatever the order of
    the examples within a class: the largest distance from an example to the nearest example of its class in the
    other batch, both ways (K,)."""
    distance = torch.cdist(a, best.expand_as(a))
    distance = distance.masked_fill(classes.unsqueeze(-1) != classes, math.inf)
    return torch.maximum(distance.amin(-1).amax(-1), distance.amin(-2).amax(-1))
