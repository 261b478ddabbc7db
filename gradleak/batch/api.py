"""``recover_batch``: what the gradient of a whole mini-batch gives away about its labels."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

import torch
from torch import nn

from .._checks import as_tensor, check_finite, positive_int
from ..head import GradientsLike, find_head, head_gradients, named_gradients, storage_precision
from ..labels import LABEL_FORMATS
from ..recovery import RecoveryResult, recover_from_gradients
from ..recovery.api import GRADIENT_SCALES
from .mass import (LatticeFit, class_mean_logits, class_prediction_mass, fit_counts, fit_lattice_unknown_scale,
                   in_spacings, lattice_starts, lattice_starts_unknown_scale, mean_feature, nearby_counts,
                   prediction_mass, refit_lattice)
from .split import BatchSplit, split_batch
from .spread import SPREAD_UNKNOWNS, fit_spread, spread_identified, spread_unknowns

#: How far (in examples, times ``1 - eps``) a class mass may sit from its lattice point and still fix the counts:
#: a tenth of the spacing. An estimate that is off by a sizeable fraction of an example lands between lattice
#: points in some class; one that is off by whole examples in every class at once is not caught.
LATTICE_TOL = 0.1
#: eps counts as determined when ``AMBIGUITY_RATIO`` standard errors stay below ``EPS_TOL`` (the rule the
#: single-example decision applies to a label's standard error).
EPS_TOL = 1e-3
AMBIGUITY_RATIO = 3.0
#: Rounds of refining the summed predictions with the last round's counts and eps (see :func:`_class_mass`).
MASS_ROUNDS = 5
#: Largest batch split into its examples: :func:`~gradleak.batch.split.split_batch` costs about ``B^2`` and found
#: every example of 30 in 32 batches of 16 on ReLU MLPs (and most at 8 from the head alone), fewer beyond.
SPLIT_MAX_BATCH = 16
#: The split's draw budget here (``max_draws`` overrides it): B = 16 needed 12k-29k draws on ReLU MLPs, and a batch
#: that cannot be split spends all of it (~2.5 s per 20k draws at B = 4 on one core).
SPLIT_MAX_DRAWS = 50_000


@dataclass
class BatchRecoveryResult:
    """What a batch gradient gave away.

    Attributes:
        class_mass: ``(C,)`` float64, the sum of the batch's soft labels (``counts`` for hard labels), or None
            when the batch size is unknown.
        counts: ``(C,)`` int64, the examples per dominant class, or None (no lattice point fits the class mass, or
            a recovered example's two largest label entries lie within ``EPS_TOL`` of each other, as in an
            even mixup).
        eps: the common label-smoothing mass (0.0 for hard labels), or None (also for split examples smoothed
            with different eps: read each example's).
        examples: one :class:`~gradleak.RecoveryResult` per example when the batch could be split (B = 1 always),
            else ``[]``.
        determined: whether the gradient pins down ``counts`` and ``eps`` (and ``examples`` when there are any);
            False means "cannot tell": read ``message``.
        counts_determined: whether ``counts`` alone are pinned down (the class mass sits on its lattice point),
            even where ``eps`` is not.
        message: why not determined, or "".
        batch_size: the B used (given, or implied by the rank), or None.
        rank: numerical rank of the head's weight gradient (its rows sum to zero, so it is at most ``C - 1``).
        implied_batch_size: ``rank`` when it is below ``min(C - 1, d)`` (each example adds one), else None: the
            gradient says only "at least ``rank``".
        label_format: "hard", "smoothing" or "mixup": the format the answer was read under.
        method: "single" (B = 1: :func:`gradleak.recover_from_gradients`), "split" (the batch split into its
            examples, :func:`~gradleak.batch.split.split_batch`) or "class_mass" (see :mod:`gradleak.batch.mass`).
        lattice_residual: how far the class mass sits from its count lattice, in examples (nan without one).
        eps_error: how well ``eps`` is known: its standard error from the lattice fit, or how far it moved between
            the estimates of the mean feature when that is more (nan without one).
        gradient_scale: ``s`` with observed gradients = ``s *`` the true ones: 1.0 when the scale is known,
            recovered with ``gradient_scale="unknown"`` (``-lr`` for one plain SGD step's weight delta).
        split_message: why the batch was not split into its examples, or why its examples were not used ("" when
            they were, or for B = 1).
    """

    class_mass: Optional[torch.Tensor]
    counts: Optional[torch.Tensor]
    eps: Optional[float]
    examples: List[RecoveryResult]
    determined: bool
    counts_determined: bool
    message: str
    batch_size: Optional[int]
    rank: int
    implied_batch_size: Optional[int]
    label_format: str
    method: str
    lattice_residual: float = math.nan
    eps_error: float = math.nan
    gradient_scale: float = 1.0
    split_message: str = ""
    extra: Dict[str, object] = field(default_factory=dict, repr=False)


def numerical_rank(weight_grad: torch.Tensor) -> int:
    """Singular values of ``weight_grad`` (C, d) above ``max(C, d) * u * sigma_max``, ``u`` the precision its
    values carry (float32 values cast to float64 keep float32's)."""
    matrix = weight_grad.detach()
    largest_row = torch.linalg.vector_norm(matrix, dim=1).argmax()
    precision = storage_precision(matrix, matrix[largest_row])
    values = torch.linalg.svdvals(matrix.double())
    return int((values > max(matrix.shape) * precision * values[0]).sum())


def recover_batch(model: nn.Module, gradients: GradientsLike, *, batch_size: Optional[int] = None,
                  label_format: str = "auto", gradient_scale: str = "known", head: Union[str, nn.Linear, None] = None,
                  split: bool = True, **options) -> BatchRecoveryResult:
    """The class mass, counts and smoothing eps of a batch from the gradient of its mean soft-target
    cross-entropy; every example's soft label and feature when the batch can be split into its examples.

    A batch of up to ``SPLIT_MAX_BATCH`` examples is first split
    (:func:`~gradleak.batch.split.split_batch`: given the class mass's counts, as one system while ``B <= C - 1``,
    :mod:`gradleak.batch.joint`, first where the mass pins them; by the labels' structure while
    ``B <= (C - 3) / 2``; by ReLU features' zeros, below the head or in it while ``B <= C - 1``); the split's
    answer stands only where the class mass (when the head has a bias) agrees with it, and where its examples are
    determined or the class mass is not. Otherwise the answer is the class mass with its counts and eps
    (:mod:`gradleak.batch.mass`), and ``split_message`` says why there are no examples.

    Args:
        model: the classifier; its head (the last ``nn.Linear``, or ``head``) needs a bias for ``B > 1`` unless
            the batch can be split: the class mass is read from ``dL/db``.
        gradients: ``{parameter name: gradient}`` or a sequence aligned with ``model.parameters()``, of the mean
            loss over the batch (``reduction="mean"``, PyTorch's default).
        batch_size: B, when known; None reads it from the numerical rank of the head's weight gradient, which
            tells it only while ``B < C - 1``.
        label_format: "auto", "hard", "smoothing" (one eps for the whole batch) or "mixup".
        gradient_scale: "known", or "unknown" when the gradients arrive as ``s`` times the true ones (a client's
            weight delta ``-lr * g``, a clipped update): ``s`` is then fitted together with the counts and eps, and
            the answer is determined only when no other counts fit at any scale. Mixup gives no lattice to fix it.
            Such a batch is split by its labels' structure only (one example at a time, or all at once from the
            counts), each set of examples fitting ``s`` too.
        split: whether to try splitting a batch of ``2..SPLIT_MAX_BATCH`` examples.
        **options: passed to :func:`gradleak.recover_from_gradients` for ``B = 1``, and to
            :func:`~gradleak.batch.split.split_batch` (``max_draws``, ``seed``, and the options of
            :func:`gradleak.recover_label` for every example) for a split.

    Returns:
        :class:`BatchRecoveryResult`. ``B = 1`` gives the same label and feature as
        :func:`gradleak.recover_from_gradients`.
    """
    if label_format not in ("auto",) + LABEL_FORMATS:
        raise ValueError(f"label_format must be one of {('auto',) + LABEL_FORMATS}, got {label_format!r}")
    if gradient_scale not in GRADIENT_SCALES:
        raise ValueError(f"gradient_scale must be one of {GRADIENT_SCALES}, got {gradient_scale!r}")
    if batch_size is not None:
        positive_int(batch_size, "batch_size")
    found = find_head(model, head)
    named = named_gradients(model, gradients)
    parts = head_gradients(model, named, found)
    weight_grad = as_tensor(parts["weight_grad"], "weight_grad")
    if weight_grad.shape != parts["weight"].shape:
        raise ValueError(f"the head weight has shape {tuple(parts['weight'].shape)} but its gradient has "
                         f"{tuple(weight_grad.shape)}")
    check_finite(weight_grad, "weight_grad")
    num_classes, dim = weight_grad.shape
    rank = numerical_rank(weight_grad)
    if rank == 0:
        raise ValueError("the head's weight gradient is all zeros (to its precision): nothing to recover")
    implied = rank if rank < min(num_classes - 1, dim) else None
    if batch_size is not None and rank > batch_size:
        raise ValueError(f"batch_size={batch_size} but the head's weight gradient has rank {rank}: it holds at "
                         f"least {rank} examples (or noise)")
    size = batch_size if batch_size is not None else implied
    common = dict(rank=rank, implied_batch_size=implied, batch_size=size)
    if size is None:
        return BatchRecoveryResult(None, None, None, [], False, False,
                                   f"the batch size is unknown: the head's weight gradient has rank {rank}, the "
                                   f"most its {num_classes} classes allow (rows sum to zero), so B >= {rank}; "
                                   "pass batch_size", label_format=label_format, method="class_mass", **common)
    if size == 1:
        return _single(model, named, found, label_format, dict(options, gradient_scale=gradient_scale), common)
    scale_known = gradient_scale == "known"
    # the class mass first: its counts let the split solve a batch that nothing else splits
    mass = None if parts["bias_grad"] is None or (label_format == "mixup" and not scale_known) else \
        _class_mass(parts, size, label_format, scale_known, common)
    parted, not_split = None, ""
    if not split:
        not_split = "not tried (split=False)"
    elif size > SPLIT_MAX_BATCH:
        not_split = f"B = {size} exceeds SPLIT_MAX_BATCH = {SPLIT_MAX_BATCH}"
    else:
        parted = split_batch(model, named, batch_size=size, label_format=label_format, head=found[1],
                             **{"max_draws": SPLIT_MAX_DRAWS, "counts": _candidate_counts(mass), **options,
                                "gradient_scale": gradient_scale})
        not_split = parted.message if not parted.examples else ""
    if mass is None and parted is not None and parted.examples:
        return _from_split(parted, None, common)  # no class mass, or (mixup at an unknown scale) none that fits
    if mass is None:
        if parts["bias_grad"] is None:
            raise ValueError("the head has no bias: a batch's class mass is read from the head's bias gradient (one "
                             f"example, B = 1, needs none), and the batch was not split into its examples: "
                             f"{not_split}")
        mass = _class_mass(parts, size, label_format, scale_known, common)  # mixup at an unknown scale: says why not
    if parted is not None and parted.examples:
        if parted.determined or not mass.determined:
            return _from_split(parted, mass, common)
        # examples the split could not pin down do not overrule a class mass that is determined
        not_split = (f"split into examples that are not determined ({parted.message}): the class mass answers; "
                     "the split is in extra['split']")
        mass.extra["split"] = parted
    mass.split_message = not_split
    return mass


def _candidate_counts(mass: Optional[BatchRecoveryResult]) -> Optional[torch.Tensor]:
    """``(K, C)`` counts for the split to solve the batch with: the class mass's, and where the mass is off its
    lattice its nearest neighbours too (the solve tells them apart); None without counts."""
    if mass is None or mass.counts is None:
        return None
    if mass.counts_determined:
        return mass.counts.unsqueeze(0)
    return torch.cat([mass.counts.unsqueeze(0), nearby_counts(mass.class_mass, mass.counts, mass.eps)])


def _from_split(parted: BatchSplit, mass: Optional[BatchRecoveryResult], common: Dict[str, object]
                ) -> BatchRecoveryResult:
    """The batch read off its examples, judged with their own fit tests and the split's joint checks, and against
    the class mass (``mass``, when the head has a bias): a class mass that fixes other counts leaves the answer
    undetermined."""
    examples = parted.examples
    labels = torch.stack([result.label.detach().double() for result in examples])
    class_mass = labels.sum(0)
    formats = {result.label_format for result in examples}
    label_format = next(name for name in ("mixup", "smoothing", "hard") if name in formats)
    counts = dominant_counts(labels)
    eps = None
    if label_format != "mixup":
        values = torch.tensor([result.eps if result.label_format == "smoothing" else 0.0 for result in examples],
                              dtype=torch.float64)
        eps = float(values.median()) if float(values.max() - values.min()) <= EPS_TOL else None
    reasons = [parted.message] if parted.message else []
    if mass is not None and mass.counts_determined and counts is not None and not torch.equal(mass.counts, counts):
        reasons.append(f"the class mass fits counts {mass.counts.tolist()}, the examples give {counts.tolist()}")
    return BatchRecoveryResult(class_mass, counts, eps, examples, not reasons, counts is not None and not reasons,
                               "; ".join(reasons), label_format=label_format, method="split",
                               gradient_scale=parted.gradient_scale, extra={"split": parted}, **common)


def dominant_counts(labels: torch.Tensor) -> Optional[torch.Tensor]:
    """``(C,)`` int64 examples per dominant class of the labels ``(B, C)``, or None when an example has none: its
    two largest entries within ``EPS_TOL`` of each other (the label is only known to about that)."""
    top = labels.topk(2, dim=1).values
    if bool((top[:, 0] - top[:, 1] <= EPS_TOL).any()):
        return None
    return torch.bincount(labels.argmax(1), minlength=labels.shape[1])


def _single(model: nn.Module, named, found, label_format: str, options: Dict[str, object],
            common: Dict[str, object]) -> BatchRecoveryResult:
    """B = 1: the single-example recovery, read as a batch."""
    result = recover_from_gradients(model, named, head=found[1], label_format=label_format, **options)
    label = result.label.detach().double()
    counts = dominant_counts(label[None])
    eps = None if result.label_format == "mixup" else result.eps
    counts_determined = result.determined and counts is not None
    return BatchRecoveryResult(label, counts, eps, [result], result.determined, counts_determined, result.message,
                               label_format=result.label_format, method="single",
                               gradient_scale=result.gradient_scale, **common)


@dataclass
class _Refinement:
    """The rounds of refining the summed predictions from ``K`` lattice starts at once (:func:`_refine`).

    Attributes:
        counts_seen: ``(R, K, C)`` each start's counts in every round (the start's own first).
        eps_seen: ``(R, K)`` the same for eps.
        inverse_scale: ``(K,)`` the last round's ``u`` (1 at a known scale).
        residual: ``(K,)`` how far the last round's class mass sits from its lattice point, in examples.
        prediction: ``(K, C)`` the last estimates of the summed predictions.
        feature_classes: ``(K, C)`` the classes the last estimate of each start's mean feature combined.
        class_logits: ``(K, C, C)`` the last round's class mean logits (:func:`~gradleak.batch.mass.class_mean_logits`).
    """

    counts_seen: torch.Tensor
    eps_seen: torch.Tensor
    inverse_scale: torch.Tensor
    residual: torch.Tensor
    prediction: torch.Tensor
    feature_classes: torch.Tensor
    class_logits: torch.Tensor

    @property
    def distance(self) -> torch.Tensor:
        """``(K,)`` how far each start's last class mass sits from its lattice point, in lattice spacings."""
        return in_spacings(self.residual, self.eps_seen[-1])


def _refine(starts: List[LatticeFit], parts: Dict[str, torch.Tensor], logits_grad: torch.Tensor, size: int,
            hard: bool, scale_known: bool) -> _Refinement:
    """:data:`MASS_ROUNDS` rounds from each of the lattice fits ``starts`` of the estimate at the batch's mean
    feature, all starts at once: each round refines the summed predictions with the last round's counts and eps
    (the mean feature over the classes they leave empty, each class's examples at their own mean) and fits the
    lattice again (near the scale found, when unknown). Only logits are formed: the weight gradient enters as
    ``logits_grad``, ``G W^T`` (C, C), formed once by the caller."""
    bias, bias_grad = parts["bias"], parts["bias_grad"]
    counts = torch.stack([start.counts for start in starts])
    eps = counts.new_tensor([start.eps for start in starts], dtype=bias.dtype)
    inverse_scale = counts.new_tensor([start.inverse_scale for start in starts], dtype=bias.dtype)
    classes = torch.ones_like(counts, dtype=torch.bool)            # the first mean feature combines every class
    feature_logits = mean_feature(logits_grad, bias_grad, classes)                        # W h_bar (K, C)
    counts_seen, eps_seen, prediction, residual = [counts], [eps], None, None
    for _ in range(MASS_ROUNDS - 1):
        empty = counts == 0
        refreshed = empty.any(-1, keepdim=True)
        classes = torch.where(refreshed, empty, classes)
        feature_logits = torch.where(refreshed, mean_feature(logits_grad, bias_grad, empty), feature_logits)
        logits = class_mean_logits(inverse_scale[:, None, None] * logits_grad, inverse_scale[:, None] * bias_grad,
                                   feature_logits, counts, eps)
        prediction = class_prediction_mass(bias, logits, counts)
        if scale_known:
            counts, inverse_scale, eps, residual = refit_lattice(prediction - size * bias_grad, size, hard=hard)
        else:
            counts, inverse_scale, eps, residual = refit_lattice(prediction, size, hard=hard, signal=bias_grad,
                                                                 inverse_scale=inverse_scale)
        counts_seen.append(counts)
        eps_seen.append(eps)
    return _Refinement(torch.stack(counts_seen), torch.stack(eps_seen), inverse_scale, residual, prediction, classes,
                       logits)


def _class_mass(parts: Dict[str, Optional[torch.Tensor]], size: int, label_format: str, scale_known: bool,
                common: Dict[str, object]) -> BatchRecoveryResult:
    """B > 1: the class mass from the bias gradient and the estimated summed predictions; counts and eps from the
    nearest lattice point (with the gradient scale, when unknown), judged by how near it is.

    The first estimate (every example at the batch's mean feature) is rough where logits differ between examples,
    so the refinement starts from each of the :data:`~gradleak.batch.mass.MASS_STARTS` lattice points nearest to it
    and the start that ends nearest to its lattice point answers; a start that ends at other counts as near (within
    the lattice tolerance) makes the counts ambiguous."""
    check_finite(as_tensor(parts["bias_grad"], "bias_grad"), "bias_grad")
    parts = {name: parts[name].detach().double() for name in ("weight", "bias", "weight_grad", "bias_grad")}
    hard = label_format == "hard"
    if label_format == "mixup" and not scale_known:
        raise ValueError("a mixup batch's class mass has no count lattice to fix an unknown gradient scale with: "
                         "pass the scale (divide the update by -lr) and gradient_scale='known'")
    feature = mean_feature(parts["weight_grad"], parts["bias_grad"])  # a ratio: the gradient scale cancels
    predicted = prediction_mass(parts["weight"], parts["bias"], feature, size)
    if label_format == "mixup":
        return BatchRecoveryResult(predicted - size * parts["bias_grad"], None, None, [], False, False,
                                   "mixup: the class mass is an estimate with no count lattice to check it against",
                                   label_format="mixup", method="class_mass", **common)
    # the first estimate as the lattice fits take it: its class mass, or (scale unknown) the summed predictions
    first, signal = (predicted - size * parts["bias_grad"], None) if scale_known else (predicted, parts["bias_grad"])
    starts = lattice_starts(first, size, hard=hard) if scale_known else \
        lattice_starts_unknown_scale(first, signal, size, hard=hard)
    logits_grad = parts["weight_grad"] @ parts["weight"].T                                 # G W^T (C, C)
    run = _refine(starts, parts, logits_grad, size, hard, scale_known)
    distances = run.distance
    best = int(distances.argmin())
    last = run.counts_seen[-1]
    rivals = distances[(last != last[best]).any(-1)].tolist()
    prediction = run.prediction[best]
    counts_seen, eps_seen = list(run.counts_seen[:, best]), run.eps_seen[:, best].tolist()
    if scale_known:
        fit = fit_counts(prediction - size * parts["bias_grad"], last[best], None, size, hard)
    else:  # the last estimate scanned over every scale again
        fit, scanned = fit_lattice_unknown_scale(prediction, signal, size, hard=hard)
        rivals.append(scanned)
        counts_seen, eps_seen = counts_seen + [fit.counts], eps_seen + [fit.eps]
    runner_up = min(rivals, default=math.inf)
    # eps is known no better than it moved as the estimate was refined with these counts (from the first estimate)
    eps_seen = [fit_counts(first, fit.counts, signal, size, hard).eps] + [
        eps for counts, eps in zip(counts_seen, eps_seen) if torch.equal(counts, fit.counts)]
    mass = prediction - fit.inverse_scale * size * parts["bias_grad"]
    tol, distance = LATTICE_TOL * (1.0 - fit.eps), in_spacings(fit.residual, fit.eps)
    reasons = []  # why the counts are not pinned, then why eps is not
    if fit.residual > tol:
        reasons.append(f"the class mass sits {fit.residual:.2g} examples from the nearest count lattice point "
                       f"(more than {tol:.3g}): the summed predictions are estimated too roughly for this batch "
                       "(logits that differ a lot between examples, a large batch), or the labels are not hard or "
                       "smoothed with one eps (mixup)")
    elif not torch.equal(counts_seen[-2], fit.counts):  # the estimate swings between rounds
        reasons.append(f"the counts changed in the last of {len(counts_seen)} rounds of refining the summed "
                       "predictions: the estimate has not settled, and a lattice point near it proves nothing")
    elif runner_up <= max(LATTICE_TOL, AMBIGUITY_RATIO * distance):
        # the single example's rule for a unique answer: every rival misses by AMBIGUITY_RATIO times more
        reasons.append(f"other counts fit almost as well ({runner_up:.2g} lattice spacings from their lattice point "
                       f"against {distance:.2g}, from another start of the refinement"
                       + ("" if scale_known else " or at another gradient scale") + "): the counts are ambiguous")
    on_lattice = not reasons
    eps, extra = fit.eps, {}
    eps_error = max(fit.eps_error, max(eps_seen) - min(eps_seen))
    # hard or smoothed labels, by the rule for every answer: it stands when its rival misses AMBIGUITY_RATIO times
    # more. Where the class means fitted to second order in the examples' spread pin eps, the rival of smoothed
    # labels is the same fit with eps held at 0 (ResNet18, 60 batches each: hard ones 1.00-1.25 times its misfit
    # with eps free; smoothed ones 10.9 times and more, from eps 0.014 up, where the first estimate's error bar had
    # read 3 of them as hard); elsewhere it is eps = 0, against the first estimate's error bar
    fitted = not hard and spread_unknowns(fit.counts, scale_known) <= SPREAD_UNKNOWNS
    rival_fitted = fitted and label_format == "auto" and spread_identified(fit.counts, scale_known)
    smoothed = not hard and (label_format != "auto" or rival_fitted or eps > AMBIGUITY_RATIO * eps_error)
    if fitted and smoothed:
        start = (logits_grad, parts["bias_grad"], parts["bias"], run.class_logits[best], fit.counts, fit.eps, size)
        scale = None if scale_known else fit.inverse_scale
        spread = fit_spread(*start, inverse_scale=scale)
        extra = {"spread": spread.spread, "spread_misfit": spread.misfit, "first_order_misfit": spread.start_misfit}
        if rival_fitted:
            extra["hard_misfit"] = fit_spread(*start, inverse_scale=scale, hard=True,
                                              enough=AMBIGUITY_RATIO * spread.misfit).misfit
            smoothed = extra["hard_misfit"] > AMBIGUITY_RATIO * spread.misfit
        if smoothed:
            # eps from the fit, known no better than it moved to there. The fit assumes the counts' smoothed labels:
            # it gives eps only, and the class mass stays the estimate that holds whatever the labels are (on
            # LeNet's mixup pairs the fit had pulled it onto a lattice point, 0.05-0.29 examples off; on batch mixup
            # it had moved eps, read as hard)
            eps = spread.eps
            eps_error = max(eps_error, max(eps_seen + [eps]) - min(eps_seen + [eps]))
    if not hard and AMBIGUITY_RATIO * eps_error > EPS_TOL:
        reasons.append(f"eps is pinned only to +-{eps_error:.2g}" + (
            ": the classes hold B/C examples each, and such counts do not separate eps" if math.isinf(eps_error)
            else " (from how far the class mass sits from its lattice point)" if eps_error == fit.eps_error
            else " (it moved that much as the summed predictions were refined)"))
    last_feature = mean_feature(parts["weight_grad"], parts["bias_grad"], run.feature_classes[best])
    return BatchRecoveryResult(mass, fit.counts, eps if smoothed else 0.0, [], not reasons, on_lattice,
                               "; ".join(reasons), label_format="smoothing" if smoothed else "hard",
                               method="class_mass", lattice_residual=fit.residual, eps_error=eps_error,
                               gradient_scale=1.0 / fit.inverse_scale, extra={"mean_feature": last_feature, **extra},
                               **common)
