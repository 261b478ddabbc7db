"""Label and feature recovery: the searches (one registry) and the public entry points."""
from . import exact  # noqa: F401  (registers "exact")
from .api import RecoveryResult, default_tolerance, recover_from_gradients, recover_label
from .base import SEARCHES, SearchOutcome, register_search

try:  # the paper's searches, registered as "pso" and "lbfgs"
    from . import paper  # noqa: F401
except ImportError:  # pragma: no cover - only while the module is being written
    pass

__all__ = ["RecoveryResult", "SEARCHES", "SearchOutcome", "default_tolerance", "recover_from_gradients",
           "recover_label", "register_search"]
