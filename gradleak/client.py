"""The victim: one client's gradient of a soft-target cross-entropy on ONE example."""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from ._checks import check_finite


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-sum_i y_i log softmax(z)_i``; logits and target both ``(B, C)``."""
    return -(target * torch.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


def single_example_gradients(model: nn.Module, x: torch.Tensor, label: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Gradients of the soft-target cross-entropy of one example with respect to every trainable parameter.

    Args:
        model: any module mapping a ``(1, *input_shape)`` batch to ``(1, C)`` logits.
        x: ONE input, shaped as the model expects it without the batch dimension (``(3, 32, 32)``, or
            ``(1, 28, 28)`` for a grayscale image); a batch of one is ``x[0]``.
        label: the (soft) label, ``(C,)`` or ``(1, C)``, summing to one.

    Returns:
        ``{parameter name: gradient}`` in ``model.named_parameters()`` order, detached, in the parameters' dtype.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    label = torch.as_tensor(label)
    if label.dim() == 2 and label.shape[0] == 1:
        label = label[0]
    if label.dim() != 1:
        raise ValueError(f"label must have shape (C,) for one example, got {tuple(label.shape)}")
    check_finite(label, "label")
    check_finite(x, "x")
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("model has no trainable parameters")
    param = named[0][1]
    logits = model(x.unsqueeze(0).to(device=param.device, dtype=param.dtype))
    if logits.dim() != 2 or logits.shape[0] != 1:
        raise ValueError(f"model must return (1, C) logits for one example, got {tuple(logits.shape)}")
    if logits.shape[1] != label.shape[0]:
        raise ValueError(f"label has {label.shape[0]} classes but the model returns {logits.shape[1]} logits")
    loss = soft_cross_entropy(logits, label.to(device=logits.device, dtype=logits.dtype).unsqueeze(0))
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return {name: (torch.zeros_like(p) if g is None else g.detach()) for (name, p), g in zip(named, grads)}
