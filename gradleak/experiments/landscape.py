"""The paper's Figure 1: its variance loss against the scalar, untrained vs trained, with our residual beside it.

For one label-smoothing example the paper's loss ``1000 * Var_pop(C - 1 smallest y_hat(lambda))`` is drawn
against ``lambda_r`` (the paper's parametrisation with ``coefficient = 1``, :func:`paper_objective`), over a
range around the true scalar and in a zoom on the grid's lowest point (where the paper found a spurious
minimum for a trained network). Beside it, gradleak's scale-normalised residual
(:func:`gradleak.recovery.structure.residuals`) on the same axis. The true scalar (evaluator only) is marked.

Outputs in ``out``: ``landscape.png``, ``landscape.csv`` (every curve point) and ``landscape.md`` (minima).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from ..head import factor_head, head_gradients
from ..recovery.paper import paper_objective
from ..recovery.structure import STRUCTURES, residuals
from .common import draw_trials, markdown_table, output_dir, setup, victim
from ..plots import save_figure

FIELDS = ["weights", "panel", "lambda", "t", "paper_loss", "residual"]


def _curves(problem, objective, s: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Paper loss and our smoothing residual at paper scalars ``s`` (K,)."""
    structure = STRUCTURES["smoothing"]
    t = torch.tensor([objective.to_t(float(v)) for v in s], dtype=torch.float64)
    with torch.no_grad():
        loss = objective.loss(s)
        r = residuals(problem, t, torch.full_like(t, structure.free_entries, dtype=torch.long),
                      torch.full_like(t, structure.offset_free, dtype=torch.bool))
    return {"lambda": s, "t": t, "paper_loss": loss, "residual": r}


def landscape(dataset: str, network: str, weights: str, *, seed: int = 2023, sample: int = 0, points: int = 600,
              zoom_points: int = 300) -> Dict[str, Any]:
    """Curves for one smoothing trial (the ``sample``-th of :func:`common.draw_trials`) on one network.

    Returns:
        ``dict(weights=, true_lambda=, eps=, target=, full=curves, zoom=curves, zoom_centre=)`` with curves
        ``{"lambda", "t", "paper_loss", "residual"}`` (each ``(K,)``).
    """
    env = setup(dataset, network, weights, seed=seed)
    trial = draw_trials(env.labels, env.num_classes, "smoothing", sample + 1, seed)[sample]
    truth = victim(env.model, env.images, trial)
    parts = head_gradients(env.model, truth.gradients)
    problem = factor_head(parts["weight_grad"], parts["weight"], parts["bias"], parts["bias_grad"])
    objective = paper_objective(problem, "smoothing", coefficient=1.0)
    # evaluator only: the true scalar from the true feature, h = t * sigma * v
    t_true = float(truth.feature.double() @ problem.v) / problem.sigma
    s_true = objective.from_t(t_true)
    sign = 1.0 if s_true > 0 else -1.0
    s = sign * torch.linspace(1.0, max(3.0 * abs(s_true), 6.0), points, dtype=torch.float64)
    full = _curves(problem, objective, s)
    centre = float(s[int(full["paper_loss"].argmin())])
    half = max(0.01 * abs(centre), 2.0 * float((s[1] - s[0]).abs()))
    low, high = sorted((max(abs(centre) - half, 1.0) * sign, (abs(centre) + half) * sign))
    zoom = _curves(problem, objective, torch.linspace(low, high, zoom_points, dtype=torch.float64))
    return {"weights": env.weights, "true_lambda": s_true, "eps": trial.spec.eps, "target": trial.spec.classes[0],
            "full": full, "zoom": zoom, "zoom_centre": centre}


def run(*, dataset: str = "cifar10", network: str = "lenet", weights: Union[str, Sequence[str]] = "untrained",
        seed: int = 2023, out: Optional[Union[str, Path]] = None, quick: bool = False, sample: int = 0,
        progress: bool = True, figure: bool = True, **_ignored) -> Dict[str, Any]:
    """Landscapes for the untrained network and every checkpoint in ``weights`` (comma-separated or a list).

    "untrained" is always included first. Writes ``landscape.png``, ``landscape.csv`` and ``landscape.md``.
    """
    names = [w.strip() for w in weights.split(",")] if isinstance(weights, str) else list(weights)
    names = ["untrained"] + [w for w in names if w != "untrained"]
    folder = output_dir(out, "landscape")
    points = 150 if quick else 600
    results = [landscape(dataset, network, w, seed=seed, sample=sample, points=points,
                         zoom_points=100 if quick else 300) for w in names]
    with (folder / "landscape.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, FIELDS)
        writer.writeheader()
        for res in results:
            for panel in ("full", "zoom"):
                c = res[panel]
                for i in range(c["lambda"].shape[0]):
                    writer.writerow({"weights": res["weights"], "panel": panel, "lambda": float(c["lambda"][i]),
                                     "t": float(c["t"][i]), "paper_loss": float(c["paper_loss"][i]),
                                     "residual": float(c["residual"][i])})
    rows = []
    for res in results:
        c = res["full"]
        paper_at = float(c["lambda"][int(c["paper_loss"].argmin())])
        ours_at = float(c["lambda"][int(c["residual"].argmin())])
        rows.append([res["weights"], f"{res['eps']:.4f}", res["target"], f"{res['true_lambda']:.4f}",
                     f"{paper_at:.4f}", f"{float(c['paper_loss'].min()):.3g}", f"{ours_at:.4f}",
                     f"{float(c['residual'].min()):.3g}"])
    table = markdown_table(["weights", "eps", "class", "true lambda", "paper loss argmin (grid)", "paper loss min",
                            "our residual argmin (grid)", "our residual min"], rows)
    (folder / "landscape.md").write_text(
        f"# Landscape ({dataset}, {network}, label smoothing, sample {sample}, seed {seed})\n\n"
        "lambda: the paper's scalar with coefficient 1 (h = lambda * g_r). Grid minima over "
        f"{points} points; the true lambda comes from the true feature (evaluator only).\n\n" + table)
    files = {"csv": str(folder / "landscape.csv"), "md": str(folder / "landscape.md")}
    if figure:
        files["png"] = str(plot(results, folder / "landscape.png", f"{dataset} / {network}"))
    summary = [{"weights": r[0], "eps": float(r[1]), "true_lambda": float(r[3]), "paper_argmin": float(r[4]),
                "paper_min": float(r[5]), "ours_argmin": float(r[6]), "ours_min": float(r[7])} for r in rows]
    return {"summary": summary, "files": files, "out": str(folder)}


def plot(results: List[Dict[str, Any]], path: Path, title: str) -> Path:
    """One row per network: paper loss (full range), paper loss (zoom on its grid minimum), our residual."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 3, figsize=(15, 3.6 * len(results)), squeeze=False)
    for row, res in enumerate(results):
        full, zoom, truth = res["full"], res["zoom"], res["true_lambda"]
        ax = axes[row, 0]
        ax.plot(full["lambda"], full["paper_loss"], color="C0")
        ax.axvline(truth, color="C3", ls="--", label=f"true lambda {truth:.4f}")
        ax.set(title=f"{res['weights']}: paper loss (eps {res['eps']:.3f})", xlabel="lambda_r",
               ylabel="1000 Var(C-1 smallest)")
        ax.legend(fontsize=8)
        ax = axes[row, 1]
        ax.plot(zoom["lambda"], zoom["paper_loss"], color="C0")
        ax.axhline(0.0, color="C3", ls="--", lw=0.8)
        lo, hi = float(zoom["lambda"].min()), float(zoom["lambda"].max())
        if lo <= truth <= hi:
            ax.axvline(truth, color="C3", ls="--")
        ax.set(title=f"zoom on the grid minimum ({res['zoom_centre']:.4f})", xlabel="lambda_r")
        ax.ticklabel_format(axis="x", useOffset=False)
        ax = axes[row, 2]
        ax.semilogy(full["lambda"], full["residual"].clamp_min(1e-16), color="C2")
        ax.axvline(truth, color="C3", ls="--")
        ax.set(title="gradleak normalised residual (smoothing)", xlabel="lambda_r", ylabel="r (log)")
        for a in axes[row]:
            a.grid(True, alpha=0.3)
    fig.suptitle(title)
    return save_figure(fig, path)
