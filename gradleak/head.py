"""The head ``z = W h + b`` of a classifier and what its single-example gradient pins down.

For soft-target cross-entropy the head's weight gradient is ``G = (p - y) h^T``: rank one. We factor it as
``G = sigma * c v^T`` with unit vectors ``c`` (C,) and ``v`` (d,), and describe every candidate answer by one
scalar ``t``::

    h(t) = t * sigma * v           p(t) = softmax(t * a + b)    with a = sigma * W v
    y(t) = p(t) - c / t            (so that (p(t) - y(t)) h(t)^T == G for every t)

With a bias gradient ``t`` is closed form (``p - y = dL/db``); without one it is the single unknown that the
label's structure has to determine (see :mod:`gradleak.recovery`).

When the gradient arrives scaled by an unknown ``s != 0`` (a weight delta ``-lr * g``, a clipped gradient), the
same factorisation holds with ``p - y = c / alpha`` and ``s = alpha / t``: ``alpha`` is a second unknown, which
the label's structure fixes by a small linear least-squares fit for every ``t`` (variable projection; see the
README, "How it works").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ._checks import as_tensor, check_finite

GradientsLike = Union[Mapping[str, torch.Tensor], Sequence[torch.Tensor]]


@dataclass(frozen=True)
class HeadProblem:
    """The attacker's view of one head gradient: the ``(C, d)`` matrices as given, every vector in float64.

    Attributes:
        weight: ``(C, d)`` head weight W (its own dtype: the big passes over it stay there).
        weight_grad: ``(C, d)`` observed dL/dW (its own dtype).
        bias: ``(C,)`` head bias or None.
        bias_grad: ``(C,)`` observed dL/db or None.
        sigma: largest singular value of ``weight_grad``.
        c: ``(C,)`` unit left factor (direction of ``p - y``).
        v: ``(d,)`` unit right factor (direction of ``h``).
        a: ``(C,)`` ``sigma * W v``: the logits are ``t * a + b``.
        a_abs: ``(C,)`` ``sigma * |W| |v|``: the scale of the sums behind ``a`` (their rounding error is relative
            to it, not to ``a``).
        rank_one_ratio: ``||G - sigma c v^T||_F / ||G||_F``; float rounding gives ~1e-7 (float32), a batch O(1).
        row_sum_error: ``|sum_i c_i|``; Theorem 1 makes it 0 when the label sums to one.
        t_min: smallest admissible ``|alpha|`` (``= |t|`` when the scale is known): ``|p_i - y_i| <= 1`` and
            ``sum_i |p_i - y_i| <= 2``.
        dtype: dtype of the observed gradient (results are returned in it).
        precision: the machine epsilon of the rounding the values actually carry: that of ``dtype``, or of a narrower
            float type when every value is exactly representable in it (float32 gradients cast to float64).
        scale_known: False when the observed gradient is ``s * g`` with an unknown ``s`` (see the module doc).
    """

    weight: torch.Tensor
    weight_grad: torch.Tensor
    bias: Optional[torch.Tensor]
    bias_grad: Optional[torch.Tensor]
    sigma: float
    c: torch.Tensor
    v: torch.Tensor
    a: torch.Tensor
    a_abs: torch.Tensor
    rank_one_ratio: float
    row_sum_error: float
    t_min: float
    dtype: torch.dtype
    precision: float
    scale_known: bool = True

    @property
    def num_classes(self) -> int:
        return self.c.shape[0]

    @property
    def entry_noise(self) -> float:
        """Noise per entry of ``c`` implied by the rank-one residual: ``ratio ||G||`` spread over ``C d`` entries
        reaches each entry of ``c = G v / sigma`` as ``ratio / sqrt(C d)``."""
        return self.rank_one_ratio / (self.num_classes * self.v.shape[0]) ** 0.5

    @property
    def t_lower(self) -> float:
        """Smallest ``|t|`` worth searching: ``t_min`` when the scale is known; otherwise the feature scale is
        free, and below logits spread over 1e-4 the softmax is linear in ``t`` (the label no longer moves)."""
        if self.scale_known:
            return self.t_min
        return 1e-4 / max(float(self.a.max() - self.a.min()), torch.finfo(torch.float64).tiny)

    def logits(self, t: torch.Tensor) -> torch.Tensor:
        """Candidate logits ``(..., C)`` for scalars ``t`` of shape ``(...)``."""
        z = t.unsqueeze(-1) * self.a
        return z if self.bias is None else z + self.bias

    def label(self, t: torch.Tensor) -> torch.Tensor:
        """Candidate labels ``y(t)``, shape ``(..., C)``; each sums to one (Theorem 1)."""
        return torch.softmax(self.logits(t), dim=-1) - self.c / t.unsqueeze(-1)

    def feature(self, t: torch.Tensor) -> torch.Tensor:
        """Candidate head inputs ``h(t)``, shape ``(..., d)``."""
        return t.unsqueeze(-1) * self.sigma * self.v

    def closed_form_t(self) -> Optional[float]:
        """``t`` from the bias gradient (``p - y = dL/db = c / t``), or None without one."""
        if self.bias_grad is None:
            return None
        mu = float(self.c @ self.bias_grad)
        if mu == 0.0:
            raise ValueError("bias_grad is orthogonal to the weight gradient: the gradients are inconsistent")
        return 1.0 / mu


#: Float types narrower than float64, narrowest first: a gradient whose values all fit one carries its rounding.
_NARROWER_FLOATS = (torch.bfloat16, torch.float16, torch.float32)


def storage_precision(values: torch.Tensor, probe: torch.Tensor) -> float:
    """Machine epsilon of the narrowest float type that holds every entry of ``values`` exactly.

    A float32 gradient cast to float64 still carries float32 rounding: judging it by float64's epsilon would
    call every fit a misfit. ``probe`` (a slice of ``values``, e.g. its largest row) is tried first, so that the
    common case (no narrower type fits) costs one pass over the probe only.
    """
    for dtype in _NARROWER_FLOATS:
        if torch.finfo(dtype).eps <= torch.finfo(values.dtype).eps:
            continue
        if bool((probe.to(dtype).to(probe.dtype) == probe).all()) and \
                bool((values.to(dtype).to(values.dtype) == values).all()):
            return torch.finfo(dtype).eps
    return torch.finfo(values.dtype).eps


#: Entries per block when a sum of a (C, d) matrix's rows is accumulated in float64: each block is converted
#: while it is in cache, so no float64 copy of the whole matrix is ever made.
_BLOCK_ENTRIES = 1 << 17


def _row_combination64(weights: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``weights @ matrix`` for a ``(C, d)`` matrix of any float dtype and float64 ``(C,)`` weights, accumulated
    in float64 block by block of rows: ``(d,)`` float64.

    This sum gives the head's feature direction ``v``, which the logits and so the label are read from: on a
    1000 x 2048 ImageNet head, accumulating it in float32 raised the largest label error from 2.6e-6 to 4.3e-5
    (the products with ``v`` itself are accurate enough in the matrix's dtype).
    """
    if matrix.dtype == torch.float64:
        return weights @ matrix
    rows = max(1, _BLOCK_ENTRIES // max(matrix.shape[1], 1))
    return sum(part @ block.double() for part, block in zip(weights.split(rows), matrix.split(rows)))


def factor_head(weight_grad: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                bias_grad: Optional[torch.Tensor] = None, *, rank_one_tol: Optional[float] = 1e-2,
                scale_known: bool = True) -> HeadProblem:
    """Validate one head gradient and factor it as ``sigma * c v^T`` (float64).

    Args:
        weight_grad: ``(C, d)`` dL/dW of one example (or ``s`` times it, with ``scale_known=False``).
        weight: ``(C, d)`` W.
        bias, bias_grad: ``(C,)`` each, or None (a bias-free head).
        rank_one_tol: raise if ``rank_one_ratio`` exceeds it (a batch passed as one example);
            None disables the check (e.g. for gradients with added noise).
        scale_known: False when the gradient is scaled by an unknown non-zero factor.
    """
    weight_grad = as_tensor(weight_grad, "weight_grad")
    weight = as_tensor(weight, "weight")
    if weight_grad.dim() != 2:
        raise ValueError(f"weight_grad must be a (C, d) matrix, got shape {tuple(weight_grad.shape)}")
    if weight.shape != weight_grad.shape:
        raise ValueError(f"weight has shape {tuple(weight.shape)} but weight_grad has {tuple(weight_grad.shape)}")
    num_classes = weight.shape[0]
    if num_classes < 2:
        raise ValueError(f"the head must have at least 2 classes, got {num_classes}")
    for name, value in (("bias", bias), ("bias_grad", bias_grad)):
        if value is not None:
            as_tensor(value, name)
            if value.shape != (num_classes,):
                raise ValueError(f"{name} must have shape ({num_classes},), got {tuple(value.shape)}")
    if bias_grad is not None and bias is None:
        raise ValueError("bias_grad was given without bias: pass the head's bias too")
    for name, value in (("weight_grad", weight_grad), ("weight", weight), ("bias", bias), ("bias_grad", bias_grad)):
        if value is not None:
            check_finite(value, name)
    dtype = weight_grad.dtype
    # The (C, d) matrices are never copied whole to float64 (for a 1000 x 2048 head that copy cost more than the
    # factorisation): the passes over them run in their own dtype, except the sum that gives v (see
    # _row_combination64); the C- and d-sized results are promoted to float64.
    grad, w = weight_grad.detach(), weight.detach()
    row_norms = torch.linalg.vector_norm(grad, dim=1).double()
    norm = float(torch.linalg.vector_norm(row_norms))
    if norm == 0.0:
        raise ValueError("weight_grad is all zeros: the example's loss gradient vanished, nothing to recover")
    # One power-iteration step from the largest row: G is rank one up to rounding (or noise), and that row is
    # already its right factor up to rounding; the step averages the noise over all rows and columns.
    largest = row_norms.argmax()
    precision = storage_precision(grad, grad[largest])
    start = (grad @ grad[largest]).double()  # only a direction to start from: its own dtype is enough
    v = _row_combination64(start, grad)
    v = v / torch.linalg.vector_norm(v)
    c = (grad @ v.to(dtype)).double()
    sigma = float(torch.linalg.vector_norm(c))
    c = c / sigma
    # measured on the residual itself: ||G||^2 - sigma^2 would cancel to nothing below sqrt(eps) of the dtype
    residual = torch.addr(grad, c.to(dtype), v.to(dtype), alpha=-sigma)
    rank_one_ratio = float(torch.linalg.vector_norm(residual)) / norm  # a ratio: the dtype's sums are plenty
    if rank_one_tol is not None and rank_one_ratio > rank_one_tol:
        raise ValueError(
            f"weight_grad is not rank one (relative residual {rank_one_ratio:.3g} > {rank_one_tol:g}): it looks "
            "like the gradient of a batch, not of one example (or an update of several local steps: pass "
            "rank_one_tol=None to get a best guess)")
    a = sigma * (w @ v.to(w.dtype)).double()
    a_abs = sigma * (w.abs() @ v.abs().to(w.dtype)).double()
    return HeadProblem(
        weight=w, weight_grad=grad,
        bias=None if bias is None else bias.detach().to(torch.float64),
        bias_grad=None if bias_grad is None else bias_grad.detach().to(torch.float64),
        sigma=sigma, c=c, v=v, a=a, a_abs=a_abs, rank_one_ratio=rank_one_ratio,
        row_sum_error=float(c.sum().abs()), t_min=float(torch.maximum(c.abs().max(), c.abs().sum() / 2)),
        dtype=dtype, precision=precision, scale_known=scale_known)


def find_head(model: nn.Module, head: Union[str, nn.Linear, None] = None) -> Tuple[str, nn.Linear]:
    """The classifier head: ``head`` if given (a module name or the module), else the last ``nn.Linear``.

    Returns ``(qualified module name, module)``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    modules = dict(model.named_modules())
    if isinstance(head, str):
        if head not in modules:
            raise ValueError(f"model has no module named {head!r}")
        found = [(head, modules[head])]
    elif isinstance(head, nn.Module):
        found = [(name, m) for name, m in modules.items() if m is head]
        if not found:
            raise ValueError("the given head module is not part of the model")
    else:
        found = [(name, m) for name, m in modules.items() if isinstance(m, nn.Linear)][-1:]
        if not found:
            raise TypeError(f"{type(model).__name__} has no nn.Linear layer: gradleak needs a fully connected head")
    name, module = found[0]
    if not isinstance(module, nn.Linear):
        raise TypeError(f"the head {name!r} is a {type(module).__name__}, not an nn.Linear")
    return name, module


def named_gradients(model: nn.Module, gradients: GradientsLike) -> Mapping[str, torch.Tensor]:
    """``{parameter name: gradient}`` from a mapping (returned as it is, so that a lazy mapping computes only the
    entries that are read) or a sequence aligned with ``model.parameters()``."""
    names = [name for name, _ in model.named_parameters()]
    if isinstance(gradients, Mapping):
        known = set(names)
        unknown = [name for name in gradients if name not in known]
        if unknown:
            raise ValueError(f"gradients name parameters the model does not have: {unknown[:5]}")
        return gradients
    if isinstance(gradients, Sequence) and not isinstance(gradients, torch.Tensor):
        if len(gradients) != len(names):
            raise ValueError(f"got {len(gradients)} gradients for a model with {len(names)} parameters")
        return dict(zip(names, gradients))
    raise TypeError("gradients must be a dict name -> tensor or a sequence aligned with model.parameters()")


def head_gradients(model: nn.Module, gradients: GradientsLike,
                   head: Union[str, nn.Linear, Tuple[str, nn.Linear], None] = None) -> Dict[str, Optional[torch.Tensor]]:
    """Pick the head's parameters and their gradients out of a model's gradients.

    Args:
        gradients: ``{parameter name: gradient}`` or a sequence aligned with ``model.parameters()``.
        head: as for :func:`find_head`, or its ``(name, module)`` answer.

    Returns:
        ``dict(weight=, weight_grad=, bias=, bias_grad=)`` (bias entries None for a bias-free head).
    """
    name, module = head if isinstance(head, tuple) else find_head(model, head)
    # a mapping is used as it is (only the head's entries are read); a sequence is named first
    named = gradients if isinstance(gradients, Mapping) else named_gradients(model, gradients)
    prefix = f"{name}." if name else ""
    if prefix + "weight" not in named:
        raise ValueError(f"gradients have no entry for the head weight {prefix + 'weight'!r}")
    has_bias = module.bias is not None
    bias_grad = named.get(prefix + "bias") if has_bias else None
    if has_bias and bias_grad is None:
        raise ValueError(f"the head has a bias but gradients have no entry {prefix + 'bias'!r}")
    return dict(weight=module.weight, weight_grad=named[prefix + "weight"],
                bias=module.bias if has_bias else None, bias_grad=bias_grad)
