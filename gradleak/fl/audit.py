"""The audit's functional core: what a server can read from one client update, with no Flower in sight.

A federated server holds the global weights it sent and receives the client's new weights. Their difference is
``s * g`` for one example's gradient ``g`` (``s = -lr`` after one plain SGD step, times a clip factor after
client-side clipping), or the sum of several examples' gradients for a batch. :func:`read_update` turns the two
sets of arrays into the attacker's conclusion:

1. the update, checked entry by entry against the model (shapes, dtypes, NaN / infinite values);
2. :func:`gradleak.recover_from_update`, first with the learning rate the server's train config gave (if any),
   then, when that reading is not determined (clipping rescaled the update), with the scale unknown;
3. the apparent batch size (:func:`apparent_batch_size`): the numerical rank of the head's weight update at
   its float precision. A batch of B examples has rank up to B; when it exceeds one, the answer is never
   reported as determined, whatever the label fit says;
4. for fully connected ReLU nets, the input itself, analytically (:func:`gradleak.invert_fully_connected`);
   gradient matching for other networks only when asked (it is slow).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from ..head import find_head
from ..reconstruct import invert_fully_connected, linear_stages, match_gradients
from ..recovery import RecoveryResult
from ..update import named_parameter_arrays, recover_from_update, update_from_weights

ArraysLike = Union[Mapping[str, np.ndarray], Sequence[np.ndarray]]

RECONSTRUCTIONS = ("auto", "analytic", "matching", "none")
#: Options that the audit sets itself from what the server knows (the train config), never the caller.
RESERVED_OPTIONS = frozenset({"lr", "local_steps", "gradient_scale"})


@dataclass
class UpdateReading:
    """What one update gave away.

    Attributes:
        result: the recovery of the label and head feature (``result.determined`` may be overridden below).
        determined: ``result.determined``, and False whenever the head's update looks like more than one example.
        message: why not determined, or "".
        scale_source: "config" (the lr of the train config explained the update) or "recovered".
        batch_size_estimate: see :func:`apparent_batch_size`; rank_limit: ``min(C, d)`` of the head.
        update_norm: L2 norm of the whole update (float64).
        reconstruction: the reconstructed input (shaped ``input_shape``, or flat), or None.
        reconstruction_method: "analytic", "matching" or None.
    """

    result: RecoveryResult
    determined: bool
    message: str
    scale_source: str
    batch_size_estimate: int
    rank_limit: int
    update_norm: float
    reconstruction: Optional[torch.Tensor] = None
    reconstruction_method: Optional[str] = None


def load_arrays(model: nn.Module, arrays: ArraysLike, *, what: str = "the global arrays") -> None:
    """Set ``model``'s parameters and buffers to ``arrays`` in place (checked as
    :func:`gradleak.update.named_parameter_arrays` checks them).

    Args:
        arrays: a dict keyed by ``state_dict()`` names, or one array per ``state_dict()`` entry in that order (as
            Flower ships a model's weights), or one per parameter.
    """
    named_parameter_arrays(model, arrays, what=what)  # every check, with messages naming the entry
    state = model.state_dict()
    if isinstance(arrays, Mapping):
        pairs = list(arrays.items())
    else:
        names = list(state) if len(arrays) == len(state) else [name for name, _ in model.named_parameters()]
        pairs = list(zip(names, arrays))
    with torch.no_grad():
        for name, value in pairs:
            state[name].copy_(torch.as_tensor(np.asarray(value)))


def apparent_batch_size(weight_update: torch.Tensor, weight: torch.Tensor) -> int:
    """The numerical rank of a head's weight update: how many examples it looks like, at its float precision.

    One example's update ``s (p - y) h^T`` is rank one; a batch of B examples sums B such terms (rank up to B).
    A float update ``new - old`` carries rounding of at most about ``eps * (|old| + |new|)`` per entry (``eps``
    of its dtype), so no singular value of pure rounding exceeds the Frobenius norm of that bound; the rank
    counts the singular values above it. Several local steps on one example also raise it (the prediction moves
    between steps), and so does noise (up to full rank).

    Args:
        weight_update: ``(C, d)`` the head's ``new - old`` weights.
        weight: ``(C, d)`` the head's old weights.

    Returns:
        the count of singular values above the rounding bound, between 0 (no update) and ``min(C, d)``.
    """
    eps = torch.finfo(weight_update.dtype).eps
    update, old = weight_update.detach().double(), weight.detach().double()
    bound = eps * float(torch.linalg.matrix_norm(old.abs() + (old + update).abs()))
    return int((torch.linalg.svdvals(update) > bound).sum())


def _gradients(model: nn.Module, update: Mapping[str, torch.Tensor], result: RecoveryResult, *, lr: Optional[float],
               local_steps: int, weight_decay: float) -> Dict[str, torch.Tensor]:
    """The gradient the update implies: ``update = s * g - lr * K * wd * W``, so ``g = (update + lr K wd W) / s``."""
    parameters = dict(model.named_parameters())
    decay = (lr or 0.0) * local_steps * weight_decay
    with torch.no_grad():
        return {name: (u + decay * parameters[name] if decay else u) / result.gradient_scale
                for name, u in update.items()}


def _is_fully_connected(model: nn.Module) -> bool:
    try:
        linear_stages(model)
    except TypeError:
        return False
    return True


def read_update(model: nn.Module, reply_arrays: ArraysLike, *, lr: Optional[float] = None, local_steps: int = 1,
                input_shape: Optional[Sequence[int]] = None, reconstruct: str = "auto",
                matching_iterations: int = 300, **options) -> UpdateReading:
    """Read one client's update the way a curious server can.

    Args:
        model: the network at the weights the server sent this client (see :func:`load_arrays`); not modified.
        reply_arrays: the weights the client sent back, in the same form as the sent ones (dict or list).
        lr: the learning rate the server's train config gave, or None (the scale is then unknown).
        local_steps: the local steps the config gave (used with ``lr`` only: an update of unknown scale is read as
            one step, the scale absorbs them).
        input_shape: shape of one input, e.g. ``(3, 32, 32)``, for the reconstruction (default: flat for fully
            connected nets; required for gradient matching).
        reconstruct: "auto" (analytic for fully connected ReLU nets, nothing otherwise), "analytic", "matching"
            (gradient matching with the recovered label, any network; slow), or "none". Only determined answers
            are reconstructed: a wrong label or scale would give noise.
        matching_iterations: the budget of gradient matching.
        **options: passed to :func:`gradleak.recover_from_update` (``label_format``, ``method``, ``head``,
            ``weight_decay``, ...); ``rank_one_tol`` defaults to None (a batch is diagnosed, not refused). With
            ``weight_decay`` the update can only be read with the config's lr (the decay term scales with it).

    Returns:
        :class:`UpdateReading`.

    Raises:
        ValueError / TypeError: the reply does not fit the model (count, shapes, dtypes), or has NaN or infinite
            entries; the messages name the entry.
    """
    reserved = RESERVED_OPTIONS & set(options)
    if reserved:
        raise TypeError(f"{sorted(reserved)} are read from the server's train config, not passed as options")
    if reconstruct not in RECONSTRUCTIONS:
        raise ValueError(f"reconstruct must be one of {RECONSTRUCTIONS}, got {reconstruct!r}")
    options.setdefault("rank_one_tol", None)
    update = update_from_weights(model, reply_arrays)
    update_norm = float(torch.sqrt(sum(u.double().square().sum() for u in update.values())))
    head_name, head = find_head(model, options.get("head"))
    head_update = update.get(f"{head_name}.weight" if head_name else "weight")
    if head_update is None:
        raise ValueError(f"the update has no entry for the head's weight {head_name}.weight")
    batch_size = apparent_batch_size(head_update, head.weight)
    if batch_size == 0:
        raise ValueError("the head's weights did not change: the client sent back the weights it was given")

    scale_source = "recovered"
    if lr is not None:
        result = recover_from_update(model, update, lr=lr, local_steps=local_steps, **options)
        scale_source = "config"
        if not result.determined and not options.get("weight_decay"):
            rescaled = recover_from_update(model, update, **options)
            if rescaled.determined:  # the lr alone does not explain the update: clipping rescaled it
                result, scale_source = rescaled, "recovered"
    else:
        result = recover_from_update(model, update, **options)

    determined, message = result.determined, result.message
    if batch_size > 1:
        determined = False
        if batch_size == min(head.weight.shape):
            diagnosis = (f"the head's update has full numerical rank {batch_size}: a batch of {batch_size} or more "
                         "examples, or noise")
        else:
            diagnosis = (f"the head's update has numerical rank {batch_size}: the sum of about {batch_size} examples' "
                         "gradients (a batch; several local steps on one example raise the rank too)")
        message = "; ".join(filter(None, [f"{diagnosis}, not one example's gradient: the label is a best guess",
                                          message]))

    reconstruction, method = None, None
    wants = {"auto": "analytic" if _is_fully_connected(model) else None, "analytic": "analytic",
             "matching": "matching", "none": None}[reconstruct]
    if determined and wants is not None:
        gradients = _gradients(model, update, result, lr=lr if scale_source == "config" else None,
                               local_steps=local_steps, weight_decay=options.get("weight_decay", 0.0))
        if wants == "analytic":
            reconstruction = invert_fully_connected(model, gradients, result, input_shape=input_shape)
        else:
            if input_shape is None:
                raise ValueError("gradient matching needs input_shape")
            reconstruction = match_gradients(model, gradients, input_shape, label=result.label, method="ig",
                                             iterations=matching_iterations).input
        method = wants
    return UpdateReading(result=result, determined=determined, message=message, scale_source=scale_source,
                         batch_size_estimate=batch_size, rank_limit=min(head.weight.shape), update_norm=update_norm,
                         reconstruction=reconstruction, reconstruction_method=method)
