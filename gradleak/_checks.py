"""Input validation shared by the public functions: clear errors instead of tracebacks from deep in torch."""
from __future__ import annotations

import torch


def as_tensor(value, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    return value


def check_finite(value: torch.Tensor, name: str) -> None:
    # one reduction in the common case: a sum is finite when every entry is (barring overflow, then look closer)
    if value.is_floating_point() and not bool(torch.isfinite(value.sum())):
        bad = int((~torch.isfinite(value)).sum())
        if bad:
            raise ValueError(f"{name} contains {bad} NaN or infinite entries")


def positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be positive, got {value}")
    return value
