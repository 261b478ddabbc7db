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

Shapes: everything works on a :class:`~gradleak.head.HeadBatch` of ``N`` examples at once, candidates ``t`` of
shape ``(N, K)`` (``K`` candidates per example) and per-candidate ``(N, K, C)`` tensors. Per-example values are
broadcast with :meth:`~gradleak.head.HeadBatch.broadcast`; the hypothesis of each candidate (``free_entries``,
``offset_free``) may be given per candidate ``(N, K)`` or shared by the examples ``(K,)``. No operation mixes
examples, and every reduction runs along one example's entries, so each example gets the same bits whatever the
batch holds (the only matrix products are the factorisation's, one per example: see :mod:`gradleak.head`).
:func:`residuals` and :func:`free_entries_of` also take a single :class:`~gradleak.head.HeadProblem` with tensors
that lack the batch dimension.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields
from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple, TypeVar, Union

import torch

from ..head import HeadBatch, HeadProblem

Problem = Union[HeadBatch, HeadProblem]


@dataclass(frozen=True)
class Structure:
    """A label hypothesis: the ``C - free_entries`` smallest entries share one value (zero unless offset_free)."""

    name: str
    free_entries: int
    offset_free: bool
    label_format: str

    def degrees_of_freedom(self, num_classes, unknowns: int = 1):
        """Equations left over once the offset and ``unknowns`` scalars (``t`` unless a closed form fixed it, and
        ``alpha`` when the gradient scale is unknown) are fitted; below 1 the structure cannot judge the answer.
        ``num_classes`` (the equations) may be an int or a tensor of them."""
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
#: With an unknown scale, how many choices of the free entries (the best by deletion diagnostics) each candidate
#: is judged under: the choice fixes ``alpha`` and so the label, and a saturated softmax can leave several choices
#: tied to within rounding, each a different label that explains the gradient (see :func:`readings`).
READINGS = 4
#: ... but with at most this many classes every choice is a reading (at most 10 pairs): there a structure can have no
#: equation to spare once ``alpha`` and ``t`` are fitted, and then every choice fits exactly and their ranking says
#: nothing about which holds the truth (see :func:`readings`).
EVERY_READING_CLASSES = 5
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


def hypotheses(structures: Sequence[Structure], which: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(free_entries, offset_free)`` of candidates under ``structures[which]``, shaped like ``which``."""
    free_entries, offset_free = _hypothesis_table(tuple(structures), which.device)
    return free_entries[which], offset_free[which]


@functools.lru_cache(maxsize=64)
def _hypothesis_table(structures: Tuple[Structure, ...], device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(free_entries, offset_free)`` of each structure, as tensors (made once per set of structures)."""
    return (torch.tensor([s.free_entries for s in structures], device=device),
            torch.tensor([s.offset_free for s in structures], device=device))


Function = TypeVar("Function", bound=Callable[..., torch.Tensor])


def _one_or_many(function: Function) -> Function:
    """Let ``function(problem, *tensors, **options)``, written for a :class:`HeadBatch` and tensors with a leading
    batch dimension, also take a single :class:`HeadProblem` and tensors without it (a batch of one)."""
    @functools.wraps(function)
    def wrapper(problem, *args, **kwargs):
        if isinstance(problem, HeadBatch):
            return function(problem, *args, **kwargs)

        def lift(value):
            return value.unsqueeze(0) if isinstance(value, torch.Tensor) else value

        return function(HeadBatch.of(problem), *map(lift, args), **{k: lift(v) for k, v in kwargs.items()})[0]
    return wrapper  # type: ignore[return-value]


def _c_like(problem: HeadBatch, values: torch.Tensor) -> torch.Tensor:
    """``c`` broadcast against per-candidate values ``(N, ..., C)``."""
    return problem.broadcast("c", values, trailing=1).expand_as(values)


def _second_free_score(error: torch.Tensor, top: torch.Tensor, offset_free: Union[torch.Tensor, bool]
                       ) -> torch.Tensor:
    """How much leaving each entry out of ``S`` (besides the largest, ``top`` (N, K, 1)) lowers the residual:
    ``(N, K, C)``.

    With a zero offset (``offset_free`` (N, K, 1), or one bool) that is ``|e_j|``; with a free offset
    ``|e_j - mean|`` over the entries other than the largest. The largest entry itself scores -1, so it is never
    picked twice.
    """
    score = error
    if not isinstance(offset_free, bool) or offset_free:
        mean = (error.sum(-1, keepdim=True) - error.gather(-1, top)) / max(error.shape[-1] - 1, 1)
        score = error - mean * offset_free
    return score.abs().scatter_(-1, top, -1.0)


def _deletion_scores(p: torch.Tensor, c: torch.Tensor, weight: torch.Tensor, offset_free: torch.Tensor
                     ) -> torch.Tensor:
    """How much leaving each entry out lowers the residual sum of squares of the least-squares fit of ``c`` by
    ``alpha p`` (``+ beta`` where the offset is free) over the entries of ``weight``: ``(..., C)``, -1 outside.

    The regression deletion identity ``RSS - RSS_{-j} = r_j^2 / (1 - h_jj)`` gives every entry at once from the
    full fit's residuals ``r`` and leverages ``h``; ``1 - h_jj`` is ``S_{-j} / S`` (times ``(n-1)/n`` with a free
    offset), ``S`` the (centred) sum of squares of ``p``. The dominant entry of ``p`` is refitted without it
    instead: where the other entries barely vary (a saturated softmax) its leverage is 1 to within rounding and
    the identity divides rounding by rounding (it had scored one deletion at 7 times the whole RSS).
    ``c`` broadcasts against ``p``.
    """
    offset = offset_free.to(p.dtype).unsqueeze(-1)
    tiny = torch.finfo(p.dtype).tiny
    c = c.expand_as(p)

    def dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x * y).sum(-1, keepdim=True)

    def centred(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return (values - offset * dot(values, mask) / mask.sum(-1, keepdim=True).clamp_min(1)) * mask

    count = weight.sum(-1, keepdim=True)
    p_c, c_c = centred(p, weight), centred(c, weight)
    spread = dot(p_c, p_c)
    residual = c_c - p_c * (dot(p_c, c_c) / spread.clamp_min(tiny))
    without = spread - p_c.square() * (1 + offset / (count - 1).clamp_min(1))
    keep = 1 - offset / count.clamp_min(1)
    score = residual.square() / (keep * without / spread.clamp_min(tiny)).clamp_min(tiny)
    dominant = p_c.abs().argmax(-1, keepdim=True)
    rest = weight.scatter(-1, dominant, 0.0)
    p_rest, c_rest = centred(p, rest), centred(c, rest)
    rest_rss = dot(c_rest, c_rest) - dot(p_rest, c_rest).square() / dot(p_rest, p_rest).clamp_min(tiny)
    return torch.where(weight > 0, score.scatter(-1, dominant, dot(residual, residual) - rest_rss), -1.0)


@_one_or_many
def free_entries_of(problem: Problem, t: torch.Tensor, p: torch.Tensor, free_entries: torch.Tensor,
                    offset_free: torch.Tensor, choices: int = 1, alpha: Optional[torch.Tensor] = None
                    ) -> torch.Tensor:
    """Indices ``(N, K, choices, 2)`` of the entries a structure leaves free at each candidate.

    The first is the label's largest entry; for two-class structures the second is the entry whose removal
    lowers the residual most (``choices`` > 1 gives the runners-up as alternatives), so the residual is the
    lower envelope over the possible second classes: continuous, and zero at the truth even when the second
    class weighs less than the deviations of a slightly wrong ``t``. One-class structures repeat the first index.
    With a known scale (or a given ``alpha``) the label ``y`` is known before the structure is, and its largest
    entry is read off; with an unknown scale ``alpha`` depends on the entries chosen, so each is the entry whose
    removal lowers the residual of the fit most (exact deletion diagnostics, see :func:`_deletion_scores`), and
    the alternatives of a one-class structure are the runners-up of that first choice.

    Args:
        t: ``(N, K)``; p: ``(N, K, C)`` the softmax at ``t``; free_entries, offset_free: ``(N, K)`` or ``(K,)``;
            alpha: ``(N, K)``. A :class:`HeadProblem` takes them without the leading ``N`` (and returns
            ``(K, choices, 2)``).
    """
    c = problem.broadcast("c", t)
    if problem.scale_known or alpha is not None:
        alpha = t if alpha is None else alpha
        error = alpha.unsqueeze(-1) * p - c
        top = (error * alpha.sign().unsqueeze(-1)).argmax(-1)
        second = _second_free_score(error, top.unsqueeze(-1), offset_free.unsqueeze(-1))
    else:
        # removing j then k lowers the residual by score_j + score_{k | j} exactly: the best pair among the
        # PAIR_FIRSTS best first entries (a greedy first entry can be the wrong one for a two-class label)
        first = _deletion_scores(p, c, torch.ones_like(p), offset_free)
        ranked = first.topk(min(max(PAIR_FIRSTS, choices), p.shape[-1]), dim=-1).indices
        singles = ranked[..., :choices]                   # one free entry: the best single deletions (N, K, choices)
        if not bool((free_entries == 2).any()):
            return torch.stack([singles, singles], dim=-1)
        firsts = ranked[..., :PAIR_FIRSTS]                                                     # (N, K, m)
        count = firsts.shape[-1]
        rest = torch.ones(*firsts.shape, p.shape[-1], dtype=p.dtype, device=p.device)
        rest = rest.scatter(-1, firsts.unsqueeze(-1), 0.0)
        seconds = _deletion_scores(p.unsqueeze(-2).expand_as(rest), c.unsqueeze(-2), rest,
                                   offset_free.unsqueeze(-1).expand(*offset_free.shape, count))   # (N, K, m, C)
        gain = first.gather(-1, firsts) + seconds.amax(-1)
        pair = torch.where(free_entries == 2, gain.argmax(-1), 0)
        top = firsts.gather(-1, pair.unsqueeze(-1))[..., 0]
        second = seconds.gather(-2, pair[..., None, None].expand(*pair.shape, 1, p.shape[-1]))[..., 0, :]
    second = second.topk(choices, dim=-1).indices
    two_class = free_entries.unsqueeze(-1) == 2
    if problem.scale_known or alpha is not None:
        top = top.unsqueeze(-1).expand_as(second)
        return torch.stack([top, torch.where(two_class, second, top)], dim=-1)
    top = torch.where(two_class, top.unsqueeze(-1), singles)
    return torch.stack([top, torch.where(two_class, second, singles)], dim=-1)


def mask_of(free: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Boolean ``(..., C)`` mask of the structured entries from free indices ``(..., 2)``."""
    return torch.ones(*free.shape[:-1], num_classes, dtype=torch.bool, device=free.device).scatter_(-1, free, False)


@dataclass(frozen=True)
class Projection:
    """The projector ``P`` of candidates' structures (``..., C``): it zeroes the free entries and, where the offset
    is free, subtracts the mean of the structured ones: ``P v = v * weight - (v * weight).sum(-1) * centre``."""

    weight: torch.Tensor
    centre: Optional[torch.Tensor]  # None when no candidate's offset is free (P only masks)

    @staticmethod
    def of(mask: torch.Tensor, offset_free: torch.Tensor, dtype: torch.dtype) -> "Projection":
        """From the structured entries ``mask`` (..., C) and ``offset_free`` (broadcast against ``mask[..., 0]``)."""
        weight = mask.to(dtype)
        if not bool(offset_free.any()):
            return Projection(weight, None)
        return Projection(weight, weight * (offset_free.to(dtype).unsqueeze(-1)
                                            / weight.sum(-1, keepdim=True).clamp_min(1)))

    def select(self, rows: torch.Tensor) -> "Projection":
        """The projectors of the candidates ``rows`` (of the leading dimension)."""
        return Projection(self.weight[rows], None if self.centre is None else self.centre[rows])

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        masked = values * self.weight
        return masked if self.centre is None else masked - masked.sum(-1, keepdim=True) * self.centre


def multiplier(problem: HeadBatch, t: torch.Tensor, projected_p: torch.Tensor, projected_c: torch.Tensor
               ) -> torch.Tensor:
    """``alpha`` (N, K) with ``p - y = c / alpha``: ``t`` when the scale is known, else the least-squares fit of
    ``alpha P p`` to ``P c`` (``projected_p``, ``projected_c``), kept admissible (``|alpha| >= t_min``: no label
    entry moves by more than one)."""
    if problem.scale_known:
        return t
    fit = (projected_p * projected_c).sum(-1) / projected_p.square().sum(-1).clamp_min(torch.finfo(t.dtype).tiny)
    return torch.where(fit < 0, -1.0, 1.0).to(fit.dtype) * torch.maximum(fit.abs(), problem.broadcast("t_min", t))


def _residual_norms(alpha: torch.Tensor, projected_p: torch.Tensor, projected_c: torch.Tensor) -> torch.Tensor:
    """``||P (alpha p - c)|| / ||P c||`` per candidate: the residual relative to the trivial answer's."""
    error = alpha.unsqueeze(-1) * projected_p - projected_c
    return error.norm(dim=-1) / projected_c.norm(dim=-1).clamp_min(torch.finfo(error.dtype).tiny)


def _piece_residuals(problem: HeadBatch, t: torch.Tensor, p: torch.Tensor, mask: torch.Tensor,
                     offset_free: torch.Tensor) -> torch.Tensor:
    """Normalised residuals ``(N, K)`` with the structured entries fixed by ``mask`` (N, K, C), or by ``mask``
    (N, 1, C) and ``offset_free`` (N, 1) shared by an example's candidates (``c`` is then projected once per
    example)."""
    project = Projection.of(mask, offset_free, t.dtype)
    projected_p, projected_c = project(p), project(_c_like(problem, project.weight))
    return _residual_norms(multiplier(problem, t, projected_p, projected_c), projected_p, projected_c)


@_one_or_many
def residuals(problem: Problem, t: torch.Tensor, free_entries: torch.Tensor, offset_free: torch.Tensor,
              free: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Normalised residuals ``r(t)`` of shape ``(N, K)`` (exact, masked; see the module docstring).

    Args:
        t: ``(N, K)`` candidate scalars (float64, non-zero).
        free_entries, offset_free: ``(N, K)`` or ``(K,)``: the hypothesis of each candidate (int 1 or 2, bool).
        free: ``(N, K, 2)`` the free entries, held instead of chosen at each ``t`` (default: chosen); ``(N, 1, 2)``,
            with ``offset_free`` ``(N, 1)``, holds the same ones for all of an example's candidates.
        A :class:`HeadProblem` takes them without the leading ``N`` (and returns ``(K,)``).
    """
    p = problem.softmax(t)
    if free is None:
        free = free_entries_of(problem, t, p, free_entries, offset_free)[..., 0, :]
    return _piece_residuals(problem, t, p, mask_of(free, problem.num_classes), offset_free)


#: Shifted logits below this are clamped before ``exp``: their probabilities (< 1e-304) vanish next to every other
#: term, and ``exp`` of a huge negative argument takes a slow path (denormal results; 6x slower on the grid).
_LOGIT_FLOOR = -700.0


def _grid_softmax(problem: HeadBatch, t: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    """The softmax ``(N, K, C)`` at many scalars ``t`` (N, K), each row times ``times`` (N, K): the grid's
    biggest pass.

    Without a bias the largest logit ``t * a_i`` is read off the sign of ``t``, so the logits are shifted by it
    (``t * a - t * max a``, or ``min a`` where ``t < 0``) instead of by a reduction over the classes, which is the
    slowest step of a softmax over few classes. The factor joins the normalisation (one pass, not two).
    """
    if problem.bias is not None:
        shifted = problem.logits(t)
        shifted = shifted.sub_(shifted.amax(-1, keepdim=True))
    else:
        a = problem.a.unsqueeze(-2)
        largest = torch.where(t > 0, a.amax(-1), a.amin(-1))
        shifted = torch.addcmul((-t * largest).unsqueeze(-1), t.unsqueeze(-1), a)
    p = shifted.clamp_min_(_LOGIT_FLOOR).exp_()
    return p.mul_((times / p.sum(-1)).unsqueeze(-1))


def grid_residuals(problem: HeadBatch, t: torch.Tensor, structures: Tuple[Structure, ...]) -> torch.Tensor:
    """Residuals ``(N, len(structures), K)`` of many candidates ``t`` (N, K) at once, for locating basins.

    One ``(N, K, C)`` softmax shared by all structures; the centring uses sums, which loses precision for
    residuals far below 1e-8 (refinement uses the exact :func:`residuals`). With an unknown scale each
    structure fits its own ``alpha`` (the exact residuals, per structure).
    """
    if not problem.scale_known:
        return torch.stack([residuals(problem, t, torch.full_like(t, s.free_entries, dtype=torch.long),
                                      torch.full_like(t, s.offset_free, dtype=torch.bool)) for s in structures], 1)
    error = _grid_softmax(problem, t, t).sub_(problem.broadcast("c", t))  # alpha y = t p - c
    # the label's largest entry: error's largest where t > 0, its smallest where t < 0 (the first of equal ones, as
    # argmax gives; over few classes max's indices take 3/4 of argmax's time)
    if bool((t > 0).all()):
        top = error.max(-1, keepdim=True).indices
    elif bool((t < 0).all()):
        top = error.min(-1, keepdim=True).indices
    else:
        top = torch.where(t > 0, error.max(-1).indices, error.min(-1).indices).unsqueeze(-1)
    # zero the free entries in a copy rather than subtracting them from sums: at large |t| the largest
    # entry dominates the sum of squares and the subtraction would cancel catastrophically. c's sums are taken by
    # subtraction: its entries sum to 0, so one entry holds at most a factor C more than the rest; two can hold all
    # of it but rounding only where they are its two largest (a mixup's classes beside a saturated softmax: the rest
    # 1e-26 of its square, which had cancelled to rounding and buried the true basin under residuals of 1e141),
    # and there the rest's own sums, made once per example, stand in.
    # every pass over the (N, K, C) grid writes into the softmax's own buffer where it can: a fresh grid-sized
    # tensor is fresh memory, whose page faults cost more than the arithmetic on a 1000-class head
    two_class = any(s.free_entries == 2 for s in structures)
    kept = error.scatter(-1, top, 0.0) if two_class else error.scatter_(-1, top, 0.0)  # two-class reads error
    norm = functools.partial(torch.linalg.vector_norm, dim=-1)  # a reduction: no grid-sized product
    sums = (kept.sum(-1), norm(kept).square()) if any(s.free_entries == 1 for s in structures) else None
    c_rows = problem.broadcast("c", t)                                   # (N, 1, C): summed once per example
    c = c_rows.expand(*t.shape, -1)
    c_top = c.gather(-1, top)[..., 0]
    c_sums = c_rows.sum(-1) - c_top, c_rows.square().sum(-1) - c_top.square()
    if two_class:
        largest = problem.c.abs().topk(2, dim=-1).indices.sort(-1).values                      # (N, 2)
        rest = problem.c.scatter(-1, largest, 0.0)
        rest_sums = rest.sum(-1, keepdim=True), rest.square().sum(-1, keepdim=True)           # (N, 1) each
    out = []
    for structure in structures:
        (c_total, c_total_sq) = c_sums
        if structure.free_entries == 1:
            total, total_sq = sums
        else:
            second = _second_free_score(error, top, structure.offset_free).max(-1, keepdim=True).indices
            kept_two = kept.scatter(-1, second, 0.0)
            total, total_sq = kept_two.sum(-1), norm(kept_two).square()
            c_second = c.gather(-1, second)[..., 0]
            c_total, c_total_sq = c_total - c_second, c_total_sq - c_second.square()
            pair = ((torch.minimum(top, second) == largest[:, None, :1])
                    & (torch.maximum(top, second) == largest[:, None, 1:]))[..., 0]
            c_total, c_total_sq = torch.where(pair, rest_sums[0], c_total), torch.where(pair, rest_sums[1], c_total_sq)
        if structure.offset_free:
            size = problem.num_classes - structure.free_entries
            total_sq = total_sq - total.square() / size
            c_total_sq = c_total_sq - c_total.square() / size
        out.append((total_sq.clamp_min(0) / c_total_sq.clamp_min(torch.finfo(t.dtype).tiny)).sqrt())
    return torch.stack(out, dim=1)


@dataclass(frozen=True)
class Minima:
    """Candidate answers of ``N`` examples, ``n`` each (``(N, n)`` per field unless said), with a mask of the
    real ones: examples have different numbers of candidates, and the rest pads.

    Attributes:
        t: scalars; alpha: their ``p - y = c / alpha`` (``= t`` with a known scale; the gradient scale is
            ``alpha / t``); residual: normalised residuals; labels: ``(N, n, C)`` candidate labels;
            rounding_units: RMS spread of the structured entries in units of their expected rounding error (see
            :func:`evaluate`); valid: every label entry in ``[0, 1]`` up to ``ROUNDING_SLACK`` times its expected
            rounding error; informative: False where the structure says nothing about the scalars (the residual
            is then set to 1, see :func:`evaluate`); negligible: True where that is because the gradient term is
            below rounding (the label is the prediction itself, the trivial answer), not because the structured
            entries are flat; free: ``(N, n, 2)`` the free entries (largest first; repeated for one-class
            structures); live: True for real candidates, False for padding.
    """

    t: torch.Tensor
    alpha: torch.Tensor
    residual: torch.Tensor
    labels: torch.Tensor
    rounding_units: torch.Tensor
    valid: torch.Tensor
    informative: torch.Tensor
    negligible: torch.Tensor
    free: torch.Tensor
    live: torch.Tensor

    @property
    def flat_structure(self) -> torch.Tensor:
        """``(N, n)``: the structure says nothing about the scalars because its structured entries are flat to
        within rounding, not because the gradient term is (the trivial answer, the prediction ``p`` itself, which
        any gradient nears)."""
        return ~self.informative & ~self.negligible

    def _map(self, function: Callable[[torch.Tensor], torch.Tensor]) -> "Minima":
        return Minima(**{f.name: function(getattr(self, f.name)) for f in fields(self)})

    def __getitem__(self, index) -> "Minima":
        """The examples ``index`` (of the leading dimension)."""
        return self._map(lambda value: value[index])

    def __len__(self) -> int:
        return self.t.shape[0]

    def take(self, index: torch.Tensor) -> "Minima":
        """Candidates ``index`` (N, m) of each example (gathered along the candidate dimension)."""
        wide = {(): index}  # the index spread over each field's trailing shape, made once per shape

        def gather(value: torch.Tensor) -> torch.Tensor:
            tail = value.shape[2:]
            if tail not in wide:
                wide[tail] = index.view(*index.shape, *([1] * len(tail))).expand(*index.shape, *tail)
            return value.gather(1, wide[tail])
        return self._map(gather)

    def with_live(self, live: torch.Tensor) -> "Minima":
        return Minima(**{f.name: getattr(self, f.name) for f in fields(self) if f.name != "live"}, live=live)

    def order(self, columns: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(N, m)``: the candidates ``columns`` (m,) (default all) of each example by residual, best first,
        then the padding (a stable sort: ties keep their order)."""
        key = torch.where(self.live, self.residual, math.inf)
        if columns is None:
            return key.sort(dim=-1, stable=True).indices
        return columns[key[:, columns].sort(dim=-1, stable=True).indices]

    def distinct(self, atol: float) -> "Minima":
        """Of candidates sorted best first (:meth:`order`), those whose labels differ by more than ``atol``
        (max-abs) from every better real one: minima reached from several starting points count once (the
        others become padding, in place)."""
        distance = torch.cdist(self.labels, self.labels, p=math.inf)  # (N, n, n) max-abs, no (N, n, n, C) temporary
        earlier_close = ((distance <= atol) & self.live.unsqueeze(-2)).tril(diagonal=-1).any(-1)
        return self.with_live(self.live & ~earlier_close)

    @staticmethod
    def cat(parts: Iterable["Minima"]) -> "Minima":
        """The candidates of several sets side by side (same examples)."""
        parts = list(parts)
        return Minima(**{f.name: torch.cat([getattr(p, f.name) for p in parts], dim=1) for f in fields(Minima)})


@dataclass(frozen=True)
class _Fit:
    """The label of candidates ``t`` (N, n) with given free entries, and what :func:`evaluate` judges it by:
    ``alpha`` (N, n), ``labels`` (N, n, C), the structure's ``project``, and the projected ``p`` and ``c``."""

    alpha: torch.Tensor
    labels: torch.Tensor
    project: "Projection"
    p: torch.Tensor
    c: torch.Tensor

    @staticmethod
    def of(problem: HeadBatch, t: torch.Tensor, p: torch.Tensor, free: torch.Tensor, offset_free: torch.Tensor,
           alpha: Optional[torch.Tensor] = None) -> "_Fit":
        """``p`` (N, n, C) the softmax at ``t``, ``free`` (N, n, 2), ``offset_free`` (N, n); ``alpha`` refitted
        unless given."""
        project = Projection.of(mask_of(free, problem.num_classes), offset_free, t.dtype)
        c = _c_like(problem, p)
        projected_p, projected_c = project(p), project(c)
        if alpha is None:
            alpha = multiplier(problem, t, projected_p, projected_c)
        return _Fit(alpha, p - c / alpha.unsqueeze(-1), project, projected_p, projected_c)


def fitted_labels(problem: HeadBatch, offset_free: torch.Tensor, t: torch.Tensor, free: torch.Tensor
                  ) -> torch.Tensor:
    """The labels ``(N, n, C)`` of candidates ``t`` (N, n) with free entries ``free`` (N, n, 2) under a structure
    whose offset is free or not (``offset_free``, ``(N, n)`` or ``(n,)``), ``alpha`` refitted: :func:`evaluate`'s
    labels without its judgement, for a scan that needs only how far the label moves."""
    return _Fit.of(problem, t, problem.softmax(t), free, offset_free.expand_as(t)).labels


def evaluate(problem: HeadBatch, free_entries: torch.Tensor, offset_free: torch.Tensor, t: torch.Tensor,
             alpha: Optional[torch.Tensor] = None, free: Optional[torch.Tensor] = None,
             live: Optional[torch.Tensor] = None) -> Minima:
    """Everything the decision needs about candidates ``t`` (N, n) under the hypotheses ``free_entries``,
    ``offset_free`` (``(N, n)`` or ``(n,)``), in their order. ``alpha`` (N, n) and ``free`` (N, n, 2) fix the
    candidates' ``alpha`` and free entries instead of choosing them (free entries set to -1 are chosen); ``live``
    (N, n) marks the real candidates (default: all)."""
    p = problem.softmax(t)
    if free is None or bool((free < 0).any()):
        chosen = free_entries_of(problem, t, p, free_entries, offset_free, alpha=alpha)[..., 0, :]
        free = chosen if free is None else torch.where(free < 0, chosen, free)
    offset_free = offset_free.expand_as(t)
    fit = _Fit.of(problem, t, p, free, offset_free, alpha)
    alpha, labels, project, projected_p, projected_c = fit.alpha, fit.labels, fit.project, fit.p, fit.c
    residual = _residual_norms(alpha, projected_p, projected_c)
    # Two trivial answers, no better than a saturated softmax: where the structured entries of the gradient term
    # are flat to within rounding (p_S ~ 0 and c_S ~ -alpha y_S constant) the normalised residual is 0/0 and the
    # structure says nothing about t; and where the gradient term c / alpha is below rounding, the label is the
    # prediction p itself (an unknown scale lets alpha grow without bound).
    precision = problem.broadcast("precision", t)
    negligible = problem.broadcast("c_max", t) / alpha.abs() <= ROUNDING_SLACK * precision
    informative = (projected_c.norm(dim=-1) > ROUNDING_SLACK * precision
                   + problem.broadcast("rank_one_ratio", t)) & ~negligible
    residual = torch.where(informative, residual, 1.0)
    # What rounding alone would leave, entry by entry: the victim computed z = W h and p - y in the gradient's
    # precision u, so z carries ~u |t| sigma |W||v| absolute error, which moves p_i by up to that times
    # p_i (1 - p_i) (a logit error shared by every class leaves the softmax alone: a saturated class stays 1),
    # and p_i - y_i is rounded to ~u (p_i + |y_i|); the label y_i itself is exact. Noise that breaks the
    # rank-one structure reaches each entry c_i as its row's (``problem.class_noise``: a row the network rounded
    # relative to a tiny p_i - y_i is that precise, noise from outside reaches every row), i.e. that over |alpha|
    # per label entry, and the logits through v as the rows' mean (``problem.entry_noise``); below the smallest
    # normal number of the victim's float type (``problem.underflow``) nothing is relative any more. The structured
    # entries are compared with their common value weighted by these errors (a weighted least-squares fit).
    noise, u = problem.broadcast("entry_noise", p), precision.unsqueeze(-1)
    logit_error = (u + noise) * t.abs().unsqueeze(-1) * problem.broadcast("a_abs_max", p)
    expected = (logit_error * p * (1 - p) + u * (p + labels.abs())
                + problem.broadcast("class_noise", p, trailing=1) / alpha.abs().unsqueeze(-1)
                + problem.broadcast("underflow", p))
    weight = project.weight
    # relative to the most precise structured entry (at most 1; 1 where none is structured): a row rounded relative
    # to a p_i of 1e-160 expects errors whose squares underflow
    finest = torch.where(weight > 0, expected, math.inf).amin(-1, keepdim=True).clamp_max(1.0)
    precision_weight = weight * (finest / expected).square()
    common = (labels * precision_weight).sum(-1, keepdim=True) / precision_weight.sum(-1, keepdim=True)
    deviation = (labels - common * offset_free.unsqueeze(-1)) / expected * weight
    spread = deviation.square().sum(-1).div(weight.sum(-1).clamp_min(1)).sqrt()
    slack = ROUNDING_SLACK * expected
    # a label of the structure: entries in [0, 1], and each free entry holds at least the common share (eps and
    # lam in [0, 1]: a "smoothed mixup" whose second class sits below the rest is no label at all)
    least = common * offset_free.unsqueeze(-1) - slack.gather(-1, free)
    valid = ((labels >= -slack) & (labels <= 1 + slack)).all(-1) & (labels.gather(-1, free) >= least).all(-1)
    return Minima(t, alpha, residual, labels, spread, valid, informative, negligible, free,
                  torch.ones_like(valid) if live is None else live)


def readings(problem: HeadBatch, structures: Sequence[Structure], t: torch.Tensor, which: torch.Tensor,
             live: Optional[torch.Tensor] = None
             ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Candidates ``t`` (N, n) under ``structures[which]`` (``which`` (n,)) and their real ones ``live`` (N, n), as
    ``(t, which, free, live)`` to :func:`evaluate`: unchanged where the scale is known (``free`` None: the label is
    known before its free entries are), and otherwise each candidate ``k`` times, consecutively, under each of
    ``k`` choices of free entries (``free`` (N, n * k, 2)): its ``k = min(READINGS, C - 1)`` best
    (:func:`free_entries_of`), or with at most ``EVERY_READING_CLASSES`` classes every choice (the one-class
    structures' fewer choices padded with ones that are not ``live``).

    With an unknown scale the choice fixes ``alpha`` and so the label, and where the softmax is saturated several
    choices fit to within rounding. A 4-class gradient of a label smoothed with eps 0.003 fits, at its own ``t``,
    the uniform label (free entry: a class the softmax gives 1e-16) as closely as the truth (free entry: the true
    class): judging the best reading only gave the uniform label as determined. Where a structure has no equation
    to spare every choice fits exactly: with 4 classes, a head bias and an unknown scale, a mixup 0.055 from the
    truth was determined while the true smoothed mixup's pair of classes, not among the best three choices, gave
    the truth exactly.
    """
    if problem.scale_known:
        return t, which, None, live
    if problem.num_classes <= EVERY_READING_CLASSES:
        table, real = _every_choice(tuple(s.free_entries for s in structures), problem.num_classes, t.device)
        choices = table.shape[1]
        free = table[which].expand(len(problem), -1, -1, -1).flatten(1, 2)
        real = real[which].flatten().expand(len(problem), -1)
        live = real if live is None else real & live.repeat_interleave(choices, -1)
    else:
        choices = min(READINGS, problem.num_classes - 1)
        free = free_entries_of(problem, t, problem.softmax(t), *hypotheses(structures, which), choices=choices)
        free = free.flatten(1, 2)
        live = None if live is None else live.repeat_interleave(choices, -1)
    return t.repeat_interleave(choices, -1), which.repeat_interleave(choices), free, live


@functools.lru_cache(maxsize=64)
def _every_choice(free_entries: Tuple[int, ...], num_classes: int, device: torch.device
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every choice of free entries of structures with ``free_entries`` each, padded to as many for each:
    ``(choices, real)``, ``(S, k, 2)`` and ``(S, k)`` (False for padding), made once per layout."""
    classes = torch.arange(num_classes, device=device)
    options = {1: classes.unsqueeze(-1).expand(-1, 2), 2: torch.combinations(classes, 2)}
    width = max(len(options[count]) for count in free_entries)
    padded = [torch.cat([options[count], options[count][-1:].expand(width - len(options[count]), 2)])
              for count in free_entries]
    real = [torch.arange(width, device=device) < len(options[count]) for count in free_entries]
    return torch.stack(padded), torch.stack(real)


def describe(problem: HeadBatch, structures: Sequence[Structure], t: torch.Tensor, which: torch.Tensor,
             live: Optional[torch.Tensor] = None) -> Dict[str, Minima]:
    """:func:`evaluate` candidates ``t`` (N, n), candidate ``k`` under ``structures[which[k]]`` (``which`` (n,),
    shared by the examples) and each of its :func:`readings`, grouped by structure and sorted best first
    (:meth:`Minima.order`; one vectorised pass for all structures); ``live`` (N, n) marks the real candidates
    (default: all)."""
    t, which, free, live = readings(problem, structures, t, which, live)
    everything = evaluate(problem, *hypotheses(structures, which), t, free=free, live=live)
    return {structure.name: everything.take(everything.order((which == index).nonzero().flatten()))
            for index, structure in enumerate(structures)}


def _linearised(problem: HeadBatch, p: torch.Tensor, project: Projection
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(P p, P dp/dt, dp/dt)``, (N, K, C) each, for the softmax ``p`` at ``t``: what the residual vector
    ``f = P (alpha p(t) - c)`` and its slope (:func:`_slope`) are made of."""
    pa = p * problem.broadcast("a", p, trailing=1)
    dp = pa - p * pa.sum(-1, keepdim=True)  # p (a - <p, a>)
    return project(p), project(dp), dp


def _slope(problem: HeadBatch, alpha: torch.Tensor, projected_p: torch.Tensor, projected_dp: torch.Tensor
           ) -> torch.Tensor:
    """``d f / d t`` for ``f = P (alpha p(t) - c)``: with a known scale ``alpha = t`` moves along (``P p`` joins
    the slope), with an unknown one ``alpha`` is held."""
    slope = alpha.unsqueeze(-1) * projected_dp
    return slope + projected_p if problem.scale_known else slope


def gauss_newton(problem: HeadBatch, t: torch.Tensor, mask: torch.Tensor, offset_free: torch.Tensor,
                 steps: int = 4, live: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Refine candidates ``t`` (N, K) by Gauss-Newton on the residual vector ``P(alpha p(t) - c)``, the structured
    entries held fixed by ``mask`` (N, K, C).

    With a known scale ``alpha = t``; with an unknown one ``alpha`` is the least-squares fit at each ``t`` and
    the step uses the variable-projection Jacobian (the ``t`` direction with its ``p`` component projected out,
    Kaufman's form). The residual is zero at the true ``t`` and smooth around it, so convergence is quadratic:
    from a grid point 2.4 % away, four steps reach machine precision. Steps are limited to half of ``|t|`` and
    keep ``t`` admissible (same sign, ``|t| >= problem.t_lower``). Candidates far from any zero may not converge;
    the caller ranks everything by residual afterwards. An example stops moving once all its real candidates
    (``live``, default all) have settled: what the others in the batch still do never changes its answer.

    Only the real candidates of the examples still moving are computed, as one flat batch of candidates (half of
    a batch's candidates can be padding, and most examples settle before the last step); each candidate's
    arithmetic is the same whichever others are computed beside it. Padding keeps its ``t``.

    Returns:
        The refined scalars ``(N, K)``.
    """
    examples, columns = (torch.ones_like(t, dtype=torch.bool) if live is None else live).nonzero(as_tuple=True)
    # candidate k of the flat batch is example examples[k] (one example's fields broadcast against its candidates
    # as they are: no gathering, and it never stops part of the way)
    rows = problem if len(problem) == 1 else problem.select(examples, features=False)
    place = torch.arange(len(examples), device=t.device)  # where the candidates still moving sit in the flat batch
    owner = examples                                      # and their examples
    refined = t[examples, columns].unsqueeze(1)           # (M, 1)
    project = Projection.of(mask[examples, columns].unsqueeze(1),
                            offset_free.expand_as(t)[examples, columns].unsqueeze(1), t.dtype)
    projected_c = project(_c_like(rows, project.weight))  # fixed while the structured entries are
    tiny = torch.finfo(t.dtype).tiny
    current, sign, previous = refined, refined.sign(), None  # every step keeps the sign
    for _ in range(steps):
        projected_p, projected_dp, _ = _linearised(rows, rows.softmax(current), project)
        alpha = multiplier(rows, current, projected_p, projected_c)
        error = alpha.unsqueeze(-1) * projected_p - projected_c
        jacobian = _slope(rows, alpha, projected_p, projected_dp)
        if not rows.scale_known:  # variable projection: the part along P p is alpha's to absorb
            jacobian = jacobian - projected_p * (jacobian * projected_p).sum(-1, keepdim=True) \
                / projected_p.square().sum(-1, keepdim=True).clamp_min(tiny)
        size = error.norm(dim=-1)
        step = -(error * jacobian).sum(-1) / (jacobian * jacobian).sum(-1).clamp_min(tiny)
        limit = 0.5 * current.abs()
        moved = current + step.clamp(-limit, limit)
        moved = sign * torch.maximum(sign * moved, rows.broadcast("t_lower", current))  # |t| >= t_lower, same sign
        # stop once every candidate has converged, or stopped converging fast (then it is not near a zero)
        settled = (moved - current).abs() <= 1e-13 * limit
        if previous is not None:
            settled |= size > 0.5 * previous
        current, previous = moved, size  # before the write below: current starts as refined itself
        refined[place] = moved
        unsettled = torch.zeros(len(problem), dtype=torch.long, device=t.device).index_add_(
            0, owner, (~settled[:, 0]).long())
        keep = unsettled[owner] > 0  # the candidates of the examples still moving
        if not bool(keep.any()):
            break
        if not bool(keep.all()):
            place, owner, rows, project = (place[keep], owner[keep], rows.select(keep, features=False),
                                           project.select(keep))
            projected_c, current, sign, previous = projected_c[keep], current[keep], sign[keep], previous[keep]
    out = t.clone()
    out[examples, columns] = refined[:, 0]
    return out


def label_standard_error(problem: HeadBatch, structure: Structure, t: torch.Tensor, alpha: torch.Tensor,
                         free: torch.Tensor, *, t_free: bool) -> torch.Tensor:
    """Standard error ``(N, C)`` of each label entry of the answers ``(t, alpha)`` (N,) each, free entries
    ``free`` (N, 2), under ``structure``, from the residual each leaves.

    Linearised least squares: the residual vector ``f = P (alpha p(t) - c)`` over the structured entries has
    Jacobian ``J`` in the free scalars (``t`` unless a closed form fixed it; ``alpha`` when the scale is unknown),
    the observed residual (at least the gradient's rounding and rank-one noise) estimates the noise per entry,
    ``s^2 = |f|^2 / max(n - k, 1)`` and at least the rounding's (where ``n = k`` the structure has no equation to
    spare: its exact fit moves with the rounding alone), and ``Cov = s^2 (J^T J)^-1`` carries over to
    ``y = p(t) - c / alpha`` through its own Jacobian. A gradient that a label structure explains only roughly (an
    update of several local steps, noise) or that barely moves the fit along a free scalar (a near-uniform or
    saturated softmax with an unknown scale) leaves a large error: the label is then not pinned down, whatever its
    residual. At least one scalar is free: ``t_free``, or an unknown scale (with neither, nothing was fitted, and the
    label's error is the gradient's own: see :func:`gradleak.recovery.api._label_error`).
    """
    t, alpha = t.unsqueeze(-1), alpha.unsqueeze(-1)   # one candidate per example: (N, 1)
    p = problem.softmax(t)
    c = _c_like(problem, p)
    project = Projection.of(mask_of(free.unsqueeze(1), problem.num_classes),
                            torch.full_like(t, structure.offset_free, dtype=torch.bool), t.dtype)
    projected_p, projected_dp, dp = _linearised(problem, p, project)
    f_columns, y_columns = [], []
    if t_free:
        f_columns.append(_slope(problem, alpha, projected_p, projected_dp))
        y_columns.append(dp + c / t.square().unsqueeze(-1) if problem.scale_known else dp)  # y = p - c / alpha
    if not problem.scale_known:
        f_columns.append(projected_p)
        y_columns.append(c / alpha.square().unsqueeze(-1))
    jacobian = torch.cat(f_columns, 1).transpose(1, 2)            # (N, C, k)
    label_jacobian = torch.cat(y_columns, 1).transpose(1, 2)      # (N, C, k)
    residual = (alpha.unsqueeze(-1) * projected_p - project(c))[:, 0]
    count = project.weight[:, 0].sum(-1) - int(structure.offset_free) - jacobian.shape[-1]
    floor = problem.precision + problem.entry_noise
    variance = torch.maximum(residual.square().sum(-1) / count.clamp_min(1), floor.square())
    # products as sums (not matmul: see the module doc); k is 1 or 2
    normal = (jacobian.unsqueeze(-1) * jacobian.unsqueeze(-2)).sum(1)                       # (N, k, k)
    # A direction the structured entries barely see (a saturated softmax whose structured p_i are below rounding
    # but one, leaving one equation for two scalars) has a huge variance, not none: the normal matrix's eigenvalues
    # are floored at eps of the largest, never cut off as a pseudo-inverse would (that had kept a 5-class smoothed
    # label 0.7 from the truth determined), and an error that overflows is infinite, never NaN.
    values, vectors = torch.linalg.eigh(normal)
    info = torch.finfo(normal.dtype)
    smallest = (info.eps * values.abs().amax(-1, keepdim=True)).clamp_min(info.tiny)
    scaled = vectors / values.clamp_min(smallest).unsqueeze(-2)                              # V diag(1 / lambda)
    covariance = variance[:, None, None] * (scaled.unsqueeze(-2) * vectors.unsqueeze(-3)).sum(-1)  # (N, k, k)
    carried = (label_jacobian.unsqueeze(-1) * covariance.unsqueeze(1)).sum(-2)              # (N, C, k)
    return (carried * label_jacobian).sum(-1).clamp_min(0).sqrt().nan_to_num(nan=math.inf)
