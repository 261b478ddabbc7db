"""How far a batch's gradient pins each example of a split: the labels' standard errors over the whole batch.

A split finds each example's feature (by its zeros, its label's structure, or the batch solved at once) and then
judges each example's own gradient ``e_n h_n^T`` with the single example's fit test. That test sees only what the
split handed it: where two examples' features are nearly parallel, the batch can be re-mixed along a direction that
its gradient barely resists, and a split off along that direction still gives each example a gradient of exactly
its structure (measured: a LeNet batch mixup of two examples sharing their classes, features at cosine 0.99999,
split by labels with both labels 0.010 off; it rebuilt ``G`` to 1.2e-7 and ``dL/db`` to 4.8e-5).

So a split read off the head alone (``B <= C - 1``: the head's gradient then holds every feature) is judged on
the batch's equations as well. With each example's label held to the structure its own test chose
(``y_n = base_n + D_n^T theta_n``: one class smoothed by ``theta = 1 - eps`` or hard; two classes mixed; two
classes mixed and smoothed), the unknowns are the features' coordinates in ``G``'s row space ``V`` (d, B),
``h_n = V a_n``, the labels' weights ``theta_n`` and, at an unknown scale, the gradient's scale ``s``:

    s sum_n e_n a_n^T = B G V        (C B equations)        s sum_n e_n = B dL/db        (C more, with a bias)

with ``e_n = softmax(W V a_n + b) - y_n``. From the answer, Gauss-Newton settles on the least-squares solution;
linearised there, the residual (at least the gradient's rounding) gives the labels' covariance
``sigma^2 (J^T J)^-1``, as :func:`gradleak.recovery.structure.label_standard_error` does for one example. Each label's
error is its standard error, or how far the least-squares solution lies from the answer where that is more. Each
example's own weight makes this a looser model than the joint solve's one eps (which it takes for a batch solved
at once), and it leaves out the zeros that pinned a direction: it errs towards larger errors. For a split from the
layer below it would err too far (measured: 4 right FCN-4 batches of 8 flagged), and that layer's gradient judges
the split instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from ..recovery import RecoveryResult
from .by_labels import _spans

#: Gauss-Newton steps from the answer, at most (each must lower the residual).
POLISH_STEPS = 20


def _structures(examples: Sequence[RecoveryResult], num_classes: int, like: torch.Tensor):
    """Each example's label structure ``y = base + D^T theta``: ``base`` (B, C), ``D`` (B, 2, C) and which of the
    two weights are free (B, 2); a one-class label (hard or smoothed, ``theta = 1 - eps``) and a pure mixup
    (``theta = lam``) have one, a smoothed mixup two."""
    eye = torch.eye(num_classes, dtype=like.dtype, device=like.device)
    uniform, nothing = torch.full_like(eye[0], 1.0 / num_classes), torch.zeros_like(eye[0])
    base, directions, free = [], [], []
    for example in examples:  # a loop over the B <= 16 examples of a split
        first, second = example.classes[0], example.classes[-1]
        if example.label_format != "mixup":
            base.append(uniform)
            directions.append(torch.stack([eye[first] - uniform, nothing]))
        elif example.eps == 0.0:
            base.append(eye[first])
            directions.append(torch.stack([eye[second] - eye[first], nothing]))
        else:
            base.append(uniform)
            directions.append(torch.stack([eye[first] - uniform, eye[second] - uniform]))
        free.append([True, example.label_format == "mixup" and example.eps != 0.0])
    return torch.stack(base), torch.stack(directions), torch.tensor(free, device=like.device)


@dataclass(frozen=True)
class _BatchEquations:
    """The batch's equations ``s sum_n e_n a_n^T = B G V`` and ``s sum_n e_n = B dL/db`` (with a bias) in the
    unknowns ``x = (a (B, B) flattened, the free label weights phi, s when the scale is unknown)``, each example's
    label ``base_n + D_n^T theta_n`` with ``theta = mapping @ phi`` (B, 2), relative to the observed side's norm."""

    weight_reduced: torch.Tensor   # W V (C, B)
    bias: torch.Tensor             # (C,)
    base: torch.Tensor             # (B, C)
    directions: torch.Tensor       # D (B, 2, C)
    mapping: torch.Tensor          # (2 B, F)
    observed: torch.Tensor         # (C B [+ C],)
    norm: torch.Tensor
    scale_known: bool
    with_bias: bool

    def weights_of(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 2)`` the label weights of the unknowns ``x``."""
        size = self.base.shape[0]
        return (self.mapping @ x[size * size:size * size + self.mapping.shape[1]]).unflatten(0, (size, 2))

    def evaluate(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The residual ``(n,)`` at ``x`` and its Jacobian ``(n, P)``, in closed form: ``e_m`` moves with ``a_m`` by
        ``(diag(p_m) - p_m p_m^T) W V`` and with its label weights by ``-D_m``, and ``sum_n e_n a_n^T`` with
        ``a_m`` by that times ``a_m^T`` plus ``e_m`` in column ``k`` (an autodiff Jacobian had cost 0.65 s the
        first time a process made one)."""
        (size, num_classes), directions = self.base.shape, self.directions
        a = x[:size * size].unflatten(0, (size, size))                                         # (B, B)
        p = torch.softmax(a @ self.weight_reduced.T + self.bias, -1)                           # (B, C)
        errors = p - self.base - (self.weights_of(x).unsqueeze(-1) * directions).sum(1)        # (B, C)
        moves = p.unsqueeze(-1) * (self.weight_reduced - (p @ self.weight_reduced).unsqueeze(1))  # (B, C, B)
        # rows (c, j) of sum_n e_n a_n^T; columns (m, k) of a, (m, i) of the label weights
        eye = torch.eye(size, dtype=a.dtype, device=a.device)
        by_a = torch.einsum("mck,mj->cjmk", moves, a) + torch.einsum("mc,jk->cjmk", errors, eye)
        by_weights = -torch.einsum("mic,mj->cjmi", directions, a)
        rebuilt = [(errors.T @ a).flatten()]
        by_a, by_weights = by_a.reshape(num_classes * size, -1), by_weights.reshape(num_classes * size, -1)
        if self.with_bias:
            rebuilt.append(errors.sum(0))
            by_a = torch.cat([by_a, moves.permute(1, 0, 2).reshape(num_classes, -1)])
            by_weights = torch.cat([by_weights, -directions.permute(2, 0, 1).reshape(num_classes, -1)])
        rebuilt = torch.cat(rebuilt)
        jacobian = torch.cat([by_a, by_weights @ self.mapping], -1)
        if not self.scale_known:
            jacobian = torch.cat([x[-1] * jacobian, rebuilt.unsqueeze(-1)], -1)
            rebuilt = x[-1] * rebuilt
        return (rebuilt - self.observed) / self.norm, jacobian / self.norm


def split_label_errors(examples: Sequence[RecoveryResult], weight: torch.Tensor, bias: Optional[torch.Tensor],
                       weight_grad: torch.Tensor, bias_grad: Optional[torch.Tensor], *, precision: float,
                       scale_known: bool, shared_weight: bool = False) -> torch.Tensor:
    """How far the batch's gradient pins each example's label (max-abs over its entries), ``(B,)`` float64.

    Args:
        examples: the split's ``B`` examples (their features, labels and label structures are the answer judged).
        weight, bias: the head's ``(C, d)`` and ``(C,)`` (or None).
        weight_grad, bias_grad: ``(C, d)`` and ``(C,)`` (or None) the batch's gradients, brought to the answer's
            scale.
        precision: the relative rounding of the gradients.
        scale_known: False to fit the gradients' scale as one more unknown.
        shared_weight: the examples' one-class labels share one weight (one eps, the model of the joint solve,
            :mod:`gradleak.batch.joint`), instead of one each.
    """
    size, num_classes = len(examples), weight.shape[0]
    g, w = weight_grad.double(), weight.double()
    b = w.new_zeros(num_classes) if bias is None else bias.double()
    _, rows = _spans(g, size)                                                          # V (d, B)
    weight_reduced = w @ rows                                                          # (C, B)
    with_bias = bias_grad is not None
    observed = torch.cat([(size * g @ rows).flatten()] + ([size * bias_grad.double()] if with_bias else []))
    norm = torch.linalg.vector_norm(observed)
    base, directions, free = _structures(examples, num_classes, g)
    # the free label weights phi: theta (B, 2) = (mapping @ phi) reshaped, one weight each or the first ones shared
    mapping = torch.eye(2 * size, dtype=g.dtype, device=g.device)[:, free.flatten()]
    if shared_weight:
        first = free.new_zeros(size, 2)
        first[:, 0] = True
        tied = mapping[:, first.flatten()[free.flatten()]].sum(-1, keepdim=True)
        mapping = torch.cat([tied, mapping[:, ~first.flatten()[free.flatten()]]], -1)
    labels = torch.stack([example.label for example in examples]).double()
    theta = (torch.linalg.pinv(directions.transpose(1, 2)) @ (labels - base).unsqueeze(-1)).flatten()
    features = torch.stack([example.feature for example in examples]).double()
    answer = torch.cat([(features @ rows).flatten(), torch.linalg.pinv(mapping) @ theta]
                       + ([] if scale_known else [g.new_ones(1)]))
    equations = _BatchEquations(weight_reduced, b, base, directions, mapping, observed, norm, scale_known, with_bias)
    x, (r, j) = answer, equations.evaluate(answer)
    for _ in range(POLISH_STEPS):
        trial = x + torch.linalg.lstsq(j, -r.unsqueeze(-1)).solution.squeeze(-1)
        trial_r, trial_j = equations.evaluate(trial)
        if not torch.linalg.vector_norm(trial_r) < torch.linalg.vector_norm(r):
            break
        x, r, j = trial, trial_r, trial_j
    count, unknowns = j.shape
    # the rounding of every observed entry, relative to the whole: precision^2 / n per entry on average
    variance = max(float(r.square().sum()) / max(count - unknowns, 1), precision ** 2 / count)
    _, values, right = torch.linalg.svd(j, full_matrices=False)
    # a direction the equations do not resist gets a variance of 1 / eps^2 relative: the label is not pinned
    values = values.clamp_min(torch.finfo(values.dtype).eps * values[0])
    covariance = variance * (right.T / values.square()) @ right                                 # (P, P)
    free_weights = slice(size * size, size * size + mapping.shape[1])
    weights_cov = (mapping @ covariance[free_weights, free_weights] @ mapping.T).unflatten(0, (size, 2))
    own = weights_cov.unflatten(-1, (size, 2)).diagonal(dim1=0, dim2=2).permute(2, 0, 1)       # (B, 2, 2)
    label_variance = torch.einsum("nic,nij,njc->nc", directions, own, directions)
    moved = ((equations.weights_of(x) - theta.unflatten(0, (size, 2))).unsqueeze(-1) * directions).sum(1)
    return torch.maximum(label_variance.clamp_min(0).sqrt().amax(-1), moved.abs().amax(-1))
