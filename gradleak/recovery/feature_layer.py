"""The layer that produces the head's input can fix ``t`` without any label structure.

When the head input is ``h = act(A x + b_A)`` (``A`` a Linear or convolution with a bias, ``act`` ReLU or
sigmoid, optionally flattened), the observed bias gradient of ``A`` is

    dL/db_A = S( delta_h * act'(h) ),     delta_h = W^T (p - y) = W^T c / t,    h = t * sigma * v

with ``S`` the sum over the positions that share a bias (a convolution channel). ``act'`` is a function of
the activation's own output (ReLU: ``h > 0``; sigmoid: ``h (1 - h)``), so this is an equation in ``t`` alone,
solvable in closed form: ``dL/db_A = u / t`` (ReLU) or ``A - t B`` (sigmoid). This is what pins the label down
where the label structure cannot: confident trained networks, whose candidate labels all look alike.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from ..head import HeadProblem

_PASS_THROUGH = (nn.Flatten, nn.Dropout, nn.Identity)
_AFFINE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_ACTIVATIONS = {nn.ReLU: "relu", nn.Sigmoid: "sigmoid"}


@dataclass(frozen=True)
class FeatureLayer:
    """``h = flatten(activation(affine(x)))``: the affine layer's bias parameter name and the activation."""

    bias_name: str
    activation: str
    channels: int


_FOUND: "weakref.WeakKeyDictionary[nn.Module, Dict[str, Optional[FeatureLayer]]]" = weakref.WeakKeyDictionary()


def find_feature_layer(model: nn.Module, head_name: str) -> Optional[FeatureLayer]:
    """The affine layer + activation right before the head in registration order, or None.

    Recognised: ``Linear|ConvNd (with bias) -> ReLU|Sigmoid -> [Flatten|Dropout|Identity]* -> head``. Registration
    order is not always execution order, so callers must check the answer with :func:`scale_from_feature_layer`'s
    residual before trusting it. The answer is remembered per model (scanning a ResNet50 costs a millisecond).
    """
    known = _FOUND.setdefault(model, {})
    if head_name not in known:
        known[head_name] = _scan(model, head_name)
    return known[head_name]


def layers_below_head(model: nn.Module, head_name: str) -> Optional[Tuple[nn.Module, str, nn.Module]]:
    """``(activation, name, layer)``: the leaf module that feeds the head through pass-through modules only
    (Flatten, Dropout, Identity), and the leaf registered just before it with its qualified name; None when the
    head is not a leaf module or nothing is registered below it. Registration order, not execution order: callers
    check what they read from these layers against the gradients."""
    leaves = [(name, m) for name, m in model.named_modules() if not list(m.children())]
    names = [name for name, _ in leaves]
    if head_name not in names:
        return None
    index = names.index(head_name) - 1
    while index >= 0 and isinstance(leaves[index][1], _PASS_THROUGH):
        index -= 1
    if index < 1:
        return None
    return (leaves[index][1], *leaves[index - 1])


def _scan(model: nn.Module, head_name: str) -> Optional[FeatureLayer]:
    below = layers_below_head(model, head_name)
    if below is None or type(below[0]) not in _ACTIVATIONS:
        return None
    activation, name, affine = below
    if not isinstance(affine, _AFFINE) or affine.bias is None:
        return None
    return FeatureLayer(bias_name=f"{name}.bias", activation=_ACTIVATIONS[type(activation)],
                        channels=affine.bias.shape[0])


def scale_from_feature_layer(problem: HeadProblem, layer: FeatureLayer, bias_grad: torch.Tensor
                             ) -> Optional[Tuple[float, float]]:
    """``(t, relative residual)`` that best explains the feature layer's bias gradient (``(nan, 1.0)`` when no
    scalar does), or None if the shapes do not match (then the layer is not what produces the head input).

    Args:
        bias_grad: ``(channels,)`` observed dL/db_A.
    """
    d = problem.v.shape[0]
    if bias_grad.shape != (layer.channels,) or d % layer.channels:
        return None
    observed = bias_grad.detach().to(torch.float64)
    norm = float(observed.norm())
    if norm == 0.0 or not bool(torch.isfinite(observed).all()):
        return None
    back = (problem.weight.T @ problem.c.to(problem.weight.dtype)).double().view(layer.channels, -1)  # W^T c per bias
    v = problem.v.view(layer.channels, -1)
    sigma = problem.sigma
    fits: Dict[float, float] = {}
    if layer.activation == "relu":
        for sign in (1.0, -1.0):
            u = (back * (sign * v > 0)).sum(-1)  # dL/db = u / t
            projection = float(u @ observed)
            if projection * sign > 0:
                t = float(u @ u) / projection
                fits[t] = float((u / t - observed).norm()) / norm
    else:  # sigmoid: dL/db = A - t B
        a = (back * sigma * v).sum(-1)
        b = (back * (sigma * v) ** 2).sum(-1)
        if float(b @ b) > 0:
            t = float(b @ (a - observed)) / float(b @ b)
            if t != 0.0:
                fits[t] = float((a - t * b - observed).norm()) / norm
    if not fits:  # no scalar of an admissible sign explains the gradient at all
        return math.nan, 1.0
    t = min(fits, key=fits.get)
    return t, fits[t]
