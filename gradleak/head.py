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

Many gradients of one head (``N`` examples, each its own) are factored together (:func:`factor_heads`, a
:class:`HeadBatch`); :class:`HeadProblem` is one of them. Every product over the ``(C, d)`` matrices is one
row vector times one matrix per example (a batched ``(1, k) x (k, m)`` product, in the matrices' dtype): it
makes no ``(C, d)`` temporary, and each example gets the same bits whatever ``N`` is, where a single
``(N, k) x (k, m)`` product's blocking (and so its rounding) would depend on ``N``. The vectors are float64.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import ClassVar, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ._checks import as_tensor, check_finite

GradientsLike = Union[Mapping[str, torch.Tensor], Sequence[torch.Tensor]]


def per_example(values: torch.Tensor, dims: int) -> torch.Tensor:
    """``values`` ``(N, *tail)`` (one entry per example) viewed as ``(N, 1, ..., 1, *tail)``, with ``dims - 1``
    ones, so that it broadcasts against the entries of a tensor ``(N, *inner)`` of ``dims`` dimensions."""
    return values.view(values.shape[0], *([1] * (dims - 1)), *values.shape[1:])


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
        row_ratio: ``(C,)`` the same residual row by row, ``||G_i - sigma c_i v|| / ||G||_F`` (its norm is
            ``rank_one_ratio``): a network rounds each ``p_i - y_i`` relative to itself, so a row 1e-9 of the
            largest carries 1e-9 of its noise, where added noise (DP, a weight delta's rounding) reaches every row.
        row_sum_error: ``|sum_i c_i|``; Theorem 1 makes it 0 when the label sums to one.
        t_min: smallest admissible ``|alpha|`` (``= |t|`` when the scale is known): ``|p_i - y_i| <= 1`` and
            ``sum_i |p_i - y_i| <= 2``.
        dtype: dtype of the observed gradient (results are returned in it).
        precision: the machine epsilon of the rounding the values actually carry: that of ``dtype``, or of a narrower
            float type when every value is exactly representable in it (float32 gradients cast to float64).
        scale_known: False when the observed gradient is ``s * g`` with an unknown ``s`` (see the module doc).
        derived_error: for a gradient derived from a batch's split, the error every entry of its ``p - y`` carries
            relative to the largest one (a least-squares solve spreads its rounding over all of them, where a
            network's own ``p_i - y_i`` is rounded relative to itself); None for a gradient as computed.
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
    row_ratio: torch.Tensor
    row_sum_error: float
    t_min: float
    dtype: torch.dtype
    precision: float
    scale_known: bool = True
    derived_error: Optional[float] = None
    #: the batch of one this problem was read from (:meth:`HeadBatch.problem`): :meth:`HeadBatch.of` gives it back
    #: without converting every field again; not an argument, so ``dataclasses.replace`` leaves it out
    origin: Optional["HeadBatch"] = field(default=None, init=False, repr=False, compare=False)

    @property
    def num_classes(self) -> int:
        return self.c.shape[0]

    @property
    def entry_noise(self) -> float:
        """Noise per entry of ``c`` implied by the rank-one residual: ``ratio ||G||`` spread over ``C d`` entries
        reaches each entry of ``c = G v / sigma`` as ``ratio / sqrt(C d)``; a ``derived_error`` adds that fraction of
        the largest entry of ``c`` to every entry."""
        return float(HeadBatch.of(self).entry_noise[0])

    @property
    def t_lower(self) -> float:
        """Smallest ``|t|`` worth searching (see :attr:`HeadBatch.t_lower`)."""
        return float(HeadBatch.of(self).t_lower[0])

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
        return float(HeadBatch.of(self).closed_form_t()[0])


@dataclass(frozen=True)
class HeadBatch:
    """N gradients of one head, factored together: :class:`HeadProblem` with a leading batch dimension ``N`` on
    every per-example field (row ``i`` is :meth:`problem` ``(i)``). The recovery pipeline works on batches; one
    gradient is a batch of one (:meth:`of`).

    Attributes:
        weight: ``(C, d)`` W (shared); bias: ``(C,)`` float64 or None (shared).
        weight_grad: ``(N, C, d)`` observed dL/dW per example (its own dtype), or None (see :meth:`select`);
            bias_grad: ``(N, C)`` float64 or None.
        sigma, rank_one_ratio, row_sum_error, t_min, precision: ``(N,)`` float64; derived_error: ``(N,)`` float64
            or None.
        c, a, a_abs, row_ratio: ``(N, C)`` float64; v: ``(N, d)`` float64, or None (see :meth:`select`).
        dtype, scale_known: shared by the batch.
        (Each as in :class:`HeadProblem`.)
    """

    weight: torch.Tensor
    weight_grad: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    bias_grad: Optional[torch.Tensor]
    sigma: torch.Tensor
    c: torch.Tensor
    v: Optional[torch.Tensor]
    a: torch.Tensor
    a_abs: torch.Tensor
    rank_one_ratio: torch.Tensor
    row_ratio: torch.Tensor
    row_sum_error: torch.Tensor
    t_min: torch.Tensor
    dtype: torch.dtype
    precision: torch.Tensor
    scale_known: bool = True
    derived_error: Optional[torch.Tensor] = None

    #: The fields with one entry per example (the others are shared).
    PER_EXAMPLE: ClassVar[Tuple[str, ...]] = ("weight_grad", "bias_grad", "sigma", "c", "v", "a", "a_abs",
                                              "rank_one_ratio", "row_ratio", "row_sum_error", "t_min", "precision",
                                              "derived_error")

    def __len__(self) -> int:
        return self.c.shape[0]

    @property
    def num_classes(self) -> int:
        return self.c.shape[-1]

    @functools.cached_property
    def entry_noise(self) -> torch.Tensor:
        """``(N,)``: see :attr:`HeadProblem.entry_noise`."""
        noise = self.rank_one_ratio / (self.num_classes * self.v.shape[-1]) ** 0.5
        return noise if self.derived_error is None else noise + self.derived_error * self.c_max

    @functools.cached_property
    def class_noise(self) -> torch.Tensor:
        """``(N, C)``: the noise on each entry of ``c``. A row whose rank-one residual is within
        ``ROW_ROUNDINGS`` roundings of its own size was rounded relative to itself (a network's ``(p_i - y_i) h``):
        its noise is its own, ``row_ratio_i / sqrt(d)``. Any other row carries noise from outside the network
        (DP, local steps, a weight delta's rounding, which can round a small row away entirely and leave it a
        residual as small as itself): :attr:`entry_noise`, the rows' mean."""
        shared = self.entry_noise.unsqueeze(-1)
        if self.derived_error is not None:  # a solve spreads its rounding over every entry (see derived_error)
            return shared.expand_as(self.c)
        own = self.row_ratio < ROW_ROUNDINGS * self.precision.unsqueeze(-1) * self.c.abs()
        return torch.where(own, self.row_ratio / self.v.shape[-1] ** 0.5, shared)

    @functools.cached_property
    def underflow(self) -> torch.Tensor:
        """``(N,)`` the smallest normal number of the float type whose rounding the values carry (the type of
        :attr:`precision`; the gradient's dtype where a precision was set by hand): below it a network's ``p_i``
        and ``p_i - y_i`` (and the gradient's rows) are rounded to a fixed step, no longer relative to themselves."""
        out = torch.full_like(self.precision, torch.finfo(self.dtype).tiny)
        for dtype in _NARROWER_FLOATS:
            out = torch.where(self.precision == torch.finfo(dtype).eps, torch.finfo(dtype).tiny, out)
        return out

    @functools.cached_property
    def c_max(self) -> torch.Tensor:
        """``(N,)`` the largest ``|c_i|``."""
        return self.c.abs().amax(-1)

    @functools.cached_property
    def a_abs_max(self) -> torch.Tensor:
        """``(N,)`` the largest entry of ``a_abs``."""
        return self.a_abs.amax(-1)

    @functools.cached_property
    def t_lower(self) -> torch.Tensor:
        """``(N,)`` smallest ``|t|`` worth searching: ``t_min`` when the scale is known; otherwise the feature
        scale is free, and below logits spread over 1e-4 the softmax is linear in ``t`` (the label no longer
        moves)."""
        if self.scale_known:
            return self.t_min
        spread = (self.a.amax(-1) - self.a.amin(-1)).clamp_min(torch.finfo(torch.float64).tiny)
        return 1e-4 / spread

    @functools.cached_property
    def feature_sign(self) -> torch.Tensor:
        """``(N,)``: +1 / -1 where ``v`` is single-signed (the features can be non-negative only with that sign of
        ``t``), else 0."""
        v = self.v
        floor = 1e-12 * v.abs().amax(-1, keepdim=True)
        return torch.where((v >= -floor).all(-1), 1, torch.where((v <= floor).all(-1), -1, 0))

    def broadcast(self, name: str, like: torch.Tensor, trailing: int = 0) -> torch.Tensor:
        """The per-example quantity ``name`` (a field or property with a leading ``N``) viewed to broadcast against
        the entries of ``like`` (N, ..., and ``trailing`` dimensions of the quantity's own, e.g. the classes)
        (:func:`per_example`), made once per batch and shape: the pipeline asks for the same few views at every
        step."""
        views = self.__dict__.setdefault("_views", {})  # frozen: a cache beside the fields, as cached_property
        key = (name, like.dim() - trailing)
        if key not in views:
            views[key] = per_example(getattr(self, name), key[1])
        return views[key]

    def logits(self, t: torch.Tensor) -> torch.Tensor:
        """Candidate logits ``(N, ..., C)`` for scalars ``t`` of shape ``(N, ...)``."""
        z = t.unsqueeze(-1) * self.broadcast("a", t)
        return z if self.bias is None else z + self.bias

    def softmax(self, t: torch.Tensor) -> torch.Tensor:
        """Candidate predictions ``softmax(logits(t))``, ``(N, ..., C)`` for scalars ``t`` of shape ``(N, ...)``.

        Written out (the logits shifted by their largest, exponentiated, normalised): over few classes and many
        candidates ``torch.softmax`` is several times slower (a 1000 x 18 x 10 float64 stack took 4.5 ms against
        0.7 ms), and the recovery takes hundreds of them."""
        shifted = self.logits(t)
        shifted = shifted.sub_(shifted.amax(-1, keepdim=True)).exp_()
        return shifted.div_(shifted.sum(-1, keepdim=True))

    def feature(self, t: torch.Tensor) -> torch.Tensor:
        """Candidate head inputs ``(N, ..., d)`` for scalars ``t`` of shape ``(N, ...)``."""
        return (t * self.broadcast("sigma", t)).unsqueeze(-1) * self.broadcast("v", t)

    def closed_form_t(self) -> Optional[torch.Tensor]:
        """``(N,)`` ``t`` from the bias gradients (``p - y = dL/db = c / t``), or None without them."""
        if self.bias_grad is None:
            return None
        mu = (self.c * self.bias_grad).sum(-1)
        if bool((mu == 0).any()):
            raise ValueError(f"bias_grad is orthogonal to the weight gradient{example_rows(mu == 0, len(self))}: "
                             "the gradients are inconsistent")
        return 1.0 / mu

    def select(self, rows: torch.Tensor, *, features: bool = True) -> "HeadBatch":
        """The examples ``rows`` (indices, repeats allowed, or a boolean mask) as a batch.

        ``features=False`` leaves out the fields with a feature dimension (``weight_grad`` and ``v`` are None):
        a batch for the equations in the scalars ``t`` alone (logits, softmax, labels), where copying ``d``
        entries per row, once per candidate, would cost more than the equations."""
        left_out = () if features else ("weight_grad", "v")
        return dataclasses.replace(self, **{name: None if getattr(self, name) is None or name in left_out
                                            else getattr(self, name)[rows] for name in self.PER_EXAMPLE})

    def split(self, size: int) -> Tuple["HeadBatch", ...]:
        """The batch in consecutive blocks of ``size`` examples (views, no copies)."""
        return tuple(self.select(slice(start, start + size)) for start in range(0, len(self), size))

    def problem(self, index: int) -> HeadProblem:
        """Example ``index`` as a :class:`HeadProblem`."""
        row = {name: None if getattr(self, name) is None else getattr(self, name)[index]
               for name in self.PER_EXAMPLE}
        scalars = {name: float(row[name]) for name in ("sigma", "rank_one_ratio", "row_sum_error", "t_min",
                                                       "precision", "derived_error") if row[name] is not None}
        problem = HeadProblem(**dict(row, **scalars), weight=self.weight, bias=self.bias, dtype=self.dtype,
                              scale_known=self.scale_known)
        if len(self) == 1:
            object.__setattr__(problem, "origin", self)  # frozen: set once, here
        return problem

    @classmethod
    def of(cls, problem: HeadProblem) -> "HeadBatch":
        """``problem`` as a batch of one."""
        if problem.origin is not None:
            return problem.origin
        fields = {}
        for name in cls.PER_EXAMPLE:
            value = getattr(problem, name)
            fields[name] = torch.tensor([value], dtype=torch.float64, device=problem.c.device) \
                if isinstance(value, float) else None if value is None else value.unsqueeze(0)
        return cls(**fields, weight=problem.weight, bias=problem.bias, dtype=problem.dtype,
                   scale_known=problem.scale_known)


def example_rows(flags: torch.Tensor, size: int) -> str:
    """`` (examples [i, ...])`` naming the examples ``flags`` (N,) marks in a batch of ``size``, for an error
    message; "" for a batch of one (a single example's message needs no index)."""
    if size == 1:
        return ""
    rows = flags.nonzero().flatten().tolist()
    return f" (examples {rows[:10]}{' ...' if len(rows) > 10 else ''})"


#: How many roundings of its own size a row's rank-one residual may be for the row to count as rounded relative to
#: itself (:attr:`HeadBatch.class_noise`).
ROW_ROUNDINGS = 100.0

#: Float types narrower than float64, narrowest first: a gradient whose values all fit one carries its rounding.
_NARROWER_FLOATS = (torch.bfloat16, torch.float16, torch.float32)


def storage_precision(values: torch.Tensor, probe: torch.Tensor) -> Union[float, torch.Tensor]:
    """Machine epsilon of the narrowest float type that holds every entry of ``values`` exactly.

    A float32 gradient cast to float64 still carries float32 rounding: judging it by float64's epsilon would
    call every fit a misfit. ``probe`` (a slice of ``values``, e.g. its largest row) is tried first, so that the
    common case (no narrower type fits) costs one pass over the probe only.

    Args:
        values: ``(C, d)``, or ``(N, C, d)`` for N examples at once.
        probe: ``(d,)``, or ``(N, d)``.

    Returns:
        A float, or ``(N,)`` float64 epsilons with a leading batch dimension.
    """
    if values.dim() == 2:
        return float(storage_precision(values.unsqueeze(0), probe.unsqueeze(0))[0])
    out = torch.full((values.shape[0],), torch.finfo(values.dtype).eps, dtype=torch.float64, device=values.device)
    settled = torch.zeros_like(out, dtype=torch.bool)
    for dtype in _NARROWER_FLOATS:
        if torch.finfo(dtype).eps <= torch.finfo(values.dtype).eps:
            continue
        fits = ~settled & (probe.to(dtype).to(probe.dtype) == probe).all(-1)
        if bool(fits.any()):
            rows = fits.nonzero().flatten()
            fits[rows] = (values[rows].to(dtype).to(values.dtype) == values[rows]).flatten(1).all(-1)
            out[fits] = torch.finfo(dtype).eps
            settled |= fits
    return out


#: Entries per block of the passes over many entries (a float64 block is 1 MiB): each block's temporaries stay in
#: cache, and no float64 copy of a whole (C, d) matrix is ever made.
_BLOCK_ENTRIES = 1 << 17


#: Entries per block of examples of the factorisation: its passes make C- and d-sized results per example and one
#: scratch block for the residual, so its blocks can be larger, and with small heads the cost of each op, not the
#: memory, dominated (a (1000, 10, 512) float32 stack took 24-28 ms in blocks of 25 examples, 9-13 ms in blocks of
#: 204, with the same bits).
_FACTOR_BLOCK_ENTRIES = 1 << 20


def examples_per_block(entries_per_example: int, block_entries: int = _BLOCK_ENTRIES) -> int:
    """How many examples whose pass touches ``entries_per_example`` entries each fill one block of
    ``block_entries`` (at least one)."""
    return max(1, block_entries // max(entries_per_example, 1))


def factor_heads(weight_grads: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 bias_grads: Optional[torch.Tensor] = None, *, rank_one_tol: Optional[float] = 1e-2,
                 scale_known: bool = True) -> HeadBatch:
    """Validate N gradients of one head and factor each as ``sigma * c v^T`` (float64), all at once.

    Args:
        weight_grads: ``(N, C, d)`` dL/dW of N examples, one each (or ``s`` times it, with ``scale_known=False``).
        weight: ``(C, d)`` W.
        bias: ``(C,)`` or None; bias_grads: ``(N, C)`` or None (a bias-free head, or the bias gradients not given).
        rank_one_tol, scale_known: as for :func:`factor_head`, for every example.
    """
    return _factor(weight_grads, weight, bias, bias_grads, rank_one_tol=rank_one_tol, scale_known=scale_known,
                   names=("weight_grads", "bias_grads"))


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
    return _factor(weight_grad, weight, bias, bias_grad, rank_one_tol=rank_one_tol, scale_known=scale_known,
                   names=("weight_grad", "bias_grad")).problem(0)


def _factor(weight_grads: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
            bias_grads: Optional[torch.Tensor], *, rank_one_tol: Optional[float], scale_known: bool,
            names: Tuple[str, str]) -> HeadBatch:
    """:func:`factor_heads`, or :func:`factor_head` when ``names`` are the single-example ones (then the
    gradients have no batch dimension, and one is added)."""
    grad_name, bias_grad_name = names
    single = grad_name == "weight_grad"
    weight_grads = as_tensor(weight_grads, grad_name)
    weight = as_tensor(weight, "weight")
    if weight_grads.dim() != 2 + (not single):
        shape = "a (C, d) matrix" if single else "an (N, C, d) stack of (C, d) matrices"
        raise ValueError(f"{grad_name} must be {shape}, got shape {tuple(weight_grads.shape)}")
    if weight.dim() != 2 or weight.shape != weight_grads.shape[-2:]:
        raise ValueError(f"weight has shape {tuple(weight.shape)} but {grad_name} has {tuple(weight_grads.shape)}")
    if not single and weight_grads.shape[0] == 0:
        raise ValueError(f"{grad_name} holds no example (shape {tuple(weight_grads.shape)})")
    num_classes = weight.shape[0]
    if num_classes < 2:
        raise ValueError(f"the head must have at least 2 classes, got {num_classes}")
    count = 1 if single else weight_grads.shape[0]
    for name, value, shape in (("bias", bias, (num_classes,)),
                               (bias_grad_name, bias_grads, (num_classes,) if single else (count, num_classes))):
        if value is not None:
            as_tensor(value, name)
            if value.shape != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(value.shape)}")
    if bias_grads is not None and bias is None:
        raise ValueError(f"{bias_grad_name} was given without bias: pass the head's bias too")
    if single:
        weight_grads = weight_grads.unsqueeze(0)
        bias_grads = None if bias_grads is None else bias_grads.unsqueeze(0)
    grad, w = weight_grads.detach(), weight.detach()
    # block by block of examples (a (1000, 10, 512) stack went from 220 ms in one piece to 30 ms in blocks of 1 MiB;
    # see _FACTOR_BLOCK_ENTRIES for the rest), and each example's arithmetic is the same whatever block it is in
    size = examples_per_block(grad[0].numel(), _FACTOR_BLOCK_ENTRIES)
    blocks = [_factor_block(part, w) for part in grad.split(size)]
    found = blocks[0] if len(blocks) == 1 else {name: torch.cat([block[name] for block in blocks])
                                                for name in blocks[0]}
    norm, rank_one_ratio = found.pop("norm"), found["rank_one_ratio"]
    # The big matrices' finiteness is read off sums the factorisation made anyway (a NaN or inf entry makes its
    # norm, or its term of |W| |v|, non-finite), instead of a pass of their own; only then is the culprit looked
    # for, in the order the checks have always run.
    summaries = ((grad_name, weight_grads, norm), ("weight", weight, found["a_abs"]), ("bias", bias, None),
                 (bias_grad_name, bias_grads, None))
    for name, value, summary in summaries:
        if value is not None and (summary is None or not bool(summary.isfinite().all())):
            check_finite(value, name)
    found["precision"] = storage_precision(grad, found.pop("largest"))
    if bool((norm == 0).any()):
        raise ValueError(f"{grad_name} is all zeros{example_rows(norm == 0, count)}: the example's loss gradient "
                         "vanished, nothing to recover")
    if rank_one_tol is not None and bool((rank_one_ratio > rank_one_tol).any()):
        worst = float(rank_one_ratio.max())
        raise ValueError(
            f"{grad_name} is not rank one{example_rows(rank_one_ratio > rank_one_tol, count)} (relative residual "
            f"{worst:.3g} > {rank_one_tol:g}): it looks like the gradient of a batch, not of one example (or an "
            "update of several local steps: pass rank_one_tol=None to get a best guess)")
    abs_c = found["c"].abs()
    return HeadBatch(
        weight=w, weight_grad=grad,
        bias=None if bias is None else bias.detach().to(torch.float64),
        bias_grad=None if bias_grads is None else bias_grads.detach().to(torch.float64),
        row_sum_error=found["c"].sum(-1).abs(), t_min=torch.maximum(abs_c.amax(-1), abs_c.sum(-1) / 2),
        dtype=grad.dtype, scale_known=scale_known, **found)


def _times(vectors: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """``vectors[n] @ matrices[n]`` for each example: ``(N, m)`` from ``(N, k)`` and ``(N, k, m)`` (a shared matrix
    is passed expanded, without a copy).

    One (1, k) x (k, m) product per example, in the matrices' dtype: no (k, m) temporary is made, and each example
    gets the same bits whatever N is (a single (N, k) x (k, m) product's blocking, and so its rounding, depends on
    N; see the module doc).
    """
    return torch.bmm(vectors.unsqueeze(-2), matrices).squeeze(-2)


def _factor_block(grad: torch.Tensor, w: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The factorisation of a block of examples' gradients ``grad`` (n, C, d) of the head ``w`` (C, d): their
    norms, largest rows and the :class:`HeadBatch` fields ``sigma, c, v, a, a_abs, rank_one_ratio, row_ratio``
    (n, ...).

    Every pass over the (C, d) matrices runs in their own dtype and makes no (C, d) temporary (for a 1000 x 2048
    head, writing one cost more than the whole factorisation): matrix-vector products, and row block by row block
    where entries must be visited one by one. The C- and d-sized results are promoted to float64.
    """
    dtype = grad.dtype
    row_norms = torch.linalg.vector_norm(grad, dim=-1).double()
    norm = torch.linalg.vector_norm(row_norms, dim=-1)
    # One power-iteration step from the largest row: G is rank one up to rounding (or noise), and that row is
    # already its right factor up to rounding; the step averages the noise over all rows and columns.
    largest = grad[torch.arange(grad.shape[0], device=grad.device), row_norms.argmax(-1)]
    transposed = grad.transpose(-1, -2)
    v = _times(_times(largest, transposed), grad).double()
    v = v / torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    low_v = v.to(dtype)
    c = _times(low_v, transposed).double()
    sigma = torch.linalg.vector_norm(c, dim=-1)
    c = c / sigma.unsqueeze(-1)
    # measured on the residual itself: ||G||^2 - sigma^2 would cancel to nothing below sqrt(eps) of the dtype
    outer = (sigma.unsqueeze(-1) * c).to(dtype).unsqueeze(-1)
    # The passes that visit entries one by one run block by block of rows, each written into one scratch block: a
    # fresh (C, d) temporary, or even a fresh block each time, is memory fresh from the system, whose page faults
    # cost more than the arithmetic.
    rows = examples_per_block(grad.shape[-1])
    scratch = grad.new_empty((*grad.shape[:-2], min(rows, grad.shape[-2]), grad.shape[-1]))
    row_residuals = []
    for block, part in zip(grad.split(rows, -2), outer.split(rows, -2)):
        residual = torch.addcmul(block, part, low_v.unsqueeze(-2), value=-1, out=scratch[..., :block.shape[-2], :])
        row_residuals.append(torch.linalg.vector_norm(residual, dim=-1))
    row_ratio = torch.cat(row_residuals, -1).double() / norm.unsqueeze(-1)  # the dtype's own sums are accurate enough
    rank_one_ratio = torch.linalg.vector_norm(row_ratio, dim=-1)
    # a = sigma W v; a_abs = sigma |W| |v|, the scale of the sums behind a (their rounding is relative to it)
    v_w = v.to(w.dtype)
    a = sigma.unsqueeze(-1) * _times(v_w, w.T.expand(len(v), -1, -1)).double()
    magnitude, scratch = v_w.abs(), w.new_empty(min(rows, w.shape[0]), w.shape[1])
    a_abs = torch.cat([_times(magnitude, torch.abs(block, out=scratch[:len(block)]).T.expand(len(v), -1, -1))
                       for block in w.split(rows)], -1)
    a_abs = sigma.unsqueeze(-1) * a_abs.double()
    return dict(norm=norm, largest=largest, sigma=sigma, c=c, v=v, a=a, a_abs=a_abs,
                rank_one_ratio=rank_one_ratio, row_ratio=row_ratio)


def find_head(model: nn.Module, head: Union[str, nn.Linear, None] = None) -> Tuple[str, nn.Linear]:
    """The classifier head: ``head`` if given (a module name or the module), else the last ``nn.Linear``.

    Returns ``(qualified module name, module)``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(head, str):
        try:
            found = [(head, model.get_submodule(head))]
        except AttributeError:
            raise ValueError(f"model has no module named {head!r}") from None
    elif isinstance(head, nn.Module):
        found = [(name, m) for name, m in model.named_modules() if m is head]
        if not found:
            raise ValueError("the given head module is not part of the model")
    else:
        found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)][-1:]
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
