"""``recover_label`` / ``recover_from_gradients``: one example's soft label and head feature from its gradient.

Both run the batched pipeline below on a batch of one; :func:`gradleak.recovery.batched.recover_labels` runs it
on many gradients of one head at once. Every step works on all examples together (a leading batch dimension, see
:mod:`gradleak.recovery.structure`) and keeps them apart, so an example's answer does not depend on the batch it
came in: the search, the fit test that decides whether it is determined (:func:`_decide`), and the reasons
given when it is not (:class:`RecoveryResults` writes them only when a result is read).
"""
from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import inspect
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union, overload

import torch
from torch import nn

from ..head import (GradientsLike, HeadBatch, example_rows, factor_head, find_head, head_gradients,
                    named_gradients)
from ..labels import LABEL_FORMATS
from .base import SEARCHES
from .exact import find_minima, search_evaluations
from .feature_layer import find_feature_layer, scale_from_feature_layer
from .structure import (FORMAT_STRUCTURES, ORDER, ROUNDING_SLACK, STRUCTURES, Minima, Structure, evaluate,
                        fitted_labels, gauss_newton, hypotheses, label_standard_error, mask_of, readings,
                        residuals)

FEATURE_SIGNS = ("auto", "nonnegative", "any")
#: Heads with fewer weights than this are recovered on one intra-op thread (see :func:`threads_for`).
PARALLEL_HEAD_ENTRIES = 1 << 18
#: Beyond this rank-one ratio (accepted only with ``rank_one_tol=None``) no answer is reported as determined.
NOISY_RANK_ONE_RATIO = 0.1
#: The logs of how far ``t`` is moved, either way, looking for a label ``step`` away along it
#: (:func:`_label_steps_along_t`) and for another label that explains the gradient (:func:`_explained_along_t`, the
#: same points): up to 4096 times, in steps of 2^(1/3); a saturated softmax moves the label only far from the answer.
SCAN_LOG_RATIOS = torch.arange(1, 37, dtype=torch.float64) / 3 * math.log(2.0)
#: Rounds of regula falsi that bring each side's scan point nearer to where the label has moved by ``step``.
STEP_REFINEMENTS = 4
#: ... aimed at this many times ``step``, so that they end at ``step`` or a little past it, never short of it.
AIM_PAST_STEP = 1.02
#: Where a second root of an answer's own structure is looked for (:func:`_second_root_near`): ``t`` times these,
#: 2^(1/96) (0.7 %) apart and up to 2^(1/4) (19 %, 2.4 steps of the search's default grid) either way.
NEAR_RATIOS = 2.0 ** (torch.arange(-24, 25, dtype=torch.float64) / 96)
#: How many of that scan's lowest local minima (the answer's own point left out) are refined, by this many
#: Gauss-Newton steps.
NEAR_STARTS = 2
NEAR_REFINEMENTS = 5
GRADIENT_SCALES = ("known", "unknown")


@dataclass
class RecoveryResult:
    """What one example's gradient gave away.

    Attributes:
        label: ``(C,)`` recovered label ``y = softmax(W h + b) - (p - y)``, in the gradient's dtype.
        feature: ``(d,)`` recovered head input ``h``, in the gradient's dtype.
        label_format: "hard", "smoothing" or "mixup" (the detected or requested structure).
        residual: scale-normalised residual of that structure at the answer (0 = exact fit, ~1 = no better
            than the trivial saturated answer).
        classes: the dominant class, or the two mixed classes ``(a, b)`` with ``a < b``.
        eps: recovered smoothing mass (``C`` times the common value of the structured entries; 0 for hard).
        lam: mixup weight of ``classes[1]`` (None unless mixup).
        scale: the scalar ``t`` of the answer (``h = t * sigma * v``; ``p - y = c / t`` when the gradient scale
            is known).
        determined: True when the gradient pins the label down, whichever path fixed the scalar (search or
            closed form): the structure fits (residual <= tol, structured entries equal to the gradient's
            precision), every other candidate's residual is at least ``ambiguity_ratio`` times larger, and the
            structure has equations to spare. False means "the gradient cannot tell": read ``message``.
        margin: residual of the best competing answer divided by the answer's own (inf if none): how clearly
            the minimum is unique.
        residuals: the best residual of every hypothesis tried ("hard", "smoothing", "mixup",
            "mixup_smoothing"; the last, the most general, only when the others leave the answer undetermined).
        rank_one_ratio: ``||G - rank-one fit|| / ||G||``: ~1e-7 for one float32 example, O(1) for a batch.
        row_sum_error: ``|sum_i (p_i - y_i)| / ||p - y||`` (Theorem 1: 0 when the label sums to one).
        label_valid: all label entries in ``[0, 1]`` up to the square root of the gradient's precision.
        method: the search used; "closed_form" when the head bias gradient fixed the answer, "feature_layer"
            when the bias gradient of the layer below the head did (see :func:`recover_from_gradients`).
        evaluations: candidate scalars the search evaluated.
        converged: the search's own stopping test (never compared with the truth).
        tol: the largest residual accepted as a fit.
        gradient_scale: ``s`` with observed gradient = ``s *`` the true one: 1.0 when the scale is known,
            recovered with ``gradient_scale="unknown"`` (``-lr`` for a plain SGD step's weight delta).
        message: why the answer is not determined, or "".
    """

    label: torch.Tensor
    feature: torch.Tensor
    label_format: str
    residual: float
    classes: Tuple[int, ...]
    eps: float
    lam: Optional[float]
    scale: float
    determined: bool
    margin: float
    residuals: Dict[str, float]
    rank_one_ratio: float
    row_sum_error: float
    label_valid: bool
    method: str
    evaluations: int
    converged: bool
    tol: float
    gradient_scale: float = 1.0
    message: str = ""
    extra: Dict[str, object] = field(default_factory=dict, repr=False)


class _Reason(enum.IntEnum):
    """Why an answer is not determined: the first test of :func:`_decide` it fails (in this order)."""

    DETERMINED = 0
    NO_EQUATIONS = 1      # no candidate's structure has an equation to spare
    NO_VALID_LABEL = 2    # no candidate gives a valid label with the feature sign
    NO_FIT = 3            # no structure holds to the gradient's precision
    AMBIGUOUS = 4         # another answer fits almost as well
    EXPLAINED_TOO = 5     # another valid label explains the gradient to its precision too
    FLAT = 6              # labels a step away fit almost as well
    IMPRECISE = 7         # the label's standard error is above the resolution
    ONE_CLASS = 8         # a two-class answer whose second class weighs (almost) nothing


@dataclass(frozen=True)
class _Decision:
    """The answer :func:`_decide` picked for each of N examples and why it is (not) determined; ``(N,)`` per field
    unless said.

    Attributes:
        t, alpha, residual, rounding_units: the answer's (see :class:`~gradleak.recovery.structure.Minima`).
        label: ``(N, C)`` float64; free: ``(N, 2)`` its free entries.
        structure: its structure, an index into :data:`~gradleak.recovery.structure.ORDER`.
        classes: ``(N, 2)`` the dominant class (then -1) or the two mixed classes, lower first; eps: the smoothing
            mass; lam: the weight of the higher class of a two-class answer (nan otherwise, or without weight).
        determined, margin: as in :class:`RecoveryResult`; reason: a :class:`_Reason`.
        runner_up: the best rival's residual; label_error: the label's standard error (where computed, else 0);
        minor: the lesser class weight of a two-class answer (inf otherwise); equations: classes that count as
            equations (:func:`_equations`).
        residuals: ``(N, len(ORDER))`` the best residual of each hypothesis tried (nan where not tried).
    """

    t: torch.Tensor
    alpha: torch.Tensor
    residual: torch.Tensor
    rounding_units: torch.Tensor
    label: torch.Tensor
    free: torch.Tensor
    structure: torch.Tensor
    classes: torch.Tensor
    eps: torch.Tensor
    lam: torch.Tensor
    determined: torch.Tensor
    margin: torch.Tensor
    reason: torch.Tensor
    runner_up: torch.Tensor
    label_error: torch.Tensor
    minor: torch.Tensor
    equations: torch.Tensor
    residuals: torch.Tensor


@dataclass(frozen=True, eq=False)
class RecoveryResults(Sequence[RecoveryResult]):
    """What N examples' gradients of one head gave away, kept as batched tensors: a sequence of
    :class:`RecoveryResult` (``results[i]``, iteration), each built when it is read.

    Attributes:
        labels: ``(N, C)`` recovered labels, in the gradients' dtype and device.
        features: ``(N, d)`` recovered head inputs, likewise.
        determined: ``(N,)`` bool, as :attr:`RecoveryResult.determined`.
        gradient_scales: ``(N,)`` float64, as :attr:`RecoveryResult.gradient_scale`.
        decision: what the fit test decided for each example (internal: read ``results[i]``).
        rank_one_ratio, row_sum_error, tol: ``(N,)`` float64; label_valid, converged: ``(N,)`` bool;
            evaluations: ``(N,)`` int64: as in :class:`RecoveryResult`.
        method: the search used (shared).
        row_sum_failed: ``(N,)`` bool: the gradient's rows do not sum to zero (the label would not sum to one).
        find_scaled_hint: computes :attr:`scaled_hint` (it runs a recovery: deferred until a result is read).
        same_answer_atol, scale_known, num_classes: the recovery's settings, for the messages.
    """

    labels: torch.Tensor
    features: torch.Tensor
    determined: torch.Tensor
    gradient_scales: torch.Tensor
    decision: _Decision = field(repr=False)
    rank_one_ratio: torch.Tensor = field(repr=False)
    row_sum_error: torch.Tensor = field(repr=False)
    tol: torch.Tensor = field(repr=False)
    label_valid: torch.Tensor = field(repr=False)
    converged: torch.Tensor = field(repr=False)
    evaluations: torch.Tensor = field(repr=False)
    method: str = field(repr=False)
    row_sum_failed: torch.Tensor = field(repr=False)
    find_scaled_hint: Callable[[], torch.Tensor] = field(repr=False)
    same_answer_atol: float = field(repr=False)
    scale_known: bool = field(repr=False)
    num_classes: int = field(repr=False)

    def __len__(self) -> int:
        return self.labels.shape[0]

    @functools.cached_property
    def scaled_hint(self) -> torch.Tensor:
        """``(N,)`` the scale ``s`` that an undetermined answer's gradient looks scaled by: its recovery with
        ``gradient_scale="unknown"`` is determined and gives ``s`` (nan otherwise, and for determined answers).
        Only the messages use it, so it is found (for all the undetermined answers at once) when first read."""
        return self.find_scaled_hint()

    @property
    def label_formats(self) -> Tuple[str, ...]:
        """The label format of each answer."""
        return tuple(STRUCTURES[ORDER[index]].label_format for index in self.decision.structure.tolist())

    @functools.cached_property
    def _rows(self) -> List[Dict[str, object]]:
        """Every per-example number as Python values, read once: the columns of one kind stacked and read in one
        pass (a read per column was 50 of the 800 tensor operations of a 10-class call with a head bias)."""
        d = self.decision
        kinds = (dict(t=d.t, alpha=d.alpha, residual=d.residual, rounding_units=d.rounding_units, eps=d.eps,
                      lam=d.lam, margin=d.margin, runner_up=d.runner_up, label_error=d.label_error, minor=d.minor,
                      gradient_scale=self.gradient_scales, rank_one_ratio=self.rank_one_ratio,
                      row_sum_error=self.row_sum_error, tol=self.tol, scaled_hint=self.scaled_hint),
                 dict(structure=d.structure, reason=d.reason, equations=d.equations, evaluations=self.evaluations),
                 dict(determined=self.determined, label_valid=self.label_valid, converged=self.converged,
                      row_sum_failed=self.row_sum_failed))
        rows = [dict(classes=classes, residuals=residuals)
                for classes, residuals in zip(d.classes.tolist(), d.residuals.tolist())]
        for columns in kinds:
            names = list(columns)
            for row, values in zip(rows, torch.stack([columns[name] for name in names], -1).tolist()):
                row.update(zip(names, values))
        return rows

    @overload
    def __getitem__(self, index: int) -> RecoveryResult: ...

    @overload
    def __getitem__(self, index: slice) -> List[RecoveryResult]: ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(f"result {index} out of range for {len(self)} results")
        index = index % len(self)
        row = self._rows[index]
        structure = STRUCTURES[ORDER[row["structure"]]]
        classes = tuple(row["classes"][:structure.free_entries])
        return RecoveryResult(
            label=self.labels[index], feature=self.features[index], label_format=structure.label_format,
            residual=row["residual"], classes=classes, eps=row["eps"],
            lam=row["lam"] if structure.free_entries == 2 else None, scale=row["t"],
            determined=row["determined"], margin=row["margin"],
            residuals={name: value for name, value in zip(ORDER, row["residuals"]) if not math.isnan(value)},
            rank_one_ratio=row["rank_one_ratio"], row_sum_error=row["row_sum_error"],
            label_valid=row["label_valid"], method=self.method, evaluations=row["evaluations"],
            converged=row["converged"], tol=row["tol"], gradient_scale=row["gradient_scale"],
            message=self._message(row, structure))

    def __iter__(self) -> Iterator[RecoveryResult]:
        return (self[i] for i in range(len(self)))

    def _message(self, row: Dict[str, object], structure: Structure) -> str:
        """Why the answer of ``row`` is not determined ("" when it is)."""
        step = 10 * self.same_answer_atol
        reason = _Reason(row["reason"])
        if reason == _Reason.NO_EQUATIONS:
            scale = "" if self.scale_known else " once the unknown gradient scale is fitted"
            saturated = "" if row["equations"] == self.num_classes else \
                f" whose gradient is above rounding (of {self.num_classes}: a saturated softmax)"
            message = (f"with {row['equations']} classes{saturated} the {structure.name} structure has no "
                       f"equation to spare{scale}: the gradient cannot determine the label")
        elif reason == _Reason.NO_VALID_LABEL:
            message = ("no candidate gives a valid label (entries in [0, 1]) with the feature sign: the gradient "
                       "may not come from a softmax cross-entropy head, or feature_sign is wrong")
        elif reason == _Reason.NO_FIT:
            message = (f"no label format fits to the gradient's precision (best: {structure.name}, residual "
                       f"{row['residual']:.3g}, tol {row['tol']:.2g}; structured entries spread over "
                       f"{row['rounding_units']:.3g} rounding units, at most {ROUNDING_SLACK:g} expected)")
        elif reason == _Reason.AMBIGUOUS:
            message = (f"ambiguous: another answer fits almost as well (residual {row['runner_up']:.3g} vs "
                       f"{row['residual']:.3g})")
        elif reason == _Reason.EXPLAINED_TOO:
            message = (f"ambiguous: another valid label, more than {step:g} away, explains the gradient to its "
                       "precision too (a saturated or nearly linear softmax, or too few classes for the most "
                       "general label of the format)")
        elif reason == _Reason.FLAT:
            message = (f"ambiguous: labels {step:g} away from the answer fit the gradient almost as well (a flat "
                       "residual: the softmax is saturated, or the label has too few equations to spare)")
        elif reason == _Reason.IMPRECISE:
            message = (f"the gradient pins the label only to about +-{row['label_error']:.2g} (from the residual "
                       f"{row['residual']:.3g} it leaves and its rank-one ratio {row['rank_one_ratio']:.2g}): not "
                       f"to {step:g}; an update of several local steps, noise, or a softmax too flat or too "
                       "saturated for the free scalars")
        elif reason == _Reason.ONE_CLASS:
            message = (f"one class holds (almost) all the label's weight (the other {row['minor']:.2g}, below "
                       f"{step:g}): the second class of a {structure.label_format} is not determined; the label "
                       "is a single class's (label_format='smoothing' or 'auto' reads it)")
        else:
            message = ""
        if row["rank_one_ratio"] > NOISY_RANK_ONE_RATIO:
            message = "; ".join(filter(None, [message, f"the gradient is far from rank one (ratio "
                                              f"{row['rank_one_ratio']:.2g}): not one clean example (a batch, "
                                              "noise, or several local steps), the answer is a best guess"]))
        if row["row_sum_failed"]:
            off = row["row_sum_error"] / abs(row["alpha"])
            message = "; ".join(filter(None, [message, "gradient rows do not sum to zero: the label does not sum "
                                              f"to one (off by {off:.2g}) or the loss is not softmax "
                                              "cross-entropy"]))
        if not math.isnan(row["scaled_hint"]):
            message += (f"; the input looks like a gradient scaled by {row['scaled_hint']:.6g} (a weight update "
                        "or a clipped gradient): pass gradient_scale='unknown', or use recover_from_update")
        return message


@contextlib.contextmanager
def threads_for(head_entries: int) -> Iterator[None]:
    """Run a recovery of a head with ``head_entries`` weights on one intra-op thread when it is small.

    A small head's work is hundreds of tiny tensor operations; spreading one of them over threads gains nothing,
    and on a loaded machine the idle threads spin-wait for cores (a 10 x 512 head went from 10 ms to 26 ms median,
    71 ms at the 90th percentile, with 2 threads on 2 busy cores). Torch's thread count is process-wide: it is
    restored on exit.
    """
    threads = torch.get_num_threads()
    if threads == 1 or head_entries >= PARALLEL_HEAD_ENTRIES:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def recovering(head_entries: int, method: str) -> Iterator[None]:
    """The context a public recovery runs in: :func:`threads_for`, and inference mode for ``method="exact"``. Our
    recovery is hundreds of small tensor operations on detached values, and inference mode drops autograd's
    bookkeeping from each (a 10 x 512 call took 2.5 ms instead of 3.0 ms); the tensors handed out are made normal
    again (see :func:`_recover`), since inference tensors cannot enter a later autograd graph. The paper's
    searches run as they are (its L-BFGS differentiates its objective)."""
    with threads_for(head_entries), torch.inference_mode(method == "exact"):
        yield


def default_tolerance(rank_one_ratio):
    """Largest residual still accepted as a fit: 1e-2, widened when the gradient is noisy.

    The residual is relative to the trivial answer (~1), so 1e-2 means the structure holds a hundred times
    better than a saturated softmax would; exact gradients reach 1e-9 (untrained nets) to 1e-4 (confident
    trained nets in float32). Noise that breaks the rank-one structure also lifts the residual of the truth,
    by about the rank-one ratio. ``rank_one_ratio`` is a float or a tensor of them (one per example).
    """
    if isinstance(rank_one_ratio, torch.Tensor):
        return (10.0 * rank_one_ratio).clamp_min(1e-2)
    return max(1e-2, 10.0 * rank_one_ratio)


def _label_parameters(label: torch.Tensor, free: torch.Tensor, free_entries: torch.Tensor,
                      offset_free: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(classes, eps, lam)`` read off float64 answers ``label`` (N, C) under their structures (free entries
    ``free`` (N, 2), ``free_entries`` and ``offset_free`` (N,)): classes ``(N, 2)`` (the dominant class then -1,
    or the two mixed classes lower first), eps ``(N,)``, lam ``(N,)`` the weight of the higher class of a
    two-class answer above the common value (nan for one class, or when the two weigh nothing)."""
    rest = mask_of(free, label.shape[-1])
    common = torch.where(offset_free, (label * rest).sum(-1) / rest.sum(-1), 0.0)
    low, high = free.amin(-1, keepdim=True), free.amax(-1, keepdim=True)
    weight_low, weight_high = label.gather(-1, low)[:, 0] - common, label.gather(-1, high)[:, 0] - common
    total = weight_low + weight_high
    two = free_entries == 2
    lam = torch.where(two & (total != 0), weight_high / total, math.nan)
    classes = torch.where(two.unsqueeze(-1), torch.cat([low, high], -1),
                          torch.stack([free[:, 0], torch.full_like(free[:, 0], -1)], -1))
    return classes, common * label.shape[-1], lam


def _equations(problem: HeadBatch) -> torch.Tensor:
    """``(N,)`` the classes that count as equations. With an unknown scale, an entry whose gradient term is below
    rounding says only "p_i ~ y_i ~ 0", which a saturated softmax satisfies at any scale: it is no equation. With
    a known scale such entries still pin t, through the normalisation of p."""
    if problem.scale_known:
        return torch.full((len(problem),), problem.num_classes, device=problem.c.device)
    floor = ROUNDING_SLACK * (problem.precision + problem.entry_noise).unsqueeze(-1)
    return (problem.c.abs() > floor).sum(-1)


@dataclass(frozen=True)
class _Candidates:
    """Candidates under several structures side by side, simplest structure first: of ``found`` (N, n), the first
    ``sizes[0]`` are under ``structures[0]``, the next ``sizes[1]`` under ``structures[1]``, and so on."""

    structures: Tuple[Structure, ...]
    found: Minima
    sizes: Tuple[int, ...]

    @staticmethod
    def of(minima: Dict[str, Minima]) -> "_Candidates":
        """Minima grouped by structure name (:func:`~gradleak.recovery.exact.find_minima`), side by side."""
        return _Candidates(tuple(STRUCTURES[name] for name in minima), Minima.cat(minima.values()),
                           tuple(m.t.shape[-1] for m in minima.values()))

    @property
    def rank(self) -> torch.Tensor:
        """``(n,)`` each candidate's structure, as its index in :attr:`structures`."""
        return _group_index(self.sizes, self.found.t.device)


@functools.lru_cache(maxsize=64)
def _group_index(sizes: Tuple[int, ...], device: torch.device) -> torch.Tensor:
    """``(sum(sizes),)``: ``i`` repeated ``sizes[i]`` times (made once per layout; never written to)."""
    return torch.arange(len(sizes), device=device).repeat_interleave(torch.tensor(sizes, device=device))


def _single_minimum(problem: HeadBatch, t: torch.Tensor, structures: Sequence[Structure]) -> _Candidates:
    """One given scalar per example, ``t`` (N,) (closed form, or a search that returns one answer), under each of
    ``structures`` and, with an unknown scale, each of its :func:`~gradleak.recovery.structure.readings`."""
    t, which, free, live = readings(problem, structures, t.unsqueeze(-1).expand(-1, len(structures)),
                                    torch.arange(len(structures), device=t.device))  # structures[i], read every way
    found = evaluate(problem, *hypotheses(structures, which), t, free=free, live=live)
    return _Candidates(tuple(structures), found, (t.shape[-1] // len(structures),) * len(structures))


def _contains(general: Structure, free_entries: torch.Tensor, offset_free: torch.Tensor) -> torch.Tensor:
    """Whether every label of the structures ``(free_entries, offset_free)`` (N,) is also a label of ``general``
    (a hard label is a smoothing label)."""
    return (general.free_entries >= free_entries) & (int(general.offset_free) >= offset_free.long())


def _explains(found: Minima, tol: torch.Tensor) -> torch.Tensor:
    """``(N, n)``: whether each candidate is another explanation of the gradient (check 1 of :func:`_decide`): a
    valid label whose structured entries hold to within ``ROUNDING_SLACK`` roundings, and that fits (residual
    below ``tol`` (N,)) or whose structure says nothing about the scalars (:attr:`Minima.flat_structure`)."""
    holds = found.live & found.valid & (found.rounding_units <= ROUNDING_SLACK)
    return holds & ((found.residual <= tol.unsqueeze(-1)) | found.flat_structure)


def _explained_elsewhere(found: Minima, answer: Minima, tol: torch.Tensor, step: float) -> torch.Tensor:
    """``(N,)``: whether any of the candidates ``found`` (N, n) is a label farther than ``step`` (max-abs) from each
    answer (``(N, 1)`` candidates) that explains the gradient (:func:`_explains`)."""
    far = (found.labels - answer.labels).abs().amax(-1) > step
    return (_explains(found, tol) & far).any(-1)


def _explained_along_t(problem: HeadBatch, answer: Minima, structures: Sequence[Structure], *, tol: torch.Tensor,
                       step: float) -> torch.Tensor:
    """``(N,)``: whether a valid label farther than ``step`` from each answer (``(N, 1)`` candidates) explains the
    gradient (:func:`_explains`) under any structure somewhere along ``t``: at ``SCAN_LOG_RATIOS`` either side of the
    answer's ``t`` (``alpha`` refitted, free entries chosen at each point).

    The search's minima need not hold every such label. A structure with fewer equations than unknowns fits
    exactly all along a curve of ``(t, alpha)``, and the minima a search returns for it are arbitrary points of
    that curve (with 4 classes and an unknown scale a hard label was determined while a smoothed mixup with 0.85
    on another class gave the same gradient a little further along ``t``); and on a saturated softmax the search
    can settle in one basin and miss another (a uniform label was determined, 0.88 off, where the true smoothed
    label fit at 1.5 times its ``t``).
    """
    count, device = len(problem), problem.c.device
    ratios = SCAN_LOG_RATIOS.to(answer.t)
    scan = answer.t[:, :1] * torch.cat([-ratios.flip(0), ratios]).exp()              # (N, 2K), nearest in the middle
    width = scan.shape[-1]
    which = torch.arange(len(structures), device=device).repeat_interleave(width).expand(count, -1)
    found = evaluate(problem, *hypotheses(structures, which), scan.repeat(1, len(structures)))
    return _explained_elsewhere(found, answer, tol, step)


def _second_root_near(problem: HeadBatch, answer: Minima, own: torch.Tensor, structures: Sequence[Structure], *,
                      tol: torch.Tensor, step: float) -> torch.Tensor:
    """``(N,)``: whether a second root of each answer's own residual (its structure and free entries, ``(N, 1)``
    candidates of structures ``structures[own]``) lies near it, with a valid label farther than ``step`` that
    explains the gradient (:func:`_explains`): the lowest local minima of a fine scan of ``t`` (``NEAR_RATIOS``),
    refined by Gauss-Newton.

    The search's grid sees one basin where two lie within a step or two of each other, and refining it finds one
    of them: a 5-class saturated smoothed mixup had exact roots 1.6 % apart in ``t``, labels 2.8e-3 apart, and the
    one found, the wrong one, was determined (its standard error is a simple root's, and the neighbours
    :func:`_flat_neighbourhood` looks at, 1e-3 away, do not fit).
    """
    own_entries, own_offset = hypotheses(structures, own)
    ratios = NEAR_RATIOS.to(answer.t)
    t = answer.t[:, :1] * ratios                                                        # (N, K)

    def held(width: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # the answer's structure and free entries for ``width`` candidates each
        return (own_entries.unsqueeze(-1).expand(-1, width), own_offset.unsqueeze(-1).expand(-1, width),
                answer.free.expand(-1, width, -1))

    entries, offset, free = held(1)
    curve = residuals(problem, t, entries, offset, free=free)  # the scan holds one structure per example
    lowest = (curve[:, 1:-1] <= curve[:, :-2]) & (curve[:, 1:-1] <= curve[:, 2:])
    lowest = torch.nn.functional.pad(lowest, (1, 1)) & (ratios != 1)     # the ends are no minima; nor the answer
    if not bool(lowest.any()):  # the common case: one root, the answer's, in sight
        return lowest[:, 0]
    starts = torch.where(lowest, curve, math.inf).topk(NEAR_STARTS, dim=-1, largest=False).indices
    entries, offset, free = held(NEAR_STARTS)
    live = lowest.gather(-1, starts)
    refined = gauss_newton(problem, t.gather(-1, starts), mask_of(free, problem.num_classes), offset,
                           steps=NEAR_REFINEMENTS, live=live)
    return _explained_elsewhere(evaluate(problem, entries, offset, refined, free=free, live=live), answer, tol, step)


def _fits_as_well(neighbours: Minima, answer: Minima, *, tol: torch.Tensor, ambiguity_ratio: float,
                  same_answer_atol: float) -> torch.Tensor:
    """``(N, m)``: whether each valid neighbouring label explains the gradient about as well as the answer
    (``(N, 1)`` candidates): it is another label, and its structure says nothing (:attr:`Minima.flat_structure`),
    or it fits with about the answer's rounding units or residual."""
    other = (neighbours.labels - answer.labels).abs().amax(-1) > same_answer_atol
    fits = (neighbours.residual <= tol.unsqueeze(-1)) \
        & ((neighbours.rounding_units <= answer.rounding_units.clamp_min(1.0))
           | (neighbours.residual < ambiguity_ratio * answer.residual))
    return neighbours.live & neighbours.valid & other & (neighbours.flat_structure | fits)


def _flat_neighbourhood(problem: HeadBatch, answer: Minima, own: torch.Tensor, structures: Sequence[Structure],
                        *, t_fixed: bool, step: float, fits_as_well: Callable[[Minima], torch.Tensor]
                        ) -> torch.Tensor:
    """``(N,)``: whether an answer next to each answer (``(N, 1)`` candidates of structures ``structures[own]``)
    fits about as well (``fits_as_well``). The neighbours lie along each scalar the answer's path left free, on
    either side, with labels that differ from it by about ``step`` (max-abs): under every structure of
    ``structures`` (free entries chosen afresh), and under the answer's own structure with its own free entries.

    ``p - y = c / alpha``: moving ``1 / alpha`` by ``step / max|c|`` moves the label by ``step`` where the
    softmax is saturated, and by more elsewhere. With a known scale ``t = alpha`` moves along (unless a closed
    form fixed it); with an unknown one ``alpha`` (``t`` held) and ``t`` (``alpha`` refitted) move separately,
    ``t`` to where the label has moved by ``step`` (:func:`_label_steps_along_t`). If one of them fits too, the
    gradient is compatible with a continuum of labels (a saturated softmax makes the residual flat), and the
    answer is not determined to ``step``, however small its own residual.
    """
    count, device = len(problem), problem.c.device
    if problem.scale_known and t_fixed:  # the answer has no free scalar to move along
        return torch.zeros(count, dtype=torch.bool, device=device)
    own_free = answer.free[:, 0]
    best_t, best_alpha = answer.t[:, 0], answer.alpha[:, 0]

    def moved(t: torch.Tensor, alpha: Optional[torch.Tensor] = None, live: Optional[torch.Tensor] = None
              ) -> torch.Tensor:
        # one pass over (N, m) scalars: every structure with its free entries chosen (-1), then the answer's own
        # with its own
        width, copies = t.shape[-1], len(structures) + 1
        which = torch.arange(len(structures), device=device).repeat_interleave(width).expand(count, -1)
        which = torch.cat([which, own.unsqueeze(-1).expand(-1, width)], -1)
        free = torch.cat([torch.full((count, len(structures) * width, 2), -1, device=device),
                          own_free.unsqueeze(1).expand(-1, width, -1)], 1)
        found = evaluate(problem, *hypotheses(structures, which), t.repeat(1, copies),
                         alpha=None if alpha is None else alpha.repeat(1, copies), free=free,
                         live=None if live is None else live.repeat(1, copies))
        return fits_as_well(found).any(-1)

    shift = step / problem.c_max
    inverse = (1.0 / best_alpha).unsqueeze(-1) + torch.stack([shift, -shift], -1)
    admissible = (inverse * best_alpha.unsqueeze(-1) > 0) & (inverse.abs() <= 1.0 / problem.t_min.unsqueeze(-1))
    # the inadmissible ones are padding: any valid scalar stands in for them
    alphas = torch.where(admissible, 1.0 / inverse, best_alpha.unsqueeze(-1))
    if problem.scale_known:
        return moved(alphas, live=admissible)
    flat = moved(best_t.unsqueeze(-1).expand(-1, 2), alpha=alphas, live=admissible)
    if not t_fixed:
        t, crossed = _label_steps_along_t(problem, answer, hypotheses(structures, own)[1], step)
        flat |= moved(torch.where(crossed, t, best_t.unsqueeze(-1)), live=crossed)
    return flat


def _label_steps_along_t(problem: HeadBatch, answer: Minima, own_offset: torch.Tensor, step: float
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(t, crossed)``, (N, 2) each: on either side of each answer's ``t`` (towards 0, and away), a ``t`` at which
    the label under the answer's own structure and free entries (``alpha`` refitted) has moved by ``step``
    (max-abs) or a little more, the nearest to within :data:`STEP_REFINEMENTS` rounds of regula falsi; and whether
    the label moves that far within ``SCAN_LOG_RATIOS`` (and above ``t_lower``).

    Measured on a geometric scan, not extrapolated from the slope at the answer: a saturated softmax leaves the
    label flat near the answer and moves it only far away (a 10-class smoothed mixup with an unknown scale was
    read 2.7e-3 off at ``t = -7.2``; the truth, at ``-0.84``, and every ``t`` between fit the gradient as well,
    while the slope at ``-7.2`` was below rounding). Never nearer than ``step``: a label 9e-4 away that fits is
    within the resolution the answer claims.
    """
    best_t = answer.t[:, 0]
    count = len(problem)

    def distance(log_ratio: torch.Tensor) -> torch.Tensor:
        # the label's max-abs distance from the answer's at t = best_t * exp(log_ratio), log_ratio (N, ...)
        t = best_t.view(-1, *[1] * (log_ratio.dim() - 1)) * log_ratio.exp()
        width = t[0].numel()
        labels = fitted_labels(problem, own_offset.unsqueeze(-1).expand(-1, width), t.reshape(count, width),
                               answer.free[:, :1].expand(-1, width, -1))
        return (labels - answer.labels).abs().amax(-1).view_as(t)

    ratios = SCAN_LOG_RATIOS.to(best_t)
    scan = torch.stack([-ratios, ratios]).expand(count, -1, -1)          # (N, 2, K): log of t / best_t
    moved = distance(scan)
    reached = (moved >= step) & (best_t[:, None, None].abs() * scan.exp() >= problem.t_lower[:, None, None])
    # the bracket: the first scan point that moved the label by step, and the one before it (the answer itself,
    # moved by 0, before the first)
    first = reached.int().argmax(-1, keepdim=True)
    moved, scan = (torch.cat([torch.zeros_like(x[..., :1]), x], -1) for x in (moved, scan))
    low, high = scan.gather(-1, first).squeeze(-1), scan.gather(-1, first + 1).squeeze(-1)
    low_moved, high_moved = moved.gather(-1, first).squeeze(-1), moved.gather(-1, first + 1).squeeze(-1)
    # regula falsi aimed a little past step (the Illinois rule halves the weight of an end kept twice, so that
    # neither end stalls): the far end lands between step and about the aim
    aim = AIM_PAST_STEP * step
    low_miss, high_miss, kept = low_moved - aim, high_moved - aim, torch.zeros_like(low, dtype=torch.long)
    for _ in range(STEP_REFINEMENTS):
        fraction = (low_miss / (low_miss - high_miss)).clamp(0.0, 1.0).nan_to_num(1.0)
        middle = low + fraction * (high - low)
        middle_moved = distance(middle)
        above = middle_moved >= step
        middle_miss = middle_moved - aim
        low, high = torch.where(above, low, middle), torch.where(above, middle, high)
        kept = torch.where(above, kept.clamp_max(0) - 1, kept.clamp_min(0) + 1)  # < 0: low kept; > 0: high kept
        low_miss = torch.where(above, torch.where(kept < -1, 0.5 * low_miss, low_miss), middle_miss)
        high_miss = torch.where(above, middle_miss, torch.where(kept > 1, 0.5 * high_miss, high_miss))
    return best_t.unsqueeze(-1) * high.exp(), reached.any(-1)


def _label_error(problem: HeadBatch, answer: Minima, own: torch.Tensor, structures: Sequence[Structure], *,
                 t_fixed: bool, equations: torch.Tensor, unknowns: int) -> torch.Tensor:
    """``(N,)``: how far the gradient pins each answer's label (max-abs): its standard error under every
    hypothesis that contains the answer (the simplest structure wins only if the more general ones would not
    move its label either), those with no equation to spare too (they cannot check the answer, but where the
    rounding alone moves their exact fit far, as where a nearly linear softmax trades a smoothing mass against an
    unknown scale, the answer is only as sure as that), and at least the rank-one ratio over ``|alpha|`` (the part
    of the gradient that is not one example's, noise or the drift of several local steps, can shift ``c`` by up to
    its relative size), or a derived gradient's error on each entry of ``c`` over ``|alpha|``, where that is more.
    A structure with more free entries than the answer's frees the label's next largest entry too."""
    shift = problem.rank_one_ratio if problem.derived_error is None else \
        torch.maximum(problem.rank_one_ratio, problem.derived_error * problem.c_max)
    errors = [shift / answer.alpha[:, 0].abs()]
    if t_fixed and problem.scale_known:  # no scalar was fitted, so no structure's fit can move the label
        return errors[0]
    own_entries, own_offset = hypotheses(structures, own)
    label, free = answer.labels[:, 0], answer.free[:, 0]
    runner = label.scatter(-1, free[:, :1], -math.inf).argmax(-1)
    pair = torch.stack([free[:, 0], torch.where(own_entries == 2, free[:, 1], runner)], -1)
    for structure in structures:
        applies = _contains(structure, own_entries, own_offset) \
            & (structure.degrees_of_freedom(equations, unknowns) >= 0)
        if not bool(applies.any()):
            continue
        free_here = pair if structure.free_entries == 2 else pair[:, :1].expand(-1, 2)
        error = label_standard_error(problem, structure, answer.t[:, 0], answer.alpha[:, 0], free_here,
                                     t_free=not t_fixed).amax(-1)
        errors.append(torch.where(applies, error, -math.inf))
    return torch.stack(errors, -1).amax(-1)


def _first_nonempty(*masks: torch.Tensor) -> torch.Tensor:
    """``(N, n)``: for each example, the first of ``masks`` (N, n) that marks any candidate (else the last)."""
    out = masks[-1]
    for mask in reversed(masks[:-1]):
        out = torch.where(mask.any(-1, keepdim=True), mask, out)
    return out


def _lowest(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(N,)`` the first index of the lowest of ``values`` (N, n) where ``mask``."""
    return torch.where(mask, values, math.inf).argmin(-1)


def _decide(problem: HeadBatch, candidates: _Candidates, *, tol: torch.Tensor, ambiguity_ratio: float,
            same_answer_atol: float, feature_sign: str, t_fixed: bool) -> _Decision:
    """Pick each example's answer among its candidates under each hypothesis, and decide whether it is determined.

    One rule, whichever path produced the candidates (a search's refined minima, or one scalar fixed by a closed
    form: ``t_fixed``), applied to every example at once (``tol`` (N,) is each one's). A candidate is eligible
    when its structure has equations to spare once its unknown scalars are fitted (``t`` unless a closed form
    fixed it, ``alpha`` when the scale is unknown; see :func:`_equations`), its label is valid (entries in [0, 1]
    to within rounding) and its feature has the sign ``feature_sign`` asks for. It fits when its residual is
    below ``tol`` (far from the trivial answer) and its structured entries agree to within ``ROUNDING_SLACK``
    times the error that rounding (at the precision the gradient's values carry) and the noise the rank-one
    ratio reveals would leave, entry by entry. The answer is the lowest residual of the simplest fitting
    structure (``candidates`` are ordered simplest first), and it is determined when all of these hold:

    1. every other answer (a label farther than ``same_answer_atol``) of the same or a simpler structure has a
       residual at least ``ambiguity_ratio`` times larger (``margin``), and no other valid label (farther than
       ``10 * same_answer_atol``) explains the gradient too: under any structure, with or without an equation to
       spare, its structured entries hold to within rounding and it fits, or they are flat and say nothing about
       the scalars (:func:`_explains`); among the search's minima, along ``t`` where those may miss one
       (:func:`_explained_along_t`), and beside the answer, where the search's grid sees one basin for two roots
       (:func:`_second_root_near`). Below the rounding, which residual is smaller says nothing: a saturated
       softmax fitted a wrong pair of classes 500 times more closely than the true pair, and a smoothed label
       exactly where the true one was mixed; a structure that cannot be checked can still hold the truth;
    2. no label ``10 * same_answer_atol`` away along the free scalars fits about as well under any structure
       (:func:`_flat_neighbourhood`, :func:`_fits_as_well`): no flat valley, no saturated softmax;
    3. the label's error (:func:`_label_error`) times ``ambiguity_ratio`` stays below that same resolution;
    4. a two-class answer gives each class a weight above that resolution (otherwise the label is one class's,
       and which class is "second" is arbitrary: a mixup forced on a smoothed label).

    Without any fit, the simplest structure below ``tol`` is the best guess, reported as undetermined. The scan
    along ``t``, the neighbourhood and the label error are computed only for the examples that pass the rest.
    """
    unknowns = int(not t_fixed) + int(not problem.scale_known)
    equations = _equations(problem)
    sign = problem.feature_sign
    if feature_sign == "nonnegative" and bool((sign == 0).any()):
        raise ValueError(f"feature_sign='nonnegative' but the weight gradient's rows have mixed signs"
                         f"{example_rows(sign == 0, len(problem))}: the head input cannot be non-negative")
    restrict = sign if feature_sign != "any" else torch.zeros_like(sign)
    structures, found, rank = candidates.structures, candidates.found, candidates.rank
    free_entries, offset_free = hypotheses(structures, rank)
    spare = torch.stack([s.degrees_of_freedom(equations, unknowns) for s in structures], -1)[:, rank] >= 1
    keep = found.live & (found.t * restrict.unsqueeze(-1) >= 0)
    valid = keep & found.valid
    holds = valid & (found.rounding_units <= ROUNDING_SLACK)  # every structured entry, to within its rounding
    explains = keep & _explains(found, tol)  # another explanation, with or without an equation to spare
    candidate = valid & spare
    uninformative, invalid = valid & ~spare, keep & ~found.valid
    has_candidate = candidate.any(-1)
    close = candidate & (found.residual <= tol.unsqueeze(-1))
    fitting = close & holds
    pool = _first_nonempty(fitting, close, candidate)
    simplest = torch.where(pool, rank, len(structures)).amin(-1, keepdim=True)
    best = torch.where(has_candidate, _lowest(found.residual, pool & (rank == simplest)),
                       _lowest(found.residual, _first_nonempty(uninformative, invalid, found.live)))
    answer = found.take(best.unsqueeze(-1))
    own = rank[best]
    distance = (found.labels - answer.labels).abs().amax(-1)
    rivals = candidate & (rank <= simplest) & (distance > same_answer_atol)
    runner_up = torch.where(rivals, found.residual, math.inf).amin(-1)
    residual = answer.residual[:, 0]
    margin = torch.where(residual > 0, runner_up / residual, math.inf)
    margin = torch.where(has_candidate, margin, 1.0)
    classes, eps, lam = _label_parameters(answer.labels[:, 0], answer.free[:, 0], free_entries[best],
                                          offset_free[best])
    minor = torch.where(lam.isfinite(), torch.minimum(lam, 1.0 - lam) * (1.0 - eps), 0.0)
    minor = torch.where(free_entries[best] == 2, minor, math.inf)
    step = 10 * same_answer_atol
    also_fits = (explains & (distance > step)).any(-1)
    reason = torch.full_like(best, _Reason.DETERMINED)
    for failed, why in reversed([(~has_candidate & uninformative.any(-1), _Reason.NO_EQUATIONS),
                                 (~has_candidate, _Reason.NO_VALID_LABEL),
                                 (~fitting.any(-1), _Reason.NO_FIT),
                                 (margin < ambiguity_ratio, _Reason.AMBIGUOUS),
                                 (also_fits, _Reason.EXPLAINED_TOO)]):
        reason = torch.where(failed, why, reason)
    label_error = torch.zeros_like(residual)
    pending = (reason == _Reason.DETERMINED).nonzero().flatten()
    if len(pending):
        whole = len(pending) == len(problem)
        part, part_answer, part_own = (problem, answer, own) if whole else \
            (problem.select(pending), answer[pending], own[pending])
        fits_as_well = functools.partial(_fits_as_well, answer=part_answer, tol=tol[pending],
                                         ambiguity_ratio=ambiguity_ratio, same_answer_atol=same_answer_atol)
        flat = _flat_neighbourhood(part, part_answer, part_own, structures, t_fixed=t_fixed, step=step,
                                   fits_as_well=fits_as_well)
        label_error[pending] = _label_error(part, part_answer, part_own, structures, t_fixed=t_fixed,
                                           equations=equations[pending], unknowns=unknowns)
        later = torch.where(flat, _Reason.FLAT, torch.where(ambiguity_ratio * label_error[pending] > step,
                                                            _Reason.IMPRECISE, _Reason.DETERMINED))
        # Labels the search's minima miss, example by example (an example's answer does not depend on the others
        # recovered with it): a second root beside the answer, within a step or two of the grid, whatever the
        # scale; and anywhere along t where the scale is unknown (alpha's fit and the choice of free entries at each
        # t) or a structure fits all along a curve. With a known scale the label at each t needs no fit, and the
        # grid sees every other basin of a structure with an equation to spare.
        if not t_fixed:
            explained = _second_root_near(part, part_answer, part_own, structures, tol=tol[pending], step=step)
            curves = torch.stack([structure.degrees_of_freedom(equations[pending], unknowns) < 0
                                  for structure in structures], -1).any(-1)
            rows = (curves | (not problem.scale_known)).nonzero().flatten()
            if len(rows):
                explained[rows] |= _explained_along_t(part.select(rows), part_answer[rows], structures,
                                                      tol=tol[pending][rows], step=step)
            later = torch.where(explained, _Reason.EXPLAINED_TOO, later)
        later = torch.where((later == _Reason.DETERMINED) & (minor[pending] <= step), _Reason.ONE_CLASS, later)
        reason[pending] = later
    tried = torch.full((len(problem), len(ORDER)), math.nan, dtype=torch.float64, device=found.t.device)
    lowest = torch.where(found.live, found.residual, math.inf)  # each structure's real candidates' lowest, below
    for structure, part in zip(structures, lowest.split(candidates.sizes, -1)):
        tried[:, ORDER.index(structure.name)] = part.amin(-1)
    order = torch.tensor([ORDER.index(structure.name) for structure in structures], device=found.t.device)
    return _Decision(t=answer.t[:, 0], alpha=answer.alpha[:, 0], residual=residual,
                     rounding_units=answer.rounding_units[:, 0], label=answer.labels[:, 0], free=answer.free[:, 0],
                     structure=order[own], classes=classes, eps=eps, lam=lam, determined=reason == _Reason.DETERMINED,
                     margin=margin, reason=reason, runner_up=runner_up, label_error=label_error, minor=minor,
                     equations=equations, residuals=tried)


def _recover(problem: HeadBatch, known_scale: Optional[Tuple[torch.Tensor, str]], *, label_format: str,
             method: str, tol: Optional[float], ambiguity_ratio: float, same_answer_atol: float, feature_sign: str,
             search_options: Dict[str, object]) -> RecoveryResults:
    """Search (unless ``known_scale`` = ``(t (N,), source)`` is given), decide, and package the answers of a batch.

    The paper's searches (``method`` "pso", "lbfgs") run example by example (they are single-example searches);
    everything else is one computation for the batch. When a known-scale answer is not determined but the same
    gradient read with an unknown scale is, the message says so: the input looks like a scaled gradient (an
    update, a clipped gradient).
    """
    count, device = len(problem), problem.c.device
    tolerance = default_tolerance(problem.rank_one_ratio) if tol is None else \
        torch.full((count,), float(tol), dtype=torch.float64, device=device)
    structures = [STRUCTURES[name] for name in FORMAT_STRUCTURES[label_format]
                  if STRUCTURES[name].free_entries < problem.num_classes]
    if not structures:
        raise ValueError(f"label_format={label_format!r} leaves no label entry to check with "
                         f"{problem.num_classes} classes: every label of that form fits the gradient")

    converged = torch.ones(count, dtype=torch.bool, device=device)
    t_fixed = known_scale is not None
    if known_scale is not None:
        used_method, evaluations = known_scale[1], torch.ones(count, dtype=torch.long, device=device)
        candidates = _single_minimum(problem, known_scale[0], structures)
    elif method == "exact":
        sign = problem.feature_sign if feature_sign != "any" else \
            torch.zeros(count, dtype=torch.long, device=device)
        used_method = method
        # Every structure is searched, the most general (mixup with smoothing) too, although a simpler fitting
        # answer wins: with a saturated softmax a simpler structure can fit a more general label's gradient exactly,
        # at an isolated wrong scalar, and only the general structure's own candidates (the true label, fitting as
        # well) show that the answer is ambiguous. Searching it only for the examples the others left undetermined
        # had given such answers as determined (a smoothed label read off a mixed one, up to 0.86 wrong).
        candidates = _Candidates.of(find_minima(problem, structures, same_answer_atol=same_answer_atol, sign=sign,
                                                **search_options))
        evaluations = search_evaluations(structures, sign, **search_options)
    else:
        if label_format == "auto":
            raise ValueError(f"method={method!r} (the paper's search) needs a known label_format; "
                             "only method='exact' detects the format")
        outcomes = [SEARCHES[method](problem.problem(i), label_format, **search_options) for i in range(count)]
        used_method = method
        evaluations = torch.tensor([o.evaluations for o in outcomes], dtype=torch.long, device=device)
        converged = torch.tensor([o.converged for o in outcomes], dtype=torch.bool, device=device)
        t = torch.tensor([o.t for o in outcomes], dtype=torch.float64, device=device)
        candidates = _single_minimum(problem, t, structures)
    decision = _decide(problem, candidates, tol=tolerance, ambiguity_ratio=ambiguity_ratio,
                       same_answer_atol=same_answer_atol, feature_sign=feature_sign, t_fixed=t_fixed)
    label_tol = problem.precision.sqrt()
    row_sum_failed = problem.row_sum_error / decision.alpha.abs() > label_tol
    determined = decision.determined & (problem.rank_one_ratio <= NOISY_RANK_ONE_RATIO) & ~row_sum_failed

    def scaled_hint() -> torch.Tensor:
        # the undetermined answers' gradients read with an unknown scale: only a message needs it (see
        # RecoveryResults.scaled_hint), so it runs when a result is first read
        hint = torch.full((count,), math.nan, dtype=torch.float64, device=device)
        if problem.scale_known and method == "exact" and not bool(determined.all()):
            rows = (~determined).nonzero().flatten()
            scaled = _recover(dataclasses.replace(problem.select(rows), scale_known=False),
                              None if known_scale is None else (known_scale[0][rows], known_scale[1]),
                              label_format=label_format, method=method, tol=tol, ambiguity_ratio=ambiguity_ratio,
                              same_answer_atol=same_answer_atol, feature_sign=feature_sign,
                              search_options=search_options)
            hint[rows] = torch.where(scaled.determined, scaled.gradient_scales, hint[rows])
        return hint

    label = decision.label
    out = problem.weight_grad.device
    with torch.inference_mode(False):  # what users compute with: normal tensors (see recovering)
        labels, features, determined, scales = (
            value.clone() for value in (label.to(device=out, dtype=problem.dtype),
                                        problem.feature(decision.t).to(device=out, dtype=problem.dtype),
                                        determined, decision.alpha / decision.t))
    return RecoveryResults(
        labels=labels, features=features, determined=determined, gradient_scales=scales, decision=decision,
        rank_one_ratio=problem.rank_one_ratio, row_sum_error=problem.row_sum_error, tol=tolerance,
        label_valid=((label >= -label_tol.unsqueeze(-1)) & (label <= 1 + label_tol.unsqueeze(-1))).all(-1),
        converged=converged, evaluations=evaluations, method=used_method, row_sum_failed=row_sum_failed,
        find_scaled_hint=scaled_hint, same_answer_atol=same_answer_atol, scale_known=problem.scale_known,
        num_classes=problem.num_classes)


def recover_label(weight_grad: torch.Tensor, weight: torch.Tensor, *, bias: Optional[torch.Tensor] = None,
                  bias_grad: Optional[torch.Tensor] = None, label_format: str = "auto", method: str = "exact",
                  gradient_scale: str = "known", tol: Optional[float] = None, ambiguity_ratio: float = 3.0,
                  same_answer_atol: float = 1e-4, feature_sign: str = "auto", rank_one_tol: Optional[float] = 1e-2,
                  precision: Optional[float] = None, **search_options) -> RecoveryResult:
    """Recover one example's label and head feature from the gradient of its head ``z = W h (+ b)``.

    Args:
        weight_grad: ``(C, d)`` observed dL/dW (soft-target cross-entropy of ONE example).
        weight: ``(C, d)`` the head weight W the gradient was computed at.
        bias, bias_grad: ``(C,)`` each for a head with bias; with ``bias_grad`` the scalar is closed form.
        label_format: "auto" (detect), "hard", "smoothing" or "mixup" (two classes, optionally smoothed).
        method: "exact" (ours: the head bias closed form when ``bias_grad`` is given, else the exact search),
            "pso" or "lbfgs" (the paper's searches, always run as named; they need a known format and scale).
        gradient_scale: "known" (the gradient as the loss gives it) or "unknown": the observed gradients are
            ``s`` times the true ones for an unknown ``s != 0`` (a weight delta, a clipped gradient); ``s`` is
            recovered too (``result.gradient_scale``). It costs one more equation: hard and smoothing labels
            need at least 4 and 5 classes, mixup 5 and 6 (without a bias gradient).
        tol: largest residual accepted as a fit; default :func:`default_tolerance`.
        ambiguity_ratio: an answer is unique when every other answer's residual is at least this many times
            its own.
        same_answer_atol: candidate labels closer than this (max-abs) are the same answer.
        feature_sign: "auto" (when every row of the weight gradient has one sign, as with ReLU or sigmoid
            features, keep only the sign of ``t`` that makes ``h >= 0``), "nonnegative" (require it) or "any".
        rank_one_tol: reject gradients farther than this from rank one (a batch); None to accept any
            (e.g. with added noise, or an update of several local steps).
        precision: for a gradient derived from a batch's split (see :mod:`gradleak.batch.joint`), the rounding the
            split measured it to carry, relative to its largest entry: the gradient is judged as rounded to it
            where that is coarser than its values' dtype, and every entry of its ``p - y`` as carrying that
            fraction of the largest (:attr:`~gradleak.head.HeadProblem.derived_error`). None: a gradient as
            computed, its rounding read off the values.
        **search_options: passed to the search (e.g. ``seed`` for "pso").

    Returns:
        :class:`RecoveryResult`; ``label`` and ``feature`` in the gradient's dtype and device.
    """
    check_options(label_format, method, feature_sign, gradient_scale, search_options)
    with recovering(weight_grad.numel() if isinstance(weight_grad, torch.Tensor) else 0, method):
        problem = HeadBatch.of(factor_head(weight_grad, weight, bias, bias_grad, rank_one_tol=rank_one_tol,
                                           scale_known=gradient_scale == "known"))
        if precision is not None:
            problem = dataclasses.replace(problem, precision=problem.precision.clamp_min(precision),
                                          derived_error=torch.full_like(problem.precision, precision))
        return recover_factored(problem, label_format=label_format, method=method, tol=tol,
                             ambiguity_ratio=ambiguity_ratio, same_answer_atol=same_answer_atol,
                             feature_sign=feature_sign, search_options=search_options)[0]


def recover_factored(problem: HeadBatch, *, label_format: str, method: str, tol: Optional[float],
                  ambiguity_ratio: float, same_answer_atol: float, feature_sign: str,
                  search_options: Dict[str, object]) -> RecoveryResults:
    """:func:`recover_label` on factored gradients (the head bias closed form first, with ``method="exact"``)."""
    known = problem.closed_form_t() if method == "exact" else None
    return _recover(problem, None if known is None else (known, "closed_form"), label_format=label_format,
                    method=method, tol=tol, ambiguity_ratio=ambiguity_ratio, same_answer_atol=same_answer_atol,
                    feature_sign=feature_sign, search_options=search_options)


def recover_from_gradients(model: nn.Module, gradients: GradientsLike, *, head: Union[str, nn.Linear, None] = None,
                           use_feature_layer: bool = True, consistency_tol: float = 1e-3, label_format: str = "auto",
                           method: str = "exact", gradient_scale: str = "known", tol: Optional[float] = None,
                           ambiguity_ratio: float = 3.0, same_answer_atol: float = 1e-4, feature_sign: str = "auto",
                           rank_one_tol: Optional[float] = 1e-2, **search_options) -> RecoveryResult:
    """:func:`recover_label` on a model's head, helped by the layer below it when that layer allows.

    Without a head bias, when the head input is ``act(Linear|Conv(x) + b)`` with ReLU or sigmoid (see
    :mod:`gradleak.recovery.feature_layer`), that layer's bias gradient fixes the scalar ``t`` in closed form,
    with no assumption on the label (an unknown gradient scale cancels out of it); it is used when it explains
    that gradient within ``consistency_tol`` (relative), and the method is then reported as "feature_layer".
    The label it gives is judged like any other answer. Both closed forms (head bias, layer below) are steps of
    ``method="exact"`` only: ``"pso"`` and ``"lbfgs"`` run the paper's search on the head, as named.

    Args:
        model: any ``nn.Module`` whose classifier head is an ``nn.Linear`` (the last one, or ``head``).
        gradients: ``{parameter name: gradient}`` or a sequence aligned with ``model.parameters()``.
        head: the head's module name or the module itself, when it is not the last ``nn.Linear``.
        use_feature_layer: False to rely on the head's gradient alone (as the paper does; ``--head-only`` on the
            command line).
        consistency_tol: how well the layer below must be explained before its answer is used.
        The other options are those of :func:`recover_label`.
    """
    check_options(label_format, method, feature_sign, gradient_scale, search_options)
    found = find_head(model, head)
    with recovering(found[1].weight.numel(), method):
        # a mapping is read as it is: only the head's entries (and the layer below's) are looked up, without a walk
        # over every parameter of the model to validate the others on every call
        named = gradients if isinstance(gradients, Mapping) else named_gradients(model, gradients)
        parts = head_gradients(model, named, found)
        single = factor_head(parts["weight_grad"], parts["weight"], parts["bias"], parts["bias_grad"],
                             rank_one_tol=rank_one_tol, scale_known=gradient_scale == "known")
        problem = HeadBatch.of(single)
        exact = method == "exact"  # the closed forms are steps of the exact pipeline; a named search always runs
        extra: Dict[str, object] = {}
        layer = find_feature_layer(model, found[0]) if exact and use_feature_layer and single.bias_grad is None \
            else None
        fit = scale_from_feature_layer(single, layer, named[layer.bias_name]) \
            if layer is not None and layer.bias_name in named else None
        options = dict(label_format=label_format, method=method, tol=tol, ambiguity_ratio=ambiguity_ratio,
                       same_answer_atol=same_answer_atol, feature_sign=feature_sign, search_options=search_options)
        if fit is not None:
            extra["feature_layer_residual"] = fit[1]
        if fit is not None and fit[1] <= consistency_tol:
            t = torch.tensor([fit[0]], dtype=torch.float64, device=problem.c.device)
            result = _recover(problem, (t, "feature_layer"), **options)[0]
        else:
            result = recover_factored(problem, **options)[0]
        result.extra.update(extra)
        return result


def _search_option_names(method: str) -> Tuple[str, ...]:
    """The options the search ``method`` takes by keyword: for "exact", those of
    :func:`~gradleak.recovery.exact.find_minima` but the ones the recovery sets itself."""
    return _keyword_options(find_minima if method == "exact" else SEARCHES[method])


@functools.lru_cache(maxsize=None)
def _keyword_options(search: Callable[..., object]) -> Tuple[str, ...]:
    """``search``'s keyword-only parameters but ``same_answer_atol`` and ``sign`` (read once per function: a search
    registered again under its name is read afresh)."""
    return tuple(name for name, parameter in inspect.signature(search).parameters.items()
                 if parameter.kind is parameter.KEYWORD_ONLY and name not in ("same_answer_atol", "sign"))


def check_options(label_format: str, method: str, feature_sign: str, gradient_scale: str,
                  search_options: Mapping[str, object]) -> None:
    """Reject an unknown option value, or a combination the recovery cannot run, before any work; ``search_options``
    are the options left over for the search, which must be ones it takes."""
    if label_format not in ("auto",) + LABEL_FORMATS:
        raise ValueError(f"label_format must be one of {('auto',) + LABEL_FORMATS}, got {label_format!r}")
    if method not in SEARCHES:
        raise ValueError(f"method must be one of {tuple(SEARCHES)}, got {method!r}")
    if feature_sign not in FEATURE_SIGNS:
        raise ValueError(f"feature_sign must be one of {FEATURE_SIGNS}, got {feature_sign!r}")
    if gradient_scale not in GRADIENT_SCALES:
        raise ValueError(f"gradient_scale must be one of {GRADIENT_SCALES}, got {gradient_scale!r}")
    if gradient_scale == "unknown" and method != "exact":
        raise ValueError(f"method={method!r} (the paper's search) assumes the gradient's scale is known; "
                         "with gradient_scale='unknown' use method='exact'")
    accepted = _search_option_names(method)
    unknown = sorted(set(search_options) - set(accepted))
    if unknown:
        raise TypeError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}: beside "
                        f"its own, the recovery passes options to the search method={method!r}, which takes "
                        f"{', '.join(accepted)}")
