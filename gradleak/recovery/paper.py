"""The paper's own searches (Wang, Liang & He, ICLR 2024), re-implemented for reproduction and comparison.

The paper writes the head input as ``h = s * g_r / coefficient`` with ``g_r`` the gradient row
``r = argmax_i |sum_j G_ij|``, and scores a candidate scalar ``s`` by how well the candidate label

    y_i(s) = softmax(W h(s) + b)_i - G[i, k] / h_k(s),     k = argmax(h(s))  (argmin if max(h(s)) == 0)

fits the label's structure: ``1000 * Var_pop`` of its ``C - m`` smallest entries, ``m = 1`` for label smoothing
(and hard labels), ``m = 2`` for mixup. Two searches minimise it:

* :func:`lbfgs_search` (``method="lbfgs"``): L-BFGS from ``s = +1`` then ``s = -1``, with plateau skips;
* :func:`pso_search` (``method="pso"``): scikit-opt 0.6.6's particle swarm over a schedule of intervals.

Both stop at the first ``s`` whose loss is below ``threshold``. The official code then compared ``s`` with the
true scalar; nothing here sees the truth. Everything is vectorised over candidate scalars and runs in float64
on the problem's device (or ``device=``). Results are converted to gradleak's scalar ``t``
(``h = t * sigma * v``): since ``g_r = sigma * c[r] * v``, ``t = s * c[r] / coefficient``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from ..head import HeadProblem
from .base import SearchOutcome, register_search

DeviceLike = Union[torch.device, str, None]
Interval = Tuple[float, float]

#: How many of the largest candidate-label entries each format leaves out of the variance.
DROPPED_ENTRIES: Dict[str, int] = {"hard": 1, "smoothing": 1, "mixup": 2}
#: The paper's ``coefficient`` per format (label smoothing runs used 4, the mixup notebook runs 2).
DEFAULT_COEFFICIENT: Dict[str, float] = {"hard": 4.0, "smoothing": 4.0, "mixup": 2.0}
#: The paper's PSO ``inter_bound`` per format (``pso()`` for label smoothing, ``pso(50)`` for mixup).
DEFAULT_INTER_BOUND: Dict[str, float] = {"hard": 20.0, "smoothing": 20.0, "mixup": 50.0}


def _check_label_format(label_format: str) -> int:
    """The number of dropped entries ``m`` for a format the paper's searches handle."""
    if label_format not in DROPPED_ENTRIES:
        raise ValueError(
            f"label_format {label_format!r} is not supported by the paper's searches, which need the format "
            f"given in advance ({', '.join(map(repr, DROPPED_ENTRIES))}); only the exact search "
            "(method='exact') detects the format")
    return DROPPED_ENTRIES[label_format]


def _check_positive(value: float, name: str) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    return value


@dataclass(frozen=True)
class PaperObjective:
    """The paper's candidate feature, label and variance loss for one head, vectorised over scalars ``s``.

    Build it with :func:`paper_objective`. All tensors are float64 on one device.

    Attributes:
        row: the gradient row ``r = argmax_i |sum_j G_ij|``.
        scaled_row: ``(d,)`` ``g_r / coefficient``: the candidate feature is ``s * scaled_row``.
        row_logits: ``(C,)`` ``W @ scaled_row``: the candidate logits are ``s * row_logits + bias``.
        bias: ``(C,)`` head bias or None.
        coefficient: the paper's ``coefficient`` (``s = coefficient * lambda_r``).
        dropped: ``m``, how many of the largest label entries are left out of the variance.
        row_factor: ``c[r]`` of the problem's factorisation ``G = sigma c v^T`` (for :meth:`to_t`).
        positive_coordinate: ``k`` used for ``s > 0``: the argmax of ``g_r`` (argmin if ``max(g_r) == 0``).
        negative_coordinate: ``k`` used for ``s <= 0``: the argmin of ``g_r`` (argmax if ``min(g_r) == 0``).
        positive_column, negative_column: ``(C,)`` the gradient columns ``G[:, k]`` for those coordinates.
    """

    row: int
    scaled_row: torch.Tensor
    row_logits: torch.Tensor
    bias: Optional[torch.Tensor]
    coefficient: float
    dropped: int
    row_factor: float
    positive_coordinate: int
    negative_coordinate: int
    positive_column: torch.Tensor
    negative_column: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.scaled_row.device

    def _scalars(self, s: torch.Tensor) -> torch.Tensor:
        if s.dim() != 1:
            raise ValueError(f"s must be a 1-D tensor of candidate scalars, got shape {tuple(s.shape)}")
        return s.to(device=self.device, dtype=torch.float64)

    def features(self, s: torch.Tensor) -> torch.Tensor:
        """Candidate head inputs ``s * g_r / coefficient``: ``(K,)`` scalars in, ``(K, d)`` out."""
        return self._scalars(s).unsqueeze(-1) * self.scaled_row

    def labels(self, s: torch.Tensor) -> torch.Tensor:
        """Candidate labels ``softmax(W h(s) + b) - G[:, k] / h_k(s)``: ``(K,)`` scalars in, ``(K, C)`` out.

        ``k = argmax(h(s))`` (argmin if its maximum is 0) depends only on the sign of ``s``. At ``s = 0`` the
        feature vanishes and the label is not finite.
        """
        s = self._scalars(s)
        logits = s.unsqueeze(-1) * self.row_logits
        if self.bias is not None:
            logits = logits + self.bias
        positive = s > 0
        feature_at_k = s * torch.where(positive, self.scaled_row[self.positive_coordinate],
                                       self.scaled_row[self.negative_coordinate])
        gradient_columns = torch.where(positive.unsqueeze(-1), self.positive_column, self.negative_column)
        return torch.softmax(logits, dim=-1) - gradient_columns / feature_at_k.unsqueeze(-1)

    def loss(self, s: torch.Tensor) -> torch.Tensor:
        """``1000 * Var_pop`` of the ``C - m`` smallest candidate-label entries: ``(K,)`` in, ``(K,)`` out.

        Differentiable in ``s`` (used by :func:`lbfgs_search`).
        """
        labels = self.labels(s)
        kept = torch.topk(labels, labels.shape[-1] - self.dropped, dim=-1, largest=False, sorted=False).values
        return 1000.0 * kept.var(dim=-1, correction=0)

    def to_t(self, s: float) -> float:
        """gradleak's scalar ``t = s * c[r] / coefficient`` for the paper's scalar ``s``."""
        return s * self.row_factor / self.coefficient

    def from_t(self, t: float) -> float:
        """The paper's scalar ``s = t * coefficient / c[r]`` for gradleak's ``t``."""
        return t * self.coefficient / self.row_factor


def paper_objective(problem: HeadProblem, label_format: str, *, coefficient: Optional[float] = None,
                    device: DeviceLike = None) -> PaperObjective:
    """The paper's objective for ``problem`` and a known ``label_format`` ("hard", "smoothing", "mixup").

    Args:
        coefficient: the paper's ``coefficient`` (default :data:`DEFAULT_COEFFICIENT` for the format).
        device: where to evaluate (default: the problem's device).
    """
    dropped = _check_label_format(label_format)
    num_classes = problem.num_classes
    if num_classes - dropped < 2:
        raise ValueError(
            f"the {label_format} objective is the variance of the {num_classes - dropped} smallest of "
            f"{num_classes} label entries, which is always 0: it cannot identify the scalar "
            f"(needs at least {dropped + 2} classes)")
    coefficient = _check_positive(DEFAULT_COEFFICIENT[label_format] if coefficient is None else coefficient,
                                  "coefficient")
    device = problem.weight_grad.device if device is None else torch.device(device)
    weight_grad = problem.weight_grad.to(device=device, dtype=torch.float64)
    row = int(weight_grad.sum(dim=1).abs().argmax())
    gradient_row = weight_grad[row]
    scaled_row = gradient_row / coefficient
    positive_coordinate = int(gradient_row.argmax() if gradient_row.max() != 0 else gradient_row.argmin())
    negative_coordinate = int(gradient_row.argmin() if gradient_row.min() != 0 else gradient_row.argmax())
    bias = None if problem.bias is None else problem.bias.to(device=device, dtype=torch.float64)
    return PaperObjective(
        row=row, scaled_row=scaled_row,
        row_logits=problem.weight.to(device=device, dtype=torch.float64) @ scaled_row,
        bias=bias, coefficient=coefficient, dropped=dropped, row_factor=float(problem.c[row]),
        positive_coordinate=positive_coordinate, negative_coordinate=negative_coordinate,
        positive_column=weight_grad[:, positive_coordinate], negative_column=weight_grad[:, negative_coordinate])


def pso_intervals(inter_bound: float = 20.0, bound: float = 70.0) -> List[Interval]:
    """The paper's PSO search intervals ``(lower, upper)`` in the order they are searched.

    Starting from ``pl = 1, pu = 6``, each stage searches ``[pl - 0.3, pu]`` then ``[-pu - 0.3, -pl]``; then
    ``pl = pu`` and ``pu`` grows by ``inter_bound / 5`` after the first stage and by ``inter_bound`` after the
    others, while ``pu < bound``. ``inter_bound=20``: ``(0.7, 6), (-6.3, -1), (5.7, 10), (-10.3, -6), (9.7, 30),
    (-30.3, -10), (29.7, 50), (-50.3, -30)``; ``inter_bound=50``: ``(0.7, 6), (-6.3, -1), (5.7, 16),
    (-16.3, -6), (15.7, 66), (-66.3, -16)`` (as printed in the official notebooks).
    """
    inter_bound = _check_positive(inter_bound, "inter_bound")
    bound = float(bound)
    lower, upper = 1.0, 6.0
    increments = [inter_bound / 5]
    intervals: List[Interval] = []
    while upper < bound:
        intervals.append((lower - 0.3, upper))
        intervals.append((-upper - 0.3, -lower))
        lower = upper
        upper += increments.pop() if increments else inter_bound
    return intervals


@dataclass
class SwarmResult:
    """One particle-swarm run.

    Attributes:
        best_x: the swarm's best position (``inf`` loss and the initial mean if nothing finite was found).
        best_y: its objective value.
        best_x_history, best_y_history: ``(iterations,)`` lists of the best position and value after each
            iteration (scikit-opt's ``gbest_y_hist``, plus the positions).
        evaluations: objective evaluations.
    """

    best_x: float
    best_y: float
    best_x_history: List[float] = field(default_factory=list)
    best_y_history: List[float] = field(default_factory=list)
    evaluations: int = 0


def particle_swarm(objective: Callable[[np.ndarray], np.ndarray], lower: float, upper: float, *,
                   population: int = 500, iterations: int = 40, rng: np.random.RandomState,
                   w: float = 0.8, c1: float = 0.5, c2: float = 0.5) -> SwarmResult:
    """Minimise a 1-D objective with scikit-opt 0.6.6's particle swarm (``sko.PSO.PSO``, ``n_dim=1``).

    The whole swarm is evaluated at once: ``objective`` maps ``(population,)`` positions to ``(population,)``
    values. Random numbers come from ``rng`` in scikit-opt's order, so that after ``np.random.seed(n)`` scikit-opt
    and ``rng = RandomState(n)`` follow the same trajectory: positions ``U(lower, upper)``, velocities
    ``U(-(upper - lower), upper - lower)``, then per iteration ``r1`` and ``r2``, each ``U(0, 1)`` of shape
    ``(population, 1)``. Personal bests start at ``inf`` and the global best at the swarm's mean position; each
    iteration moves ``V = w V + c1 r1 (pbest - X) + c2 r2 (gbest - X)``, ``X = clip(X + V, lower, upper)``,
    evaluates, and keeps strictly better personal and global bests. scikit-opt also evaluates the initial
    swarm but never reads those values (its personal bests start at ``inf``), so that evaluation is skipped:
    ``population * iterations`` evaluations in all.
    """
    if not upper > lower:
        raise ValueError(f"the interval upper bound {upper} must exceed its lower bound {lower}")
    if population < 1 or iterations < 1:
        raise ValueError(f"population and iterations must be positive, got {population} and {iterations}")
    shape = (population, 1)
    positions = rng.uniform(lower, upper, size=shape)
    span = upper - lower
    velocities = rng.uniform(-span, span, size=shape)
    personal_x = positions.copy()
    personal_y = np.full(shape, np.inf)
    result = SwarmResult(best_x=float(positions.mean(axis=0)[0]), best_y=math.inf)
    for _ in range(iterations):
        r1 = rng.random_sample(shape)
        r2 = rng.random_sample(shape)
        velocities = (w * velocities + c1 * r1 * (personal_x - positions)
                      + c2 * r2 * (result.best_x - positions))
        positions = np.clip(positions + velocities, lower, upper)
        values = np.asarray(objective(positions[:, 0]), dtype=np.float64).reshape(shape)
        result.evaluations += population
        improved = personal_y > values
        personal_x = np.where(improved, positions, personal_x)
        personal_y = np.where(improved, values, personal_y)
        best = int(personal_y.argmin())
        if result.best_y > personal_y[best, 0]:
            result.best_x, result.best_y = float(personal_x[best, 0]), float(personal_y[best, 0])
        result.best_x_history.append(result.best_x)
        result.best_y_history.append(result.best_y)
    return result


@register_search("pso")
def pso_search(problem: HeadProblem, label_format: str, *, population: int = 500, iterations: int = 40,
               inter_bound: Optional[float] = None, bound: float = 70.0, coefficient: Optional[float] = None,
               threshold: float = 1e-9, seed: int = 0, w: float = 0.8, c1: float = 0.5, c2: float = 0.5,
               progress: bool = False, device: DeviceLike = None) -> SearchOutcome:
    """The paper's PSO search: a fresh swarm per interval of :func:`pso_intervals`, first loss below threshold.

    Each interval runs the full swarm (:func:`particle_swarm`, one ``RandomState(seed)`` stream for all
    intervals); the search stops after the first interval whose best loss is ``< threshold`` (converged).
    Otherwise it returns the best over all intervals, not converged.

    Args:
        label_format: "hard" or "smoothing" (the ``C - 1`` objective) or "mixup" (``C - 2``).
        population, iterations, w, c1, c2: the swarm's settings (the paper's: 500, 40, 0.8, 0.5, 0.5).
        inter_bound, bound: the interval schedule (defaults: :data:`DEFAULT_INTER_BOUND`, 70).
        coefficient: the paper's scale of ``s`` (default :data:`DEFAULT_COEFFICIENT`).
        threshold: the paper's convergence test on the ``1000 * variance`` loss.
        progress: show a progress bar over intervals.
        device: where to evaluate the objective (default: the problem's device).

    Returns:
        ``SearchOutcome`` with ``t = s * c[r] / coefficient`` and ``objective`` the paper's loss; ``info`` holds
        ``s``, ``row``, ``coefficient``, ``intervals`` (those searched), ``interval_results``
        (``(best s, best loss)`` per searched interval) and ``converged_interval`` (or None).
    """
    objective = paper_objective(problem, label_format, coefficient=coefficient, device=device)
    inter_bound = DEFAULT_INTER_BOUND[label_format] if inter_bound is None else inter_bound
    schedule = pso_intervals(inter_bound, bound)
    if not schedule:
        raise ValueError(f"bound {bound} leaves no interval to search: the first one ends at 6")

    def swarm_objective(positions: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return objective.loss(torch.from_numpy(positions)).cpu().numpy()

    rng = np.random.RandomState(seed)
    searched: List[Interval] = []
    interval_results: List[Tuple[float, float]] = []
    best_s, best_loss, evaluations = math.nan, math.inf, 0
    converged_interval: Optional[Interval] = None
    for lower, upper in tqdm(schedule, desc="pso intervals", disable=not progress):
        swarm = particle_swarm(swarm_objective, lower, upper, population=population, iterations=iterations,
                               rng=rng, w=w, c1=c1, c2=c2)
        searched.append((lower, upper))
        interval_results.append((swarm.best_x, swarm.best_y))
        evaluations += swarm.evaluations
        if swarm.best_y < best_loss or math.isnan(best_s):
            best_s, best_loss = swarm.best_x, swarm.best_y
        if swarm.best_y < threshold:
            converged_interval = (lower, upper)
            break
    return SearchOutcome(
        t=objective.to_t(best_s), objective=best_loss, evaluations=evaluations,
        converged=converged_interval is not None,
        info=dict(s=best_s, row=objective.row, coefficient=objective.coefficient, intervals=searched,
                  interval_results=interval_results, converged_interval=converged_interval))


@register_search("lbfgs")
def lbfgs_search(problem: HeadProblem, label_format: str, *, lr: float = 0.5, epochs: int = 200,
                 bound: float = 100.0, initial: float = 1.0, coefficient: Optional[float] = None,
                 threshold: float = 1e-9, device: DeviceLike = None) -> SearchOutcome:
    """The paper's L-BFGS search with plateau skips and a sign flip.

    Phase "positive" starts at ``s = +initial`` with ``torch.optim.LBFGS([s], lr)`` (torch defaults otherwise)
    for ``epochs // 2`` epochs; phase "negative" starts at ``s = -initial`` with a fresh optimiser for the rest.
    Each epoch evaluates the loss (pushed into a 3-entry buffer that starts at ``[0, 0, 0]``), then:

    1. ``|s| > bound``: the positive phase flips to the negative one; the negative phase gives up;
    2. loss ``< threshold``: converged, return ``s``;
    3. ``max - min`` of the buffer ``< mean / 1000`` (a plateau): skip, ``s += skip`` (negative phase:
       ``s -= skip``) with ``skip`` = 0.5, 1, 2, ... doubling per skip within a phase; the optimiser keeps its
       history;
    4. otherwise one ``optimizer.step``.

    Without convergence the lowest-loss ``s`` of all evaluations is returned, not converged.

    Returns:
        ``SearchOutcome`` with ``t = s * c[r] / coefficient``, ``objective`` the paper's loss, ``evaluations`` the
        loss evaluations (closure calls); ``info`` holds ``s``, ``row``, ``coefficient``, ``phase`` (where the
        search ended), ``stop`` ("threshold", "out_of_bound" or "epochs"), ``skips``, ``flips`` (1 if the
        positive phase left the bound), ``epochs`` (run in total).
    """
    objective = paper_objective(problem, label_format, coefficient=coefficient, device=device)
    lr = _check_positive(lr, "lr")
    bound = _check_positive(bound, "bound")
    initial = _check_positive(initial, "initial")
    if epochs < 2:
        raise ValueError(f"epochs must be at least 2 (half per sign), got {epochs}")
    best = {"s": initial, "loss": math.inf}
    evaluations = skips = flips = epochs_run = 0
    phases = (("positive", 1.0, epochs // 2), ("negative", -1.0, epochs - epochs // 2))
    for phase, sign, phase_epochs in phases:
        scalar = torch.tensor([sign * initial], dtype=torch.float64, device=objective.device, requires_grad=True)
        optimizer = torch.optim.LBFGS([scalar], lr=lr)

        def closure() -> torch.Tensor:
            nonlocal evaluations
            optimizer.zero_grad()
            loss = objective.loss(scalar)[0]
            loss.backward()
            evaluations += 1
            if loss.item() < best["loss"]:
                best["s"], best["loss"] = scalar.item(), loss.item()
            return loss

        recent_losses = [0.0, 0.0, 0.0]
        skip = 0.5
        stop = "epochs"
        for _ in range(phase_epochs):
            epochs_run += 1
            loss = closure().item()
            recent_losses = recent_losses[1:] + [loss]
            if abs(scalar.item()) > bound:
                stop = "out_of_bound"
                break
            if loss < threshold:
                return SearchOutcome(
                    t=objective.to_t(scalar.item()), objective=loss, evaluations=evaluations, converged=True,
                    info=dict(s=scalar.item(), row=objective.row, coefficient=objective.coefficient,
                              phase=phase, stop="threshold", skips=skips, flips=flips, epochs=epochs_run))
            if max(recent_losses) - min(recent_losses) < sum(recent_losses) / 3000:
                with torch.no_grad():
                    scalar += sign * skip
                skip *= 2
                skips += 1
                continue
            optimizer.step(closure)
        if phase == "positive" and stop == "out_of_bound":
            flips += 1
    return SearchOutcome(
        t=objective.to_t(best["s"]), objective=best["loss"], evaluations=evaluations, converged=False,
        info=dict(s=best["s"], row=objective.row, coefficient=objective.coefficient, phase="negative",
                  stop=stop, skips=skips, flips=flips, epochs=epochs_run))
