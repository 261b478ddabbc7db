"""``recover_label`` / ``recover_from_gradients``: one example's soft label and head feature from its gradient."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..head import GradientsLike, HeadProblem, factor_head, find_head, head_gradients, named_gradients
from ..labels import LABEL_FORMATS
from .base import SEARCHES
from .feature_layer import find_feature_layer, scale_from_feature_layer
from .structure import (FORMAT_STRUCTURES, ROUNDING_SLACK, STRUCTURES, Minima, Structure, describe,
                        label_standard_error)

FEATURE_SIGNS = ("auto", "nonnegative", "any")
#: Heads with fewer weights than this are recovered on one intra-op thread (see :func:`_threads_for`).
PARALLEL_HEAD_ENTRIES = 1 << 18
#: Beyond this rank-one ratio (accepted only with ``rank_one_tol=None``) no answer is reported as determined.
NOISY_RANK_ONE_RATIO = 0.1


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


@contextlib.contextmanager
def _threads_for(head_entries: int) -> Iterator[None]:
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


def default_tolerance(rank_one_ratio: float) -> float:
    """Largest residual still accepted as a fit: 1e-2, widened when the gradient is noisy.

    The residual is relative to the trivial answer (~1), so 1e-2 means the structure holds a hundred times
    better than a saturated softmax would; exact gradients reach 1e-9 (untrained nets) to 1e-4 (confident
    trained nets in float32). Noise that breaks the rank-one structure also lifts the residual of the truth,
    by about the rank-one ratio.
    """
    return max(1e-2, 10.0 * rank_one_ratio)


def _label_parameters(answer: "_Candidate") -> Tuple[Tuple[int, ...], float, Optional[float]]:
    """``(classes, eps, lam)`` read off the answer's float64 label under its structure."""
    y = answer.label.tolist()
    rest = [value for i, value in enumerate(y) if i not in answer.free]
    common = sum(rest) / len(rest) if answer.structure.offset_free and rest else 0.0
    eps = common * len(y)
    if answer.structure.free_entries == 1:
        return (answer.free[0],), eps, None
    a, b = sorted(answer.free)
    weight_a, weight_b = y[a] - common, y[b] - common
    total = weight_a + weight_b
    return (a, b), eps, (weight_b / total if total != 0 else float("nan"))


def _single_minimum(problem: HeadProblem, t: float, structures: Sequence[Structure]) -> Dict[str, Minima]:
    """Minima dict for one given scalar (closed form, or a search that returns one answer)."""
    t_tensor = torch.tensor([t] * len(structures), dtype=torch.float64, device=problem.c.device)
    return describe(problem, structures, t_tensor, torch.arange(len(structures), device=problem.c.device))


def _label_tolerance(problem: HeadProblem) -> float:
    """Slack, in label units, for the checks that labels lie in [0, 1] and sum to one."""
    return math.sqrt(problem.precision)


def _preferred_sign(problem: HeadProblem) -> int:
    """+1 / -1 when ``v`` is single-signed (the features can be non-negative only with that sign of t), else 0."""
    v = problem.v
    floor = 1e-12 * float(v.abs().max())
    if bool((v >= -floor).all()):
        return 1
    if bool((v <= floor).all()):
        return -1
    return 0


@dataclass(frozen=True)
class _Candidate:
    structure: Structure
    t: float
    alpha: float
    residual: float
    label: torch.Tensor
    rounding_units: float
    valid: bool
    informative: bool
    free: Tuple[int, ...]


def _candidates(minima: Minima, structure: Structure) -> List[_Candidate]:
    columns = (minima.t.tolist(), minima.alpha.tolist(), minima.residual.tolist(), minima.rounding_units.tolist(),
               minima.valid.tolist(), minima.informative.tolist(), minima.free.tolist())
    return [_Candidate(structure, t, alpha, r, minima.labels[i], s, valid, informative, tuple(dict.fromkeys(f)))
            for i, (t, alpha, r, s, valid, informative, f) in enumerate(zip(*columns))]


def _neighbours(problem: HeadProblem, best: _Candidate, structures: Sequence[Structure], *, t_fixed: bool,
                step: float) -> List[_Candidate]:
    """The answers next to ``best`` along each scalar its path left free, on either side, whose labels differ
    from it by about ``step`` (max-abs): under every structure of ``structures`` (free entries chosen afresh),
    and under the answer's own structure with its own free entries.

    ``p - y = c / alpha``: moving ``1 / alpha`` by ``step / max|c|`` moves the label by ``step`` where the
    softmax is saturated, and by more elsewhere. With a known scale ``t = alpha`` moves along (unless a closed
    form fixed it); with an unknown one ``t`` (``alpha`` refitted) and ``alpha`` (``t`` held) move separately,
    ``t`` by the amount that moves the label by ``step`` to first order. If one of them fits too, the gradient
    is compatible with a continuum of labels (a saturated softmax makes the residual flat), and the answer is
    not determined to ``step``, however small its own residual.
    """
    device = problem.c.device
    own_free = torch.tensor((best.free * 2)[:2], device=device)

    def moved(t: torch.Tensor, alpha: Optional[torch.Tensor] = None) -> List[_Candidate]:
        # one pass: every structure with its free entries chosen (-1), then the answer's own with its own
        count, copies = t.shape[0], len(structures) + 1
        which = torch.cat([torch.arange(len(structures), device=device).repeat_interleave(count),
                           torch.full((count,), structures.index(best.structure), device=device)])
        free = torch.cat([torch.full((len(structures) * count, 2), -1, device=device), own_free.expand(count, 2)])
        found = describe(problem, structures, t.repeat(copies), which, free=free,
                         alpha=None if alpha is None else alpha.repeat(copies))
        return [c for name, m in found.items() for c in _candidates(m, STRUCTURES[name])]

    inverse = 1.0 / best.alpha + torch.tensor([step, -step], dtype=torch.float64, device=device) \
        / float(problem.c.abs().max())
    inverse = inverse[(inverse * best.alpha > 0) & (inverse.abs() <= 1.0 / problem.t_min)]  # admissible alphas
    out: List[_Candidate] = []
    if problem.scale_known:
        if not t_fixed:
            out += moved(1.0 / inverse)
    else:
        out += moved(torch.full_like(inverse, best.t), alpha=1.0 / inverse)
        if not t_fixed:
            probe = 1e-6 * abs(best.t)
            shifted = describe(problem, [best.structure], torch.tensor([best.t + probe], dtype=torch.float64,
                                                                       device=device),
                               torch.zeros(1, dtype=torch.long, device=device), free=own_free.expand(1, 2))
            rate = float((shifted[best.structure.name].labels[0] - best.label).abs().max()) / probe
            delta = min(step / rate, 0.5 * abs(best.t)) if rate > 0 else 0.5 * abs(best.t)
            out += moved(torch.tensor([best.t + delta, best.t - delta], dtype=torch.float64, device=device))
    return out


def _contains(general: Structure, special: Structure) -> bool:
    """Whether every label of ``special`` is also a label of ``general`` (a hard label is a smoothing label)."""
    return general.free_entries >= special.free_entries and general.offset_free >= special.offset_free


def _equations(problem: HeadProblem) -> int:
    """The classes that count as equations. With an unknown scale, an entry whose gradient term is below rounding
    says only "p_i ~ y_i ~ 0", which a saturated softmax satisfies at any scale: it is no equation. With a known
    scale such entries still pin t, through the normalisation of p."""
    if problem.scale_known:
        return problem.num_classes
    return int((problem.c.abs() > ROUNDING_SLACK * (problem.precision + problem.entry_noise)).sum())


def _fits_as_well(neighbour: _Candidate, best: _Candidate, *, tol: float, ambiguity_ratio: float,
                  same_answer_atol: float) -> bool:
    """Whether a valid neighbouring label explains the gradient about as well as ``best``: it is another label,
    and its structure says nothing (uninformative), or it fits with about the answer's rounding units or
    residual."""
    if not neighbour.valid or float((neighbour.label - best.label).abs().max()) <= same_answer_atol:
        return False
    if not neighbour.informative:
        return True
    return neighbour.residual <= tol and (neighbour.rounding_units <= max(1.0, best.rounding_units)
                                          or neighbour.residual < ambiguity_ratio * best.residual)


def _label_error(problem: HeadProblem, best: _Candidate, structures: Sequence[Structure], *, t_fixed: bool,
                 equations: int, unknowns: int) -> float:
    """How far the gradient pins the answer's label (max-abs): its standard error under every hypothesis that
    contains the answer (the simplest structure wins only if the more general ones would not move its label
    either), and at least the rank-one ratio over ``|alpha|`` (the part of the gradient that is not one
    example's, noise or the drift of several local steps, can shift ``c`` by up to its relative size)."""
    order = torch.argsort(best.label, descending=True).tolist()
    free = best.free + tuple(i for i in order if i not in best.free)
    errors = [float(label_standard_error(problem, s, best.t, best.alpha, free[:s.free_entries],
                                         t_free=not t_fixed).max())
              for s in structures if _contains(s, best.structure) and s.degrees_of_freedom(equations, unknowns) >= 1]
    return max(errors + [problem.rank_one_ratio / abs(best.alpha)])


def _decide(problem: HeadProblem, minima: Dict[str, Minima], *, tol: float, ambiguity_ratio: float,
            same_answer_atol: float, feature_sign: str, t_fixed: bool) -> Tuple[_Candidate, bool, float, str]:
    """Pick ``(answer, determined, margin, message)`` from the candidate answers of each hypothesis.

    One rule, whichever path produced the candidates (a search's refined minima, or one scalar fixed by a closed
    form: ``t_fixed``). A candidate is eligible when its structure has equations to spare once its unknown
    scalars are fitted (``t`` unless a closed form fixed it, ``alpha`` when the scale is unknown; see
    :func:`_equations`), its label is valid (entries in [0, 1] to within rounding) and its feature has the sign
    ``feature_sign`` asks for. It fits when its residual is below ``tol`` (far from the trivial answer) and its
    structured entries agree to within ``ROUNDING_SLACK`` times the error that rounding (at the precision the
    gradient's values carry) and the noise the rank-one ratio reveals would leave, entry by entry. The answer is
    the lowest residual of the simplest fitting structure (``minima`` is ordered simplest first), and it is
    determined when all of these hold:

    1. every other answer (a label farther than ``same_answer_atol``) of the same or a simpler structure has a
       residual at least ``ambiguity_ratio`` times larger (``margin``);
    2. no label ``10 * same_answer_atol`` away along the free scalars fits about as well under any structure
       (:func:`_neighbours`, :func:`_fits_as_well`): no flat valley, no saturated softmax;
    3. the label's error (:func:`_label_error`) times ``ambiguity_ratio`` stays below that same resolution;
    4. a two-class answer gives each class a weight above that resolution (otherwise the label is one class's,
       and which class is "second" is arbitrary: a mixup forced on a smoothed label).

    Without any fit, the simplest structure below ``tol`` is the best guess, reported as undetermined.
    """
    unknowns = int(not t_fixed) + int(not problem.scale_known)
    equations = _equations(problem)
    sign = _preferred_sign(problem)
    if feature_sign == "nonnegative" and sign == 0:
        raise ValueError("feature_sign='nonnegative' but the weight gradient's rows have mixed signs: "
                         "the head input cannot be non-negative")
    restrict = sign if feature_sign != "any" else 0
    rank = {name: i for i, name in enumerate(minima)}
    structures = [STRUCTURES[name] for name in minima]
    candidates, uninformative, invalid = [], [], []
    for structure, found in zip(structures, minima.values()):
        keep = found.t * restrict >= 0 if restrict else torch.ones_like(found.t, dtype=torch.bool)
        invalid += _candidates(found[keep & ~found.valid], structure)
        eligible = structure.degrees_of_freedom(equations, unknowns) >= 1
        (candidates if eligible else uninformative).extend(_candidates(found[keep & found.valid], structure))
    if not candidates:
        fallback = min(uninformative or invalid or [c for s, m in zip(structures, minima.values())
                                                    for c in _candidates(m, s)], key=lambda c: c.residual)
        if uninformative:
            scale = "" if problem.scale_known else " once the unknown gradient scale is fitted"
            saturated = "" if equations == problem.num_classes else \
                f" whose gradient is above rounding (of {problem.num_classes}: a saturated softmax)"
            reason = (f"with {equations} classes{saturated} the {fallback.structure.name} structure has no "
                      f"equation to spare{scale}: the gradient cannot determine the label")
        else:
            reason = ("no candidate gives a valid label (entries in [0, 1]) with the feature sign: the gradient "
                      "may not come from a softmax cross-entropy head, or feature_sign is wrong")
        return fallback, False, 1.0, reason
    close = [c for c in candidates if c.residual <= tol]
    fitting = [c for c in close if c.rounding_units <= ROUNDING_SLACK]
    pool = fitting or close or candidates
    simplest = min(rank[c.structure.name] for c in pool)
    best = min((c for c in pool if rank[c.structure.name] == simplest), key=lambda c: c.residual)
    rivals = [c.residual for c in candidates if rank[c.structure.name] <= simplest
              and float((c.label - best.label).abs().max()) > same_answer_atol]
    runner_up = min(rivals, default=math.inf)
    margin = runner_up / best.residual if best.residual > 0 else math.inf
    step = 10 * same_answer_atol
    if not fitting:
        return best, False, margin, (f"no label format fits to the gradient's precision (best: "
                                     f"{best.structure.name}, residual {best.residual:.3g}, tol {tol:.2g}; "
                                     f"structured entries spread over {best.rounding_units:.3g} rounding units, at "
                                     f"most {ROUNDING_SLACK:g} expected)")
    if margin < ambiguity_ratio:
        return best, False, margin, (f"ambiguous: another answer fits almost as well (residual {runner_up:.3g} "
                                     f"vs {best.residual:.3g})")
    if any(_fits_as_well(c, best, tol=tol, ambiguity_ratio=ambiguity_ratio, same_answer_atol=same_answer_atol)
           for c in _neighbours(problem, best, structures, t_fixed=t_fixed, step=step)):
        return best, False, margin, (f"ambiguous: labels {step:g} away from the answer fit the gradient almost as "
                                     "well (a flat residual: the softmax is saturated, or the label has too few "
                                     "equations to spare)")
    error = _label_error(problem, best, structures, t_fixed=t_fixed, equations=equations, unknowns=unknowns)
    if ambiguity_ratio * error > step:
        return best, False, margin, (f"the gradient pins the label only to about +-{error:.2g} (from the residual "
                                     f"{best.residual:.3g} it leaves and its rank-one ratio "
                                     f"{problem.rank_one_ratio:.2g}): not to {step:g}; an update of several local "
                                     "steps, noise, or a softmax too flat or too saturated for the free scalars")
    minor = _minor_weight(best)
    if minor is not None and minor <= step:
        return best, False, margin, (f"one class holds (almost) all the label's weight (the other {minor:.2g}, "
                                     f"below {step:g}): the second class of a {best.structure.label_format} is not "
                                     "determined; the label is a single class's (label_format='smoothing' or "
                                     "'auto' reads it)")
    return best, True, margin, ""


def _minor_weight(answer: "_Candidate") -> Optional[float]:
    """The smaller class weight of a two-class answer (above the common smoothing value), else None."""
    _, eps, lam = _label_parameters(answer)
    if lam is None:
        return None
    return min(lam, 1.0 - lam) * (1.0 - eps) if math.isfinite(lam) else 0.0


GRADIENT_SCALES = ("known", "unknown")


def recover_label(weight_grad: torch.Tensor, weight: torch.Tensor, *, bias: Optional[torch.Tensor] = None,
                  bias_grad: Optional[torch.Tensor] = None, label_format: str = "auto", method: str = "exact",
                  gradient_scale: str = "known", tol: Optional[float] = None, ambiguity_ratio: float = 3.0,
                  same_answer_atol: float = 1e-4, feature_sign: str = "auto", rank_one_tol: Optional[float] = 1e-2,
                  **search_options) -> RecoveryResult:
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
        **search_options: passed to the search (e.g. ``seed`` for "pso").

    Returns:
        :class:`RecoveryResult`; ``label`` and ``feature`` in the gradient's dtype and device.
    """
    _check_options(label_format, method, feature_sign, gradient_scale)
    with _threads_for(weight_grad.numel() if isinstance(weight_grad, torch.Tensor) else 0):
        problem = factor_head(weight_grad, weight, bias, bias_grad, rank_one_tol=rank_one_tol,
                              scale_known=gradient_scale == "known")
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
    _check_options(label_format, method, feature_sign, gradient_scale)
    found = find_head(model, head)
    with _threads_for(found[1].weight.numel()):
        named = named_gradients(model, gradients)
        parts = head_gradients(model, named, found)
        problem = factor_head(parts["weight_grad"], parts["weight"], parts["bias"], parts["bias_grad"],
                              rank_one_tol=rank_one_tol, scale_known=gradient_scale == "known")
        exact = method == "exact"  # the closed forms are steps of the exact pipeline; a named search always runs
        known = problem.closed_form_t() if exact else None
        scale = None if known is None else (known, "closed_form")
        extra: Dict[str, object] = {}
        layer = find_feature_layer(model, found[0]) if exact and use_feature_layer and known is None else None
        if layer is not None and layer.bias_name in named:
            fit = scale_from_feature_layer(problem, layer, named[layer.bias_name])
            if fit is not None:
                extra["feature_layer_residual"] = fit[1]
                if fit[1] <= consistency_tol:
                    scale = (fit[0], "feature_layer")
        result = _recover(problem, scale, label_format=label_format, method=method, tol=tol,
                          ambiguity_ratio=ambiguity_ratio, same_answer_atol=same_answer_atol,
                          feature_sign=feature_sign, search_options=search_options)
        result.extra.update(extra)
        return result


def _check_options(label_format: str, method: str, feature_sign: str, gradient_scale: str) -> None:
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


def _recover(problem: HeadProblem, known_scale: Optional[Tuple[float, str]], *, label_format: str, method: str,
             tol: Optional[float], ambiguity_ratio: float, same_answer_atol: float, feature_sign: str,
             search_options: Dict[str, object]) -> RecoveryResult:
    """Search (unless ``known_scale`` = ``(t, source)`` is given), decide, and package the answer.

    When a known-scale answer is not determined but the same gradient read with an unknown scale is, the
    message says so: the input looks like a scaled gradient (an update, a clipped gradient).
    """
    tol = default_tolerance(problem.rank_one_ratio) if tol is None else float(tol)
    structures = [STRUCTURES[name] for name in FORMAT_STRUCTURES[label_format]
                  if STRUCTURES[name].free_entries < problem.num_classes]
    if not structures:
        raise ValueError(f"label_format={label_format!r} leaves no label entry to check with "
                         f"{problem.num_classes} classes: every label of that form fits the gradient")
    decide = functools.partial(_decide, problem, tol=tol, ambiguity_ratio=ambiguity_ratio,
                               same_answer_atol=same_answer_atol, feature_sign=feature_sign,
                               t_fixed=known_scale is not None)
    if known_scale is not None:
        used_method, evaluations, converged = known_scale[1], 1, True
        minima = _single_minimum(problem, known_scale[0], structures)
        best, determined, margin, message = decide(minima)
    elif method == "exact":
        # The most general structure (mixup with smoothing) is the costliest and the rarest: try the others
        # first. When they give a determined answer, adding it cannot change the decision (simpler wins).
        stages = [structures[:-1], structures] if len(structures) > 2 or label_format == "mixup" else [structures]
        options = dict(search_options, same_answer_atol=same_answer_atol,
                       sign=_preferred_sign(problem) if feature_sign != "any" else 0)
        used_method, evaluations, converged = method, 0, True
        for stage in filter(None, stages):
            outcome = SEARCHES["exact"](problem, label_format, structures=[s.name for s in stage], **options)
            evaluations += outcome.evaluations
            minima = outcome.info["minima"]
            best, determined, margin, message = decide(minima)
            if determined:
                break
    else:
        if label_format == "auto":
            raise ValueError(f"method={method!r} (the paper's search) needs a known label_format; "
                             "only method='exact' detects the format")
        outcome = SEARCHES[method](problem, label_format, **search_options)
        used_method, evaluations, converged = method, outcome.evaluations, outcome.converged
        minima = _single_minimum(problem, outcome.t, structures)
        best, determined, margin, message = decide(minima)
    label_tol = _label_tolerance(problem)
    if problem.rank_one_ratio > NOISY_RANK_ONE_RATIO:
        determined = False
        message = "; ".join(filter(None, [message, f"the gradient is far from rank one (ratio "
                                          f"{problem.rank_one_ratio:.2g}): not one clean example (a batch, noise, "
                                          "or several local steps), the answer is a best guess"]))
    if problem.row_sum_error / abs(best.alpha) > label_tol:
        determined = False
        message = "; ".join(filter(None, [message, "gradient rows do not sum to zero: the label does not sum to "
                                          f"one (off by {problem.row_sum_error / abs(best.alpha):.2g}) or the loss "
                                          "is not softmax cross-entropy"]))
    if not determined and problem.scale_known and method == "exact":
        scaled = _recover(dataclasses.replace(problem, scale_known=False), known_scale, label_format=label_format,
                          method=method, tol=tol, ambiguity_ratio=ambiguity_ratio,
                          same_answer_atol=same_answer_atol, feature_sign=feature_sign,
                          search_options=search_options)
        if scaled.determined:
            message += (f"; the input looks like a gradient scaled by {scaled.gradient_scale:.6g} (a weight update "
                        "or a clipped gradient): pass gradient_scale='unknown', or use recover_from_update")
    t_tensor = torch.tensor(best.t, dtype=torch.float64, device=problem.c.device)
    y = best.label
    classes, eps, lam = _label_parameters(best)
    device = problem.weight_grad.device
    return RecoveryResult(
        label=y.to(device=device, dtype=problem.dtype),
        feature=problem.feature(t_tensor).to(device=device, dtype=problem.dtype),
        label_format=best.structure.label_format, residual=best.residual, classes=classes, eps=eps, lam=lam,
        scale=best.t, determined=determined, margin=margin,
        residuals={name: float(m.residual.min()) if m.residual.numel() else math.inf for name, m in minima.items()},
        rank_one_ratio=problem.rank_one_ratio, row_sum_error=problem.row_sum_error,
        label_valid=bool((y >= -label_tol).all() and (y <= 1 + label_tol).all()), method=used_method,
        evaluations=evaluations, converged=converged, tol=tol, gradient_scale=best.alpha / best.t, message=message)
