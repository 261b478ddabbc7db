"""The class mass of a batch, and the counts and smoothing eps it implies.

For a batch of ``B`` examples and a head ``z = W h + b`` the bias gradient is the mean of ``p_n - y_n``, so the
class mass (the sum of the soft labels) is

    m = sum_n y_n = S_p - B * dL/db,        S_p = sum_n softmax(W h_n + b)

exactly. ``S_p`` needs the examples' features, which a batch hides; to first order in the spread of the logits
it is ``B * softmax(W h_bar + b)`` (the linear term vanishes at the mean feature ``h_bar``). Each row of the head's
weight gradient is ``dL/dW_c = (1/B) sum_n e_nc h_n``, a weighted sum of the features with the weights of
``dL/db_c``: for a class no example holds the weights are all of one sign (``p_nc - eps/C``) and
``dL/dW_c / dL/db_c`` is a weighted mean of the features; the least-squares combination of those ratios
(weighted by ``dL/db_c^2``) estimates ``h_bar``, over the classes held by no example once the counts are known.
This is what iLRG's per-class embeddings do (Ma et al., ICLR 2023), for the whole batch and for soft labels.

Once counts and eps are fitted, each class's mean feature follows from its row of the weight gradient (only its
logits are needed: :func:`class_mean_logits`), and the summed predictions are refined with each class's examples
at their own mean (:func:`class_prediction_mass`): that keeps the spread of the logits between classes, which the
batch's mean feature drops (on LeNet with the paper's init at B = 16 the hard counts came back in 6 batches of 10
instead of 2). The spread within a class is not in this estimate: once the counts are known,
:mod:`gradleak.batch.spread` fits its main direction, with every class mean, to both of the head's gradients.

The estimate is good when the examples' predictions are alike (untrained networks); its error grows with the
spread of the logits and with ``B``. Integer counts make it checkable: with label smoothing every class mass is
``(1 - eps) n_c + eps B / C`` with integer ``n_c`` summing to ``B``, a lattice that a wrong estimate misses.
:func:`fit_lattice` finds the nearest lattice point and says how far the mass is from it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple, TypeVar

import torch

#: A float or a tensor of them (:func:`in_spacings` takes either).
Number = TypeVar("Number", float, torch.Tensor)
#: Candidate smoothing masses scanned before the closed-form refinement (eps in [0, 1)).
EPS_GRID = 400
#: Lattice points the refinement of the summed predictions starts from (:func:`lattice_starts`): on ResNet18 at
#: B = 64 the first-order estimate lay about 0.5 lattice spacings from 8 count vectors; refined from the four
#: nearest it settled on wrong counts (0.49 spacings off), from the next four on the truth (0.04).
MASS_STARTS = 8
#: Counts one example away from the nearest lattice point tried too where the class mass is off its lattice
#: (paper-init LeNet at B = 8: the nearest counts were one example off in 4 of 20 batches, never more).
NEARBY_COUNTS = 4


def mean_feature(weight_grad: torch.Tensor, bias_grad: torch.Tensor, classes: Optional[torch.Tensor] = None
                 ) -> torch.Tensor:
    """Least-squares estimate ``(d,)`` of the batch's mean head feature from the ratios ``dL/dW_c / dL/db_c``
    weighted by ``dL/db_c^2``: ``sum_c q_c G_c / sum_c q_c^2`` with ``q = dL/db``. It is linear in ``G``: given
    ``G A^T`` (C, k) instead of ``G``, it gives ``A h_bar`` (k,).

    Args:
        weight_grad: ``(C, d)``; bias_grad: ``(C,)`` (float64; a common scale of both cancels).
        classes: ``(C,)`` boolean, the classes to combine (those held by no example), or ``(K, C)`` for ``K``
            estimates at once (then ``(K, d)``); None for all.
    """
    q = bias_grad if classes is None else bias_grad * classes
    return q @ weight_grad / q.square().sum(-1, keepdim=True).clamp_min(torch.finfo(q.dtype).tiny)


def prediction_mass(weight: torch.Tensor, bias: torch.Tensor, feature: torch.Tensor, batch_size: int
                    ) -> torch.Tensor:
    """``B * softmax(W h + b)``: ``(C,)`` the summed predictions of ``B`` examples with feature ``h`` (d,)."""
    return batch_size * torch.softmax(weight @ feature + bias, dim=-1)


def class_mean_logits(logits_grad: torch.Tensor, bias_grad: torch.Tensor, feature_logits: torch.Tensor,
                      counts: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """``(K, C, C)``: row ``c`` is ``W mu_c``, the logits (bias aside) of class ``c``'s mean feature, for ``K`` sets
    of counts ``n`` (K, C) and eps (K,) at once, given the batch's mean feature ``h_bar`` as its logits ``W h_bar``
    (K, C): ``mu_c = h_bar + B (dL/db_c h_bar - dL/dW_c) / ((1 - eps) n_c)`` (``h_bar`` where ``n_c = 0``).

    Row ``c`` of ``B dL/dW`` is ``sum_n p_nc h_n - (eps B / C) h_bar - (1 - eps) sum_{n in c} h_n``. Taking
    ``sum_n p_nc h_n`` as ``(sum_n p_nc) h_bar`` (the predictions' spread times the features' is second order)
    and ``sum_n p_nc = (1 - eps) n_c + eps B / C + B dL/db_c`` (the lattice) leaves the class sum. When every class
    holds an example, the class means average back to ``h_bar`` exactly (the rows of both gradients sum to
    zero). Hard labels are ``eps = 0``; for batch mixup ``mu_c`` is the mean weighted by the labels' class-``c``
    entries. Only the logits are needed, and ``mu_c`` is linear in the gradients: the weight gradient enters as
    ``G W^T``, computed once for every start and round, and no ``(C, d)`` mean is formed.

    Args:
        logits_grad: ``(K, C, C)`` or ``(C, C)``, ``G W^T``; bias_grad: ``(K, C)`` or ``(C,)``; float64, at the
            true scale (an unknown one's inverse multiplied in).
    """
    share = counts.to(feature_logits.dtype)
    spread = share.sum(-1)[:, None, None] * (bias_grad[..., None] * feature_logits[:, None] - logits_grad) \
        / ((1 - eps)[:, None, None] * share.clamp_min(1)[..., None])
    return feature_logits[:, None] + torch.where(counts[..., None] > 0, spread, 0.0)


def class_prediction_mass(bias: torch.Tensor, logits: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``sum_c n_c softmax(W mu_c + b)``: ``(K, C)`` the summed predictions with each class's examples at their class
    mean ``mu_c`` (``logits`` (K, C, C) from :func:`class_mean_logits`, counts ``n`` (K, C)). Where the classes'
    logits differ, this keeps the spread between the classes that :func:`prediction_mass` (every example at the
    batch's mean) drops."""
    return (counts.to(logits.dtype)[:, None] @ torch.softmax(logits + bias, dim=-1))[:, 0]


@dataclass(frozen=True)
class LatticeFit:
    """The nearest smoothed-count lattice point ``(1 - eps) n + eps B / C`` to a class mass.

    Attributes:
        counts: ``(C,)`` int64, non-negative, summing to ``B``.
        eps: the common smoothing mass (0 for hard labels), in [0, 1).
        lattice: ``(C,)`` the lattice point itself.
        residual: ``max_c |m_c - lattice_c|``, in examples.
        eps_error: standard error of ``eps`` from the residual (least squares); inf when the counts cannot tell
            eps (every class holds ``B/C`` examples, so the lattice point ignores eps).
        inverse_scale: ``u = 1 / s`` for gradients observed as ``s`` times the true ones (1.0 when known).
    """

    counts: torch.Tensor
    eps: float
    lattice: torch.Tensor
    residual: float
    eps_error: float
    inverse_scale: float = 1.0


def _round_to_sum(values: torch.Tensor, total: int) -> torch.Tensor:
    """Non-negative integers ``(..., C)`` nearest to ``values`` whose rows sum to ``total``: round, then move each
    row's deficit onto the entries that rounding moved the most the other way. A row far from every count vector
    can be left off ``total`` (only entries above zero can give an example up): see :func:`_largest_remainders`."""
    counts = values.round().clamp(0, total)
    deficit = total - counts.sum(-1, keepdim=True)
    gap = values - counts
    up_rank = _ranks(-gap)
    down_rank = _ranks(torch.where(counts > 0, gap, torch.full_like(gap, torch.inf)))
    counts = counts + (up_rank < deficit).to(counts.dtype) - (down_rank < -deficit).to(counts.dtype)
    return counts.clamp_min(0)


def _largest_remainders(values: torch.Tensor, total: int) -> torch.Tensor:
    """Non-negative integers ``(K, C)`` summing to ``total`` for rows of ``values`` (K, C) however far from every
    count vector: the largest remainders of the nearest non-negative values with that sum (:func:`_onto_simplex`)."""
    share = _onto_simplex(values, total)
    floor = share.floor()
    return floor + (_ranks(floor - share) < total - floor.sum(-1, keepdim=True)).to(floor.dtype)


def _onto_simplex(values: torch.Tensor, total: float) -> torch.Tensor:
    """The nearest point (Euclidean) to each row of ``values`` (K, C) with entries at least 0 summing to ``total``:
    ``max(v - t, 0)``, with the shift ``t`` read off the sorted row."""
    ordered = values.sort(-1, descending=True).values
    shifts = (ordered.cumsum(-1) - total) / torch.arange(1, values.shape[-1] + 1, dtype=values.dtype,
                                                         device=values.device)
    kept = (ordered > shifts).sum(-1, keepdim=True)  # the entries above the shift: a prefix of the sorted row
    return (values - shifts.gather(-1, kept - 1)).clamp_min(0.0)


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """Each entry's rank along the last dimension (0 for the smallest): the inverse of the sorting permutation,
    scattered rather than sorted again (the sorts of the eps grid were most of the class mass's time)."""
    order = values.argsort(-1)
    positions = torch.arange(values.shape[-1], device=values.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


def in_spacings(residual: Number, eps: Number) -> Number:
    """A class mass's distance from a lattice point (max-abs, in examples) in units of the lattice's spacing
    ``1 - eps``, the measure the fit is judged by: lattice points are chosen by it too. In examples, a larger eps
    wins by its finer lattice alone: nearest in examples, 22 of 24 hard ResNet18 batches of 128 (random classes)
    came out at eps 0.35 to 0.82, all with wrong counts."""
    return residual / (1 - eps)


def _grid_lattice(mass: torch.Tensor, batch_size: int, hard: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """For each row of ``mass`` (K, C) and each eps of a grid (only 0 when ``hard``): the counts ``(K, E, C)``
    rounded from ``(m - eps B / C) / (1 - eps)``, and their lattice point's distance from the row ``(K, E)`` (eps
    refitted with the counts; :func:`in_spacings`, inf where the rounding could not be moved onto ``B``)."""
    share = batch_size / mass.shape[-1]
    eps = mass.new_zeros(1) if hard else torch.linspace(0.0, 0.99, EPS_GRID, dtype=mass.dtype, device=mass.device)
    counts = _round_to_sum((mass[:, None] - eps[:, None] * share) / (1 - eps[:, None]), batch_size)
    # a mass whose rounding lands off B at every eps (an unknown scale's scan reaches masses with entries of -3 and
    # +3 at B = 4, where rounding had given counts summing to 11) takes the largest remainders at eps = 0
    lost = (counts.sum(-1) != batch_size).all(-1)
    if bool(lost.any()):
        counts[lost, 0] = _largest_remainders(mass[lost], batch_size)
    _, refit, _, _, lattice = _on_lattice(mass[:, None], counts, None, batch_size, hard)
    residual = in_spacings((mass[:, None] - lattice).abs().amax(-1), refit)
    # elsewhere rounding that cannot be moved onto B (eps near 1 blows the values up) is no lattice point
    return counts, torch.where(counts.sum(-1) == batch_size, residual, torch.inf)


def _lattice_counts(mass: torch.Tensor, batch_size: int, hard: bool) -> torch.Tensor:
    """For each row of ``mass`` (K, C), the counts ``(K, C)`` of its nearest lattice point (:func:`_grid_lattice`)."""
    rows = max(1, (1 << 22) // ((1 if hard else EPS_GRID) * mass.shape[-1]))  # bounds the (rows, eps, C) temporaries
    best = []
    for part in mass.split(rows):
        counts, residual = _grid_lattice(part, batch_size, hard)
        best.append(counts.gather(1, residual.argmin(-1)[:, None, None].expand(-1, 1, counts.shape[-1]))[:, 0])
    return torch.cat(best)


def _nearest_distinct(counts: torch.Tensor, residual: torch.Tensor, most: int) -> torch.Tensor:
    """Indices of up to ``most`` rows of ``counts`` (M, C) with distinct counts, each the nearest (``residual``
    (M,)) of the rows with its counts, nearest first; rows at an infinite residual are left out, unless every row
    is (then the first row)."""
    order = residual.argsort(stable=True)
    finite = residual[order].isfinite()
    order = order[finite] if bool(finite.any()) else order[:1]
    _, inverse = torch.unique(counts[order], dim=0, return_inverse=True)
    ranks = torch.arange(len(order), device=counts.device)
    first = torch.full((int(inverse.max()) + 1 if len(order) else 0,), len(order), device=counts.device)
    first = first.scatter_reduce(0, inverse, ranks, "amin")  # each count vector's nearest row, by rank
    return order[first.sort().values[:most]]


def _refit(mass: torch.Tensor, counts: torch.Tensor, signal: Optional[torch.Tensor], batch_size: int,
           hard: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Least-squares ``(u, eps, eps_variance_factor)`` (each ``(...)``) with the counts held: the mass
    ``m = prediction - u B q`` (``signal`` q; ``u`` is held at 0 and ``mass`` is ``m`` when None) on the lattice
    point ``(1 - eps) n + eps B / C`` (eps held at 0 when ``hard``). ``eps_variance_factor`` times the residual
    variance is eps's variance."""
    away = batch_size / counts.shape[-1] - counts        # d(lattice)/d(eps)
    target = mass - counts                               # = u B q + eps * away
    tiny = torch.finfo(mass.dtype).tiny
    if hard:
        zeros = torch.zeros_like(target[..., 0])
        if signal is None:
            return zeros, zeros, zeros
        column = (batch_size * signal).expand_as(away)
        return (target * column).sum(-1) / column.square().sum(-1).clamp_min(tiny), zeros, zeros
    if signal is None:
        norm = away.square().sum(-1)
        eps = (target * away).sum(-1) / norm.clamp_min(tiny)
        return torch.zeros_like(eps), eps.clamp(0.0, 0.999), 1.0 / norm.clamp_min(tiny)
    column = (batch_size * signal).expand_as(away)
    a11, a12, a22 = column.square().sum(-1), (column * away).sum(-1), away.square().sum(-1)
    b1, b2 = (target * column).sum(-1), (target * away).sum(-1)
    det = (a11 * a22 - a12.square()).clamp_min(tiny)
    u, eps = (a22 * b1 - a12 * b2) / det, (a11 * b2 - a12 * b1) / det
    return u, eps.clamp(0.0, 0.999), a11 / det


def _on_lattice(mass: torch.Tensor, counts: torch.Tensor, signal: Optional[torch.Tensor], batch_size: int,
                hard: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_refit` with the counts ``(..., C)`` held, and where it leaves the mass: ``(u, eps, eps variance
    factor)`` (each ``(...)``), the mass with the gradient term taken out (``m - u B q``, or ``mass`` itself without
    ``signal``) and its lattice point ``(1 - eps) n + eps B / C``, each ``(..., C)``."""
    u, eps, factor = _refit(mass, counts, signal, batch_size, hard)
    shifted = mass if signal is None else mass - (u * batch_size)[..., None] * signal
    lattice = (1 - eps[..., None]) * counts + eps[..., None] * (batch_size / counts.shape[-1])
    return u, eps, factor, shifted, lattice


def nearby_counts(mass: torch.Tensor, counts: torch.Tensor, eps: float, most: int = NEARBY_COUNTS) -> torch.Tensor:
    """The counts one example away from ``counts`` (C,) (one example moved to another class) whose lattice points
    (at ``eps``) lie nearest to ``mass`` (C,), nearest first: ``(most, C)`` at most."""
    num_classes, batch_size = counts.shape[0], int(counts.sum())
    eye = torch.eye(num_classes, dtype=counts.dtype, device=counts.device)
    moved = counts + eye.unsqueeze(0) - eye.unsqueeze(1)                 # [i, j]: one example from class i to j
    moved = moved[(counts > 0).unsqueeze(1) & ~eye.bool()]
    lattice = (1 - eps) * moved + eps * batch_size / num_classes
    return moved[(mass - lattice).abs().amax(-1).argsort()[:most]]


def fit_lattice(mass: torch.Tensor, batch_size: int, *, hard: bool = False) -> LatticeFit:
    """The smoothed-count lattice point nearest to ``mass`` (C,), float64: max-abs, in lattice spacings
    (:func:`in_spacings`).

    Every ``eps`` of a grid over [0, 1) (only 0 when ``hard``) gives counts by rounding
    ``(m - eps B / C) / (1 - eps)`` to integers summing to ``B``; ``eps`` is then refitted by least squares with
    those counts, and the candidate nearest to ``m`` wins. Vectorised over the grid: ``(EPS_GRID, C)``.
    """
    return lattice_starts(mass, batch_size, hard=hard, most=1)[0]


def lattice_starts(mass: torch.Tensor, batch_size: int, *, hard: bool = False, most: int = MASS_STARTS
                   ) -> List[LatticeFit]:
    """The lattice fits of ``mass`` (C,) with the ``most`` nearest distinct counts over the eps grid, nearest first
    (the first is :func:`fit_lattice`'s): where the estimate of the mass is rough, the counts it lies nearest to
    need not be the ones a refined estimate settles on."""
    counts, residual = _grid_lattice(mass[None], batch_size, hard)
    return [fit_counts(mass, counts[0, row], None, batch_size, hard)
            for row in _nearest_distinct(counts[0], residual[0], most).tolist()]


def fit_counts(mass: torch.Tensor, counts: torch.Tensor, signal: Optional[torch.Tensor], batch_size: int,
               hard: bool = False) -> LatticeFit:
    """The lattice fit of ``mass`` (C,) with ``counts`` (C,) held, eps (and ``u`` with ``signal``, the bias
    gradient: ``mass`` is then the summed predictions) refitted."""
    u, eps, factor, shifted, lattice = _on_lattice(mass, counts, signal, batch_size, hard)
    share = batch_size / mass.shape[-1]
    freedom = max(mass.shape[-1] - 1 - int(not hard) - int(signal is not None), 1)
    rms = float((shifted - lattice).square().sum().div(freedom).sqrt())
    eps_error = 0.0 if hard else (rms * float(factor) ** 0.5 if float((share - counts).abs().max()) > 0
                                  else float("inf"))
    return LatticeFit(counts=counts.to(torch.int64), eps=float(eps), lattice=lattice,
                      residual=float((shifted - lattice).abs().max()), eps_error=eps_error,
                      inverse_scale=float(u) if signal is not None else 1.0)


#: With an unknown gradient scale, the gradient term ``u B q`` must move some class's mass by at least this many
#: examples: nearer to zero the mass is the summed predictions alone, which every scale would call a fit.
MIN_SIGNAL = 0.5
#: The scan over the gradient term's size, in examples of the class it moves most.
SCALE_STEP = 0.1


def refit_lattice(prediction: torch.Tensor, batch_size: int, *, hard: bool = False,
                  signal: Optional[torch.Tensor] = None, inverse_scale: Optional[torch.Tensor] = None
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One refinement round's lattice fit for ``K`` estimates at once: each row of ``prediction`` (K, C) gets the
    counts of the lattice point nearest to its mass, and ``(u, eps)`` refitted with them (:func:`fit_counts` row by
    row). Without ``signal`` the rows are the class masses; with it (the observed bias gradient ``q``, scale
    unknown) they are the summed predictions, the mass is ``prediction - u B q`` at ``u = inverse_scale`` (K,) for
    the counts, and ``u`` is refitted too (near the scale found: no scan, see :func:`fit_lattice_unknown_scale`).

    Returns:
        ``(counts (K, C), u (K,), eps (K,), residual (K,))``: ``u`` is 1 without ``signal``, and ``residual`` is
        the max-abs distance from the lattice point in examples.
    """
    mass = prediction if signal is None else prediction - (inverse_scale * batch_size)[:, None] * signal
    counts = _lattice_counts(mass, batch_size, hard)
    u, eps, _, shifted, lattice = _on_lattice(prediction, counts, signal, batch_size, hard)
    return counts, u if signal is not None else torch.ones_like(u), eps, (shifted - lattice).abs().amax(-1)


def fit_lattice_unknown_scale(prediction: torch.Tensor, signal: torch.Tensor, batch_size: int, *,
                              hard: bool = False) -> Tuple[LatticeFit, float]:
    """The lattice fit of ``m = prediction - u B q`` with the inverse gradient scale ``u`` unknown too.

    Args:
        prediction: ``(C,)`` the estimated summed predictions; signal: ``(C,)`` the observed (scaled) bias gradient.

    Returns:
        ``(best fit, runner_up)``: the nearest fit (:func:`lattice_starts_unknown_scale`), and the residual of the
        nearest fit with other counts in lattice spacings (inf if none), which tells a unique answer from an
        ambiguous one.
    """
    fits = lattice_starts_unknown_scale(prediction, signal, batch_size, hard=hard, most=2)
    return fits[0], in_spacings(fits[1].residual, fits[1].eps) if len(fits) > 1 else math.inf


def lattice_starts_unknown_scale(prediction: torch.Tensor, signal: torch.Tensor, batch_size: int, *,
                                 hard: bool = False, most: int = MASS_STARTS) -> List[LatticeFit]:
    """The lattice fits of ``m = prediction - u B q`` (``signal`` q, ``u`` unknown) with the ``most`` nearest
    distinct counts over every scale, nearest first (:func:`in_spacings`).

    ``u B max|q|`` (how many examples the gradient term moves the most-moved class by) is scanned from
    ``-(B + 1)`` to ``B + 1`` in steps of :data:`SCALE_STEP`, skipping ``|.| < MIN_SIGNAL``; each point's mass gets
    its nearest lattice counts, and ``(u, eps)`` are refitted by least squares with them.
    """
    top = float(signal.abs().max())
    reach = batch_size + 1.0
    moves = torch.arange(-reach, reach + SCALE_STEP / 2, SCALE_STEP, dtype=prediction.dtype, device=prediction.device)
    moves = moves[moves.abs() >= MIN_SIGNAL]
    mass = prediction - (moves / top)[:, None] * signal
    counts = _lattice_counts(mass, batch_size, hard)
    u, eps, _, shifted, lattice = _on_lattice(prediction.expand_as(counts), counts, signal, batch_size, hard)
    residual = in_spacings((shifted - lattice).abs().amax(-1), eps)
    residual = torch.where((u * batch_size).abs() * top >= MIN_SIGNAL, residual, torch.full_like(residual, torch.inf))
    return [fit_counts(prediction, counts[row], signal, batch_size, hard)
            for row in _nearest_distinct(counts, residual, most).tolist()]
