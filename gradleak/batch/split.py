"""Split a small batch's gradient into its examples: every example's soft label and head feature.

For the mean soft-target cross-entropy over ``B`` examples, the head ``z = W h + b`` has the gradient

    G = dL/dW = (1/B) sum_n e_n h_n^T   (C, d)        dL/db = (1/B) sum_n e_n        e_n = p_n - y_n

**Only the directions of the features are needed.** If the rows of ``Ht`` (B, d) are the ``h_n`` up to positive
scales, ``Et^T = B G pinv(Ht^T)`` gives ``et_n`` with ``et_n ht_n^T = e_n h_n^T``: each example's own head gradient
``G_n`` is fixed, and :func:`gradleak.recover_label` solves it (the feature's scale from a known ``e_n``, or from the
label's structure when that leaves the answer undetermined: the scale a split gives can carry more error than the
gradient's rounding) and judges it with its fit test like any single example.

**Where the directions come from.** ReLU features have many exact zeros, and a vector of a ``B``-dimensional
subspace that vanishes on ``B - 1`` prescribed coordinates is fixed up to scale (the observation behind SPEAR,
Dimitrov et al., NeurIPS 2024). The null direction of ``B - 1`` rows is an example's whenever the rows all lie in
that example's zero set:

* ``source`` = the layer below (its module name), when the head input is ``h = relu(A f + b_A)`` with an
  ``nn.Linear`` ``A`` (bias optional): ``dL/dA = (1/B) sum_n delta_n f_n^T`` (d, n_in) has rank ``B`` (up to the
  widths), and ``delta_n = (W^T e_n) * 1[h_n > 0]`` has exactly ``h_n``'s zeros. Once all ``B`` directions are
  found, ``dL/dA`` gives every ``f_n`` (its scale from ``dL/db_A`` when ``A`` has a bias) and so ``h_n``;
* ``source`` = "head" otherwise, while ``B <= C - 1``: the ``h_n`` span ``G``'s row space (its rows sum to zero, so
  ``rank(G) <= min(B, C - 1)``), and each ``h_n`` is a non-negative vector of that space with many zeros.

**Without zeros.** For ``B <= (C - 3) / 2`` (the head source) the examples are first sought by their labels'
structure (:mod:`gradleak.batch.by_labels`): each example's prediction minus a structured label lies in ``G``'s
column space, which pins its feature at full scale with equations to spare. That needs no zeros (sigmoid features,
or ReLU features averaged over space), and the set it finds is judged by the same checks as below. Beyond, the
directions the zeros give are pinned by their labels and the examples they miss are sought by theirs (for
``B <= C - 4``), and at ``B = (C - 2) / 2`` a batch whose labels are hard or share one weight is split by its
labels as the last resort. Where the head's input is the output of a Sigmoid, Tanh or Softplus, which is never
exactly zero, no row is drawn at all (LeNet's sigmoid features, nearly parallel, leave draws at the rounding that
used to spend the whole budget: 1.5 s of a batch of 4).

**Counts first.** A batch whose counts the class mass pins (hard labels, or smoothed with one eps) is solved as one
system from them (:mod:`gradleak.batch.joint`) before either: one solve, where the labels take a search per example
and the zeros up to ``max_draws`` draws (ResNet18's features, averaged over space, have few zeros: the search spent
2.6 s of a batch of 8 that the solve answers in 0.3 s). A split it does not determine waits for the other paths.

**Drawing rows.** A draw takes ``B - 1`` rows that are independent (ReLU patterns are correlated: many rows share
the low-dimensional span of the few examples active there, and dependent rows leave several null directions).
Rows are weighted, chunk by chunk, towards those likely inactive for the examples still missing: small rows
(few examples active) and rows where many of the examples found so far are inactive. When at most ``REMAINING``
examples are missing, their inputs ``f_m`` are sought too: projecting the found ``delta_n`` out of ``dL/dA`` leaves
a matrix whose row space the missing ``f_m`` span, sparse and non-negative when ``f`` is itself a ReLU output, and
each ``f_m`` gives its example's zero set through ``A f_m + b_A`` (the last example needs no search at all).

**The filter.** Most null directions are mixtures of several examples. A candidate is kept only when

1. its zero set (entries below what the gradient's rounding leaves there) has zeros to spare beyond the
   ``B - 1`` it was drawn on and pins exactly one direction (least squares over all of them, pruned of rows that
   do not fit, whose second singular value is clear of rounding): mixtures of examples whose zero sets overlap
   fail here;
2. it has the shape of an example: from the layer below, it equals ``W^T e`` on its support for some ``e`` that
   sums to zero (``C - 1`` unknowns fitted to as many equations as the support has: a mixture of examples with
   different supports is no such vector); from the head, it is non-negative;
3. the ``B`` directions explain the batch jointly: ``G`` (and ``dL/db``, ``dL/dA``, ``dL/db_A``) are reproduced,
   each ``delta_n`` is ``(W^T e_n) * 1[h_n > 0]`` for the ``e_n`` and ``h_n`` they imply, every example's label is
   determined by its own fit test (at the gradient's precision; for a split by labels, where that fails, at the
   rounding the least squares measurably carry into the example, within the joint solve's bound), and the
   recovered labels and features reproduce ``G`` (and ``dL/db``); from the head alone the batch's own equations
   must pin every label too
   (:func:`~gradleak.batch.label_precision.split_label_errors`): one example's fit test cannot see a re-mixing of
   the examples that their gradient barely resists. (From the layer below, that layer's gradient pins each
   direction, which the head's equations alone would not know.)

Candidates are drawn and judged in vectorised chunks of ``CHUNK`` (no loop over candidates); the search stops as
soon as ``B`` directions pass, or after ``max_draws``. A batch that cannot be split is reported with the reason
and no examples, never split wrongly with confidence.

Measured (untrained digits MLP 64-256-128-10, float32 gradients, one core; labels within 1e-3 and feature cosine
above 0.999): B = 2, 4, 8 split right in 80/80 batches each (smoothing and mixup, with and without biases), B = 8
in about 0.5 s; B = 16 in 30/32, median 3-4 s. Not split: an example whose zero set lies inside another's (every
unit inactive for it is inactive for the other too) is not pinned by its zeros, and is reported missing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from .._checks import as_tensor, check_finite, positive_int
from ..head import GradientsLike, find_head, head_gradients, named_gradients, storage_precision
from ..recovery import RecoveryResult, recover_label
from ..recovery.feature_layer import layers_below_head
from .by_labels import LabelSplit, can_complete, largest_batch, split_by_labels
from .joint import CARRIED_MOST, largest_joint_batch, least_squares_errors, solve_jointly
from .label_precision import split_label_errors

#: Entries of a refined candidate (unit norm) below ``ZERO_UNITS`` times the rounding they carry are zeros: measured
#: on float32 digits MLPs (B = 2 to 16), true zeros sit below 0.2 units and the smallest true non-zero above 600.
ZERO_UNITS = 10.0
#: The same for a raw draw, whose rounding is bounded loosely (propagated through its ``B - 1`` rows as a worst
#: case): measured, the true zeros of a draw on one example's zeros sit below 1e-3 of that bound.
DRAW_ZERO_UNITS = 1.0
#: Zeros a direction needs beyond the ``B - 1`` it was drawn on, so that its zero set checks it.
SPARE_ZEROS = 2
#: Equations the ``W^T e`` fit (``C - 1`` unknowns) needs beyond its unknowns to test a candidate.
SPARE_EQUATIONS = 3
#: A candidate's fit residuals must stay below this many times the rounding its entries carry.
FIT_UNITS = 100.0
#: Draws per vectorised chunk.
CHUNK = 4096
#: Raw draws checked per chunk at most (the W^T e fit costs d (C - 1)^2 per draw), the sparsest first.
RAW_CHECKS = 1024
#: Layer source: once at most this many examples are missing, they are also sought through their inputs.
REMAINING = 8
#: Row weights of successive chunks, cycled: ``(a, b)`` weighs a row by ``||M[i]||^-a (1 + k_i)^b``, with ``k_i``
#: the directions found so far that vanish on row ``i``. ReLU patterns are correlated: rows with a small norm
#: (few examples active) and rows where many found examples are inactive are more often in the zero set of the
#: examples still missing; plain uniform chunks keep every example within reach.
ROW_WEIGHTS = ((0, 3), (1, 3), (2, 3))
#: A row is drawn only if its basis row exceeds this many times its rounding.
SIGNAL_UNITS = 100.0
#: A drawn row must have at least this part (relative) outside the span of the rows drawn before it.
INDEPENDENT = 0.05
#: Random rows tried per step of a draw for one independent of the previous ones.
ROW_TRIES = 16
#: In a raw zero set, rows whose misfit exceeds this many times the set's median are not zeros.
OUTLIER_RATIO = 100.0
#: Rows pruned one at a time from a raw zero set, at most.
PRUNE_STEPS = 8


@dataclass(frozen=True)
class BatchSplit:
    """A batch gradient split into its examples.

    Attributes:
        examples: one :class:`~gradleak.RecoveryResult` per example (in no particular order) when the batch was
            split, else ``[]``. Each is the single-example recovery of that example's own head gradient.
        features: ``(B, d)`` the examples' head inputs (``examples[n].feature`` stacked), or None.
        determined: True when every example's result is determined and together they reproduce the head's
            gradients (``G`` and ``dL/db``) to rounding.
        message: why the batch was not split or not determined, or "".
        rank: numerical rank of the matrix the directions were read from (``dL/dA`` of the layer below, or
            ``G``).
        source: "head", or the module name of the layer below whose gradient gave the directions.
        batch_size: the ``B`` used (given, or the rank).
        draws: null directions drawn from the source matrix (the search of the layer's inputs not counted).
        diagnostics: the joint checks' relative errors (``weight_grad``, ``bias_grad``, ``layer_grad``,
            ``layer_bias_grad``, ``delta``), as far as they were reached.
        found_by: how the examples' features were found: "zeros" (their zero sets), "labels" (their labels'
            structure, :mod:`gradleak.batch.by_labels`), "zeros and labels" (the examples the zeros missed by
            their labels) or "joint" (the whole batch solved at once from its counts, :mod:`gradleak.batch.joint`);
            "" when the batch was not split.
        gradient_scale: ``s`` with observed gradients = ``s *`` the true ones: 1.0 at a known scale, fitted with
            ``gradient_scale="unknown"`` (``-lr`` for one SGD step's weight delta); nan when not split.
    """

    examples: List[RecoveryResult]
    features: Optional[torch.Tensor]
    determined: bool
    message: str
    rank: int
    source: str
    batch_size: int
    draws: int = 0
    diagnostics: Mapping[str, float] = field(default_factory=dict)
    found_by: str = "zeros"
    gradient_scale: float = 1.0


@dataclass(frozen=True)
class _Subspace:
    """The span the directions live in, read off a ``(d, m)`` matrix ``M`` whose columns are combinations of them.

    Attributes:
        basis: ``(d, B)`` orthonormal basis of the span (rows of ``M`` that are exactly zero give zero rows).
        values: ``(B,)`` the matching singular values of ``M``.
        row_noise: ``(d,)`` rounding of each row of ``basis``: ``(precision * ||M[i]|| + eps * ||M||) / values[-1]``,
            the second term the float64 SVD's own (``eps`` float64's, relative to the whole matrix).
        live: ``(d,)`` rows that are not exactly zero.
        precision: the precision ``M``'s values carry.
        row_norm: ``(d,)`` the norms the rows' rounding is relative to (``||M[i]||``).
    """

    basis: torch.Tensor
    values: torch.Tensor
    row_noise: torch.Tensor
    live: torch.Tensor
    precision: float
    row_norm: torch.Tensor

    def noise(self, q: torch.Tensor) -> torch.Tensor:
        """``(K, d)`` rounding of the entries of ``basis @ q`` for refined unit coefficients ``q`` (K, B)."""
        weights = torch.linalg.vector_norm(q / self.values, dim=-1, keepdim=True)
        return self.row_noise * self.values[-1] * weights


def split_batch(model: nn.Module, gradients: GradientsLike, *, batch_size: Optional[int] = None,
                label_format: str = "auto", head: Union[str, nn.Linear, None] = None, max_draws: int = 200_000,
                seed: int = 0, counts: Optional[torch.Tensor] = None, **recovery_options) -> BatchSplit:
    """Split the gradient of a small batch into its examples' soft labels and head features.

    Args:
        model: the classifier; its head is the last ``nn.Linear`` (or ``head``), bias optional. Its input must be
            ReLU features: the output of ``Linear -> ReLU`` right below the head (the layer source, which reads
            up to ``B = min(d, n_in)`` examples), or any non-negative sparse features with ``B <= C - 1`` (the
            head source). Features without zeros (sigmoids; a Sigmoid, Tanh or Softplus right below the head skips
            the search by zeros) are split by their labels' structure while
            ``B <= (C - 3) / 2``, or ``(C - 2) / 2`` when the labels are hard or share one eps or mixup weight
            (:mod:`gradleak.batch.by_labels`), and reported as not split beyond.
        gradients: ``{parameter name: gradient}`` or a sequence aligned with ``model.parameters()``, of the mean
            soft-target cross-entropy over the batch at its known scale (a plain gradient, not a weight update).
        batch_size: ``B``, or None to read it as the numerical rank of the source matrix. That rank only says
            ``B >= rank`` when it is the most the matrix allows: ``C - 1`` for the head alone (its rows sum to
            zero), the number of non-zero rows or the input width of the layer below. The batch is then not split
            unless ``batch_size`` is given, and from the head alone never beyond ``B = C - 1``.
        label_format: passed to :func:`gradleak.recover_label` for every example ("auto" detects each one's).
        head: the head's module name or the module itself, when it is not the last ``nn.Linear``.
        max_draws: most null directions drawn before giving up (time grows about linearly with it, and with
            ``B^2``: 4096 draws take ~0.1 s at ``B = 8`` on one core).
        seed: seed of the row sampling (a successful split does not depend on it).
        counts: ``(C,)`` the examples per class, when known (the class mass's, see :func:`gradleak.recover_batch`),
            or ``(K, C)`` candidates for them: a batch of ``B <= C - 1`` examples smoothed with one eps (or hard)
            is then solved as one system (:mod:`gradleak.batch.joint`) for each, with a head bias, and read when
            exactly one candidate's solve fits. With one candidate it goes first, and spares the other paths when
            its examples are all determined; otherwise it stands in for examples the other paths did not find, or did
            not determine, only when its own are all determined.
        **recovery_options: passed to :func:`gradleak.recover_label` (``tol``, ``ambiguity_ratio``, ...);
            ``gradient_scale="unknown"`` for gradients that are ``s`` times the true ones (a weight update): only the
            labels' structure splits those (from the head, see above, or solved at once from ``counts``), fitting
            ``s``, and every example is then recovered from the gradients divided by it.

    Returns:
        :class:`BatchSplit`; its tensors in the gradient's dtype.

    Raises:
        ValueError: NaN or infinite gradients, a zero head gradient, shapes that do not match the model, or a
            ``batch_size`` below the gradient's rank.
    """
    if batch_size is not None:
        positive_int(batch_size, "batch_size")
    positive_int(max_draws, "max_draws")
    gradient_scale_known = recovery_options.pop("gradient_scale", "known") == "known"
    found = find_head(model, head)
    named = named_gradients(model, gradients)
    parts = head_gradients(model, named, found)
    weight = parts["weight"].detach()
    weight_grad = _checked(parts["weight_grad"], "head weight gradient", weight.shape)
    bias = None if parts["bias"] is None else parts["bias"].detach()
    bias_grad = None if bias is None else _checked(parts["bias_grad"], "head bias gradient", bias.shape)
    if not bool(weight_grad.any()):
        raise ValueError("the head's weight gradient is all zeros: nothing to split")
    num_classes, dim = weight.shape
    precision = storage_precision(weight_grad, weight_grad[torch.linalg.vector_norm(weight_grad, dim=1).argmax()])

    below = layers_below_head(model, found[0])  # one walk of the modules, read twice
    layer = _relu_layer_below(below, dim)
    if layer is not None and f"{layer[0]}.weight" in named:
        name, module = layer
        layer_grads = (_checked(named[f"{name}.weight"], f"{name}.weight gradient", module.weight.shape),
                       None if module.bias is None else
                       _checked(named.get(f"{name}.bias"), f"{name}.bias gradient", module.bias.shape))
        source, matrix = name, layer_grads[0]
    else:
        layer = layer_grads = None
        source, matrix = "head", weight_grad.T
    # singular values above max(rows, columns) rounding units of the largest count (the usual numerical rank)
    values = torch.linalg.svdvals(matrix.double())
    rank = int((values > max(matrix.shape) * precision * values[0]).sum())
    if batch_size is not None and rank > batch_size:
        raise ValueError(f"batch_size={batch_size} but the {source} gradient has rank {rank}: it holds at least "
                         f"{rank} examples (or noise)")
    size = rank if batch_size is None else batch_size
    live = int(matrix.any(dim=1).sum())

    def refuse(message: str, draws: int = 0, diagnostics: Optional[Dict[str, float]] = None) -> BatchSplit:
        return BatchSplit([], None, False, message, rank, source, size, draws, dict(diagnostics or {}), "", math.nan)

    if source == "head" and size > num_classes - 1:
        return refuse(f"B = {size} examples but the head's gradient has rank at most C - 1 = {num_classes - 1}: "
                      "its row space no longer holds every feature; the head alone cannot split this batch")
    ceiling, bound = (num_classes - 1, "C - 1") if layer is None else (min(live, matrix.shape[1]),
                                                                        "its non-zero rows or its columns")
    if batch_size is None and rank >= ceiling:
        return refuse(f"the {source} gradient has rank {rank}, the most it can have ({bound}): B >= {rank}, the "
                      "gradient cannot tell B; pass batch_size")
    tol = _joint_tolerance(precision)
    head_source = layer is None
    # the whole batch solved at once needs neither separable directions nor zeros, only its counts
    joint_possible = (head_source and counts is not None and bias_grad is not None and label_format != "mixup"
                      and size <= largest_joint_batch(num_classes))
    unseparable = ""  # why the examples cannot be found one by one
    if rank < size:
        unseparable = (f"the {source} gradient has rank {rank} < B = {size}: the examples' "
                       f"{'inputs to the layer' if layer else 'features'} are linearly dependent (or B exceeds the "
                       "layer's widths), so their directions are not separable")
    elif live < _zeros_needed(size):
        unseparable = (f"only {live} rows of the {source} gradient are not zero: a direction of {size} examples "
                       f"needs {_zeros_needed(size)} zeros among them to be pinned and checked")
    if unseparable and not joint_possible:
        return refuse(unseparable)

    def by_labels_split(how: str, known: Optional[torch.Tensor] = None) -> Tuple[LabelSplit, str]:
        """The split by labels and ``how`` it was found, or "" where it was not."""
        result = split_by_labels(weight_grad, weight, bias, bias_grad, size, precision=precision, tolerance=tol,
                                 known=known, scale_known=gradient_scale_known, seed=seed)
        return result, how if result.features is not None else ""

    def examples_of(how: str, labelled: Optional[LabelSplit]) -> BatchSplit:
        """Every example recovered from the features found ``how``, judged on its own and jointly."""
        gradient_scale, observed, observed_bias = 1.0, weight_grad, bias_grad
        if how in ("labels", "zeros and labels", "joint"):
            # every example at its scale, from its label's structure: judged below like any split, on the gradients
            # brought to their true scale when it was unknown
            features, scale_known, diagnostics = labelled.features, True, {}
            gradient_scale = labelled.gradient_scale
            observed = weight_grad / gradient_scale
            observed_bias = None if bias_grad is None else bias_grad / gradient_scale
        elif layer is None:
            features, scale_known, diagnostics = directions.clamp_min(0.0), False, {}  # rounding below zero is zero
        else:
            features, scale_known, diagnostics = _layer_features(directions, layer[1], layer_grads)
        errors, features, scale_known = _errors(features, scale_known, directions if layer else None, weight,
                                                observed, observed_bias, diagnostics)
        failed = {name: value for name, value in diagnostics.items() if not value <= tol}
        if failed:
            return refuse(f"the {size} directions found do not explain the batch jointly (relative errors "
                          f"{_describe(failed)}, tolerance {tol:.2g}): not one batch of this model's examples, or a "
                          "spurious direction passed the per-direction checks", draws, diagnostics)
        dtype = observed.dtype

        def recovered(own_errors: torch.Tensor, feature: torch.Tensor, rounding: Optional[float]) -> RecoveryResult:
            """One example's answer from its own gradient ``e_n h_n^T``, judged at the precision ``rounding``."""
            own = torch.outer(own_errors, feature).to(dtype)
            options = dict(recovery_options, label_format=label_format, precision=rounding)
            # e_n itself is known: it is this example's bias gradient (of a zero bias, on a bias-free head)
            found = recover_label(own, weight, bias=weight.new_zeros(num_classes) if bias is None else bias,
                                  bias_grad=own_errors.to(dtype), **options) if scale_known else None
            if found is None or not found.determined:
                # the feature's scale read from the label's structure instead: the scale the split gives can carry
                # more error than the gradient's rounding (the joint checks below judge either answer)
                searched = recover_label(own, weight, bias=bias, **options)
                if found is None or searched.determined:
                    found = searched
            return found

        # e_n h_n^T is judged at the gradient's precision, or with the rounding a solve measured it to carry (relative
        # to its largest entry: recover_label's precision). A split by labels has no solve to measure it: an example
        # that is not determined at the gradient's precision is judged again with the rounding its least squares
        # carry (_carried), where that is within the joint solve's bound
        solved = [None] * size if labelled is None or labelled.precision is None else labelled.precision.tolist()
        carried = _carried(errors, labelled.errors).tolist() if how in ("labels", "zeros and labels") \
            else [math.inf] * size
        examples = []
        for own_errors, feature, rounding, carry in zip(errors, features, solved, carried):
            found = recovered(own_errors, feature, rounding)
            if not found.determined and carry <= CARRIED_MOST:
                again = recovered(own_errors, feature, carry)
                found = again if again.determined else found
            examples.append(found)
        if head_source:  # features read off the head alone: its equations judge them (B <= C - 1)
            examples = _pinned_by_the_batch(examples, weight, bias, observed, observed_bias, precision,
                                            gradient_scale_known, shared_weight=how == "joint")
        stacked = torch.stack([result.feature for result in examples])
        diagnostics.update(_reproduction(examples, weight, bias, observed, observed_bias))
        reasons = [f"example {n}: {result.message}" for n, result in enumerate(examples) if not result.determined]
        misfit = {name: value for name, value in diagnostics.items()
                  if name.startswith("answer") and not value <= tol}
        if misfit:
            reasons.append(f"the recovered labels and features do not reproduce the head's gradients (relative "
                           f"errors {_describe(misfit)}, tolerance {tol:.2g})")
        return BatchSplit(examples, stacked, not reasons, "; ".join(reasons), rank, source, size, draws, diagnostics,
                          how, gradient_scale)

    def solved_jointly() -> Tuple[Optional[BatchSplit], str]:
        """The batch solved as one system for each candidate of ``counts``: its split where exactly one fits (else
        None), and what the solves said."""
        candidates = counts.reshape(-1, num_classes)
        wrong = candidates.sum(-1) != size
        if bool(wrong.any()):
            raise ValueError(f"counts sum to {int(candidates[wrong][0].sum())}, not to the batch size {size}")
        # a loop over the few candidate counts: each is a whole solve, and the batch is read only when one fits
        solves = [solve_jointly(weight_grad, weight, bias, bias_grad, row, precision=precision,
                                scale_known=gradient_scale_known, seed=seed) for row in candidates]
        fitting = [n for n, joint in enumerate(solves) if joint.features is not None]
        said = _joint_message(solves, candidates, fitting, precision)
        return (examples_of("joint", solves[fitting[0]]) if len(fitting) == 1 else None), said

    # an activation that never outputs an exact zero feeds the head: no draw can find an example's zero set (LeNet's
    # sigmoid features, nearly parallel, left draws at the rounding that spent the whole budget: 1.5 s at B = 4)
    dense = _dense_activation(below) if layer is None else None
    by_labels, found_by, draws, directions, found, sparse = None, "", 0, None, 0, dense is None
    # counts first (see the module doc); counts off the mass's lattice (mixup pairs) are a solve each, which the
    # other paths usually spare
    pinned = joint_possible and counts.reshape(-1, num_classes).shape[0] == 1
    joint = solved_jointly() if pinned else None  # (its split or None, what it said), or None where not tried
    if joint is not None and joint[0] is not None and joint[0].determined:
        return joint[0]
    labels_alone = head_source and can_complete(size, 0, num_classes) and not unseparable
    if labels_alone and size <= largest_batch(num_classes):  # each example has an equation to spare: labels first
        by_labels, found_by = by_labels_split("labels")
    if not found_by and gradient_scale_known and not unseparable and sparse:  # zeros give directions, not the scale
        subspace = _subspace(matrix, size, precision)
        if layer is None:
            check, remaining = _non_negative, None
        else:
            check, remaining = _HeadShaped(weight, precision), _Remaining(matrix, layer[1], precision, seed)
        directions, draws, sparse = _search(subspace, size, check, remaining, max_draws=max_draws, seed=seed)
        found = directions.shape[0]
        if head_source and sparse and found and can_complete(size, found, num_classes):
            # each direction the zeros gave is pinned by its label (one that fits none is dropped), and the examples
            # they did not give are sought by their labels once the others' terms are taken out
            by_labels, found_by = by_labels_split("zeros and labels", directions)
        if not found_by and sparse and found >= size:
            found_by = "zeros"
    if not found_by and labels_alone and size > largest_batch(num_classes):
        # the last resort, without zeros: examples whose labels are hard or share one weight
        by_labels, found_by = by_labels_split("labels")

    split = examples_of(found_by, by_labels) if found_by else None
    joint_said = ""
    if joint_possible and (split is None or not split.determined):
        # examples that were not found, or not determined, may still be read from the whole batch at once
        jointly, joint_said = joint if joint is not None else solved_jointly()
        if jointly is not None:
            if split is None or jointly.determined:
                split = jointly
            else:
                joint_said = "; solved as one system from its counts, its examples are not determined either"
    if split is not None:
        return split if split.determined or not joint_said else replace(split, message=split.message + joint_said)
    if unseparable:
        return refuse(unseparable + joint_said)
    labels_said = _labels_message(by_labels, size, num_classes) + joint_said if head_source else ""
    if not gradient_scale_known:
        return refuse("with an unknown gradient scale only the labels' structure splits a batch (from the head "
                      f"alone, B <= {largest_batch(num_classes, shared_weight=True)} of {num_classes} classes, or "
                      f"up to {largest_joint_batch(num_classes)} solved at once from their counts){labels_said}")
    if not sparse:
        why = f"the head's input is the output of {dense}, which has no exact zeros" if dense else (
            f"no draw of B - 1 = {size - 1} rows vanishes on any other row: the head's input has no exact zeros "
            "(sigmoid or other dense features)")
        return refuse(f"{why}, and the batch cannot be split by its zeros{labels_said}", draws)
    return refuse(f"found {found} of {size} example directions in {draws} draws (max_draws): too many examples "
                  "for the budget, examples with too few zeros, or not one batch of this model's "
                  f"examples{labels_said}", draws)


def _errors(features: torch.Tensor, scale_known: bool, directions: Optional[torch.Tensor], weight: torch.Tensor,
            weight_grad: torch.Tensor, bias_grad: Optional[torch.Tensor], diagnostics: Dict[str, float]
            ) -> Tuple[torch.Tensor, torch.Tensor, bool]:
    """Every example's ``e_n = p_n - y_n`` from the head's gradient and the features (B, d).

    ``E^T = B G pinv(H^T)`` gives ``e_n`` up to the inverse of the unknown scale of ``h_n`` (exactly when the scale
    is known); a head bias fixes the scales when ``B <= C - 1`` (``sum_n kappa_n e_n = B dL/db``). Adds the joint
    checks' relative errors to ``diagnostics``: ``G`` reproduced, ``dL/db`` reproduced, and (layer source, with
    the ``delta_n`` directions) ``delta_n`` parallel to ``(W^T e_n) * 1[h_n > 0]``.

    Returns:
        ``(errors (B, C), features (B, d), scale known)``, float64.
    """
    size, num_classes = features.shape[0], weight.shape[0]
    g = weight_grad.double()
    errors = least_squares_errors(features, g)
    diagnostics["weight_grad"] = _relative(errors.T @ features / size, g)
    if directions is not None:
        predicted = (errors @ weight.double()) * (features > 0)
        off = predicted - (predicted * directions).sum(1, keepdim=True) * directions  # directions: unit rows
        diagnostics["delta"] = float((torch.linalg.vector_norm(off, dim=1)
                                      / torch.linalg.vector_norm(predicted, dim=1).clamp_min(1e-300)).max())
    if bias_grad is None:
        return errors, features, scale_known
    db = bias_grad.double()
    if scale_known:
        diagnostics["bias_grad"] = _relative(errors.mean(0), db)
    elif size <= num_classes - 1:
        kappa = torch.linalg.lstsq(errors.T, size * db.unsqueeze(1)).solution.squeeze(1)
        # features are non-negative at either scale, so every kappa_n is positive for a true split
        diagnostics["bias_grad"] = _relative((kappa.unsqueeze(1) * errors).mean(0), db) \
            if bool((kappa > 0).all()) else math.inf
        if bool((kappa > 0).all()):
            return kappa.unsqueeze(1) * errors, features / kappa.unsqueeze(1), True
    return errors, features, scale_known


def _carried(errors: torch.Tensor, structured: torch.Tensor) -> torch.Tensor:
    """``(B,)`` the rounding each example's own gradient carries from a split by labels: how far the errors read
    off ``G`` by least squares (B, C) land from those its feature and structured label give (B, C), relative to each
    example's largest entry (the units of the joint solve's own measure, :func:`~gradleak.batch.joint.solve_jointly`;
    both sides of the split, where re-reading the errors from a rounded gradient sees only the least squares). Nearly
    parallel features amplify ``G``'s rounding in the least squares (measured on ResNet18 with 100 classes: 3e-7 to
    7e-6, 5 to 50 times float32's, with the errors read from ``G`` that far from the truth): at the gradient's own
    precision, right examples were refused for label entries a few 1e-7 below zero."""
    return (errors - structured).abs().amax(-1) / structured.abs().amax(-1).clamp_min(torch.finfo(errors.dtype).tiny)


def _pinned_by_the_batch(examples: List[RecoveryResult], weight: torch.Tensor, bias: Optional[torch.Tensor],
                         weight_grad: torch.Tensor, bias_grad: Optional[torch.Tensor], precision: float,
                         scale_known: bool, shared_weight: bool) -> List[RecoveryResult]:
    """The examples of a split, each determined one made undetermined where the batch's equations pin its label
    less well than the batch answers are given to: its error
    (:func:`~gradleak.batch.label_precision.split_label_errors`) above ``CARRIED_MOST`` (three of them within 1e-3,
    the bound the joint solve holds its examples to)."""
    errors = split_label_errors(examples, weight, bias, weight_grad, bias_grad, precision=precision,
                                scale_known=scale_known, shared_weight=shared_weight)
    said = "the batch's gradient pins this split's label only to {:.2g} (max-abs; at most {:.2g}): another " \
           "re-mixing of the examples fits it about as well"
    return [result if error <= CARRIED_MOST or not result.determined else
            replace(result, determined=False, message=said.format(error, CARRIED_MOST))
            for result, error in zip(examples, errors.tolist())]


def _reproduction(examples: List[RecoveryResult], weight: torch.Tensor, bias: Optional[torch.Tensor],
                  weight_grad: torch.Tensor, bias_grad: Optional[torch.Tensor]) -> Dict[str, float]:
    """Relative errors of the head's gradients rebuilt from the recovered labels and features alone:
    ``(1/B) sum_n (softmax(W h_n + b) - y_n) h_n^T`` against ``G`` ("answer_weight_grad"), and the bias
    gradient ("answer_bias_grad")."""
    features = torch.stack([result.feature for result in examples]).double()
    labels = torch.stack([result.label for result in examples]).double()
    logits = features @ weight.double().T + (0.0 if bias is None else bias.double())
    errors = torch.softmax(logits, dim=-1) - labels
    out = {"answer_weight_grad": _relative(errors.T @ features / len(examples), weight_grad.double())}
    if bias_grad is not None:
        out["answer_bias_grad"] = _relative(errors.mean(0), bias_grad.double())
    return out


def _checked(value: Optional[torch.Tensor], name: str, shape: torch.Size) -> torch.Tensor:
    if value is None:
        raise ValueError(f"gradients have no entry for the {name}")
    value = as_tensor(value, name).detach()
    if value.shape != shape:
        raise ValueError(f"the {name} has shape {tuple(value.shape)}, expected {tuple(shape)}")
    check_finite(value, name)
    return value


def _labels_message(by_labels: Optional[LabelSplit], size: int, num_classes: int) -> str:
    """What the search by label structure said, for a refusal (head source)."""
    if by_labels is None:
        return (f"; by their labels' structure the head pins examples only for B <= {largest_batch(num_classes)} "
                f"with {num_classes} classes ({largest_batch(num_classes, shared_weight=True)} with hard labels, "
                "one smoothing eps or batch mixup)")
    if by_labels.candidates < size:
        return f"; by their labels' structure {by_labels.candidates} of {size} examples were found"
    return (f"; by their labels' structure no set of {size} of the {by_labels.candidates} candidates rebuilds the "
            f"gradient alone (best relative error {by_labels.misfit:.2g}, next {by_labels.runner_up:.2g})")


def _joint_message(solves: List[LabelSplit], candidates: torch.Tensor, fitting: List[int], precision: float) -> str:
    """What the joint solves with the candidate counts (K, C) found, for a refusal."""
    if len(fitting) == 1:
        return ""
    if fitting:
        return (f"; solved as one system, counts {' and '.join(str(candidates[n].tolist()) for n in fitting)} "
                "all fit: the counts are ambiguous")
    joint, counts = solves[0], candidates[0].tolist()
    others = f" (and {len(solves) - 1} counts one example away)" if len(solves) > 1 else ""
    said = f"; solved as one system with counts {counts}{others}, "
    if not joint.candidates:
        return said + (f"no start converged (best residual {joint.misfit / precision:.3g} rounding units): the counts "
                       "or the label format (one eps for the batch) do not hold, or the starts missed")
    return said + (f"two batches fit (residuals {joint.misfit / precision:.3g} and {joint.runner_up / precision:.3g} "
                   "rounding units)")


def _relative(estimate: torch.Tensor, observed: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(estimate - observed) / torch.linalg.vector_norm(observed).clamp_min(1e-300))


def _describe(values: Mapping[str, float]) -> str:
    return ", ".join(f"{name} {value:.2g}" for name, value in values.items())


def _joint_tolerance(precision: float) -> float:
    """Largest relative error of the joint reproductions: the gradient's rounding, amplified by the split's
    conditioning (measured below 1e-5 in float32) and with room to spare; a wrong split errs by O(0.1)."""
    return 1e4 * precision


#: Activations whose outputs are exactly zero at most at one point or by underflow at very negative inputs (below
#: about -88 for a float32 sigmoid or softplus). GELU, whose output underflows to zero below about -14, is not one.
_DENSE_ACTIVATIONS = (nn.Sigmoid, nn.Tanh, nn.Softplus)


def _dense_activation(below: Optional[Tuple[nn.Module, str, nn.Module]]) -> Optional[str]:
    """The name of the activation that feeds the head (``below``, :func:`layers_below_head`'s answer, in registration
    order) when it never outputs an exact zero, else None. Registration order can mislead only towards skipping the
    search by zeros, never towards a wrong split."""
    return type(below[0]).__name__ if below is not None and isinstance(below[0], _DENSE_ACTIVATIONS) else None


def _relu_layer_below(below: Optional[Tuple[nn.Module, str, nn.Module]], dim: int
                      ) -> Optional[Tuple[str, nn.Linear]]:
    """``(name, module)`` of the ``nn.Linear`` that feeds the head through a ReLU (``below``,
    :func:`layers_below_head`'s answer, in registration order): ``Linear -> ReLU -> [Flatten | Dropout | Identity]*
    -> head`` with ``d`` outputs; else None. Registration order is not always execution order: the joint checks
    reject a layer that does not produce the head's input."""
    if below is None or not isinstance(below[0], nn.ReLU):
        return None
    _, name, module = below
    if not isinstance(module, nn.Linear) or module.out_features != dim:
        return None
    return name, module


def _subspace(matrix: torch.Tensor, size: int, precision: float, rows: Optional[torch.Tensor] = None
              ) -> _Subspace:
    """The top-``size`` left singular subspace of ``matrix`` (d, m), with the rounding of its rows.

    ``rows`` (d,): the norms the rows' rounding is relative to, when ``matrix`` was computed from another one (a
    projection cancels most of a row, not its rounding); rows with a zero norm there are exactly zero.
    """
    m = matrix.double()
    left, values, _ = torch.linalg.svd(m, full_matrices=False)
    rows = torch.linalg.vector_norm(m, dim=1) if rows is None else rows
    live = rows > 0
    basis = left[:, :size] * live.unsqueeze(1)  # rows that are exactly zero stay exactly zero
    # the SVD's own rounding is relative to the whole matrix, so a small row carries it too: nothing next to a float32
    # gradient's rounding, as much as a float64 one's
    rounding = precision * rows + torch.finfo(torch.float64).eps * values[0]
    return _Subspace(basis, values[:size], rounding / values[size - 1], live, precision, rows)


def _non_negative(x: torch.Tensor, zero: torch.Tensor, noise: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Head source (and the layer's inputs): an example's direction is non-negative (ReLU features) up to sign.

    Args:
        x: ``(K, d)`` unit candidates; zero: ``(K, d)`` their zero sets; noise: ``(K, d)`` their entries' rounding.

    Returns:
        ``(passes (K,), x with its sign fixed and its zeros exactly zero (K, d))``.
    """
    x = x * torch.where(x.sum(1, keepdim=True) >= 0, 1.0, -1.0)
    return (x >= -ZERO_UNITS * noise).all(1), torch.where(zero, 0.0, x)


class _HeadShaped:
    """Layer source: on its support a ``delta_n`` equals ``W^T e`` for some ``e`` that sums to zero.

    Called like :func:`_non_negative`; the sign of a passing candidate is arbitrary (a ``delta_n`` has either).
    """

    def __init__(self, weight: torch.Tensor, precision: float) -> None:
        num_classes = weight.shape[0]
        # orthonormal basis of the vectors summing to zero: e = N z with C - 1 free entries
        centred = torch.eye(num_classes, dtype=torch.float64) - 1.0 / num_classes
        basis = torch.linalg.qr(centred)[0][:, :num_classes - 1]
        self.shapes = weight.double().T @ basis  # (d, C - 1)
        self.unknowns = num_classes - 1
        self.precision = precision

    def __call__(self, x: torch.Tensor, zero: torch.Tensor, noise: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        support = (~zero).double()
        gram = torch.einsum("kd,da,db->kab", support, self.shapes, self.shapes)
        rhs = torch.einsum("kd,da->ka", support * x, self.shapes)
        coefficients = torch.linalg.lstsq(gram, rhs.unsqueeze(-1)).solution.squeeze(-1)
        misfit = torch.linalg.vector_norm(support * (x - coefficients @ self.shapes.T), dim=1)
        # rounding of x on the support, and of the products W^T e (relative to the vector, unit norm)
        allowed = FIT_UNITS * (torch.linalg.vector_norm(support * noise, dim=1) + self.precision)
        enough = support.sum(1) >= self.unknowns + SPARE_EQUATIONS
        sign = torch.where(x.sum(1, keepdim=True) >= 0, 1.0, -1.0)
        return enough & (misfit <= allowed), torch.where(zero, 0.0, x * sign)


def _search(subspace: _Subspace, size: int, check, remaining: Optional[_Remaining], *, max_draws: int, seed: int
            ) -> Tuple[torch.Tensor, int, bool]:
    """Draw null directions of ``size - 1`` live rows at a time until ``size`` distinct directions pass (with
    ``remaining``, the last ``REMAINING`` are also sought through their inputs after every chunk).

    Returns ``((n, d) unit directions, draws made, sparse)``; ``n < size`` when the budget ran out, or at once
    (``sparse`` False) when no draw of the first chunk has a single zero beyond its own rows.
    """
    basis = subspace.basis
    # rows drawn from: those whose basis row stands above its rounding (after a projection, a row where only the
    # projected-out examples were active keeps nothing but rounding, in a random direction)
    live = (subspace.live & (torch.linalg.vector_norm(basis, dim=1) > SIGNAL_UNITS * subspace.row_noise)
            ).nonzero().squeeze(1)
    generator = torch.Generator().manual_seed(seed)
    kept = basis.new_zeros(0, basis.shape[1])  # coefficients of the directions found so far
    kept_x = basis.new_zeros(0, basis.shape[0])
    drawn = chunk = 0
    if live.numel() < size - 1:
        return kept_x, drawn, True  # too few rows to draw from: nothing can be said about zeros
    while kept.shape[0] < size and drawn < max_draws:
        missing = size - kept.shape[0]
        if remaining is not None and missing <= REMAINING and missing < size:
            q, x, zero = _refine(subspace, remaining.zero_sets(kept_x, missing), size)
            kept, kept_x = _keep(q, x, zero, subspace, check, kept, kept_x)
            if kept.shape[0] == size:
                break
        count = 1 if size == 1 else min(CHUNK, max_draws - drawn)
        drawn += count
        norm_power, found_power = ROW_WEIGHTS[chunk % len(ROW_WEIGHTS)]
        found_zeros = (kept_x[:, live] == 0).sum(0).double()
        weights = subspace.row_norm[live] ** -norm_power * (1.0 + found_zeros) ** found_power
        x, zero, noise = _draws(subspace, size, live, weights, count, generator)
        if chunk == 0 and x.shape[0] == 0:
            return kept_x, drawn, False  # no draw vanishes beyond its own rows anywhere: dense features
        chunk += 1
        # the same check on the raw draws first (their rounding is bounded loosely): most draws mix examples.
        # One draw per zero set (hits on one example repeat theirs); mixtures vanish only where all their examples
        # do, so the draws with the most zeros are checked first.
        _, group = torch.unique(zero, dim=0, return_inverse=True)
        first = torch.full((int(group.max()) + 1 if group.numel() else 0,), group.numel()).scatter_reduce(
            0, group, torch.arange(group.numel()), reduce="amin")
        order = first[torch.argsort((zero[first] & subspace.live).sum(1), descending=True)[:RAW_CHECKS]]
        x, zero, noise = x[order], zero[order], noise[order]
        zero = zero[check(x, zero, noise)[0]]
        q, x, zero = _refine(subspace, zero, size)
        kept, kept_x = _keep(q, x, zero, subspace, check, kept, kept_x)
        if size == 1:
            break
    return kept_x, drawn, True


def _keep(q: torch.Tensor, x: torch.Tensor, zero: torch.Tensor, subspace: _Subspace, check, kept: torch.Tensor,
          kept_x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The kept coefficients (n, B) and directions (n, d), with the refined candidates ``q`` (K, B), ``x`` and
    ``zero`` (K, d) that pass ``check`` and are new appended (the sparsest version of each first)."""
    passed, signed = check(x, zero, subspace.noise(q))
    q, signed, zeros = q[passed], signed[passed], (zero & subspace.live)[passed].sum(1)
    order = torch.argsort(zeros, descending=True)
    q, signed = q[order], signed[order]
    new = _distinct(q, kept, subspace.precision)
    return torch.cat([kept, q[new]]), torch.cat([kept_x, signed[new]])


class _Remaining:
    """Layer source: the last few examples follow from the others' directions through their inputs ``f_m``.

    Projecting the found ``delta_n`` out of ``dL/dA = (1/B) sum_n delta_n f_n^T`` leaves ``sum_m (P delta_m) f_m^T``
    over the ``r`` missing examples: its row space is spanned by their ``f_m``. With ``r = 1`` that is ``f_m`` up to
    scale; with a few more, the ``f_m`` are the sparse non-negative vectors of that space when the layer's input
    is itself a ReLU output (found like the ``delta_n``, with ``r - 1`` zeros instead of ``B - 1``). Each ``f_m``
    gives its example's zero set where ``c A f_m + b_A <= 0`` for its unknown scale ``c``: two candidates (the
    sign of ``c``) without a bias, one per interval between the breakpoints ``c = -b_i / (A f_m)_i`` with one.
    """

    def __init__(self, layer_grad: torch.Tensor, layer: nn.Linear, precision: float, seed: int) -> None:
        self.layer_grad = layer_grad.double()
        self.columns = torch.linalg.vector_norm(self.layer_grad, dim=0)  # the rounding of the projected columns
        self.weight = layer.weight.detach().double()
        self.bias = None if layer.bias is None else layer.bias.detach().double()
        self.precision = precision
        self.seed = seed
        self.sparse_inputs = True  # until a search of the inputs finds no zeros (the layer reads raw inputs)
        self.tried: Optional[int] = None

    def zero_sets(self, found: torch.Tensor, missing: int) -> torch.Tensor:
        """``(K, d)`` candidate zero sets of the ``missing`` examples, given the others' unit directions (k, d).

        Each call with more than one missing draws afresh; one missing example is tried once per set of others.
        """
        if (missing > 1 and not self.sparse_inputs) or (missing == 1 and self.tried == found.shape[0]):
            return torch.zeros(0, found.shape[1], dtype=torch.bool)
        self.tried, self.seed = found.shape[0], self.seed + 1
        projected = self.layer_grad - found.T @ torch.linalg.lstsq(found.T, self.layer_grad).solution
        if missing == 1:
            inputs = torch.linalg.svd(projected, full_matrices=False)[2][:1]  # f_m up to scale, (1, n_in)
        else:
            subspace = _subspace(projected.T, missing, self.precision, self.columns)
            inputs, _, self.sparse_inputs = _search(subspace, missing, _non_negative, None, max_draws=CHUNK,
                                                    seed=self.seed)
        pre = inputs @ self.weight.T  # (n, d): A f_m up to scale
        if self.bias is None:
            return torch.cat([pre <= 0, pre >= 0])
        # one scale c inside each interval between breakpoints (either sign), and beyond the outermost ones
        cuts = torch.sort(-self.bias / torch.where(pre == 0, torch.nan, pre), dim=1).values
        cuts = torch.where(torch.isfinite(cuts), cuts, torch.nan)
        scales = torch.cat([(cuts[:, 1:] + cuts[:, :-1]) / 2, cuts.nan_to_num(torch.inf).min(1, keepdim=True).values
                            - 1.0, cuts.nan_to_num(-torch.inf).max(1, keepdim=True).values + 1.0], dim=1)
        zero = scales.unsqueeze(2) * pre.unsqueeze(1) + self.bias <= 0  # (n, intervals, d)
        return zero[torch.isfinite(scales) & (scales != 0)]


def _zeros_needed(size: int) -> int:
    """Zeros (among live rows) a direction of a ``size``-dimensional span needs to be pinned and checked by them;
    one example's span is its direction already."""
    return 0 if size == 1 else size - 1 + SPARE_ZEROS


def _draws(subspace: _Subspace, size: int, live: torch.Tensor, weights: torch.Tensor, count: int,
           generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, zero, noise)``, each ``(K, d)``: the unit directions of ``count`` draws that have zeros to spare, their
    zero sets and the rounding of their entries.

    Each draw is the null direction of ``size - 1`` random live rows of the basis that are independent (each
    one's part outside the span of the previous ones is at least ``INDEPENDENT`` of its norm): ReLU patterns are
    correlated, and many rows share a low-dimensional span (rows where the same few examples are active), so plain
    random rows are often dependent and leave several null directions. The draw's rounding is that of its rows,
    propagated through the inverse of their smallest singular value.
    """
    basis = subspace.basis
    if size == 1:
        q = basis.new_ones(1, 1)
        noise = subspace.row_noise.unsqueeze(0)
    else:
        rows, valid = _independent_rows(basis, live, weights, size - 1, count, generator)
        rows = rows[valid]
        _, singular, vh = torch.linalg.svd(basis[rows], full_matrices=True)
        q = vh[:, -1, :]  # (K, B)
        drawn_noise = torch.linalg.vector_norm(subspace.row_noise[rows], dim=1) / singular[:, -1]
        noise = subspace.row_noise + torch.linalg.vector_norm(basis, dim=1) * drawn_noise.unsqueeze(1)
    x = q @ basis.T
    zero = x.abs() <= DRAW_ZERO_UNITS * noise
    spare = (zero & subspace.live).sum(1) >= _zeros_needed(size)
    return x[spare], zero[spare], noise[spare]


def _independent_rows(basis: torch.Tensor, live: torch.Tensor, weights: torch.Tensor, count: int, draws: int,
                      generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(rows (draws, count), valid (draws,))``: per draw, ``count`` live rows chosen one at a time, each the first
    of ``ROW_TRIES`` random rows whose part outside the span of those already chosen is large enough (Gram-Schmidt,
    all draws at once). A draw that finds no such row at some step is not valid."""
    chosen = torch.empty(draws, count, dtype=torch.long)
    span = basis.new_zeros(draws, 0, basis.shape[1])  # orthonormal rows spanning the chosen ones
    valid = torch.ones(draws, dtype=torch.bool)
    for step in range(count):
        tries = live[torch.multinomial(weights, draws * ROW_TRIES, replacement=True, generator=generator)
                     .view(draws, ROW_TRIES)]
        u = basis[tries]  # (K, T, B)
        outside = u - torch.einsum("ktb,kjb,kjc->ktc", u, span, span)
        ratio = torch.linalg.vector_norm(outside, dim=2) / torch.linalg.vector_norm(u, dim=2)
        ok = ratio > INDEPENDENT
        first = ok.to(torch.uint8).argmax(1)  # the first acceptable try
        valid &= ok.any(1)
        chosen[:, step] = tries.gather(1, first.unsqueeze(1)).squeeze(1)
        picked = outside[torch.arange(draws), first]
        span = torch.cat([span, (picked / torch.linalg.vector_norm(picked, dim=1, keepdim=True).clamp_min(1e-300))
                          .unsqueeze(1)], dim=1)
    return chosen, valid


def _refine(subspace: _Subspace, zero: torch.Tensor, size: int
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Least-squares directions over whole zero sets, pruned of the rows that are not zeros, then regrown.

    A raw zero set may hold a few rows where the direction is small but not zero (a draw's rounding is only
    bounded, loosely). The least-squares fit over the set leaves such a row standing out: rows far above the set's
    median misfit go at once, then the worst row while any misfits its rounding (``PRUNE_STEPS`` at most). The
    zero set is then read afresh at the fit's own rounding, and fitted once more.

    Args:
        zero: ``(K, d)`` zero sets.

    Returns:
        ``(q (K', B), x (K', d), zero (K', d))``: unit coefficients, unit directions ``basis @ q`` and their zero
        sets, for the candidates whose zero set pins one direction and keeps zeros to spare.
    """
    live = subspace.live
    zero = zero.clone()
    q, x, misfit, separated = _fit_zero_sets(subspace, zero)
    typical = torch.where(zero & live, misfit, torch.nan).nanmedian(dim=1).values
    zero &= misfit <= torch.clamp(OUTLIER_RATIO * typical, min=ZERO_UNITS).unsqueeze(1)
    rows = torch.arange(zero.shape[0])
    for _ in range(PRUNE_STEPS):
        q, x, misfit, separated = _fit_zero_sets(subspace, zero)
        worst = torch.where(zero & live, misfit, -1.0).max(dim=1)
        pruning = worst.values > ZERO_UNITS
        if not bool(pruning.any()):
            break
        zero[rows[pruning], worst.indices[pruning]] = False
    for _ in range(2):  # regrow the zero set at the fit's rounding, refit
        zero = misfit <= ZERO_UNITS  # dead rows (exactly zero) included
        q, x, misfit, separated = _fit_zero_sets(subspace, zero)
    keep = separated & ~(zero & (misfit > ZERO_UNITS)).any(1) & ((zero & live).sum(1) >= _zeros_needed(size))
    return q[keep], x[keep], zero[keep]


def _fit_zero_sets(subspace: _Subspace, zero: torch.Tensor
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The unit direction of the span closest to vanishing on each zero set (K, d).

    Returns ``(q (K, B), x (K, d), misfit (K, d), separated (K,))``: ``misfit`` is ``|x|`` in units of its rounding;
    ``separated`` is False when a second direction vanishes there almost as well (the zero set is shared by
    mixtures of several examples, or too small to pin one).
    """
    basis = subspace.basis
    gram = torch.einsum("kd,da,db->kab", zero.double(), basis, basis)
    eigenvalues, vectors = torch.linalg.eigh(gram)
    q = vectors[:, :, 0]
    x = q @ basis.T
    misfit = x.abs() / subspace.noise(q).clamp_min(1e-300)
    if basis.shape[1] == 1:
        separated = torch.ones(q.shape[0], dtype=torch.bool)
    else:
        separated = eigenvalues[:, 1] > subspace.precision * eigenvalues[:, -1]
    return q, x, misfit, separated


def _distinct(q: torch.Tensor, kept: torch.Tensor, precision: float) -> torch.Tensor:
    """``(K,)`` which of the unit coefficient rows ``q`` are new: not within ``sqrt(precision)`` of a kept one (or
    of an earlier row of ``q``) in angle."""
    close = 1.0 - precision ** 0.5
    seen = (q @ kept.T).abs().gt(close).any(1) if kept.shape[0] else torch.zeros(q.shape[0], dtype=torch.bool)
    earlier = torch.triu((q @ q.T).abs().gt(close), diagonal=1).any(0)
    return ~seen & ~earlier


def _layer_features(directions: torch.Tensor, layer: nn.Linear,
                    layer_grads: Tuple[torch.Tensor, Optional[torch.Tensor]]
                    ) -> Tuple[torch.Tensor, bool, Dict[str, float]]:
    """Every example's head input from the ``delta_n`` directions (B, d) and the layer below.

    ``dL/dA = (1/B) sum_n delta_n f_n^T`` gives ``s_n f_n`` for each direction's unknown scale ``s_n``;
    ``dL/db_A = (1/B) sum_n delta_n`` gives ``s_n`` itself when ``A`` has a bias, and then ``h_n = relu(A f_n +
    b_A)`` at its true scale. Without a bias ``h_n`` is known up to a positive scale once the sign of ``s_n`` is
    the one whose active set is the direction's support.

    Returns:
        ``(features (B, d), scale known, diagnostics)``.
    """
    size = directions.shape[0]
    weight_grad, bias_grad = (None if g is None else g.double() for g in layer_grads)
    scaled = torch.linalg.lstsq(directions.T, weight_grad).solution * size  # (B, n_in): s_n f_n
    diagnostics = {"layer_grad": _relative(directions.T @ scaled / size, weight_grad)}
    weight = layer.weight.detach().double()
    support = directions != 0
    if bias_grad is not None:
        scales = torch.linalg.lstsq(directions.T, bias_grad.unsqueeze(1)).solution.squeeze(1) * size
        diagnostics["layer_bias_grad"] = _relative(directions.T @ scales / size, bias_grad)
        if bool((scales == 0).any()):  # a direction with no part in dL/db_A: not one of this batch's examples
            diagnostics["layer_bias_grad"] = math.inf
            scales = torch.where(scales == 0, 1.0, scales)
        inputs = scaled / scales.unsqueeze(1)
        features = torch.relu(inputs @ weight.T + layer.bias.detach().double())
        return features, True, diagnostics
    pre = scaled @ weight.T  # (B, d): s_n (A f_n)
    sign = torch.where((pre * support).sum(1, keepdim=True) >= 0, 1.0, -1.0)
    return torch.relu(sign * pre), False, diagnostics
