"""Augmented labels as a federated client builds them: hard, label smoothing, two-image mixup.

Every label here is a probability vector of shape ``(C,)`` that sums to one, which is what makes the
head's logit gradient equal ``softmax(z) - y`` (see :mod:`gradleak.client`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

LABEL_FORMATS = ("hard", "smoothing", "mixup")


@dataclass(frozen=True)
class LabelSpec:
    """The structure of one augmented label (the evaluator's ground truth).

    ``classes`` holds one class (hard, smoothing) or two (mixup, ``(a, b)`` with weights
    ``(1 - lam, lam)``); ``eps`` is the smoothing mass spread uniformly over all ``C`` classes.
    """

    label_format: str
    num_classes: int
    classes: Tuple[int, ...]
    eps: float = 0.0
    lam: Optional[float] = None

    def to_tensor(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The label as a ``(C,)`` tensor."""
        if self.label_format == "mixup":
            return mixup_label(self.classes[0], self.classes[1], self.lam, self.num_classes, eps=self.eps,
                               dtype=dtype)
        return smooth_label(self.classes[0], self.num_classes, self.eps, dtype=dtype)


def _check_class(index: int, num_classes: int) -> None:
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if not 0 <= int(index) < num_classes:
        raise ValueError(f"class index {index} is outside [0, {num_classes})")


def hard_label(target: int, num_classes: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """One-hot label of shape ``(C,)``."""
    return smooth_label(target, num_classes, 0.0, dtype=dtype)


def smooth_label(target: int, num_classes: int, eps: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Label smoothing: ``(1 - eps) * onehot(target) + eps / C``, shape ``(C,)``; ``eps`` in ``[0, 1)``."""
    _check_class(target, num_classes)
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"label smoothing eps must lie in [0, 1), got {eps}")
    label = torch.full((num_classes,), eps / num_classes, dtype=dtype)
    label[int(target)] += 1.0 - eps
    return label


def mixup_label(class_a: int, class_b: int, lam: float, num_classes: int, eps: float = 0.0,
                dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Two-image mixup label ``(1 - lam) * e_a + lam * e_b``, then smoothed by ``eps``; shape ``(C,)``."""
    _check_class(class_a, num_classes)
    _check_class(class_b, num_classes)
    if class_a == class_b:
        raise ValueError(f"mixup needs two different classes, got {class_a} twice")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"mixup lambda must lie in [0, 1], got {lam}")
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"label smoothing eps must lie in [0, 1), got {eps}")
    label = torch.full((num_classes,), eps / num_classes, dtype=dtype)
    label[int(class_a)] += (1.0 - eps) * (1.0 - lam)
    label[int(class_b)] += (1.0 - eps) * lam
    return label


def mix_inputs(x_a: torch.Tensor, x_b: torch.Tensor, lam: float) -> torch.Tensor:
    """The mixup input ``(1 - lam) * x_a + lam * x_b`` (same shapes in, same shape out)."""
    if x_a.shape != x_b.shape:
        raise ValueError(f"mixup inputs must have the same shape, got {tuple(x_a.shape)} and {tuple(x_b.shape)}")
    return (1.0 - lam) * x_a + lam * x_b
