"""Client updates as a federated server sees them, and what one example's update leaks.

A server receives weights, not gradients. After one plain SGD step on one example (learning rate ``lr``,
weight decay ``wd``, ``torch.optim.SGD`` with one parameter group) a client's update is::

    update = new - old = -lr * (g + wd * W)

with ``g`` the example's gradient and ``W`` the weights the client started from. Flower ships weights as numpy
arrays in ``model.state_dict()`` order (buffers included); PyTorch code often uses ``model.parameters()`` order
or a dict. The functions here accept all three, check each array against the model, and hand the update to
:func:`gradleak.recover_from_gradients`.
"""
from __future__ import annotations

import dataclasses
import math
from numbers import Real
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from ._checks import check_finite
from .recovery import RecoveryResult, recover_from_gradients

ArrayLike = Union[torch.Tensor, np.ndarray, np.generic]
WeightsLike = Union[Mapping[str, ArrayLike], Sequence[ArrayLike]]

#: Shape mismatches spelled out in one error message (the count of the others follows).
_MISMATCHES_SHOWN = 3


def _slots(arrays: WeightsLike, state: Mapping[str, torch.Tensor], parameter_names: List[str],
           what: str) -> Tuple[List[Tuple[str, str, object]], str]:
    """``([(label for messages, state_dict name, value)], order)`` for a dict or a sequence of arrays."""
    num_parameters = len(parameter_names)
    if isinstance(arrays, Mapping):
        unknown = [key for key in arrays if key not in state]
        if unknown:
            raise ValueError(f"{what} names entries that model.state_dict() does not have: {unknown[:5]} "
                             f"(it has {list(state)[:5]}{' ...' if len(state) > 5 else ''})")
        return [(repr(key), key, value) for key, value in arrays.items()], "dict"
    if not isinstance(arrays, Sequence) or isinstance(arrays, (str, bytes)):
        raise TypeError(f"{what} must be a dict name -> array or a list of arrays, got {type(arrays).__name__}")
    if len(arrays) == len(state):
        names, order = list(state), "state_dict()"
    elif len(arrays) == num_parameters:
        names, order = parameter_names, "parameters()"
    else:
        raise ValueError(f"{what} has {len(arrays)} arrays, but the model has {len(state)} state_dict() entries "
                         f"(parameters and buffers, in state_dict() order, as Flower sends them) and "
                         f"{num_parameters} parameters (in parameters() order)")
    return [(f"entry {i} ({name!r})", name, value) for i, (name, value) in enumerate(zip(names, arrays))], order


def _check_shapes(slots: List[Tuple[str, str, object]], state: Mapping[str, torch.Tensor],
                  parameters: Mapping[str, nn.Parameter], order: str, what: str) -> None:
    """Raise one ValueError listing the arrays whose shape differs from their state_dict entry's."""
    wrong = [(label, name, tuple(value.shape)) for label, name, value in slots
             if tuple(value.shape) != tuple(state[name].shape)]
    if not wrong:
        return
    lines = [f"{label} has shape {got}, expected {tuple(state[name].shape)}"
             for label, name, got in wrong[:_MISMATCHES_SHOWN]]
    if len(wrong) > _MISMATCHES_SHOWN:
        lines.append(f"and {len(wrong) - _MISMATCHES_SHOWN} more")
    buffer_shapes: Dict[Tuple[int, ...], str] = {}
    for name, value in state.items():
        if name not in parameters:
            buffer_shapes.setdefault(tuple(value.shape), name)
    looks_like_buffer = [(label, buffer_shapes[got]) for label, name, got in wrong
                         if name in parameters and got in buffer_shapes]
    if looks_like_buffer:
        label, buffer = looks_like_buffer[0]
        hint = {"state_dict()": "the arrays look out of order: a list of that length is read in "
                                "model.state_dict() order, buffers in their places",
                "parameters()": "a list of that length is read in model.parameters() order, which has no buffers",
                "dict": "check which array was stored under that name"}[order]
        lines.append(f"{label}, a parameter, has the shape of the buffer {buffer!r}: {hint}")
    raise ValueError(f"{what} does not fit the model: " + "; ".join(lines))


def named_parameter_arrays(model: nn.Module, arrays: WeightsLike, *, what: str = "update") -> Dict[str, torch.Tensor]:
    """Name per-entry arrays (an update, or new weights) after the model's parameters, checking them all.

    Args:
        model: the module the arrays belong to.
        arrays: a dict keyed by ``model.state_dict()`` names (a subset is allowed; buffers are checked, then
            ignored), or a list with one array per entry of ``model.state_dict()`` (buffers included, in that
            order: Flower's NDArrays) or per entry of ``model.parameters()``. Each is a torch tensor or a numpy
            array (a numpy scalar for a 0-d entry) of the shape of the entry it stands for; parameters' arrays are
            floating point and finite.
        what: what the arrays are, for error messages.

    Returns:
        ``{parameter name: tensor}`` in ``model.named_parameters()`` order for a list (dict order for a dict),
        each a detached tensor of that parameter's shape, dtype and device.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    state = model.state_dict(keep_vars=True)
    parameters = dict(model.named_parameters())
    slots, order = _slots(arrays, state, list(parameters), what)
    for label, _, value in slots:
        if not isinstance(value, (torch.Tensor, np.ndarray, np.generic)):
            raise TypeError(f"{what} {label} must be a torch.Tensor or a numpy array, got {type(value).__name__}")
    _check_shapes(slots, state, parameters, order, what)
    named = {}
    for label, name, value in slots:
        if name not in parameters:
            continue
        floating = value.is_floating_point() if isinstance(value, torch.Tensor) else value.dtype.kind == "f"
        if not floating:
            raise TypeError(f"{what} {label} has dtype {value.dtype}; a parameter's array must be floating point")
        parameter = parameters[name]
        tensor = (value.detach().to(dtype=parameter.dtype, device=parameter.device) if isinstance(value, torch.Tensor)
                  else torch.tensor(value, dtype=parameter.dtype, device=parameter.device))
        check_finite(tensor, f"{what} {label}")
        named[name] = tensor
    return named


def update_from_weights(model: nn.Module, new_weights: WeightsLike) -> Dict[str, torch.Tensor]:
    """A client's update ``new - old``, where ``model`` holds the old weights.

    Args:
        model: the module at the weights the client started from.
        new_weights: the weights the client sent back, in any form :func:`named_parameter_arrays` accepts
            (dict, ``state_dict()``-ordered list as from Flower, or ``parameters()``-ordered list; torch or numpy).

    Returns:
        ``{parameter name: new - old}`` for the parameters only (buffers dropped), each of the parameter's shape,
        computed in the parameter's dtype and on its device (float32 weights minus float32 weights, as a server
        storing them would).
    """
    new = named_parameter_arrays(model, new_weights, what="new_weights")
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        return {name: value - parameters[name] for name, value in new.items()}


def _learning_rate(lr: object) -> float:
    if isinstance(lr, bool) or not isinstance(lr, Real) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    return float(lr)


class _UndoneSteps(Mapping):
    """``{name: -update / (steps * lr) - weight_decay * W}``, computed for the entries that are read only (the
    recovery reads the head and the layer below it; a 55M-parameter network need not be divided through)."""

    def __init__(self, update: Mapping[str, torch.Tensor], parameters: Mapping[str, torch.Tensor], *,
                 lr: float, steps: int, weight_decay: float) -> None:
        self._update, self._parameters = update, parameters
        self._divisor, self._weight_decay = steps * lr, weight_decay

    def __getitem__(self, name: str) -> torch.Tensor:
        with torch.no_grad():
            gradient = -self._update[name] / self._divisor
            return gradient - self._weight_decay * self._parameters[name] if self._weight_decay else gradient

    def __iter__(self):
        return iter(self._update)

    def __len__(self) -> int:
        return len(self._update)


def recover_from_update(model: nn.Module, update: WeightsLike, *, lr: Optional[float] = None,
                        weight_decay: float = 0.0, local_steps: int = 1, **options) -> RecoveryResult:
    """One example's label and head feature from a client's weight update (plain SGD on that one example).

    With ``lr`` the update becomes the gradient ``g = -update / lr - weight_decay * W`` (``torch.optim.SGD``'s
    step undone, weight decay on every parameter) and is recovered with ``gradient_scale="known"``. Without it
    the update itself is recovered with ``gradient_scale="unknown"``: it is ``s * g`` for one unknown scalar
    ``s``, ``-lr`` for plain SGD, ``-lr * min(1, C / ||g||)`` after DP-SGD's per-example clipping to norm ``C``
    (noise aside).

    Several local steps (``local_steps = K > 1``, which needs ``lr``) send ``-lr * sum_k g(theta_k)``: the
    average gradient along the client's path, no longer the gradient at the weights the server holds. It is
    read to first order, divided by ``K * lr``; the fit test then judges how well one example's gradient
    explains it (the drift along the path shows as a residual, and a label it cannot pin down to 1e-3 comes back
    undetermined).

    Args:
        model: the module at the weights the client started from (``W``).
        update: ``new - old``, one array per parameter, in any form :func:`named_parameter_arrays` accepts:
            a dict, a list in ``state_dict()`` order (buffers included; Flower's NDArrays) or in
            ``parameters()`` order; torch tensors or numpy arrays. See :func:`update_from_weights` for new weights.
        lr: the client's learning rate, or None when the server does not know it.
        weight_decay: the client's SGD weight decay; it needs ``lr`` (the decay term ``-lr * weight_decay * W``
            scales with the learning rate, so it cannot be removed from an update of unknown scale).
        local_steps: the client's SGD steps K on its one example (a FedAvg server sets it with ``lr``).
        **options: passed to :func:`gradleak.recover_from_gradients` (``label_format``, ``method``, ``head``,
            ...); ``gradient_scale`` is set here.

    Returns:
        :class:`RecoveryResult` whose ``gradient_scale`` is always relative to the update:
        ``update = gradient_scale * g - lr * weight_decay * W``. It is ``-lr * local_steps`` exactly when ``lr``
        is given, and the recovered scale otherwise. ``label`` ``(C,)`` and ``feature`` ``(d,)`` are in the
        parameters' dtype.
    """
    if "gradient_scale" in options:
        raise TypeError("recover_from_update sets gradient_scale itself: pass lr when the scale is known, "
                        "or leave lr=None for an unknown scale")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, Real) or not math.isfinite(weight_decay) \
            or weight_decay < 0:
        raise ValueError(f"weight_decay must be a non-negative finite number, got {weight_decay!r}")
    if isinstance(local_steps, bool) or not isinstance(local_steps, int) or local_steps < 1:
        raise ValueError(f"local_steps must be a positive int, got {local_steps!r}")
    named = named_parameter_arrays(model, update)
    if lr is None:
        if weight_decay != 0:
            raise ValueError("weight_decay needs lr: the update's decay term -lr * weight_decay * W scales with the "
                             "unknown learning rate and cannot be separated from the gradient; pass lr, or "
                             "weight_decay=0 (the decay then counts as noise on the gradient, see rank_one_ratio)")
        if local_steps > 1:
            raise ValueError("local_steps > 1 needs lr: an update of unknown scale is read as one step whatever K is "
                             "(the scale absorbs K); pass lr, or leave local_steps=1")
        return recover_from_gradients(model, named, gradient_scale="unknown", **options)
    lr = _learning_rate(lr)
    parameters = dict(model.named_parameters())
    gradients = _UndoneSteps(named, parameters, lr=lr, steps=local_steps, weight_decay=weight_decay)
    result = recover_from_gradients(model, gradients, gradient_scale="known", **options)
    return dataclasses.replace(result, gradient_scale=-lr * local_steps)
