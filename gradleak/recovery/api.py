"""``recover_label`` / ``recover_from_gradients``: one example's soft label and head feature from its gradient."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..head import GradientsLike, HeadProblem, factor_head, find_head, head_gradients, named_gradients
from ..labels import LABEL_FORMATS
from .base import SEARCHES
from .feature_layer import find_feature_layer, scale_from_feature_layer
from .structure import FORMAT_STRUCTURES, STRUCTURES, Minima, Structure, describe

FEATURE_SIGNS = ("auto", "nonnegative", "any")
#: How many rounding errors the structured entries may spread over and still count as equal.
ROUNDING_SLACK = 100.0
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
        scale: the scalar ``t`` of the answer (``h = t * sigma * v``, ``p - y = c / t``).
        determined: True when the gradient pins the label down: the structure fits (residual <= tol), every
            other candidate's residual is at least ``ambiguity_ratio`` times larger, and the structure has
            equations to spare. False means "the gradient cannot tell": read ``message``.
        margin: residual of the best competing answer divided by the answer's own (inf if none): how clearly
            the minimum is unique.
        residuals: the best residual of every hypothesis tried ("hard", "smoothing", "mixup",
            "mixup_smoothing"; the last, the most general, only when the others leave the answer undetermined).
        rank_one_ratio: ``||G - rank-one fit|| / ||G||``: ~1e-7 for one float32 example, O(1) for a batch.
        row_sum_error: ``|sum_i (p_i - y_i)| / ||p - y||`` (Theorem 1: 0 when the label sums to one).
        label_valid: all label entries in ``[0, 1]`` up to the square root of the dtype's machine epsilon.
        method: the search used; "closed_form" when the head bias gradient fixed the answer, "feature_layer"
            when the bias gradient of the layer below the head did (see :func:`recover_from_gradients`).
        evaluations: candidate scalars the search evaluated.
        converged: the search's own stopping test (never compared with the truth).
        tol: the largest residual accepted as a fit.
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
    message: str = ""
    extra: Dict[str, object] = field(default_factory=dict, repr=False)


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


def _label_tolerance(dtype: torch.dtype) -> float:
    """Slack, in label units, for the checks that labels lie in [0, 1] and sum to one."""
    return math.sqrt(torch.finfo(dtype).eps)


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
    residual: float
    label: torch.Tensor
    rounding_units: float
    free: Tuple[int, ...]


def _candidates(minima: Minima, structure: Structure) -> List[_Candidate]:
    ts, rs, spreads, frees = (minima.t.tolist(), minima.residual.tolist(), minima.rounding_units.tolist(),
                              minima.free.tolist())
    return [_Candidate(structure, t, r, minima.labels[i], s, tuple(dict.fromkeys(f)))
            for i, (t, r, s, f) in enumerate(zip(ts, rs, spreads, frees))]


def _decide(problem: HeadProblem, minima: Dict[str, Minima], *, tol: float, ambiguity_ratio: float,
            same_answer_atol: float, feature_sign: str, closed_form: bool) -> Tuple[_Candidate, bool, float, str]:
    """Pick ``(answer, determined, margin, message)`` from the refined minima of each hypothesis.

    A structure fits at a candidate when its residual is below ``tol`` (far from the trivial answer) and its
    structured entries agree to within ``ROUNDING_SLACK`` times the error that rounding (and the noise the
    rank-one ratio reveals) would leave: as sharp as the gradient allows, entry by entry, so that a smoothing
    mass of 1e-5 per class is not mistaken for zero. The simplest fitting structure wins (``minima`` is ordered
    simplest first), its lowest residual is the answer, and the answer is unique when every other answer (a
    label farther than ``same_answer_atol``) of the same or a simpler structure has a residual at least
    ``ambiguity_ratio`` times larger. Without any such fit, the simplest structure below ``tol`` is the best
    guess, reported as undetermined.
    """
    sign = _preferred_sign(problem)
    if feature_sign == "nonnegative" and sign == 0:
        raise ValueError("feature_sign='nonnegative' but the weight gradient's rows have mixed signs: "
                         "the head input cannot be non-negative")
    restrict = sign if feature_sign != "any" else 0
    label_tol = _label_tolerance(problem.dtype)
    rank = {name: i for i, name in enumerate(minima)}
    num_classes = problem.num_classes
    candidates, uninformative, invalid = [], [], []
    for name, found in minima.items():
        structure = STRUCTURES[name]
        informative = closed_form or structure.degrees_of_freedom(num_classes) >= 1
        keep = found.t * restrict >= 0 if restrict else torch.ones_like(found.t, dtype=torch.bool)
        valid = ((found.labels >= -label_tol) & (found.labels <= 1 + label_tol)).all(-1)
        invalid += _candidates(found[keep & ~valid], structure)
        (candidates if informative else uninformative).extend(_candidates(found[keep & valid], structure))
    if not candidates:
        fallback = min(uninformative or invalid or [c for name, m in minima.items()
                                                    for c in _candidates(m, STRUCTURES[name])],
                       key=lambda c: c.residual)
        if any(STRUCTURES[name].degrees_of_freedom(num_classes) < 1 for name in minima) and not closed_form:
            reason = (f"with {num_classes} classes the {fallback.structure.name} structure has no equation to "
                      "spare: the gradient cannot determine the label")
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
    if closed_form:
        return best, True, margin, ""
    if not fitting:
        return best, False, margin, (f"no structure holds to the gradient's precision (residual "
                                     f"{best.residual:.3g}, tol {tol:.2g}; structured entries spread over "
                                     f"{best.rounding_units:.3g} rounding units, at most {ROUNDING_SLACK:g} expected)")
    if margin < ambiguity_ratio:
        return best, False, margin, (f"ambiguous: another answer fits almost as well (residual {runner_up:.3g} "
                                     f"vs {best.residual:.3g})")
    return best, True, margin, ""


def recover_label(weight_grad: torch.Tensor, weight: torch.Tensor, *, bias: Optional[torch.Tensor] = None,
                  bias_grad: Optional[torch.Tensor] = None, label_format: str = "auto", method: str = "exact",
                  tol: Optional[float] = None, ambiguity_ratio: float = 3.0, same_answer_atol: float = 1e-4,
                  feature_sign: str = "auto", rank_one_tol: Optional[float] = 1e-2, **search_options
                  ) -> RecoveryResult:
    """Recover one example's label and head feature from the gradient of its head ``z = W h (+ b)``.

    Args:
        weight_grad: ``(C, d)`` observed dL/dW (soft-target cross-entropy of ONE example).
        weight: ``(C, d)`` the head weight W the gradient was computed at.
        bias, bias_grad: ``(C,)`` each for a head with bias; with ``bias_grad`` the answer is closed form.
        label_format: "auto" (detect), "hard", "smoothing" or "mixup" (two classes, optionally smoothed).
        method: "exact" (ours), "pso" or "lbfgs" (the paper's searches; they need a known format).
        tol: largest residual accepted as a fit; default :func:`default_tolerance`.
        ambiguity_ratio: an answer is unique when every other answer's residual is at least this many times
            its own.
        same_answer_atol: candidate labels closer than this (max-abs) are the same answer.
        feature_sign: "auto" (when every row of the weight gradient has one sign, as with ReLU or sigmoid
            features, keep only the sign of ``t`` that makes ``h >= 0``), "nonnegative" (require it) or "any".
        rank_one_tol: reject gradients farther than this from rank one (a batch); None to accept any
            (e.g. with added noise).
        **search_options: passed to the search (e.g. ``seed`` for "pso").

    Returns:
        :class:`RecoveryResult`; ``label`` and ``feature`` in the gradient's dtype and device.
    """
    _check_options(label_format, method, feature_sign)
    problem = factor_head(weight_grad, weight, bias, bias_grad, rank_one_tol=rank_one_tol)
    known = problem.closed_form_t()
    return _recover(problem, None if known is None else (known, "closed_form"), label_format=label_format,
                    method=method, tol=tol, ambiguity_ratio=ambiguity_ratio, same_answer_atol=same_answer_atol,
                    feature_sign=feature_sign, search_options=search_options)


def recover_from_gradients(model: nn.Module, gradients: GradientsLike, *, head: Union[str, nn.Linear, None] = None,
                           use_feature_layer: bool = True, consistency_tol: float = 1e-3, label_format: str = "auto",
                           method: str = "exact", tol: Optional[float] = None, ambiguity_ratio: float = 3.0,
                           same_answer_atol: float = 1e-4, feature_sign: str = "auto",
                           rank_one_tol: Optional[float] = 1e-2, **search_options) -> RecoveryResult:
    """:func:`recover_label` on a model's head, helped by the layer below it when that layer allows.

    Without a head bias, when the head input is ``act(Linear|Conv(x) + b)`` with ReLU or sigmoid (see
    :mod:`gradleak.recovery.feature_layer`), that layer's bias gradient fixes the scalar ``t`` in closed form,
    with no assumption on the label; it is used when it explains that gradient within ``consistency_tol``
    (relative), and the method is then reported as "feature_layer".

    Args:
        model: any ``nn.Module`` whose classifier head is an ``nn.Linear`` (the last one, or ``head``).
        gradients: ``{parameter name: gradient}`` or a sequence aligned with ``model.parameters()``.
        head: the head's module name or the module itself, when it is not the last ``nn.Linear``.
        use_feature_layer: False to rely on the head's gradient alone (as the paper does).
        consistency_tol: how well the layer below must be explained before its answer is used.
        The other options are those of :func:`recover_label`.
    """
    _check_options(label_format, method, feature_sign)
    found = find_head(model, head)
    named = named_gradients(model, gradients)
    parts = head_gradients(model, named, found)
    problem = factor_head(parts["weight_grad"], parts["weight"], parts["bias"], parts["bias_grad"],
                          rank_one_tol=rank_one_tol)
    known = problem.closed_form_t()
    scale = None if known is None else (known, "closed_form")
    extra: Dict[str, object] = {}
    layer = find_feature_layer(model, found[0]) if use_feature_layer and known is None else None
    if layer is not None and layer.bias_name in named:
        fit = scale_from_feature_layer(problem, layer, named[layer.bias_name])
        if fit is not None:
            extra["feature_layer_residual"] = fit[1]
            if fit[1] <= consistency_tol:
                scale = (fit[0], "feature_layer")
    result = _recover(problem, scale, label_format=label_format, method=method, tol=tol,
                      ambiguity_ratio=ambiguity_ratio, same_answer_atol=same_answer_atol, feature_sign=feature_sign,
                      search_options=search_options)
    result.extra.update(extra)
    return result


def _check_options(label_format: str, method: str, feature_sign: str) -> None:
    if label_format not in ("auto",) + LABEL_FORMATS:
        raise ValueError(f"label_format must be one of {('auto',) + LABEL_FORMATS}, got {label_format!r}")
    if method not in SEARCHES:
        raise ValueError(f"method must be one of {tuple(SEARCHES)}, got {method!r}")
    if feature_sign not in FEATURE_SIGNS:
        raise ValueError(f"feature_sign must be one of {FEATURE_SIGNS}, got {feature_sign!r}")


def _recover(problem: HeadProblem, known_scale: Optional[Tuple[float, str]], *, label_format: str, method: str,
             tol: Optional[float], ambiguity_ratio: float, same_answer_atol: float, feature_sign: str,
             search_options: Dict[str, object]) -> RecoveryResult:
    """Search (unless ``known_scale`` = ``(t, source)`` is given), decide, and package the answer."""
    tol = default_tolerance(problem.rank_one_ratio) if tol is None else float(tol)
    structures = [STRUCTURES[name] for name in FORMAT_STRUCTURES[label_format]
                  if STRUCTURES[name].free_entries < problem.num_classes]
    if not structures:
        raise ValueError(f"label_format={label_format!r} leaves no label entry to check with "
                         f"{problem.num_classes} classes: every label of that form fits the gradient")
    decide = functools.partial(_decide, problem, tol=tol, ambiguity_ratio=ambiguity_ratio,
                               same_answer_atol=same_answer_atol, feature_sign=feature_sign,
                               closed_form=known_scale is not None)
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
    label_tol = _label_tolerance(problem.dtype)
    if problem.rank_one_ratio > NOISY_RANK_ONE_RATIO:
        determined = False
        message = "; ".join(filter(None, [message, f"the gradient is far from rank one (ratio "
                                          f"{problem.rank_one_ratio:.2g}): not one clean example, the answer is a "
                                          "best guess"]))
    if problem.row_sum_error / abs(best.t) > label_tol:
        determined = False
        message = "; ".join(filter(None, [message, "gradient rows do not sum to zero: the label does not sum to "
                                          f"one (off by {problem.row_sum_error / abs(best.t):.2g}) or the loss is "
                                          "not softmax cross-entropy"]))
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
        evaluations=evaluations, converged=converged, tol=tol, message=message)
