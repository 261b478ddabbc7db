"""Batch label-recovery baselines: what earlier attacks read off the head gradient of a whole mini-batch.

A client averages the soft-target cross-entropy over a batch of ``B`` examples; for a head ``z = W h + b`` the
head's gradients are::

    dL/dW = (1/B) sum_k (p_k - y_k) h_k^T   (C, d)        dL/db = (1/B) sum_k (p_k - y_k)   (C,)

The attacker sees the model, these gradients and (for most baselines) ``B``; never the inputs or the labels.
Every baseline here assumes hard labels, and was written from its paper and its authors' public code:

* ``"ilrg"``: iLRG (Ma et al., ICLR 2023, "Instance-wise Batch Label Restoration via Gradients in Federated
  Learning"). Needs a head bias. Per-class counts from a linear system solved by pseudo-inverse.
* ``"llg"``, ``"llg*"``, ``"llg+"``: LLG (Wainakh et al., PoPETs 2022, "User-Level Label Leakage from Gradients
  in Federated Learning"). Row sums of ``dL/dW``; negative ones mark present classes, then a per-occurrence
  "impact" is subtracted greedily until ``B`` labels are chosen. LLG estimates the impact from the gradient
  alone, LLG* from dummy inputs run through the model, LLG+ from auxiliary labelled data.
* ``"yin"``: GradInversion's batch label rule (Yin et al., CVPR 2021): the ``B`` classes whose row of ``dL/dW``
  has the lowest minimum. Assumes no label repeats in the batch.
* ``"idlg"``: iDLG (Zhao et al., 2020) extended to batches as iLRG's paper evaluates it: the classes whose row
  sum of ``dL/dW`` is negative. A set of classes, no counts.

Every function has the signature ``fn(model, gradients, batch_size, **options) -> BatchBaselineResult``
(``gradients``: ``{parameter name: gradient}`` or a sequence aligned with ``model.parameters()``); see
:data:`BATCH_BASELINES`. Each raises ``ValueError`` naming the reason when it cannot apply.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from .._checks import as_tensor, check_finite, positive_int
from ..head import GradientsLike, find_head, head_gradients

__all__ = ["BatchBaselineResult", "BATCH_BASELINES", "ilrg", "llg", "llg_star", "llg_plus", "yin", "idlg"]


@dataclass(frozen=True)
class BatchBaselineResult:
    """A batch label-recovery baseline's answer.

    Attributes:
        counts: ``(C,)`` int64 number of examples of each class (sums to ``B``), or None when the method only
            tells which classes are present (``"idlg"``).
        classes: the classes judged present, ascending.
        labels: one class per example, ascending (a gradient does not tell the batch's order), length ``B``;
            None when the method gives no counts.
        method: the baseline's name (its key in :data:`BATCH_BASELINES`).
        scores: ``(C,)`` float64, the per-class quantity the method reads: iLRG's least-squares counts before
            rounding, LLG's row sums (less the estimated offset for LLG* and LLG+), Yin's row minima, iDLG's row
            sums.
    """

    counts: Optional[torch.Tensor]
    classes: Tuple[int, ...]
    labels: Optional[Tuple[int, ...]]
    method: str
    scores: torch.Tensor


@dataclass(frozen=True)
class _Head:
    """The head's parameters and gradients in float64; bias entries None for a bias-free head."""

    weight: torch.Tensor       # (C, d)
    weight_grad: torch.Tensor  # (C, d)
    bias: Optional[torch.Tensor]       # (C,)
    bias_grad: Optional[torch.Tensor]  # (C,)

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]


def _read_head(model: nn.Module, gradients: GradientsLike) -> _Head:
    parts = head_gradients(model, gradients)
    weight, weight_grad = parts["weight"], as_tensor(parts["weight_grad"], "weight_grad")
    if weight_grad.shape != weight.shape:
        raise ValueError(f"the head weight has shape {tuple(weight.shape)} but its gradient has "
                         f"{tuple(weight_grad.shape)}")
    if weight.shape[0] < 2:
        raise ValueError(f"the head must have at least 2 classes, got {weight.shape[0]}")
    check_finite(weight_grad, "weight_grad")
    bias, bias_grad = parts["bias"], parts["bias_grad"]
    if bias_grad is not None:
        as_tensor(bias_grad, "bias_grad")
        if bias_grad.shape != bias.shape:
            raise ValueError(f"the head bias has shape {tuple(bias.shape)} but its gradient has "
                             f"{tuple(bias_grad.shape)}")
        check_finite(bias_grad, "bias_grad")
    return _Head(*(None if t is None else t.detach().to(torch.float64) for t in (weight, weight_grad, bias, bias_grad)))


def _from_counts(counts: torch.Tensor, method: str, scores: torch.Tensor) -> BatchBaselineResult:
    classes = torch.arange(counts.shape[0], device=counts.device)
    labels = torch.repeat_interleave(classes, counts)
    return BatchBaselineResult(counts=counts, classes=tuple(classes[counts > 0].tolist()),
                               labels=tuple(labels.tolist()), method=method, scores=scores)


# --------------------------------------------------------------------------------------------------------------
# iLRG
# --------------------------------------------------------------------------------------------------------------

def _round_to_total(solution: torch.Tensor, total: int) -> torch.Tensor:
    """iLRG's rounding of the least-squares counts to integers that sum to ``total``.

    Negative entries become 0, the rest are rounded, and an entry above ``total`` (no such count exists) becomes 0.
    If the sum is off by ``e``, the ``|e|`` entries rounded the furthest in the wrong direction move by one: down
    for the most rounded-up ones, up for the most rounded-down ones. Two departures from the official code, which
    corrects once: only positive counts move down (there, a count clipped from a negative value could become -1),
    and the pass is repeated until the sum is ``total`` (needed only when ``|e|`` exceeds the entries that can
    move). Its upward branch slices ``[:e]`` with ``e < 0``, i.e. all but ``|e|`` entries, a bug not reproduced.
    """
    counts = solution.clamp(min=0).round()
    counts = torch.where(counts <= total, counts, torch.zeros_like(counts)).to(torch.int64)
    excess = int(counts.sum()) - total
    while excess != 0:
        err = counts - solution
        if excess > 0:
            err = torch.where(counts > 0, err, torch.full_like(err, -torch.inf))
            moved = err.argsort(descending=True, stable=True)[:min(excess, int((counts > 0).sum()))]
            counts[moved] -= 1
        else:
            moved = err.argsort(stable=True)[:-excess]
            counts[moved] += 1
        excess = int(counts.sum()) - total
    return counts


def ilrg(model: nn.Module, gradients: GradientsLike, batch_size: int) -> BatchBaselineResult:
    """iLRG (Ma et al., ICLR 2023): per-class counts from the head's weight and bias gradients.

    When the embeddings of a batch are alike (untrained networks), row ``c`` of the gradients is
    ``dW_c ~ db_c * e_c`` with ``e_c`` the mean embedding of class ``c``, so ``e_c = dW_c / db_c`` (C, d). The
    head maps each to probabilities ``P_c = softmax(W e_c + b)`` (C, C); the bias gradient is then linear in the
    counts ``n`` (C,)::

        B * db_i = sum_c n_c P_c[i] - n_i   for every class i,       sum_c n_c = B

    a ``(C + 1, C)`` system solved with the Moore-Penrose pseudo-inverse, then rounded to non-negative integers
    summing to ``B`` (see :func:`_round_to_total`). A class whose ``db_c`` is exactly 0 has no embedding to read:
    its ``e_c`` is taken as 0.

    Args:
        model: an ``nn.Module`` whose last ``nn.Linear`` is the head, WITH a bias.
        gradients: the batch's mean-reduced gradients, by parameter name or aligned with ``model.parameters()``.
        batch_size: B.

    Returns:
        :class:`BatchBaselineResult` with counts, classes and labels; ``scores`` is the (C,) least-squares
        solution before rounding.

    Raises:
        ValueError: the head has no bias (iLRG reads the embeddings off ``dW_c / db_c``).
    """
    batch_size = positive_int(batch_size, "batch_size")
    head = _read_head(model, gradients)
    if head.bias is None:
        raise ValueError("iLRG needs a head bias: it reads each class's mean embedding as dL/dW_c / dL/db_c, "
                         "and this model's head has none")
    db = head.bias_grad
    nonzero = db != 0
    embeddings = torch.where(nonzero[:, None], head.weight_grad / torch.where(nonzero, db, 1.0)[:, None], 0.0)
    probs = torch.softmax(embeddings @ head.weight.T + head.bias, dim=1)               # (C, C), row c = P_c
    eye = torch.eye(head.num_classes, dtype=probs.dtype, device=probs.device)
    system = torch.cat([torch.ones_like(probs[:1]), probs.T - eye])                    # (C + 1, C)
    rhs = torch.cat([db.new_tensor([float(batch_size)]), batch_size * db])            # (C + 1,)
    solution = torch.linalg.pinv(system) @ rhs
    return _from_counts(_round_to_total(solution, batch_size), "ilrg", solution)


# --------------------------------------------------------------------------------------------------------------
# LLG, LLG*, LLG+
# --------------------------------------------------------------------------------------------------------------

def _llg_select(row_sums: torch.Tensor, impact: float, offset: torch.Tensor, batch_size: int) -> torch.Tensor:
    """LLG's selection: ``(C,)`` int64 counts summing to ``B``.

    Every class with a negative row sum is present (P1 of the paper, for non-negative head inputs): each is
    taken once, the most negative first if there are more than ``B``. Then the impact of one occurrence (a
    negative number) is removed from each chosen class and the class with the lowest remaining
    ``row_sum - offset`` is taken, until ``B`` labels are chosen. (The official LLG and LLG* take every negative
    class even when there are more than ``B``; its LLG+ stops at ``B``, which is kept here for all three so that
    the answer has ``B`` labels.)
    """
    negative = torch.nonzero(row_sums < 0).flatten()
    first = negative[row_sums[negative].argsort(stable=True)][:batch_size]
    counts = torch.zeros(row_sums.shape[0], dtype=torch.int64, device=row_sums.device)
    counts[first] = 1
    remaining = row_sums - offset - impact * counts
    for _ in range(batch_size - first.numel()):
        pick = int(remaining.argmin())
        counts[pick] += 1
        remaining[pick] -= impact
    return counts


def llg(model: nn.Module, gradients: GradientsLike, batch_size: int) -> BatchBaselineResult:
    """LLG (Wainakh et al., PoPETs 2022), from the gradient alone.

    The row sums ``s = dL/dW @ 1`` (C,) are negative for present classes; the impact of one occurrence is
    estimated as ``m = (sum of the negative s_c) / B * (1 + 1/C)`` and no offset is subtracted. See
    :func:`_llg_select` for the greedy choice of the ``B`` labels. The bias gradient is not used.

    Returns:
        :class:`BatchBaselineResult` with counts, classes and labels; ``scores`` are the row sums ``s``.
    """
    batch_size = positive_int(batch_size, "batch_size")
    head = _read_head(model, gradients)
    row_sums = head.weight_grad.sum(dim=1)
    num_classes = head.num_classes
    impact = float(row_sums.clamp(max=0).sum()) / batch_size * (1 + 1 / num_classes)
    counts = _llg_select(row_sums, impact, torch.zeros_like(row_sums), batch_size)
    return _from_counts(counts, "llg", row_sums)


def _head_inputs_and_probs(model: nn.Module, inputs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The head's input sums ``sigma_k = sum_m h_km`` (N,) and softmax probabilities (N, C), float64, for a batch
    of inputs run through ``model`` in its current mode."""
    _, head = find_head(model)
    seen = []
    hook = head.register_forward_hook(lambda module, args, output: seen.append((args[0], output)))
    try:
        with torch.no_grad():
            logits = model(inputs)
    finally:
        hook.remove()
    if len(seen) != 1:
        raise ValueError(f"the head ran {len(seen)} times in one forward pass; LLG needs it to run once")
    features, head_out = seen[0]
    # The impact and offset are read as row sums of (p - y) h^T: that needs the logits to be the head's output.
    if not isinstance(logits, torch.Tensor) or logits.shape != head_out.shape or not torch.equal(logits, head_out):
        raise ValueError("the model's logits are not its head's output (something follows the head): LLG's "
                         "row sums of (p - y) h^T do not describe its gradient")
    return features.to(torch.float64).flatten(1).sum(dim=1), torch.softmax(head_out.to(torch.float64), dim=1)


def _impact_and_offset(sigma: torch.Tensor, probs: torch.Tensor, batches: torch.Tensor
                       ) -> Tuple[float, torch.Tensor]:
    """LLG*/LLG+'s estimates from simulated batches.

    Args:
        sigma: ``(N,)`` head input sums of the simulation inputs.
        probs: ``(N, C)`` their softmax probabilities.
        batches: ``(R, C, B)`` indices into the N inputs: ``batches[r, i]`` is the batch of B inputs, ALL labelled
            ``i``, of repetition ``r``.

    Row sum ``j`` of the mean gradient of batch ``(r, i)`` is ``(1/B) sum_k (p_kj - [j == i]) sigma_k``. The
    impact of one occurrence is the own-class row sum averaged over classes and repetitions, divided by B, times
    ``(1 + 1/C)``; the offset of class ``j`` is its row sum in the batches of the other classes, averaged.

    Returns:
        ``(impact, offset)`` with offset ``(C,)`` float64.
    """
    repeats, num_classes, batch_size = batches.shape
    rows = torch.arange(repeats * num_classes, device=batches.device).repeat_interleave(batch_size)
    # a sparse (R*C, N) averaging matrix: no (R, C, B, C) gather, which would not fit for C = 1000
    averaging = torch.sparse_coo_tensor(torch.stack([rows, batches.flatten()]),
                                        torch.full((rows.numel(),), 1.0 / batch_size, dtype=torch.float64,
                                                   device=batches.device),
                                        (repeats * num_classes, sigma.shape[0]), check_invariants=True)
    weighted = torch.sparse.mm(averaging, torch.cat([probs * sigma[:, None], sigma[:, None]], dim=1))
    mass = weighted[:, :-1].reshape(repeats, num_classes, num_classes)  # [r, i, j] = (1/B) sum_k p_kj sigma_k
    mean_sigma = weighted[:, -1].reshape(repeats, num_classes)          # [r, i] = (1/B) sum_k sigma_k
    own = mass.diagonal(dim1=1, dim2=2)                                 # (R, C)
    impact = float((own - mean_sigma).mean()) / batch_size * (1 + 1 / num_classes)
    offset = (mass.sum(dim=1) - own).sum(dim=0) / (repeats * (num_classes - 1))
    return impact, offset


def _llg_simulated(model: nn.Module, gradients: GradientsLike, batch_size: int, inputs: torch.Tensor,
                   batches: torch.Tensor, method: str) -> BatchBaselineResult:
    head = _read_head(model, gradients)
    sigma, probs = _head_inputs_and_probs(model, inputs)
    if probs.shape[1] != head.num_classes:
        raise ValueError(f"the model has {probs.shape[1]} logits but its head gradient {head.num_classes} rows")
    impact, offset = _impact_and_offset(sigma, probs, batches.to(sigma.device))
    row_sums = head.weight_grad.sum(dim=1)
    counts = _llg_select(row_sums, impact, offset.to(row_sums.device), batch_size)
    return _from_counts(counts, method, row_sums - offset.to(row_sums.device))


#: LLG*'s dummy inputs: the official code uses zeros for MNIST and CelebA, ones for CIFAR-100, random for SVHN.
_DUMMIES = ("zeros", "ones", "random")


def llg_star(model: nn.Module, gradients: GradientsLike, batch_size: int, *,
             input_shape: Optional[Sequence[int]] = None, dummy: str = "zeros", repeats: int = 10,
             seed: int = 0) -> BatchBaselineResult:
    """LLG* (Wainakh et al., PoPETs 2022): LLG with the impact and offset measured on dummy inputs.

    The attacker knows the model: it runs ``repeats`` batches of ``B`` dummy inputs through it, labels each batch
    with every class in turn, and reads from the row sums of the resulting gradients the impact of one
    occurrence and each class's offset (its row sum when absent; see :func:`_impact_and_offset`). The greedy
    choice of :func:`_llg_select` then runs on ``row sums - offset``.

    Dummy inputs carry no class, so one batch per repetition serves every class (the official code draws a new
    one per class: the same estimator, C times the forward passes). The model runs in its current mode.

    Args:
        input_shape: the shape of one input, e.g. ``(1, 28, 28)``; default ``model.input_shape``.
        dummy: ``"zeros"``, ``"ones"`` or ``"random"`` (uniform in [0, 1), drawn from a private generator seeded
            with ``seed``; the official code fills the tensor with ``random_()``, i.e. integers up to 2^24).
        repeats: number of dummy batches (the official code uses 10).

    Returns:
        :class:`BatchBaselineResult`; ``scores`` are the row sums less the estimated offset.
    """
    batch_size = positive_int(batch_size, "batch_size")
    repeats = positive_int(repeats, "repeats")
    if dummy not in _DUMMIES:
        raise ValueError(f"unknown dummy {dummy!r}; choose one of {list(_DUMMIES)}")
    input_shape = getattr(model, "input_shape", None) if input_shape is None else input_shape
    if input_shape is None:
        raise ValueError("LLG* runs dummy inputs through the model: pass input_shape= (the shape of one input)")
    shape = (repeats * batch_size, *(positive_int(int(n), "each input dimension") for n in input_shape))
    _, head = find_head(model)
    like = dict(dtype=head.weight.dtype, device=head.weight.device)
    if dummy == "random":
        inputs = torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=like["dtype"])
        inputs = inputs.to(like["device"])
    else:
        inputs = (torch.zeros if dummy == "zeros" else torch.ones)(shape, **like)
    num_classes = head.out_features
    batches = torch.arange(repeats * batch_size).reshape(repeats, 1, batch_size).expand(-1, num_classes, -1)
    return _llg_simulated(model, gradients, batch_size, inputs, batches, "llg*")


def llg_plus(model: nn.Module, gradients: GradientsLike, batch_size: int, *,
             auxiliary: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, repeats: int = 10,
             seed: int = 0) -> BatchBaselineResult:
    """LLG+ (Wainakh et al., PoPETs 2022): LLG with the impact and offset measured on auxiliary labelled data.

    As :func:`llg_star`, but the simulated batch of class ``i`` holds ``B`` auxiliary inputs OF class ``i``,
    drawn with replacement (from a private generator seeded with ``seed``), as the official code draws them
    from the training set's distribution.

    Args:
        auxiliary: ``(inputs (N, *input_shape), labels (N,) int64)`` with at least one input of every class.
        repeats: number of draws per class (the official code uses 10).

    Raises:
        ValueError: no auxiliary data, or a class without any auxiliary input.
    """
    batch_size = positive_int(batch_size, "batch_size")
    repeats = positive_int(repeats, "repeats")
    if auxiliary is None:
        raise ValueError("LLG+ needs auxiliary labelled data: pass auxiliary=(inputs, labels)")
    inputs, labels = auxiliary
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.dtype != torch.int64:
        raise ValueError("auxiliary labels must be a (N,) int64 tensor")
    if not isinstance(inputs, torch.Tensor) or inputs.shape[:1] != labels.shape:
        raise ValueError(f"auxiliary inputs must be a tensor with one row per label ({labels.shape[0]})")
    _, head = find_head(model)
    num_classes = head.out_features
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"auxiliary labels must lie in [0, {num_classes})")
    per_class = torch.bincount(labels, minlength=num_classes)
    if not bool((per_class > 0).all()):
        missing = torch.nonzero(per_class == 0).flatten().tolist()
        raise ValueError(f"LLG+ needs auxiliary inputs of every class; classes {missing[:10]} have none")
    by_class = labels.argsort(stable=True)
    starts = per_class.cumsum(0) - per_class
    draws = torch.rand(repeats, num_classes, batch_size, generator=torch.Generator().manual_seed(seed))
    batches = by_class[starts[:, None] + (draws * per_class[:, None]).long()]    # (R, C, B)
    inputs = inputs.to(dtype=head.weight.dtype, device=head.weight.device)
    return _llg_simulated(model, gradients, batch_size, inputs, batches, "llg+")


# --------------------------------------------------------------------------------------------------------------
# Yin et al. and iDLG
# --------------------------------------------------------------------------------------------------------------

def yin(model: nn.Module, gradients: GradientsLike, batch_size: int) -> BatchBaselineResult:
    """GradInversion's batch label restoration (Yin et al., CVPR 2021, Sec. 3.2).

    The ``B`` classes whose row of ``dL/dW`` (C, d) has the lowest minimum over the feature dimension. With
    non-negative head inputs (ReLU then pooling) an absent class's row ``(1/B) sum_k p_kc h_k`` has no negative
    entry, while a present class's row has one wherever its example's feature outweighs the others'. Assumes no
    label repeats in the batch: each chosen class counts once.

    Raises:
        ValueError: ``B`` exceeds the number of classes (no batch of distinct labels has that size).
    """
    batch_size = positive_int(batch_size, "batch_size")
    head = _read_head(model, gradients)
    if batch_size > head.num_classes:
        raise ValueError(f"Yin et al.'s rule assumes distinct labels, impossible for {batch_size} examples of "
                         f"{head.num_classes} classes")
    minima = head.weight_grad.min(dim=1).values
    counts = torch.zeros(head.num_classes, dtype=torch.int64, device=minima.device)
    counts[minima.argsort(stable=True)[:batch_size]] = 1
    return _from_counts(counts, "yin", minima)


def idlg(model: nn.Module, gradients: GradientsLike, batch_size: int) -> BatchBaselineResult:
    """iDLG (Zhao et al., 2020) extended to batches, as iLRG's paper evaluates it: the set of classes whose row
    sum of ``dL/dW`` is negative.

    Gives no counts (``counts`` and ``labels`` are None) and may name fewer or more than ``B`` classes; a class
    present once among many examples can have a positive row sum and be missed. ``batch_size`` is only
    checked. The bias gradient is not used (iLRG's comparison reads the weight gradient).
    """
    positive_int(batch_size, "batch_size")
    row_sums = _read_head(model, gradients).weight_grad.sum(dim=1)
    classes = tuple(torch.nonzero(row_sums < 0).flatten().tolist())
    return BatchBaselineResult(counts=None, classes=classes, labels=None, method="idlg", scores=row_sums)


BatchBaselineFn = Callable[..., BatchBaselineResult]
#: Batch label baselines by name: ``fn(model, gradients, batch_size, **options) -> BatchBaselineResult``.
#: ``"llg*"`` needs ``input_shape=`` unless the model has ``input_shape``; ``"llg+"`` needs ``auxiliary=``.
BATCH_BASELINES: Dict[str, BatchBaselineFn] = {
    "ilrg": ilrg, "llg": llg, "llg*": llg_star, "llg+": llg_plus, "yin": yin, "idlg": idlg,
}
