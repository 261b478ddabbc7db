"""Label and feature recovery: the searches (one registry) and the public entry points."""
from . import exact, paper  # noqa: F401  (register "exact", "pso" and "lbfgs")
from .api import RecoveryResult, default_tolerance, recover_from_gradients, recover_label
from .base import SEARCHES, SearchOutcome, register_search

__all__ = ["RecoveryResult", "SEARCHES", "SearchOutcome", "default_tolerance", "recover_from_gradients",
           "recover_label", "register_search"]
