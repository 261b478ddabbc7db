"""Input validation shared by the public functions: clear errors instead of tracebacks from deep in torch."""
from __future__ import annotations

import argparse
import math
from typing import Any, Callable

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


def bounded(kind: Callable[[str], Any], name: str, low: float, high: float = math.inf, *, open_low: bool = False,
             open_high: bool = False) -> Callable[[str], Any]:
    """An argparse ``type`` that parses with ``kind`` and accepts values between ``low`` and ``high`` (each end
    included unless open): a bad value becomes argparse's one-line usage error (exit status 2)."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        above = value > low if open_low else value >= low
        below = value < high if open_high else value <= high
        if not (above and below):
            lower = f"{'>' if open_low else '>='} {low:g}"
            upper = "" if high == math.inf else f" and {'<' if open_high else '<='} {high:g}"
            raise argparse.ArgumentTypeError(f"{name} must be {lower}{upper}, got {text}")
        return value
    return parse
