"""Label and feature recovery: the searches (one registry) and the public entry points."""
from . import exact, paper  # noqa: F401  (register "exact", "pso" and "lbfgs")
from .api import RecoveryResult, RecoveryResults, default_tolerance, recover_from_gradients, recover_label
from .base import SEARCHES, SearchOutcome, register_search
from .batched import recover_labels

__all__ = ["RecoveryResult", "RecoveryResults", "SEARCHES", "SearchOutcome", "default_tolerance",
           "recover_from_gradients", "recover_label", "recover_labels", "register_search"]
