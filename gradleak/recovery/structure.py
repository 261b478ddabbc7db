"""Label structures as residuals on the candidate family ``y(t)``.

Each hypothesis says that the ``C - m`` smallest entries of the label are equal: to zero (``offset_free`` false)
or to a common unknown value (true). Its residual at ``t`` is scale-normalised::

    r(t) = || P (t * y_S(t)) || / || P c_S ||        t * y(t) = t * p(t) - c

with ``S`` the ``C - m`` smallest entries of ``y(t)`` and ``P`` the centring over ``S`` when the offset is free
(identity otherwise). The normalisation matters: as ``|t| -> inf`` the softmax saturates and the plain variance
of ``y_S`` goes to zero for any gradient, but ``r -> 1`` there, while ``r = 0`` exactly at the true ``t``.

With an unknown gradient scale the candidate labels are ``y = p(t) - c / alpha`` with a second unknown ``alpha``
(see :class:`~gradleak.head.HeadProblem`); for each ``t`` it is the least-squares fit of ``alpha p_S`` to ``c_S``
(variable projection), and ``r(t) = min_alpha || P (alpha p_S(t) - c_S) || / || P c_S ||``, still in ``[0, 1]``
and still one-dimensional. Everything below is written for ``alpha``: with a known scale ``alpha = t``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch

from ..head import HeadProblem


@dataclass(frozen=True)
class Structure:
    """A label hypothesis: the ``C - free_entries`` smallest entries share one value (zero unless offset_free)."""

    name: str
    free_entries: int
    offset_free: bool
    label_format: str

    def degrees_of_freedom(self, num_classes: int, unknowns: int = 1) -> int:
        """Equations left over once the offset and ``unknowns`` scalars (``t`` unless a closed form fixed it, and
        ``alpha`` when the gradient scale is unknown) are fitted; below 1 the structure cannot judge the answer."""
        return num_classes - self.free_entries - int(self.offset_free) - unknowns


STRUCTURES: Dict[str, Structure] = {s.name: s for s in (
    Structure("hard", 1, False, "hard"),
    Structure("smoothing", 1, True, "smoothing"),
    Structure("mixup", 2, False, "mixup"),
    Structure("mixup_smoothing", 2, True, "mixup"),
)}
# From the simplest to the most general; auto-detection takes the first that fits.
ORDER: Tuple[str, ...] = ("hard", "smoothing", "mixup", "mixup_smoothing")
#: With an unknown scale, the first free entry of a two-class structure is sought among this many candidates.
PAIR_FIRSTS = 4
#: How many expected rounding errors the structured entries may spread over and still count as equal (and label
#: entries stray outside [0, 1]).
ROUNDING_SLACK = 100.0
# The hypotheses tried for each requested label format, simplest first.
FORMAT_STRUCTURES: Dict[str, Tuple[str, ...]] = {
    "hard": ("hard",),
    "smoothing": ("smoothing",),
    "mixup": ("mixup", "mixup_smoothing"),
    "auto": ORDER,
}


def _second_free_score(error: torch.Tensor, top: torch.Tensor, offset_free: torch.Tensor) -> torch.Tensor:
    """How much leaving each entry out of ``S`` (besides the largest, ``top``) lowers the residual: ``(K, C)``.

    With a zero offset that is ``|e_j|``; with a free offset ``|e_j - mean|`` over the entries other than the
    largest. The largest entry itself scores -1, so it is never picked twice.
    """
    top = top.unsqueeze(-1)
    mean = (error.sum(-1, keepdim=True) - error.gather(-1, top)) / max(error.shape[-1] - 1, 1)
    score = (error - mean * offset_free.unsqueeze(-1)).abs()
    return score.scatter_(-1, top, -1.0)


def _deletion_scores(p: torch.Tensor, c: torch.Tensor, weight: torch.Tensor, offset_free: torch.Tensor
                     ) -> torch.Tensor:
    """How much leaving each entry out lowers the residual sum of squares of the least-squares fit of ``c`` by
    ``alpha p`` (``+ beta`` where the offset is free) over the entries of ``weight``: ``(K, C)``, -1 outside.

    The regression deletion identity ``RSS - RSS_{-j} = r_j^2 / (1 - h_jj)`` gives every entry at once from the
    full fit's residuals ``r`` and leverages ``h``; ``1 - h_jj`` is ``S_{-j} / S`` (times ``(n-1)/n`` with a free
    offset), ``S`` the (centred) sum of squares of ``p``, computed without cancellation for the dominant entry.
    """
    offset = offset_free.to(p.dtype).unsqueeze(-1)
    tiny = torch.finfo(p.dtype).tiny

    def centred(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        count = mask.sum(-1, keepdim=True).clamp_min(1)
        return (values - offset * (values * mask).sum(-1, keepdim=True) / count) * mask

    count = weight.sum(-1, keepdim=True)
    p_c, c_c = centred(p, weight), centred(c.expand_as(p), weight)
    spread = p_c.square().sum(-1, keepdim=True)
    residual = c_c - p_c * (p_c * c_c).sum(-1, keepdim=True) / spread.clamp_min(tiny)
    without = spread - p_c.square() * (1 + offset / (count - 1).clamp_min(1))
    dominant = p_c.abs().argmax(-1, keepdim=True)
    exact = centred(p, weight.scatter(-1, dominant, 0.0)).square().sum(-1, keepdim=True)
    without = without.scatter(-1, dominant, exact)
    keep = 1 - offset / count.clamp_min(1)
    score = residual.square() / (keep * without / spread.clamp_min(tiny)).clamp_min(tiny)
    return torch.where(weight > 0, score, torch.full_like(score, -1.0))


def free_entries_of(problem: HeadProblem, t: torch.Tensor, p: torch.Tensor, free_entries: torch.Tensor,
                    offset_free: torch.Tensor, choices: int = 1, alpha: Optional[torch.Tensor] = None
                    ) -> torch.Tensor:
    """Indices ``(K, choices, 2)`` of the entries a structure leaves free at each candidate.

    The first is the label's largest entry; for two-class structures the second is the entry whose removal
    lowers the residual most (``choices`` > 1 gives the runners-up as alternatives), so the residual is the
    lower envelope over the possible second classes: continuous, and zero at the truth even when the second
    class weighs less than the deviations of a slightly wrong ``t``. One-class structures repeat the first index.
    With a known scale (or a given ``alpha``) the label ``y`` is known before the structure is, and its largest
    entry is read off; with an unknown scale ``alpha`` depends on the entries chosen, so each is the entry whose
    removal lowers the residual of the fit most (exact deletion diagnostics, see :func:`_deletion_scores`).

    Args:
        t: ``(K,)``; p: ``(K, C)`` the softmax at ``t``; free_entries, offset_free: ``(K,)``; alpha: ``(K,)``.
    """
    if problem.scale_known or alpha is not None:
        alpha = t if alpha is None else alpha
        error = alpha.unsqueeze(-1) * p - problem.c
        top = (error * alpha.sign().unsqueeze(-1)).argmax(-1)
        second = _second_free_score(error, top, offset_free)
    else:
        # removing j then k lowers the residual by score_j + score_{k | j} exactly: the best pair among the
        # PAIR_FIRSTS best first entries (a greedy first entry can be the wrong one for a two-class label)
        first = _deletion_scores(p, problem.c, torch.ones_like(p), offset_free)
        if not bool((free_entries == 2).any()):  # one free entry: the best single deletion
            top = first.argmax(-1)
            return torch.stack([top, top], dim=-1).unsqueeze(1).expand(-1, choices, 2)
        firsts = first.topk(min(PAIR_FIRSTS, p.shape[-1]), dim=-1).indices                     # (K, m)
        count = firsts.shape[-1]
        rest = torch.ones(p.shape[0], count, p.shape[-1], dtype=p.dtype, device=p.device)
        rest = rest.scatter(-1, firsts.unsqueeze(-1), 0.0)
        seconds = _deletion_scores(p.unsqueeze(1).expand_as(rest), problem.c, rest,
                                   offset_free.unsqueeze(-1).expand(-1, count))               # (K, m, C)
        gain = first.gather(-1, firsts) + seconds.amax(-1)
        pair = torch.where(free_entries == 2, gain.argmax(-1), torch.zeros_like(free_entries))
        top = firsts.gather(-1, pair.unsqueeze(-1))[:, 0]
        second = seconds[torch.arange(p.shape[0], device=p.device), pair]
    second = second.topk(choices, dim=-1).indices
    second = torch.where(free_entries.unsqueeze(-1) == 2, second, top.unsqueeze(-1))
    return torch.stack([top.unsqueeze(-1).expand_as(second), second], dim=-1)


def mask_of(free: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Boolean ``(K, C)`` mask of the structured entries from free indices ``(K, 2)``."""
    return torch.ones(free.shape[0], num_classes, dtype=torch.bool, device=free.device).scatter_(-1, free, False)


def _projector(mask: torch.Tensor, offset_free: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(weight, centre)`` (K, C) such that ``_project(v) = v * weight - (v * weight).sum(-1) * centre`` zeroes
    the free entries and, where the offset is free, subtracts the mean of the structured ones."""
    weight = mask.to(dtype)
    centre = weight * (offset_free.to(dtype).unsqueeze(-1) / weight.sum(-1, keepdim=True).clamp_min(1))
    return weight, centre


def _project(values: torch.Tensor, weight: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    masked = values * weight
    return masked - masked.sum(-1, keepdim=True) * centre


def multiplier(problem: HeadProblem, t: torch.Tensor, p: torch.Tensor, weight: torch.Tensor, centre: torch.Tensor
               ) -> torch.Tensor:
    """``alpha`` (K,) with ``p - y = c / alpha``: ``t`` when the scale is known, else the least-squares fit of
    ``alpha P p`` to ``P c``, kept admissible (``|alpha| >= t_min``: no label entry moves by more than one)."""
    if problem.scale_known:
        return t
    projected = _project(p, weight, centre)
    fit = (projected * _project(problem.c.expand_as(p), weight, centre)).sum(-1) \
        / projected.square().sum(-1).clamp_min(torch.finfo(p.dtype).tiny)
    return torch.where(fit < 0, -1.0, 1.0).to(fit.dtype) * fit.abs().clamp_min(problem.t_min)


def _piece_residuals(problem: HeadProblem, t: torch.Tensor, p: torch.Tensor, mask: torch.Tensor,
                     offset_free: torch.Tensor) -> torch.Tensor:
    """Normalised residuals ``(K,)`` with the structured entries fixed by ``mask`` (K, C)."""
    weight, centre = _projector(mask, offset_free, t.dtype)
    alpha = multiplier(problem, t, p, weight, centre)
    return _normalised(problem, alpha.unsqueeze(-1) * p - problem.c, weight, centre)


def _normalised(problem: HeadProblem, error: torch.Tensor, weight: torch.Tensor, centre: torch.Tensor
                ) -> torch.Tensor:
    """``||P error|| / ||P c||`` per row: the residual relative to the trivial answer's; ``error`` is
    ``alpha y = alpha p - c``."""
    scale = _project(problem.c.expand_as(weight), weight, centre)
    return _project(error, weight, centre).norm(dim=-1) / scale.norm(dim=-1).clamp_min(torch.finfo(error.dtype).tiny)


def residuals(problem: HeadProblem, t: torch.Tensor, free_entries: torch.Tensor, offset_free: torch.Tensor
              ) -> torch.Tensor:
    """Normalised residuals ``r(t)`` of shape ``(K,)`` (exact, masked; see the module docstring).

    Args:
        t: ``(K,)`` candidate scalars (float64, non-zero).
        free_entries, offset_free: ``(K,)`` the hypothesis of each candidate (int 1 or 2, bool).
    """
    p = torch.softmax(problem.logits(t), -1)
    free = free_entries_of(problem, t, p, free_entries, offset_free)[:, 0]
    return _piece_residuals(problem, t, p, mask_of(free, problem.num_classes), offset_free)


def grid_residuals(problem: HeadProblem, t: torch.Tensor, structures: Tuple[Structure, ...]) -> torch.Tensor:
    """Residuals ``(K, len(structures))`` of many candidates ``t`` (K,) at once, for locating basins.

    One ``(K, C)`` softmax shared by all structures; the centring uses sums, which loses precision for
    residuals far below 1e-8 (refinement uses the exact :func:`residuals`). With an unknown scale each
    structure fits its own ``alpha`` (the exact residuals, per structure).
    """
    if not problem.scale_known:
        return torch.stack([residuals(problem, t, torch.full_like(t, s.free_entries, dtype=torch.long),
                                      torch.full_like(t, s.offset_free, dtype=torch.bool)) for s in structures], -1)
    error = t.unsqueeze(-1) * torch.softmax(problem.logits(t), dim=-1) - problem.c
    top = (error * t.sign().unsqueeze(-1)).argmax(-1, keepdim=True)
    # zero the free entries in a copy rather than subtracting them from sums: at large |t| the largest
    # entry dominates the sum of squares and the subtraction would cancel catastrophically
    one_free = error.scatter(-1, top, 0.0), problem.c.expand_as(error).scatter(-1, top, 0.0)
    out = []
    for structure in structures:
        kept, kept_c = one_free
        if structure.free_entries == 2:
            offset = torch.full_like(t, structure.offset_free, dtype=torch.bool)
            second = _second_free_score(error, top[:, 0], offset).argmax(-1, keepdim=True)
            kept, kept_c = kept.scatter(-1, second, 0.0), kept_c.scatter(-1, second, 0.0)
        total, total_sq = kept.sum(-1), kept.square().sum(-1)
        c_total, c_total_sq = kept_c.sum(-1), kept_c.square().sum(-1)
        if structure.offset_free:
            size = problem.num_classes - structure.free_entries
            total_sq = total_sq - total.square() / size
            c_total_sq = c_total_sq - c_total.square() / size
        out.append((total_sq.clamp_min(0) / c_total_sq.clamp_min(torch.finfo(t.dtype).tiny)).sqrt())
    return torch.stack(out, dim=-1)


@dataclass(frozen=True)
class Minima:
    """Candidate answers of one hypothesis, best (lowest residual) first.

    Attributes:
        t: ``(n,)`` scalars; alpha: ``(n,)`` their ``p - y = c / alpha`` (``= t`` with a known scale; the
            gradient scale is ``alpha / t``); residual: ``(n,)`` normalised residuals; labels: ``(n, C)``
            candidate labels; rounding_units: ``(n,)`` RMS spread of the structured entries in units of their
            expected rounding error (see :func:`describe`); valid: ``(n,)`` every label entry in ``[0, 1]`` up
            to ``ROUNDING_SLACK`` times its expected rounding error; informative: ``(n,)`` False where the
            structure says nothing about the scalars (the residual is then set to 1, see :func:`describe`);
            free: ``(n, 2)`` the free entries (largest first; repeated for one-class structures).
    """

    t: torch.Tensor
    alpha: torch.Tensor
    residual: torch.Tensor
    labels: torch.Tensor
    rounding_units: torch.Tensor
    valid: torch.Tensor
    informative: torch.Tensor
    free: torch.Tensor

    def __getitem__(self, index) -> "Minima":
        return Minima(self.t[index], self.alpha[index], self.residual[index], self.labels[index],
                      self.rounding_units[index], self.valid[index], self.informative[index], self.free[index])

    def __len__(self) -> int:
        return self.t.shape[0]


def describe(problem: HeadProblem, structures: Sequence[Structure], t: torch.Tensor, which: torch.Tensor,
             alpha: Optional[torch.Tensor] = None, free: Optional[torch.Tensor] = None) -> Dict[str, Minima]:
    """Everything the decision needs about candidates ``t`` (n,), candidate ``k`` under ``structures[which[k]]``;
    per structure, sorted best first (one vectorised pass for all structures). ``alpha`` (n,) and ``free``
    (n, 2) fix the candidates' ``alpha`` and free entries instead of choosing them (rows of ``free`` set to -1
    are chosen)."""
    free_entries = torch.tensor([s.free_entries for s in structures], device=t.device)[which]
    offset_free = torch.tensor([s.offset_free for s in structures], device=t.device)[which]
    p = torch.softmax(problem.logits(t), dim=-1)
    if free is None or bool((free < 0).any()):
        chosen = free_entries_of(problem, t, p, free_entries, offset_free, alpha=alpha)[:, 0]
        free = chosen if free is None else torch.where(free < 0, chosen, free)
    mask = mask_of(free, problem.num_classes)
    weight, centre = _projector(mask, offset_free, t.dtype)
    if alpha is None:
        alpha = multiplier(problem, t, p, weight, centre)
    labels = p - problem.c / alpha.unsqueeze(-1)
    residual = _normalised(problem, alpha.unsqueeze(-1) * labels, weight, centre)
    # Two trivial answers, no better than a saturated softmax: where the structured entries of the gradient term
    # are flat to within rounding (p_S ~ 0 and c_S ~ -alpha y_S constant) the normalised residual is 0/0 and the
    # structure says nothing about t; and where the gradient term c / alpha is below rounding, the label is the
    # prediction p itself (an unknown scale lets alpha grow without bound).
    informative = (_project(problem.c.expand_as(p), weight, centre).norm(dim=-1)
                   > ROUNDING_SLACK * problem.precision + problem.rank_one_ratio) \
        & (problem.c.abs().max() / alpha.abs() > ROUNDING_SLACK * problem.precision)
    residual = torch.where(informative, residual, torch.ones_like(residual))
    # What rounding alone would leave, entry by entry: the victim computed z = W h and p - y in the gradient's
    # precision u, so z carries ~u |t| sigma |W||v| absolute error, and p_i and y_i ~u of themselves. Noise that
    # breaks the rank-one structure reaches each entry of c as ``problem.entry_noise``, i.e. that over |alpha|
    # per label entry, and the logits through v the same way. The structured entries are compared with their
    # common value weighted by these errors (a weighted least-squares fit).
    noise = problem.entry_noise
    scale = 1 + t.abs().unsqueeze(-1) * problem.a_abs.max()
    expected = ((problem.precision + noise) * scale * (p + labels.abs()) + noise / alpha.abs().unsqueeze(-1)
                + torch.finfo(t.dtype).tiny)
    precision = weight / expected.square()
    common = (labels * precision).sum(-1, keepdim=True) / precision.sum(-1, keepdim=True)
    deviation = (labels - common * offset_free.unsqueeze(-1)) / expected * weight
    spread = deviation.square().sum(-1).div(weight.sum(-1).clamp_min(1)).sqrt()
    slack = ROUNDING_SLACK * expected
    valid = ((labels >= -slack) & (labels <= 1 + slack)).all(-1)
    everything = Minima(t, alpha, residual, labels, spread, valid, informative, free)
    out = {}
    for index, structure in enumerate(structures):
        mine = (which == index).nonzero().flatten()
        out[structure.name] = everything[mine[residual[mine].argsort()]]
    return out


def _slope_in_t(problem: HeadProblem, p: torch.Tensor, alpha: torch.Tensor, weight: torch.Tensor,
                centre: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(d f / d t, d p / d t)`` for the residual vector ``f = P (alpha p(t) - c)``, (K, C) each, ``p`` the softmax
    at ``t``: with a known scale ``alpha = t`` moves along (``P p`` joins the slope), with an unknown one ``alpha``
    is held."""
    centred = problem.a - (p * problem.a).sum(-1, keepdim=True)
    slope = _project(alpha.unsqueeze(-1) * p * centred, weight, centre)
    dp = p * centred
    if problem.scale_known:
        slope = slope + _project(p, weight, centre)
    return slope, dp


def gauss_newton(problem: HeadProblem, t: torch.Tensor, mask: torch.Tensor, offset_free: torch.Tensor,
                 steps: int = 4) -> torch.Tensor:
    """Refine candidates ``t`` (K,) by Gauss-Newton on the residual vector ``P(alpha p(t) - c)``, the structured
    entries held fixed by ``mask`` (K, C).

    With a known scale ``alpha = t``; with an unknown one ``alpha`` is the least-squares fit at each ``t`` and
    the step uses the variable-projection Jacobian (the ``t`` direction with its ``p`` component projected out,
    Kaufman's form). The residual is zero at the true ``t`` and smooth around it, so convergence is quadratic:
    from a grid point 2.4 % away, four steps reach machine precision. Steps are limited to half of ``|t|`` and
    keep ``t`` admissible (same sign, ``|t| >= problem.t_lower``). Candidates far from any zero may not converge;
    the caller ranks everything by residual afterwards.

    Returns:
        The refined scalars ``(K,)``.
    """
    weight, centre = _projector(mask, offset_free, t.dtype)
    t_lower, tiny = problem.t_lower, torch.finfo(t.dtype).tiny
    previous = None
    for _ in range(steps):
        p = torch.softmax(problem.logits(t), dim=-1)
        alpha = multiplier(problem, t, p, weight, centre)
        error = _project(alpha.unsqueeze(-1) * p - problem.c, weight, centre)
        jacobian, _ = _slope_in_t(problem, p, alpha, weight, centre)
        if not problem.scale_known:  # variable projection: the part along P p is alpha's to absorb
            along = _project(p, weight, centre)
            jacobian = jacobian - along * (jacobian * along).sum(-1, keepdim=True) \
                / along.square().sum(-1, keepdim=True).clamp_min(tiny)
        size = error.norm(dim=-1)
        step = -(error * jacobian).sum(-1) / (jacobian * jacobian).sum(-1).clamp_min(tiny)
        limit = 0.5 * t.abs()
        moved = t + step.clamp(-limit, limit)
        moved = torch.where(t > 0, moved.clamp_min(t_lower), moved.clamp_max(-t_lower))
        # stop once every candidate has converged, or stopped converging fast (then it is not near a zero)
        settled = (moved - t).abs() <= 1e-13 * limit
        if previous is not None:
            settled |= size > 0.5 * previous
        t, previous = moved, size
        if bool(settled.all()):
            break
    return t


def label_standard_error(problem: HeadProblem, structure: Structure, t: float, alpha: float, free: Sequence[int],
                         *, t_free: bool) -> torch.Tensor:
    """Standard error ``(C,)`` of each label entry of the answer ``(t, alpha)``, from the residual it leaves.

    Linearised least squares: the residual vector ``f = P (alpha p(t) - c)`` over the structured entries has
    Jacobian ``J`` in the free scalars (``t`` unless a closed form fixed it; ``alpha`` when the scale is
    unknown), the observed residual (at least the gradient's rounding and rank-one noise) estimates the noise
    per entry, ``s^2 = |f|^2 / (n - k)``, and ``Cov = s^2 (J^T J)^-1`` carries over to ``y = p(t) - c / alpha``
    through its own Jacobian. A gradient that a label structure explains only roughly (an update of several
    local steps, noise) or that barely moves the fit along a free scalar (a near-uniform or saturated softmax
    with an unknown scale) leaves a large error: the label is then not pinned down, whatever its residual.
    """
    dtype, device = torch.float64, problem.c.device
    t_tensor = torch.tensor([t], dtype=dtype, device=device)
    p = torch.softmax(problem.logits(t_tensor), -1)
    mask = mask_of(torch.tensor([(tuple(free) * 2)[:2]], device=device), problem.num_classes)
    offset = torch.tensor([structure.offset_free], device=device)
    weight, centre = _projector(mask, offset, dtype)
    f_columns, y_columns = [], []
    if t_free:
        f_slope, dp = _slope_in_t(problem, p, torch.tensor([alpha], dtype=dtype, device=device), weight, centre)
        f_columns.append(f_slope)
        y_columns.append(dp + problem.c / t ** 2 if problem.scale_known else dp)  # y = p - c / alpha
    if not problem.scale_known:
        f_columns.append(_project(p, weight, centre))
        y_columns.append(problem.c.unsqueeze(0) / alpha ** 2)
    if not f_columns:
        return torch.zeros(problem.num_classes, dtype=dtype, device=device)
    jacobian = torch.cat(f_columns).T            # (C, k)
    label_jacobian = torch.cat(y_columns).T      # (C, k)
    residual = _project(alpha * p - problem.c, weight, centre)[0]
    count = int(weight.sum()) - int(structure.offset_free) - jacobian.shape[1]
    floor = problem.precision + problem.entry_noise
    variance = max(float(residual.square().sum()) / max(count, 1), floor ** 2)
    covariance = variance * torch.linalg.pinv(jacobian.T @ jacobian)
    return ((label_jacobian @ covariance) * label_jacobian).sum(-1).clamp_min(0).sqrt()
