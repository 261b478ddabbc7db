"""Strict JSON values: what ``json.dumps(..., allow_nan=False)`` accepts, from results that hold tensors."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch


def strict_json(value: Any) -> Any:
    """``value`` made of plain JSON values, recursively: non-finite floats become None (standard JSON has no
    Infinity or NaN), tensors and numpy values become numbers or lists, tuples lists, mapping keys strings."""
    if isinstance(value, dict):
        return {str(key): strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(item) for item in value]
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)):
        return strict_json(value.tolist() if not isinstance(value, torch.Tensor) else value.detach().cpu().tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
