"""Hard-label baselines: what earlier attacks read off one example's head gradient.

Every baseline assumes a hard (one-hot) label and predicts ONE class. They are here for the comparison
tables: on soft labels (label smoothing, mixup) their one-hot answer is wrong by construction, which is the
point the paper makes. All of them see only the head's parameters and gradients, never the truth.

For one example and a head ``z = W h (+ b)`` the weight gradient is ``G = (p - y) h^T`` (C, d). With a hard
label ``y = e_k``, ``p_k - 1 < 0`` while every other ``p_i - y_i = p_i > 0``: row ``k`` points the opposite
way from every other row. The baselines differ in how they read that sign:

* ``"idlg"`` (Zhao et al., 2020, iDLG): with a bias gradient, the class whose ``dL/db`` entry is negative;
  without one, the row whose inner product with the sum of the other rows is the most negative
  (``<g_i, sum_{j != i} g_j>``; only the target row is anti-parallel to the others, whatever the sign of ``h``).
* ``"yin"`` (Yin et al., 2021, GradInversion): the minimum of the rows' sums ``sum_j G_ij``, which is
  negative only for the target row when the features are non-negative (ReLU, sigmoid).
* ``"rlg"`` (Dang et al., 2021, RLG, for a batch of one): the top left singular vector of ``G`` (the
  direction of ``p - y``), oriented so that most entries are positive; the class is its most negative entry.

Use :data:`LABEL_BASELINES` (name -> function) or :func:`baseline_from_gradients` for a whole model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Union

import torch
from torch import nn

from ._checks import as_tensor, check_finite
from .head import GradientsLike, head_gradients

__all__ = ["BaselineResult", "LABEL_BASELINES", "idlg_label", "yin_label", "rlg_label", "baseline_from_gradients"]


@dataclass(frozen=True)
class BaselineResult:
    """A hard-label baseline's answer.

    Attributes:
        label: ``(C,)`` one-hot prediction, float64.
        target: the predicted class.
        scores: ``(C,)`` float64 score of each class; the prediction is its argmin.
        method: the baseline's name.
        rule: which reading of the gradient was used (e.g. "bias_sign", "row_inner_product", "row_sum").
    """

    label: torch.Tensor
    target: int
    scores: torch.Tensor
    method: str
    rule: str


def _validated(weight_grad: torch.Tensor, bias_grad: Optional[torch.Tensor]) -> torch.Tensor:
    """``weight_grad`` (C, d) as float64 after checking shapes and values."""
    weight_grad = as_tensor(weight_grad, "weight_grad")
    if weight_grad.dim() != 2:
        raise ValueError(f"weight_grad must be a (C, d) matrix, got shape {tuple(weight_grad.shape)}")
    if weight_grad.shape[0] < 2:
        raise ValueError(f"the head must have at least 2 classes, got {weight_grad.shape[0]}")
    check_finite(weight_grad, "weight_grad")
    if bias_grad is not None:
        as_tensor(bias_grad, "bias_grad")
        if bias_grad.shape != weight_grad.shape[:1]:
            raise ValueError(f"bias_grad must have shape ({weight_grad.shape[0]},), got {tuple(bias_grad.shape)}")
        check_finite(bias_grad, "bias_grad")
    grad = weight_grad.detach().to(torch.float64)
    if not bool(grad.abs().max() > 0):
        raise ValueError("weight_grad is all zeros: the example's loss gradient vanished, there is no label to read")
    return grad


def _result(scores: torch.Tensor, method: str, rule: str) -> BaselineResult:
    target = int(scores.argmin())
    label = torch.zeros_like(scores)
    label[target] = 1.0
    return BaselineResult(label=label, target=target, scores=scores, method=method, rule=rule)


def idlg_label(weight_grad: torch.Tensor, weight: Optional[torch.Tensor] = None, *,
               bias: Optional[torch.Tensor] = None, bias_grad: Optional[torch.Tensor] = None) -> BaselineResult:
    """iDLG's label: the class whose head gradient has the opposite sign to every other class.

    Args:
        weight_grad: ``(C, d)`` dL/dW of one example.
        weight, bias: unused (accepted so that every baseline has the same signature).
        bias_grad: ``(C,)`` dL/db; when given, the prediction is ``argmin dL/db`` (``p - y`` itself).

    Returns:
        :class:`BaselineResult`; without ``bias_grad`` the scores are ``<g_i, sum_{j != i} g_j> / ||G||^2``.
    """
    grad = _validated(weight_grad, bias_grad)
    if bias_grad is not None:
        return _result(bias_grad.detach().to(torch.float64), "idlg", "bias_sign")
    total = grad.sum(dim=0)                                   # (d,)
    scores = (grad @ total - grad.square().sum(dim=1))        # <g_i, sum_j g_j> - ||g_i||^2, shape (C,)
    return _result(scores / grad.square().sum(), "idlg", "row_inner_product")


def yin_label(weight_grad: torch.Tensor, weight: Optional[torch.Tensor] = None, *,
              bias: Optional[torch.Tensor] = None, bias_grad: Optional[torch.Tensor] = None) -> BaselineResult:
    """Yin et al.'s rule for a batch of one: the class with the most negative row sum ``sum_j G_ij``.

    Correct for hard labels when the head input is non-negative (ReLU, sigmoid, average-pooled ReLU); the
    bias gradient is not used. Shapes as in :func:`idlg_label`.
    """
    grad = _validated(weight_grad, bias_grad)
    return _result(grad.sum(dim=1), "yin", "row_sum")


def rlg_label(weight_grad: torch.Tensor, weight: Optional[torch.Tensor] = None, *,
              bias: Optional[torch.Tensor] = None, bias_grad: Optional[torch.Tensor] = None) -> BaselineResult:
    """RLG's SVD rule for a batch of one: the odd-signed entry of the top left singular vector of ``G``.

    The top left singular vector is ``+-(p - y) / ||p - y||``; it is oriented so that the majority of its
    entries are positive (C - 1 of them for a hard label) and the class is its most negative entry.
    Shapes as in :func:`idlg_label`; the bias gradient is not used.
    """
    grad = _validated(weight_grad, bias_grad)
    u = torch.linalg.svd(grad, full_matrices=False).U[:, 0]   # (C,)
    if int((u > 0).sum()) < int((u < 0).sum()):
        u = -u
    return _result(u, "rlg", "svd_sign")


BaselineFn = Callable[..., BaselineResult]
#: Hard-label baselines by name: ``fn(weight_grad, weight, *, bias=None, bias_grad=None) -> BaselineResult``.
LABEL_BASELINES: Dict[str, BaselineFn] = {"idlg": idlg_label, "yin": yin_label, "rlg": rlg_label}


def baseline_from_gradients(model: nn.Module, gradients: GradientsLike, method: str = "idlg", *,
                            head: Union[str, nn.Linear, None] = None) -> BaselineResult:
    """Run the baseline ``method`` of :data:`LABEL_BASELINES` on a model's head.

    Args:
        model: any ``nn.Module`` with an ``nn.Linear`` head (the last one, or ``head``).
        gradients: ``{parameter name: gradient}`` or a sequence aligned with ``model.parameters()``.
    """
    if method not in LABEL_BASELINES:
        raise ValueError(f"unknown label baseline {method!r}; choose one of {sorted(LABEL_BASELINES)}")
    parts = head_gradients(model, gradients, head)
    return LABEL_BASELINES[method](parts["weight_grad"], parts["weight"], bias=parts["bias"],
                                   bias_grad=parts["bias_grad"])
