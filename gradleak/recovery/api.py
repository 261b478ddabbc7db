"""``recover_label`` / ``recover_from_gradients``: one example's soft label and head feature from its gradient."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..head import GradientsLike, HeadProblem, factor_head, head_gradients
from ..labels import LABEL_FORMATS
from .base import SEARCHES
from .exact import Minima
from .structure import FORMAT_STRUCTURES, STRUCTURES, Structure, residuals

FEATURE_SIGNS = ("auto", "nonnegative", "any")


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
        determined: True when the gradient pins the label down: the structure fits (residual <= tol), no other
            separated answer fits as well, and the structure has equations to spare. False means "the gradient
            cannot tell", never a confident wrong answer.
        margin: residual of the best competing answer (another scalar, or for auto another structure); inf if
            none. Far above ``tol`` means the minimum is unique.
        residuals: the best residual of every hypothesis tried ("hard", "smoothing", "mixup",
            "mixup_smoothing").
        rank_one_ratio: ``||G - rank-one fit|| / ||G||``: ~1e-7 for one float32 example, O(1) for a batch.
        row_sum_error: ``|sum_i (p_i - y_i)| / ||p - y||`` (Theorem 1: 0 when the label sums to one).
        label_valid: all label entries in ``[-tol, 1 + tol]``.
        method: the search used ("closed_form" when a bias gradient made a search unnecessary).
        evaluations: candidate scalars the search evaluated.
        converged: the search's own stopping test (never compared with the truth).
        tol: the residual tolerance used for the decisions above.
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


def default_tolerance(dtype: torch.dtype, rank_one_ratio: float) -> float:
    """Residual tolerance: sqrt of the gradient dtype's machine epsilon, widened when the gradient is noisy.

    The rank-one ratio measures how far the observed gradient is from any exact single-example gradient, so
    residuals at the true answer cannot be expected below a multiple of it.
    """
    return max(math.sqrt(torch.finfo(dtype).eps), 10.0 * rank_one_ratio)


def _label_parameters(y: torch.Tensor, structure: Structure) -> Tuple[Tuple[int, ...], float, Optional[float]]:
    """``(classes, eps, lam)`` read off a float64 label ``y`` (C,) under ``structure``."""
    num_classes = y.shape[0]
    top = y.topk(structure.free_entries).indices
    rest = torch.ones_like(y, dtype=torch.bool)
    rest[top] = False
    common = float(y[rest].mean()) if structure.offset_free else 0.0
    eps = common * num_classes
    if structure.free_entries == 1:
        return (int(top[0]),), eps, None
    a, b = sorted(int(i) for i in top)
    weight_a, weight_b = float(y[a]) - common, float(y[b]) - common
    total = weight_a + weight_b
    return (a, b), eps, (weight_b / total if total != 0 else float("nan"))


def _single_minimum(problem: HeadProblem, t: float, structures: Sequence[Structure]) -> Dict[str, Minima]:
    """Minima dict for one given scalar (closed form, or a search that returns one answer)."""
    t_tensor = torch.tensor([t], dtype=torch.float64, device=problem.c.device)
    out = {}
    for structure in structures:
        free = torch.tensor([structure.free_entries], device=t_tensor.device)
        offset = torch.tensor([structure.offset_free], device=t_tensor.device)
        out[structure.name] = Minima(t_tensor, residuals(problem, t_tensor, free, offset))
    return out


def _is_valid(problem: HeadProblem, t: float, tol: float) -> bool:
    y = problem.label(torch.tensor([t], dtype=torch.float64, device=problem.c.device))[0]
    return bool((y >= -tol).all() and (y <= 1 + tol).all())


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
    fits: bool


def _decide(problem: HeadProblem, minima: Dict[str, Minima], tol: float, feature_sign: str, closed_form: bool
            ) -> Tuple[_Candidate, bool, float, str]:
    """Pick ``(answer, determined, margin, message)`` from the refined minima of each hypothesis.

    The simplest structure that fits wins (``minima`` is ordered simplest first); an answer is determined when
    no other separated answer of that structure, nor of another equally simple one, fits too. With
    ``feature_sign="auto"`` a tie between the two signs of ``t`` goes to the sign that makes ``h >= 0``.
    """
    sign = _preferred_sign(problem)
    if feature_sign == "nonnegative":
        if sign == 0:
            raise ValueError("feature_sign='nonnegative' but the weight gradient's rows have mixed signs: "
                             "the head input cannot be non-negative")
        minima = {name: Minima(m.t[m.t * sign > 0], m.residual[m.t * sign > 0]) for name, m in minima.items()}
    num_classes = problem.num_classes
    rank = {name: i for i, name in enumerate(minima)}
    candidates = []
    for name, found in minima.items():
        structure = STRUCTURES[name]
        informative = closed_form or structure.degrees_of_freedom(num_classes) >= 1
        for t, r in zip(found.t.tolist(), found.residual.tolist()):
            candidates.append(_Candidate(structure, t, r, informative and r <= tol and _is_valid(problem, t, tol)))
    if not candidates:
        raise ValueError("no candidate answer has the required feature sign")

    def separated(c: _Candidate, best: _Candidate) -> bool:
        return c.structure is not best.structure or abs(c.t - best.t) > 1e-6 * abs(best.t)

    fitting = [c for c in candidates if c.fits]
    if not fitting:
        best = min(candidates, key=lambda c: c.residual)
        margin = min((c.residual for c in candidates if separated(c, best)), default=math.inf)
        reasons = []
        if not closed_form and best.structure.degrees_of_freedom(num_classes) < 1:
            reasons.append(f"with {num_classes} classes the {best.structure.name} structure cannot determine "
                           "the label")
        reasons.append(f"no hypothesis fits within tol={tol:.2g} (best residual {best.residual:.3g})")
        return best, closed_form, margin, "; ".join(reasons)
    simplest = min(rank[c.structure.name] for c in fitting)
    best = min((c for c in fitting if rank[c.structure.name] == simplest), key=lambda c: c.residual)
    rivals = [c for c in fitting if separated(c, best) and rank[c.structure.name] == simplest]
    if rivals and feature_sign == "auto" and sign != 0:
        agreeing = [c for c in [best] + rivals if c.t * sign > 0]
        if len(agreeing) == 1:
            best, rivals = agreeing[0], []
    margin = min((c.residual for c in candidates if c.structure is best.structure and separated(c, best)),
                 default=math.inf)
    if closed_form or not rivals:
        return best, True, margin, ""
    where = ", ".join(f"{c.structure.name} at t={c.t:.6g} (residual {c.residual:.2g})" for c in rivals[:3])
    return best, False, min(c.residual for c in rivals), f"ambiguous: other answers fit as well: {where}"


def recover_label(weight_grad: torch.Tensor, weight: torch.Tensor, *, bias: Optional[torch.Tensor] = None,
                  bias_grad: Optional[torch.Tensor] = None, label_format: str = "auto", method: str = "exact",
                  tol: Optional[float] = None, feature_sign: str = "auto", rank_one_tol: Optional[float] = 1e-2,
                  **search_options) -> RecoveryResult:
    """Recover one example's label and head feature from the gradient of its head ``z = W h (+ b)``.

    Args:
        weight_grad: ``(C, d)`` observed dL/dW (soft-target cross-entropy of ONE example).
        weight: ``(C, d)`` the head weight W the gradient was computed at.
        bias, bias_grad: ``(C,)`` each for a head with bias; with ``bias_grad`` the answer is closed form.
        label_format: "auto" (detect), "hard", "smoothing" or "mixup" (two classes, optionally smoothed).
        method: "exact" (ours), "pso" or "lbfgs" (the paper's searches; they need a known format).
        tol: residual tolerance for the fit decisions; default :func:`default_tolerance`.
        feature_sign: "auto" (prefer non-negative features only to break a tie), "nonnegative" (search only
            the sign that makes ``h >= 0``) or "any".
        rank_one_tol: reject gradients farther than this from rank one (a batch); None to accept any
            (e.g. with added noise).
        **search_options: passed to the search (e.g. ``seed`` for "pso").

    Returns:
        :class:`RecoveryResult`; ``label`` and ``feature`` in the gradient's dtype and device.
    """
    if label_format not in ("auto",) + LABEL_FORMATS:
        raise ValueError(f"label_format must be one of {('auto',) + LABEL_FORMATS}, got {label_format!r}")
    if method not in SEARCHES:
        raise ValueError(f"method must be one of {tuple(SEARCHES)}, got {method!r}")
    if feature_sign not in FEATURE_SIGNS:
        raise ValueError(f"feature_sign must be one of {FEATURE_SIGNS}, got {feature_sign!r}")
    problem = factor_head(weight_grad, weight, bias, bias_grad, rank_one_tol=rank_one_tol)
    tol = default_tolerance(problem.dtype, problem.rank_one_ratio) if tol is None else float(tol)
    structures = [STRUCTURES[name] for name in FORMAT_STRUCTURES[label_format]]
    closed_t = problem.closed_form_t()
    if closed_t is not None:
        used_method, evaluations, converged = "closed_form", 1, True
        minima = _single_minimum(problem, closed_t, structures)
    else:
        if method != "exact" and label_format == "auto":
            raise ValueError(f"method={method!r} (the paper's search) needs a known label_format; "
                             "only method='exact' detects the format")
        outcome = SEARCHES[method](problem, label_format, **search_options)
        used_method, evaluations, converged = method, outcome.evaluations, outcome.converged
        minima = outcome.info.get("minima") or _single_minimum(problem, outcome.t, structures)
    best, determined, margin, message = _decide(problem, minima, tol, feature_sign, closed_t is not None)
    if problem.row_sum_error > tol:
        determined = False
        message = "; ".join(filter(None, [message, f"gradient rows do not sum to zero (error "
                                          f"{problem.row_sum_error:.2g}): the label does not sum to one or the loss "
                                          "is not softmax cross-entropy"]))
    t_tensor = torch.tensor(best.t, dtype=torch.float64, device=problem.c.device)
    y = problem.label(t_tensor)
    classes, eps, lam = _label_parameters(y, best.structure)
    device = weight_grad.device
    return RecoveryResult(
        label=y.to(device=device, dtype=problem.dtype),
        feature=problem.feature(t_tensor).to(device=device, dtype=problem.dtype),
        label_format=best.structure.label_format, residual=best.residual, classes=classes, eps=eps, lam=lam,
        scale=best.t, determined=determined, margin=margin,
        residuals={name: float(m.residual.min()) if m.residual.numel() else math.inf for name, m in minima.items()},
        rank_one_ratio=problem.rank_one_ratio, row_sum_error=problem.row_sum_error,
        label_valid=bool((y >= -tol).all() and (y <= 1 + tol).all()), method=used_method,
        evaluations=evaluations, converged=converged, tol=tol, message=message)


def recover_from_gradients(model: nn.Module, gradients: GradientsLike, *, head: Union[str, nn.Linear, None] = None,
                           **options) -> RecoveryResult:
    """:func:`recover_label` on a model's head.

    Args:
        model: any ``nn.Module`` whose classifier head is an ``nn.Linear`` (the last one, or ``head``).
        gradients: ``{parameter name: gradient}`` or a sequence aligned with ``model.parameters()``.
        head: the head's module name or the module itself, when it is not the last ``nn.Linear``.
        **options: as for :func:`recover_label`.
    """
    parts = head_gradients(model, gradients, head)
    return recover_label(parts["weight_grad"], parts["weight"], bias=parts["bias"], bias_grad=parts["bias_grad"],
                         **options)
