"""Audit a Flower (flwr) federation: what each client update leaks to the server.

``from gradleak.fl import LeakageAudit`` needs Flower: ``pip install gradleak[fl]``. This package itself imports
without it (``gradleak`` builds its command line from :mod:`gradleak.fl.cli` whether or not Flower is installed);
Flower is imported when the strategy wrapper or the simulation is first used.
"""
from __future__ import annotations

import importlib

from .records import AuditRecord, TruthRecord, load_records, load_truth

FLWR_MISSING = ("gradleak.fl needs Flower with its simulation engine, which is not installed: "
                "pip install gradleak[fl]  (or: pip install 'flwr[simulation]>=1.20')")

# names served from modules that import flwr, loaded on first access
_NEED_FLWR = {"LeakageAudit": ".strategy"}

__all__ = ["AuditRecord", "LeakageAudit", "TruthRecord", "load_records", "load_truth"]


def import_with_flwr(module: str):
    """``gradleak.fl.<module>`` (a module that imports Flower), or an ImportError saying how to install Flower."""
    try:
        return importlib.import_module(module, __name__)
    except ImportError as error:
        if (error.name or "").split(".")[0] in ("flwr", "ray"):
            raise ImportError(FLWR_MISSING) from error
        raise


def __getattr__(name: str):
    if name not in _NEED_FLWR:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_with_flwr(_NEED_FLWR[name]), name)
    globals()[name] = value
    return value
