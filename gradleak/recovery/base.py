"""What every label-recovery search returns, and the registry that names the searches."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict



@dataclass
class SearchOutcome:
    """A search's answer, before it is turned into a label and a feature.

    Attributes:
        t: the scalar that fixes the answer (``h = t * sigma * v``, ``p - y = c / t``; see :class:`HeadProblem`).
        objective: the search's own objective at ``t`` (each method has its own scale).
        evaluations: how many candidate scalars the search evaluated.
        converged: whether the search's own stopping test was met. Never a comparison with the truth.
        info: method-specific details (phases, intervals, iterations).
    """

    t: float
    objective: float
    evaluations: int
    converged: bool
    info: Dict[str, Any] = field(default_factory=dict)


SearchFn = Callable[..., SearchOutcome]
SEARCHES: Dict[str, SearchFn] = {}


def register_search(name: str) -> Callable[[SearchFn], SearchFn]:
    """Decorator: make a search available as ``method=name``.

    A search is called as ``fn(problem: HeadProblem, label_format: str, **options) -> SearchOutcome`` with
    ``label_format`` one of "hard", "smoothing", "mixup".
    """
    def add(fn: SearchFn) -> SearchFn:
        if name in SEARCHES:
            raise ValueError(f"a search named {name!r} is already registered")
        SEARCHES[name] = fn
        return fn
    return add
