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

**The solve.** Levenberg-Marquardt on all unknowns at once (``B^2 + 1`` columns, closed-form Jacobians), from
:data:`STARTS` starts spread around the batch's mean feature (:func:`gradleak.batch.mass.mean_feature`), all
starts together. A start converges when its residual is within :data:`CONVERGED_UNITS` rounding units of the
gradient, or within :data:`FLOOR_RATIO` times what rounding alone leaves at the best solution where that is more.
The best one is the batch only when every start that ended at another batch (up to the order of the examples of one
class) misses by :data:`AMBIGUITY_RATIO` times more and does not converge itself; a start that ends near the
rounding apart from the best is first followed further, since along a flat valley it may still be on its way. The
caller judges the answer like any split: each example's own fit test and the joint reproductions. Each example's own
gradient is derived, and an ill-conditioned batch carries more rounding into it than the gradient's dtype says:
re-running the solve (and the split's least squares) on the gradient the answer gives measures how much, relative
to each example's largest entry, and the example is judged with it (``LabelSplit.precision``; see the ``precision``
of :func:`gradleak.recover_label`).

Where it holds (``gradleak experiment batch``, in the README): untrained ResNet18 at ``B = 8`` of CIFAR-10's 10
classes, features at cosine > 0.999999 and eps within 1e-7. LeNet with PyTorch's init, whose sigmoid features are
nearly parallel, leaves a flat valley (refused); with the paper's init, whose logits spread widely, starts can miss.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

from .by_labels import LabelSplit, _spans
from .least_squares import levenberg_marquardt
from .mass import mean_feature

#: Starts of the solve, spread around the mean feature.
STARTS = 32
#: Spreads of the starts around the mean feature (relative to its norm), log-spaced over the starts.
START_SPREADS = (0.03, 3.0)
#: Levenberg-Marquardt iterations at most; and for the starts that end near the rounding apart from the best.
ITERATIONS = 100
POLISH_ITERATIONS = 1000
#: A solve whose best start is still above this many rounding units after EARLY_ITERATIONS steps stops there: the
#: counts or the label model do not fit (measured on float32 gradients: starts that converge are below 3e3 units by
#: step 10; wrong counts stay at 1e5 to 1e6 and a mixup batch at 7e6 after 100 steps). The units are float32's for
#: finer gradients: a wrong model's misfit does not shrink with the rounding, and a float64 batch's converging starts
#: were still at 1e-7 to 1e-5 relative at step 20 (5e8 to 5e10 float64 units).
HOPELESS_UNITS = 1e4
EARLY_ITERATIONS = 20
#: A start has converged when its residual norm is at most this many rounding units of the gradient (measured on
#: ResNet18 and LeNet batches of 8 and 9 of 10 classes: the batch itself at 0.5 to 1.9 units, wrong batches from 2.9
#: units up), or within FLOOR_RATIO times the residual that rounding alone leaves at the best solution, where that
#: is more: the gradient its features and errors give, computed in the gradient's dtype, and solved again from it
#: in FLOOR_ITERATIONS steps (measured: the batch itself at 0.6 to 1.8 times that floor, from 0.3 units on ResNet18
#: to 49 units on LeNet with 100 classes at B = 16, whose sigmoid features are nearly parallel).
CONVERGED_UNITS = 10.0
FLOOR_RATIO = 3.0
FLOOR_ITERATIONS = 30
#: Converged starts whose features differ by more than this (relative) are different batches.
SAME_BATCH = 1e-3
#: The batch is unique when every start that ended at another one misses by this many times more (and does not
#: converge itself): the single example's rule for a unique answer.
AMBIGUITY_RATIO = 3.0
#: The same re-run tells how much rounding each example's own gradient carries: the solve and the split's least
#: squares, re-run on the gradient the answer gives, land that far (relative) from the answer's errors (measured on
#: LeNet: 2e-6 to 2e-5, where the labels were 3e-6 to 2e-5 from the truth). A batch whose examples carry more than
#: this is refused: their labels would not be pinned within 1e-3, the precision the batch answers are given to.
CARRIED_MOST = 1e-3 / AMBIGUITY_RATIO
#: A start is done when a step gains less than this part of its cost (more once it has converged, see
#: :mod:`gradleak.batch.least_squares`).
STALLED = 1e-12
#: Initial ``theta = 1 - eps``.
THETA_START = 0.9


def largest_joint_batch(num_classes: int) -> int:
    """The largest ``B`` the joint system reads: the head's gradient holds every feature while ``B <= C - 1``."""
    return num_classes - 1


class JointSystem:
    """The joint equations of a batch with known counts (see the module's docstring), in the unknowns
    ``x = (a_1, ..., a_B, theta)`` (``B^2 + 1``), evaluated at ``K`` points at once.

    Args:
        weight_grad: ``(C, d)`` ``G``; weight: ``(C, d)``; bias, bias_grad: ``(C,)``; all float64.
        counts: ``(C,)`` integers summing to ``B``; slot ``n`` takes the ``n``-th class of the sorted list.
        scale_known: False to fit the gradient scale ``s`` by least squares at every point.
    """

    def __init__(self, weight_grad: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                 bias_grad: torch.Tensor, counts: torch.Tensor, scale_known: bool) -> None:
        self.size, self.num_classes, self.bias, self.scale_known = int(counts.sum()), weight.shape[0], bias, scale_known
        self.columns, self.rows = _spans(weight_grad, self.size)                      # U (C, B), V (d, B)
        self.weight_reduced = weight @ self.rows                                      # (C, B)
        target = self.size * self.columns.T @ weight_grad @ self.rows                  # (B, B)
        bias_target = self.size * bias_grad
        self.scale = torch.linalg.vector_norm(target)
        self.bias_scale = torch.linalg.vector_norm(bias_target).clamp_min(1e-300)
        self.wanted = torch.cat([target.flatten() / self.scale, bias_target / self.bias_scale])
        self.classes = torch.repeat_interleave(torch.arange(self.num_classes, device=weight.device),
                                               counts.to(weight.device))
        self.one_hot = torch.eye(self.num_classes, dtype=weight.dtype, device=weight.device)[self.classes]  # (B, C)
        self.by_theta = 1.0 / self.num_classes - self.one_hot                         # (B, C): de_n / dtheta
        self.eye = torch.eye(self.size, dtype=weight.dtype, device=weight.device)

    def evaluate(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """At every point ``x`` (K, B^2 + 1): the coordinates ``a`` (K, B, B), predictions ``p`` and errors ``e``
        (K, B, C), ``U^T e_n`` (K, B, B), the right-hand sides rebuilt (K, B^2 + C) and the gradient scale ``s``
        (K,): 1 at a known scale, else the least-squares factor from the rebuilt sides to the observed ones (the
        residual stays relative to the observed gradient)."""
        a, theta = x[:, :-1].unflatten(-1, (self.size, self.size)), x[:, -1, None, None]
        p = torch.softmax(a @ self.weight_reduced.T + self.bias, -1)
        e = p - (theta * self.one_hot + (1 - theta) / self.num_classes)
        along = e @ self.columns
        rebuilt = torch.cat([(along.transpose(-1, -2) @ a).flatten(1) / self.scale, e.sum(1) / self.bias_scale], -1)
        s = rebuilt.new_ones(x.shape[0]) if self.scale_known else (rebuilt @ self.wanted) / rebuilt.square().sum(-1)
        return a, p, e, along, rebuilt, s

    def residuals(self, x: torch.Tensor) -> torch.Tensor:
        """``(K, B^2 + C + B C)``: the rebuilt sides (at the fitted scale) minus the observed; ``(I - U U^T) e_n``."""
        _, _, e, along, rebuilt, s = self.evaluate(x)
        return torch.cat([s[:, None] * rebuilt - self.wanted, (e - along @ self.columns.T).flatten(1)], -1)

    def normal_equations(self, x: torch.Tensor, r: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``J^T J`` (K, P, P) and ``J^T r`` (K, P) at every point ``x`` with residuals ``r``, in closed form from
        ``de_n/da_n = (diag(p_n) - p_n p_n^T) W V``. The ``B C`` rows ``(I - U U^T) e_n`` (most of them with 100
        classes) depend on example ``n``'s coordinates and ``theta`` alone: their part is summed block by block."""
        size, columns, eye = self.size, self.columns, self.eye
        a, p, _, along, rebuilt, s = self.evaluate(x)
        count = x.shape[0]
        by_a = p.unsqueeze(-1) * (self.weight_reduced - (p @ self.weight_reduced).unsqueeze(-2))  # (K, B, C, B)
        # the rebuilt sides M = sum_n (U^T e_n) a_n^T (entry [i, j], by a_n[l]) and sum_n e_n
        turned = columns.T @ by_a                                                         # (K, B, B, B)
        by_m = (torch.einsum("knil,knj->kijnl", turned, a)
                + torch.einsum("kni,jl->kijnl", along, eye)).flatten(3).flatten(1, 2)     # (K, B^2, B^2)
        by_m_theta = torch.einsum("ni,knj->kij", self.by_theta @ columns, a).flatten(1)    # (K, B^2)
        by_sum = by_a.permute(0, 2, 1, 3).flatten(2)                                       # (K, C, B^2)
        by_sum_theta = self.by_theta.sum(0).expand(count, -1).unsqueeze(-1)                # (K, C, 1)
        jacobian = torch.cat([torch.cat([by_m, by_m_theta.unsqueeze(-1)], -1) / self.scale,
                              torch.cat([by_sum, by_sum_theta], -1) / self.bias_scale], 1)  # (K, B^2 + C, P)
        if not self.scale_known:  # d(s r) = s dr + r ds, ds = (wanted - 2 s r) . dr / |r|^2
            pull = ((self.wanted - 2 * s[:, None] * rebuilt) / rebuilt.square().sum(-1, keepdim=True)).unsqueeze(1)
            jacobian = s[:, None, None] * jacobian + rebuilt.unsqueeze(-1) * (pull @ jacobian)
        top = jacobian.shape[1]
        matrix = jacobian.transpose(-1, -2) @ jacobian
        gradient = (jacobian.transpose(-1, -2) @ r[:, :top, None]).squeeze(-1)
        own = torch.cat([by_a, self.by_theta.expand(count, -1, -1).unsqueeze(-1)], -1)
        own = own - columns @ (columns.T @ own)                                           # (I - U U^T) de_n
        blocks = own.transpose(-1, -2) @ own                                              # (K, B, B + 1, B + 1)
        own_r = r[:, top:].unflatten(-1, (size, self.num_classes)).unsqueeze(-1)
        pulls = (own.transpose(-1, -2) @ own_r).squeeze(-1)                               # (K, B, B + 1)
        matrix[:, :-1, :-1] += torch.einsum("knij,nm->knimj", blocks[..., :size, :size], eye).flatten(3).flatten(1, 2)
        matrix[:, :-1, -1] += blocks[..., :size, size].flatten(1)
        matrix[:, -1, :-1] += blocks[..., size, :size].flatten(1)
        matrix[:, -1, -1] += blocks[..., size, size].sum(1)
        gradient[:, :-1] += pulls[..., :size].flatten(1)
        gradient[:, -1] += pulls[..., size].sum(1)
        return matrix, gradient


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
    system = JointSystem(g, w, b, db, counts, scale_known)
    x = _starts(system.rows.T @ mean_feature(g, db, counts == 0), size, seed)
    hopeless = HOPELESS_UNITS * max(precision, torch.finfo(torch.float32).eps)
    x, norm = _levenberg_marquardt(system, x, ITERATIONS, give_up=hopeless, settled=CONVERGED_UNITS * precision)
    x, norm, apart = _ranked(x, norm, system.classes)

    def bound(best: torch.Tensor) -> Tuple[float, torch.Tensor]:
        """The convergence bound at the solution ``best`` (P,), and the rounding its examples carry."""
        floor, carried = _rounded_again(system, best, w, b, counts, weight_grad.dtype)
        return max(CONVERGED_UNITS * precision, FLOOR_RATIO * floor), carried

    settled, carried = CONVERGED_UNITS * precision, None
    if float(norm[0]) <= hopeless:
        settled, carried = bound(x[0])
    # a start near the rounding that has not reached the best batch may still be on its way there along a flat
    # valley (measured: one at 4.6 units went on to the best one): it is followed further before it counts as a
    # second batch
    slow = (apart & (norm <= settled)).nonzero().flatten()
    if len(slow):
        best_before = x[0].clone()
        x[slow], norm[slow] = _levenberg_marquardt(system, x[slow], POLISH_ITERATIONS)
        x, norm, apart = _ranked(x, norm, system.classes)
        if not torch.equal(x[0], best_before):  # a followed start overtook the best: its own rounding is measured
            settled, carried = bound(x[0])
    converged = norm <= settled
    best, runner_up = float(norm[0]), float(norm[apart][0]) if bool(apart.any()) else math.inf
    if not (bool(converged.any()) and runner_up > max(AMBIGUITY_RATIO * best, settled)
            and float(carried.max()) <= CARRIED_MOST):
        return LabelSplit(None, None, int(converged.sum()), best, runner_up)
    a, _, errors, _, _, s = system.evaluate(x[:1])
    return LabelSplit(a[0] @ system.rows.T, errors[0], int(converged.sum()), best, runner_up, float(s[0]), carried)


def _rounded_again(system: JointSystem, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   counts: torch.Tensor, dtype: torch.dtype) -> Tuple[float, torch.Tensor]:
    """What rounding alone does to the solution ``x`` (P,): the mean-loss gradients its features and errors give,
    computed in ``dtype`` as a network computes them, solved again from ``x``. Returns the residual norm that
    leaves, and how far (relative to each example's largest entry) the errors read from the re-solved features by
    least squares, as the split reads them, land from the solution's ``(B,)``."""
    a, _, errors, _, _, _ = system.evaluate(x[None])
    features, errors, size = a[0] @ system.rows.T, errors[0], system.size
    rounded_errors, rounded_features = errors.to(dtype), features.to(dtype)
    weight_grad = (rounded_errors.T @ rounded_features / size).double()
    rebuilt = JointSystem(weight_grad, weight, bias, rounded_errors.mean(0).double(), counts, system.scale_known)
    start = torch.cat([(features @ rebuilt.rows).flatten(), x[-1:]])[None]
    again, norm = _levenberg_marquardt(rebuilt, start, FLOOR_ITERATIONS)
    features_again = rebuilt.evaluate(again)[0][0] @ rebuilt.rows.T
    errors_again = least_squares_errors(features_again, weight_grad)
    return float(norm[0]), (errors_again - errors).abs().amax(-1) / errors.abs().amax(-1)


def least_squares_errors(features: torch.Tensor, weight_grad: torch.Tensor) -> torch.Tensor:
    """Every example's ``e_n`` ``(B, C)`` from the batch's ``G`` ``(C, d)`` and its independent features ``(B, d)``:
    ``E^T = B G pinv(H^T)``. By QR without column pivoting: nearly parallel features (LeNet's sigmoids) put a
    rank-revealing solver's rank decision at the rounding, where it flipped from call to call (measured: errors
    3e-1 or 1e-4 from the same inputs)."""
    return torch.linalg.lstsq(features.T, weight_grad.T, driver="gels").solution * features.shape[0]


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


def _levenberg_marquardt(system: JointSystem, x: torch.Tensor, iterations: int, give_up: float = math.inf,
                         settled: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Minimise ``||system.residuals(x)||`` from every start ``x`` (K, P) at once, for at most ``iterations`` steps,
    or :data:`EARLY_ITERATIONS` when no start is below ``give_up`` by then; a start below ``settled`` is done once a
    step gains little (:func:`gradleak.batch.least_squares.levenberg_marquardt`): ``(x, residual norms (K,))``."""
    return levenberg_marquardt(system.residuals, system.normal_equations, x, iterations, stalled=STALLED,
                               give_up=give_up, give_up_after=EARLY_ITERATIONS, settled=settled)


def _distance(a: torch.Tensor, best: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """How far each solution's features ``a`` (K, B, B) are from ``best`` (B, B) as batches, whatever the order of
    the examples within a class: the largest distance from an example to the nearest example of its class in the
    other batch, both ways (K,)."""
    distance = torch.cdist(a, best.expand_as(a))
    distance = distance.masked_fill(classes.unsqueeze(-1) != classes, math.inf)
    return torch.maximum(distance.amin(-1).amax(-1), distance.amin(-2).amax(-1))
