"""A small batch's features found by their examples' label structure: a split that needs no zeros.

For the mean soft-target cross-entropy over ``B`` examples the head's gradient ``G = (1/B) sum_n e_n h_n^T`` (C, d)
has the column space of the ``e_n = p_n - y_n`` (an orthonormal basis ``U``, C x B) and the row space of the
features ``h_n`` (``V``, d x B). One example's feature is ``h = V a`` for some ``a`` in R^B, its prediction is
``p(a) = softmax(W V a + b)``, and its ``e`` lies in the span of ``U``: with ``P = I - U U^T``,

    P p(a) = P y.

A structured label is ``y = base + theta * D``: label smoothing of class ``k`` (``1/C + theta (e_k - 1/C)``,
``theta = 1 - eps``; hard labels at ``theta = 1``) or a mixup of classes ``j`` and ``k`` (``e_k + theta (e_j -
e_k)``). Both ``p`` and ``y`` sum to one and the ``e_n`` sum to zero, so that is ``C - B - 1`` equations in the
``B + 1`` unknowns ``a`` and ``theta``: for ``B <= (C - 3) / 2`` every example is an isolated zero of the
residual ``|| P p(a) - P y ||`` (``theta`` fitted by least squares, the structure the best of all of them), with
equations to spare, and any other zero is a coincidence. Sigmoid features, which have no zeros, split this way as
well as ReLU ones.

**The search.** Starts ``a`` spread over directions (uniform on the sphere) and scales (logits spreading from
``1e-3`` to ``30``), refined together by Gauss-Newton with each start's label structure held (the structure is
chosen again between the two rounds; two-class labels are tried among the :data:`PAIR_CLASSES` classes the
column space leans on most); every start that reaches the gradient's rounding is a candidate, with its feature at
full scale, its label and its ``e``. Candidates that agree are one.

**Hard labels, one eps, batch mixup.** At ``B = (C - 2) / 2`` (4 of 10 classes) each example has as many
equations as unknowns: finitely many zeros, most of them spurious. When the examples share their labels' weight
(one smoothing eps, the ``lam`` of batch mixup, or none for hard labels) they have one to spare again. The
weight is read first, as the one that most distinct zeros of the free search agree on (a spurious zero carries
its own); the search then runs with the labels held (hard ones always tried), and each example found is polished
with its weight free (near its zero the square system converges to it exactly).

**With some examples known.** Directions found otherwise (a ReLU feature's zeros) are each given their scale and
label by the same search along the direction (``C - B - 1`` equations in two unknowns, for ``B <= C - 4``); a
direction that fits no label is dropped. Their terms are taken out of ``G``, and the examples left are sought in
what remains, so a split that the zeros leave short by up to :func:`largest_batch` examples is completed.

**The set.** ``B`` candidates are the batch only if they rebuild it: ``sum_n (U^T e_n) a_n^T = B U^T G V`` (and
``sum_n e_n = B dL/db`` with a head bias). Every set of ``B`` of the best candidates is tried at once; the one
that rebuilds the gradient is returned only when no other set comes close, and the caller judges it like any
split (each example's own fit test, the joint reproductions, how far the batch's equations pin each label).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch

#: Starting points of the search (spread over directions and logit scales).
STARTS = 8192
#: Gauss-Newton steps in each of the two rounds.
STEPS = 12
#: At most this many distinct candidates (best residual first) are combined into sets of B.
MOST_CANDIDATES = 8
#: Largest batch searched: the search is over a B-dimensional space (the examples it finds are taken out and the
#: rest sought again in a smaller one), and B is at most (C - 2) / 2 anyway.
MOST_EXAMPLES = 8
#: Two-class (mixup) labels are tried among this many classes (those the gradient's column space leans on most).
PAIR_CLASSES = 12
#: Logit spreads (standard deviation over the classes) the starts cover, log-spaced.
LOGIT_SPREADS = (1e-3, 30.0)
#: Candidates closer than this (relative to their size) are one: where the structure pins a feature's scale only
#: loosely, starts converge along the flat basin, measured up to 4e-4 apart with labels within 3e-4 (ResNet18).
SAME_CANDIDATE = 1e-3
#: Distinct candidates (weight free) whose weights are compared to find the weight a batch shares.
SHARED_CANDIDATES = 256
#: Candidates whose labels' weights agree this closely share it (measured: a batch's examples within 1e-5).
SHARED_WEIGHT_TOL = 1e-4
#: A set that rebuilds the gradient is unique when every other set misses by this many times more.
UNIQUE_FACTOR = 100.0


def largest_batch(num_classes: int, shared_weight: bool = False) -> int:
    """The largest ``B`` whose examples the label structure pins down with an equation to spare: ``C - B - 1``
    equations, ``B + 1`` unknowns per example, or ``B`` when the examples share their labels' weight (``1 - eps``
    of label smoothing with one eps, or ``lam`` of batch mixup); capped at :data:`MOST_EXAMPLES`."""
    return min(MOST_EXAMPLES, (num_classes - 2 - (not shared_weight)) // 2)


def can_complete(size: int, known: int, num_classes: int) -> bool:
    """Whether the labels' structure can split a batch of ``size`` examples of which ``known`` directions were
    found otherwise: with none known, at most :func:`largest_batch` examples (of a batch that shares its labels'
    weight: the search finds out whether it does); with some, each one's scale and label pinned along its
    direction (``C - B - 1`` equations, two unknowns, one to spare), and the examples they leave as many."""
    if known == 0:
        return size <= largest_batch(num_classes, shared_weight=True)
    return size <= num_classes - 4 and size - known <= largest_batch(num_classes, shared_weight=True)


@dataclass(frozen=True)
class LabelSplit:
    """The examples of a batch found by their label structure (here, or solved at once: :mod:`.joint`).

    Attributes:
        features: ``(B, d)`` float64 head inputs at their scale, or None when no set was found.
        errors: ``(B, C)`` float64 ``e_n = p_n - y_n`` of those features and labels, or None.
        candidates: distinct candidates the search found.
        misfit: relative error with which the best set rebuilds the gradient (inf without a set).
        runner_up: the same for the second-best set (inf without one).
        gradient_scale: ``s`` with observed gradients = ``s *`` the ones the set gives (1.0 at a known scale).
        precision: ``(B,)`` the rounding each example's own gradient carries, relative to its largest entry, where
            a solve measured it (:mod:`.joint`), else None (the gradient's own).
    """

    features: Optional[torch.Tensor]
    errors: Optional[torch.Tensor]
    candidates: int
    misfit: float
    runner_up: float
    gradient_scale: float = 1.0
    precision: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class _Structures:
    """The label structures a search tries, F of them: ``y = base + theta D`` projected, ``(P base, P D)`` rows
    ``(F, C)`` each, their classes ``first, second`` (F,) (smoothing of ``second`` where they are equal, else the
    mixup ``e_second + theta (e_first - e_second)``), and ``theta`` (F,) where each label is held (``P base`` is
    then the whole label and ``P D`` zero), or None where ``theta`` is fitted."""

    base: torch.Tensor
    direction: torch.Tensor
    first: torch.Tensor
    second: torch.Tensor
    theta: Optional[torch.Tensor] = None


def _pair_classes(projector: torch.Tensor, both_orders: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The pairs ``(first, second)`` tried for two-class labels: among the :data:`PAIR_CLASSES` classes the column
    space leans on most (``1 - P_kk = |U_k|^2``; a label's classes carry its ``e``'s largest entries, which keeps
    the pairs few with many classes), ``first < second`` or both orders."""
    leaning = (1 - projector.diagonal()).topk(min(PAIR_CLASSES, projector.shape[0])).indices.sort().values
    low, high = torch.triu_indices(len(leaning), len(leaning), 1, device=projector.device)
    if both_orders:
        low, high = torch.cat([low, high]), torch.cat([high, low])
    return leaning[low], leaning[high]


def _projector(columns: torch.Tensor) -> torch.Tensor:
    return torch.eye(columns.shape[0], dtype=columns.dtype, device=columns.device) - columns @ columns.T


def _free_structures(columns: torch.Tensor) -> _Structures:
    """Smoothing of each class, then mixup of each pair, ``theta`` fitted (one unknown per label)."""
    projector = _projector(columns)
    num_classes = projector.shape[0]
    first, second = _pair_classes(projector, both_orders=False)
    classes = torch.arange(num_classes, device=projector.device)
    smooth_base = projector.new_full((num_classes, num_classes), 1.0 / num_classes)  # P 1 = 1: 1 is orthogonal to U
    return _Structures(torch.cat([smooth_base, projector[second]]),
                       torch.cat([projector - 1.0 / num_classes, projector[first] - projector[second]]),
                       torch.cat([classes, first]), torch.cat([classes, second]))


def _held_structures(columns: torch.Tensor, shared: Optional[float]) -> _Structures:
    """Labels with no unknown: hard labels of each class, and with a ``shared`` weight (eps of label smoothing,
    the lesser mixup weight) smoothing of each class by it and mixup of each pair by it (in both orders)."""
    projector = _projector(columns)
    num_classes = projector.shape[0]
    classes = torch.arange(num_classes, device=projector.device)
    base, first, second, theta = [projector], [classes], [classes], [projector.new_ones(num_classes)]
    if shared is not None:
        low, high = _pair_classes(projector, both_orders=True)
        base += [(1 - shared) * projector + shared / num_classes, shared * projector[low] + (1 - shared) *
                 projector[high]]
        first, second = first + [classes, low], second + [classes, high]
        theta += [projector.new_full((num_classes,), 1 - shared), projector.new_full((len(low),), shared)]
    base = torch.cat(base)
    return _Structures(base, torch.zeros_like(base), torch.cat(first), torch.cat(second), torch.cat(theta))


def _fit(projected_p: torch.Tensor, structures: _Structures) -> Tuple[torch.Tensor, torch.Tensor]:
    """The label structures fitted to ``P p`` (K, C): residual norms and ``theta`` (K, F) for all of them at once,
    from inner products (no (K, F, C) tensor); ``theta`` least squares, or held."""
    base, direction = structures.base, structures.direction
    offset_sq = projected_p.square().sum(-1, keepdim=True) - 2 * projected_p @ base.T + base.square().sum(-1)
    if structures.theta is not None:
        return offset_sq.clamp_min(0).sqrt(), structures.theta.expand_as(offset_sq)
    norm_sq = direction.square().sum(-1).clamp_min(torch.finfo(direction.dtype).tiny)
    along = projected_p @ direction.T - (base * direction).sum(-1)                       # (P D) . (P p - P base)
    return (offset_sq - along.square() / norm_sq).clamp_min(0).sqrt(), along / norm_sq


def _project(values: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """``P values`` along the class dimension (the last) of ``values`` (..., C): ``P = I - U U^T``
    with ``U = columns`` (C, B), without a (C, C) product."""
    return values - (values @ columns) @ columns.T


def _starts(weight_reduced: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """``(count, m)`` starting points: directions uniform on the sphere, scales spreading the logits over
    :data:`LOGIT_SPREADS` (log-spaced)."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(count, weight_reduced.shape[1], generator=generator, dtype=torch.float64)
    a = (a / torch.linalg.vector_norm(a, dim=-1, keepdim=True)).to(weight_reduced.device)
    spread = torch.logspace(math.log10(LOGIT_SPREADS[0]), math.log10(LOGIT_SPREADS[1]), count, dtype=torch.float64)
    return a * (spread.to(a.device) / (a @ weight_reduced.T).std(-1).clamp_min(1e-300)).unsqueeze(-1)


def _search(weight_reduced: torch.Tensor, bias: torch.Tensor, columns: torch.Tensor, structures: _Structures,
            a: torch.Tensor):
    """Starts ``a`` (K, m) refined in the span whose head weights are ``weight_reduced`` (C, m), ``P`` from the
    column space ``columns`` (C, B): ``(a (K, m), residual (K,), theta (K,), and the classes of each one's
    structure (K,) twice)``."""
    dim = weight_reduced.shape[1]
    identity = torch.eye(dim, dtype=a.dtype, device=a.device)
    p = torch.softmax(a @ weight_reduced.T + bias, -1)
    for _ in range(2):
        structure = _fit(_project(p, columns), structures)[0].argmin(-1)
        offset, along = structures.base[structure], structures.direction[structure]
        along = along / torch.linalg.vector_norm(along, dim=-1, keepdim=True).clamp_min(1e-300)
        for _ in range(STEPS):
            target = _project(p, columns) - offset
            residual = target - along * (along * target).sum(-1, keepdim=True)
            slope = p.unsqueeze(-1) * (weight_reduced - (p @ weight_reduced).unsqueeze(-2))   # dp/da (K, C, m)
            slope = slope - columns @ (columns.T @ slope)
            slope = slope - along.unsqueeze(-1) * (along.unsqueeze(-1) * slope).sum(-2, keepdim=True)
            normal = slope.transpose(-1, -2) @ slope
            damping = 1e-12 * normal.diagonal(dim1=-2, dim2=-1).sum(-1)[:, None, None] * identity
            step = -torch.linalg.solve(normal + damping + 1e-300 * identity,
                                       (slope.transpose(-1, -2) @ residual.unsqueeze(-1))).squeeze(-1)
            length, limit = torch.linalg.vector_norm(step, dim=-1), torch.linalg.vector_norm(a, dim=-1)
            a = a + step * (limit / length.clamp_min(1e-300)).clamp(max=1.0).unsqueeze(-1)
            p = torch.softmax(a @ weight_reduced.T + bias, -1)
    projected = _project(p, columns)
    fits, weights = _fit(projected, structures)
    structure = fits.argmin(-1)
    theta = weights.gather(-1, structure.unsqueeze(-1)).squeeze(-1)
    # the chosen structure's residual, computed directly: the inner products that rank all the structures at once
    # cancel below sqrt(eps) of float64, far above a float64 gradient's rounding
    misfit = projected - structures.base[structure] - theta.unsqueeze(-1) * structures.direction[structure]
    residual = torch.linalg.vector_norm(misfit, dim=-1)
    return a, residual, theta, structures.first[structure], structures.second[structure]


def _candidates(weight: torch.Tensor, bias: torch.Tensor, basis: torch.Tensor, columns: torch.Tensor, *,
                starts: Union[int, torch.Tensor], precision: float, seed: int,
                structures: Optional[_Structures] = None, most: int = MOST_CANDIDATES):
    """The distinct examples found in the span of ``basis`` (d, m) from ``starts`` (a number of them, see
    :func:`_starts`, or the points themselves (K, m)), best fit (relative to their errors) first, at most ``most``,
    under the ``structures`` (default: every one, its weight fitted): ``(features (n, d), errors (n, C), weights
    (n,))``, float64. A weight is eps for a smoothed label and the lesser class weight of a two-class one (0 for
    hard)."""
    num_classes = weight.shape[0]
    weight_reduced = weight @ basis
    structures = _free_structures(columns) if structures is None else structures
    a = _starts(weight_reduced, starts, seed) if isinstance(starts, int) else starts
    a, residual, theta, first, second = _search(weight_reduced, bias, columns, structures, a)
    labels = _labels(first, second, theta, num_classes)
    errors = torch.softmax(a @ weight_reduced.T + bias, -1) - labels
    error_norms = torch.linalg.vector_norm(errors, dim=-1)
    slack = math.sqrt(precision)
    good = ((residual <= 100 * precision) & (labels >= -slack).all(-1) & (labels <= 1 + slack).all(-1)
            & (error_norms > slack))
    weights = torch.where(first == second, 1 - theta, torch.minimum(theta, 1 - theta))
    # best fit first, relative to the errors fitted: near a saturated softmax a spurious zero with small errors fits
    # within the rounding too, and an absolute order let such zeros crowd out the examples of a float64 gradient
    order = (residual / error_norms)[good].argsort()
    a, errors, weights = a[good][order], errors[good][order], weights[good][order]
    # a candidate reached from several starts counts once (the best of them): the best one left, then those
    # away from it, until ``most`` (a loop over candidates found, not over starts)
    kept = []
    while a.shape[0] and len(kept) < most:
        kept.append((a[0], errors[0], weights[0]))
        away = torch.linalg.vector_norm(a - a[0], dim=-1) > SAME_CANDIDATE * torch.linalg.vector_norm(a[0])
        a, errors, weights = a[away], errors[away], weights[away]
    if not kept:
        return basis.new_zeros(0, basis.shape[0]), basis.new_zeros(0, num_classes), basis.new_zeros(0)
    found_a, found_errors, found_weights = (torch.stack(values) for values in zip(*kept))
    return found_a @ basis.T, found_errors, found_weights


def _search_rest(weight: torch.Tensor, bias: torch.Tensor, remaining: torch.Tensor, rest: int, *, precision: float,
                 seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The candidates ``(features, errors)`` for the ``rest`` examples whose gradient ``remaining`` (C, d) holds."""
    columns, rows = _spans(remaining, rest)
    search = dict(starts=STARTS, precision=precision, seed=seed)
    if rest > largest_batch(weight.shape[0]):  # one unknown too many, unless the labels are hard or share a weight
        shared = _shared_weight(weight, bias, rows, columns, **search)
        held, _, _ = _candidates(weight, bias, rows, columns, structures=_held_structures(columns, shared), **search)
        if not held.shape[0]:
            return held, held.new_zeros(0, weight.shape[0])
        # each polished with its weight free: near its zero the square system converges to it exactly, where the
        # shared weight is known only to the spread of the candidates that gave it
        search["starts"] = held @ rows
    features, errors, _ = _candidates(weight, bias, rows, columns, **search)
    return features, errors


def _shared_weight(weight: torch.Tensor, bias: torch.Tensor, basis: torch.Tensor, columns: torch.Tensor, *,
                   starts: int, precision: float, seed: int) -> Optional[float]:
    """The labels' weight (eps, or the lesser mixup weight) that the examples in the span of ``basis`` share, or
    None.

    With the weight free each example is one of finitely many zeros (as many equations as unknowns), most of them
    spurious; the examples' zeros all carry the shared weight, a spurious one its own. The weight most distinct
    candidates agree on (at least two, within :data:`SHARED_WEIGHT_TOL`) is the batch's. Hard labels (weight 0)
    are left out: they are tried anyway, and in batch mixup an example mixed with its own class is one.
    """
    _, _, weights = _candidates(weight, bias, basis, columns, starts=starts, precision=precision, seed=seed,
                                most=SHARED_CANDIDATES)
    weights = weights[weights > SHARED_WEIGHT_TOL]  # hard labels share nothing: they are always tried
    agree = (weights.unsqueeze(0) - weights.unsqueeze(1)).abs() <= SHARED_WEIGHT_TOL
    support = agree.sum(-1)
    if not len(weights) or int(support.max()) < 2:
        return None
    return float(weights[agree[support.argmax()]].mean())


def _spans(g: torch.Tensor, size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(U (C, B), V (d, B))``: orthonormal bases of the column and row spaces of a rank-``size`` gradient ``g``."""
    left, _, right = torch.linalg.svd(g, full_matrices=False)
    return left[:, :size], right[:size].T


def _labels(first: torch.Tensor, second: torch.Tensor, theta: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(K, C)`` labels of the structures with classes ``first``, ``second`` (K,) each (see :func:`_structures`)
    and weights ``theta`` (K,)."""
    eye = torch.eye(num_classes, dtype=theta.dtype, device=theta.device)
    smooth = (first == second).unsqueeze(-1)
    base = torch.where(smooth, 1.0 / num_classes, eye[second])
    direction = torch.where(smooth, eye[second] - 1.0 / num_classes, eye[first] - eye[second])
    return base + theta.unsqueeze(-1) * direction


def split_by_labels(weight_grad: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    bias_grad: Optional[torch.Tensor], size: int, *, precision: float, tolerance: float,
                    known: Optional[torch.Tensor] = None, scale_known: bool = True, seed: int = 0) -> LabelSplit:
    """Find the ``size`` examples of a batch gradient by their label structure.

    Args:
        weight_grad: ``(C, d)`` ``G`` of the batch (rank ``size``); weight: ``(C, d)``; bias, bias_grad: ``(C,)`` or
            None.
        size: ``B``; at most :func:`largest_batch` of C examples are sought (beyond the ``known`` ones).
        precision: the gradient's rounding (relative); a candidate must fit its structure to 100 times it.
        tolerance: the largest relative error with which a set may rebuild ``G`` (and ``dL/db``).
        known: ``(k, d)`` directions of some of the examples, found otherwise (their zeros). Each is given its
            scale and label by a search along it (``C - B - 1`` equations, 2 unknowns), and its term is taken
            out of ``G`` (and ``dL/db``) before the rest are sought in what remains.
        scale_known: False when the gradients are ``s`` times the true ones for an unknown ``s`` (a weight update):
            the spans and so the examples do not depend on it, and each set's ``s`` is fitted by least squares
            before it is judged (``known`` needs the scale).
        seed: seeds the starts.
    """
    if known is not None and not scale_known:
        raise ValueError("directions found otherwise are pinned at the gradient's known scale only")
    g, w = weight_grad.double(), weight.double()
    num_classes = w.shape[0]
    b = w.new_zeros(num_classes) if bias is None else bias.double()
    db = None if bias_grad is None else bias_grad.double()
    columns, rows = _spans(g, size)
    pinned_h, pinned_e = [], []
    for direction in ([] if known is None else known.double()):  # a loop over the few examples found otherwise
        h, e, _ = _candidates(w, b, direction.unsqueeze(-1), columns, starts=STARTS // 16, precision=precision,
                              seed=seed)
        if h.shape[0]:
            pinned_h.append(h[0])
            pinned_e.append(e[0])
    pinned_h = torch.stack(pinned_h) if pinned_h else g.new_zeros(0, g.shape[1])
    pinned_e = torch.stack(pinned_e) if pinned_e else g.new_zeros(0, num_classes)
    rest = size - pinned_h.shape[0]
    if rest > largest_batch(num_classes, shared_weight=True):
        return LabelSplit(None, None, pinned_h.shape[0], math.inf, math.inf)
    features, errors = g.new_zeros(0, g.shape[1]), g.new_zeros(0, num_classes)
    if rest < 0:  # more known directions than examples: the set is chosen among them, with no search
        features, errors, rest = pinned_h, pinned_e, size
        pinned_h, pinned_e = pinned_h[:0], pinned_e[:0]
    while rest > features.shape[0]:  # examples left beyond the candidates in hand
        features, errors = _search_rest(w, b, g - pinned_e.T @ pinned_h / size, rest, precision=precision,
                                        seed=seed)
        if features.shape[0] >= rest or not features.shape[0] or not scale_known:
            break
        # fewer found than are left: with equations to spare those are examples (a spurious one leaves a remainder
        # no set rebuilds); they are taken out (at the known scale), and the rest sought again in a smaller span,
        # where starts find them more easily
        pinned_h, pinned_e = torch.cat([pinned_h, features]), torch.cat([pinned_e, errors])
        rest -= features.shape[0]
        features, errors = features[:0], errors[:0]
    count = pinned_h.shape[0] + features.shape[0]
    if features.shape[0] < rest:
        return LabelSplit(None, None, count, math.inf, math.inf)
    # every set of the candidates, with the pinned examples, must rebuild G (in its spans) and dL/db
    sets = torch.tensor(list(itertools.combinations(range(features.shape[0]), rest)), dtype=torch.long,
                        device=g.device)                                                     # (S, rest)
    observed = size * columns.T @ g @ rows                                                   # (B, B)
    target = (observed - (pinned_e @ columns).T @ (pinned_h @ rows)).flatten()
    pieces = (errors @ columns).unsqueeze(-1) * (features @ rows).unsqueeze(-2)              # (n, B, B)
    rebuilt = pieces[sets].sum(1).flatten(1)                                                 # (S, B * B)
    norm = torch.linalg.vector_norm(observed)
    if db is not None:  # the bias gradient joins, weighted like G
        weight_db = norm / (size * torch.linalg.vector_norm(db)).clamp_min(1e-300)
        rebuilt = torch.cat([rebuilt, weight_db * errors[sets].sum(1)], -1)
        target = torch.cat([target, weight_db * (size * db - pinned_e.sum(0))])
    scale = torch.ones(len(sets), dtype=g.dtype, device=g.device) if scale_known else \
        (rebuilt @ target) / rebuilt.square().sum(-1).clamp_min(1e-300)
    misfit = torch.linalg.vector_norm(scale.unsqueeze(-1) * rebuilt - target, dim=-1) / norm
    ranked = misfit.sort()
    best, runner_up = float(ranked.values[0]), float(ranked.values[1]) if len(sets) > 1 else math.inf
    if not (best <= tolerance and runner_up > max(UNIQUE_FACTOR * best, tolerance)):
        return LabelSplit(None, None, count, best, runner_up)
    chosen = sets[ranked.indices[0]]
    return LabelSplit(torch.cat([pinned_h, features[chosen]]), torch.cat([pinned_e, errors[chosen]]), count, best,
                      runner_up, float(scale[ranked.indices[0]]))
