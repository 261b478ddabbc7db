"""Experiments: one module per table or figure family; results as CSV/Markdown/PNG files and returned dicts.

:data:`EXPERIMENTS` maps a name to a function taking keyword arguments ``dataset, network, samples, seed, out,
quick, weights, progress, ray`` (each ignores those that do not apply; ``ray``, a Ray address, spreads the
trials of label-recovery, noise, dp and local-steps over a Ray cluster) — what ``gradleak experiment <name>`` calls:

* ``"label-recovery"``: :func:`gradleak.experiments.label_recovery.run` (tables 1-2 style);
* ``"noise"``: :func:`gradleak.experiments.noise.run` (Gaussian/Laplace noise on the whole gradient);
* ``"dp"``: :func:`gradleak.experiments.dp.run` (one Opacus DP-SGD step: clipping norm x noise multiplier,
  attacked with the learning rate known and with the scale unknown; needs ``opacus``);
* ``"local-steps"``: :func:`gradleak.experiments.local_steps.run` (K local SGD steps on one example: the
  update ``-lr * sum_k g(theta_k)`` against ``K * lr``);
* ``"landscape"``: :func:`gradleak.experiments.landscape.run` (Figure 1);
* ``"train"``: :func:`gradleak.training.train_experiment` (checkpoints for the trained rows);
* ``"reconstruction"``: :func:`gradleak.experiments.reconstruction.run_reconstruction` (imported on first use);
* ``"label-variants"``: :func:`gradleak.experiments.reconstruction.run_label_variants` (the README's table of
  gradient matching with the recovered, true, hard and DLG's joint label; also reads ``methods``, ``variants``,
  ``iterations``);
* ``"report"``: :func:`gradleak.experiments.report.run` (one table from every label-recovery run in a folder);
* ``"batch"``: :func:`gradleak.experiments.batch.run` (batch label recovery against the batch size, beside the
  batch baselines; also reads ``init``, ``batch_sizes``).

Modules are imported when an experiment is called, so importing this package stays cheap.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, Dict

__all__ = ["EXPERIMENTS", "run_experiment"]


def _lazy(module: str, function: str) -> Callable[..., Any]:
    def call(**kwargs: Any) -> Any:
        return getattr(importlib.import_module(module, __name__), function)(**kwargs)
    call.__name__ = function
    call.__qualname__ = function
    call.__doc__ = f"Calls ``{module.lstrip('.')}.{function}`` (imported on first use)."
    return call


def _reconstruction(*, dataset: str = "cifar10", network: str = "fcn4", seed: int = 2023, out=None,
                    quick: bool = False, progress: bool = True, samples=None, weights=None, **kwargs: Any) -> Any:
    """Adapter to the reconstruction experiment's own signature (another module; its defaults apply).

    ``samples``, ``weights`` and every option ``run_reconstruction`` does not take (``ray``, ``stds``, ...) do not
    apply (one built-in sample, untrained network) and are ignored, as the other experiments ignore theirs.
    """
    from .reconstruction import run_reconstruction

    accepted = inspect.signature(run_reconstruction).parameters
    options = {k: v for k, v in kwargs.items() if k in accepted or k == "variants"}
    if "variants" in options:  # the CLI's name for run_reconstruction's label_variants
        options["label_variants"] = options.pop("variants")
    if quick:
        options.setdefault("iterations", 50)
    return run_reconstruction(network, dataset, seed=seed, out_dir=None if out is None else str(out),
                              progress=progress, **options)


EXPERIMENTS: Dict[str, Callable[..., Any]] = {
    "label-recovery": _lazy(".label_recovery", "run"),
    "noise": _lazy(".noise", "run"),
    "dp": _lazy(".dp", "run"),
    "local-steps": _lazy(".local_steps", "run"),
    "landscape": _lazy(".landscape", "run"),
    "train": _lazy("gradleak.training", "train_experiment"),
    "reconstruction": _reconstruction,
    "label-variants": _lazy(".reconstruction", "run_label_variants"),
    "report": _lazy(".report", "run"),
    "batch": _lazy(".batch", "run"),
}


def run_experiment(name: str, **kwargs: Any) -> Any:
    """Run the experiment ``name`` of :data:`EXPERIMENTS` with keyword arguments."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose one of {sorted(EXPERIMENTS)}")
    return EXPERIMENTS[name](**kwargs)
