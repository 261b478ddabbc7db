"""``recover_labels``: many single-example gradients of one head, recovered as one vectorised computation.

A server that audits many clients, or an experiment over many samples, holds N gradients of the same head, each
of one example. :func:`recover_labels` factors them together (one row-vector product per example and matrix),
evaluates one ``(N, K, C)`` grid for all of them, refines every candidate of every example by one batched
Gauss-Newton, and runs the fit test on all of them at once: the pipeline of :func:`gradleak.recover_label`,
which is the same code run on a batch of one. No step mixes examples (see :mod:`gradleak.recovery.structure`),
so each answer is the one ``recover_label(weight_grads[i], weight, ...)`` gives with the same options.

What is not one computation:

* ``method="pso"`` / ``"lbfgs"``: the paper's searches are single-example searches; they run example by
  example, and the fit test then judges their answers together;
* the search runs in stages (the most general structure, mixup with smoothing, only for the examples the
  others leave undetermined), and undetermined answers with a known scale are recovered once more with an
  unknown one (for the message): each stage is one computation over the examples it concerns.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..head import factor_heads
from .api import RecoveryResults, check_options, recover_factored, recovering


def recover_labels(weight_grads: torch.Tensor, weight: torch.Tensor, *, bias: Optional[torch.Tensor] = None,
                   bias_grads: Optional[torch.Tensor] = None, label_format: str = "auto", method: str = "exact",
                   gradient_scale: str = "known", tol: Optional[float] = None, ambiguity_ratio: float = 3.0,
                   same_answer_atol: float = 1e-4, feature_sign: str = "auto", rank_one_tol: Optional[float] = 1e-2,
                   **search_options) -> RecoveryResults:
    """Recover N examples' labels and head features from their gradients of one head ``z = W h (+ b)``.

    Args:
        weight_grads: ``(N, C, d)`` observed dL/dW, each of ONE example (soft-target cross-entropy).
        weight: ``(C, d)`` the head weight W all the gradients were computed at.
        bias: ``(C,)`` for a head with bias; bias_grads: ``(N, C)`` its gradients (then every scalar is closed
            form).
        The other options are those of :func:`gradleak.recover_label`, for every example.

    Returns:
        :class:`~gradleak.recovery.api.RecoveryResults`: a sequence of N
        :class:`~gradleak.recovery.api.RecoveryResult` (``results[i]`` is what ``recover_label`` gives for
        example ``i``), with the labels ``(N, C)``, features ``(N, d)`` and ``determined`` ``(N,)`` as tensors.

    Raises:
        ValueError: as :func:`gradleak.recover_label` would for any of the examples (the message names them),
            or when the shapes do not match.
    """
    check_options(label_format, method, feature_sign, gradient_scale, search_options)
    # every pass runs block by block on cache-sized tensors: like one small head, a batch of small heads gains
    # nothing from intra-op threads (on 2 busy cores they made a batch of 1000 10 x 512 heads 50x slower)
    with recovering(weight_grads.shape[1:].numel() if isinstance(weight_grads, torch.Tensor) else 0, method):
        problem = factor_heads(weight_grads, weight, bias, bias_grads, rank_one_tol=rank_one_tol,
                               scale_known=gradient_scale == "known")
        return recover_factored(problem, label_format=label_format, method=method, tol=tol,
                                ambiguity_ratio=ambiguity_ratio, same_answer_atol=same_answer_atol,
                                feature_sign=feature_sign, search_options=search_options)
