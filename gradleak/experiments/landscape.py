"""The paper's Figure 1: its variance loss along the scalar, untrained vs trained, with our residual beside it.

For one label-smoothing example the paper's loss ``1000 * Var_pop(C - 1 smallest y_hat(lambda))`` (its
parametrisation with ``coefficient = 1``, :func:`paper_objective`) and gradleak's scale-normalised residual
(:func:`gradleak.recovery.structure.residuals`) are drawn against gradleak's scalar ``t`` (``h(t) = t sigma v``,
``lambda`` is ``t`` times a constant), over a range around the true scalar and in a zoom on the grid's lowest
point of the paper's loss (where the paper found a spurious minimum for a trained network). The true scalar
(evaluator only) is marked, and so are the scalars where the label's largest entry changes class: the smoothing
structure leaves that entry free, so there the paper's loss has a kink and our residual a jump (its normaliser
``||P c_S||`` depends on which entry is left out, see :func:`free_class_switches`).

Outputs in ``out``: ``landscape.png``, ``landscape.csv`` (every curve point) and ``landscape.md`` (minima).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from matplotlib.ticker import MaxNLocator

from ..head import factor_head, head_gradients
from ..recovery.paper import paper_objective
from ..recovery.structure import STRUCTURES, free_entries_of, residuals
from .common import draw_trials, markdown_table, output_dir, setup, victim
from ..plots import new_figure, save_figure

#: The figure marks the free-class changes where the residual jumps by more than this factor (either way); the
#: others (between wrong classes, whose ``c`` entries are alike) are listed in landscape.md only.
MARKED_JUMP = 1.05
FIELDS = ["weights", "panel", "lambda", "t", "paper_loss", "residual", "free_class"]


def curves_at(problem, objective, s: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Paper loss, our smoothing residual and the class the structure leaves free, at paper scalars ``s`` (K,)."""
    structure = STRUCTURES["smoothing"]
    t = objective.to_t(s)
    free_entries = torch.full_like(t, structure.free_entries, dtype=torch.long)
    offset_free = torch.full_like(t, structure.offset_free, dtype=torch.bool)
    with torch.no_grad():
        loss = objective.loss(s)
        r = residuals(problem, t, free_entries, offset_free)
        free = free_entries_of(problem, t, torch.softmax(problem.logits(t), -1), free_entries, offset_free)
    return {"lambda": s, "t": t, "paper_loss": loss, "residual": r, "free_class": free[:, 0, 0]}


def free_class_switches(problem, curves: Dict[str, torch.Tensor]) -> List[Dict[str, Any]]:
    """Where along the curve the free class (the label's largest entry) changes: ``[{t, before, after, jump}]``.

    At such a ``t`` the two classes' label entries are equal, so the ``C - 1`` smallest values are the same on
    both sides: the paper's variance is continuous (a kink), and so is our residual's numerator
    ``||P (t y_S)||``. Its normaliser ``||P c_S||`` (the trivial answer's residual) depends on which class is left
    out, so ``r(t)`` jumps there by ``jump = ||P c_S(before)|| / ||P c_S(after)||`` (its value after over its value
    before). ``t`` is the midpoint of the two grid points around the change.
    """
    classes = problem.num_classes
    # row k: c without its k-th entry, centred (the smoothing structure's offset is free)
    others = problem.c.to(torch.float64).expand(classes, classes)[~torch.eye(classes, dtype=torch.bool)]
    others = others.view(classes, classes - 1)
    normaliser = (others - others.mean(-1, keepdim=True)).norm(dim=-1)
    free, t = curves["free_class"], curves["t"]
    changed = (free[1:] != free[:-1]).nonzero().flatten().tolist()
    return [{"t": float((t[i] + t[i + 1]) / 2), "before": int(free[i]), "after": int(free[i + 1]),
             "jump": float(normaliser[free[i]] / normaliser[free[i + 1]])} for i in changed]


def landscape(dataset: str, network: str, weights: str, *, seed: int = 2023, sample: int = 0, points: int = 600,
              zoom_points: int = 300) -> Dict[str, Any]:
    """Curves for one smoothing trial (the ``sample``-th of :func:`common.draw_trials`) on one network.

    Returns:
        ``dict(weights=, true_t=, true_lambda=, eps=, target=, full=curves, zoom=curves, zoom_centre=, switches=)``
        with curves ``{"lambda", "t", "paper_loss", "residual", "free_class"}`` (each ``(K,)``), ``zoom_centre``
        the paper loss's grid minimum in ``t`` and ``switches`` the :func:`free_class_switches` of ``full``.
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
    full = curves_at(problem, objective, s)
    centre = float(s[int(full["paper_loss"].argmin())])
    half = max(0.01 * abs(centre), 2.0 * float((s[1] - s[0]).abs()))
    low, high = sorted((max(abs(centre) - half, 1.0) * sign, (abs(centre) + half) * sign))
    zoom = curves_at(problem, objective, torch.linspace(low, high, zoom_points, dtype=torch.float64))
    return {"weights": env.weights, "true_t": t_true, "true_lambda": s_true, "eps": trial.spec.eps,
            "target": trial.spec.classes[0], "full": full, "zoom": zoom, "zoom_centre": objective.to_t(centre),
            "switches": free_class_switches(problem, full)}


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
                                     "residual": float(c["residual"][i]), "free_class": int(c["free_class"][i])})
    summary = []
    for res in results:
        c = res["full"]
        summary.append({"weights": res["weights"], "eps": res["eps"], "target": res["target"],
                        "true_t": res["true_t"], "true_lambda": res["true_lambda"],
                        "paper_argmin_t": float(c["t"][int(c["paper_loss"].argmin())]),
                        "paper_min": float(c["paper_loss"].min()),
                        "ours_argmin_t": float(c["t"][int(c["residual"].argmin())]),
                        "ours_min": float(c["residual"].min()), "switches": res["switches"]})
    rows = [[s["weights"], f"{s['eps']:.4f}", s["target"], f"{s['true_t']:.4f}", f"{s['true_lambda']:.4f}",
             f"{s['paper_argmin_t']:.4f}", f"{s['paper_min']:.3g}", f"{s['ours_argmin_t']:.4f}",
             f"{s['ours_min']:.3g}",
             ", ".join(f"{w['t']:.3f} ({w['before']} -> {w['after']}, r x {w['jump']:.3g})" for w in s["switches"])
             or "none"]
            for s in summary]
    table = markdown_table(["weights", "eps", "class", "true t", "true lambda (paper)", "paper loss argmin t (grid)",
                            "paper loss min", "our residual argmin t (grid)", "our residual min",
                            "free class changes at t (class before -> after, moving away from t = 0; r's jump)"], rows)
    (folder / "landscape.md").write_text(
        f"# Landscape ({dataset}, {network}, label smoothing, sample {sample}, seed {seed})\n\n"
        "t: gradleak's scalar, h(t) = t * sigma * v; lambda: the paper's scalar with coefficient 1 "
        "(h = lambda * g_r), a constant multiple of t. Grid minima over "
        f"{points} points; the true scalar comes from the true feature (evaluator only). Where the free class "
        "(the label's largest entry) changes, the paper's loss has a kink and our residual jumps by the ratio of the "
        "normalisers ||P c_S|| of the two classes (r x jump); the figure marks the changes where r moves by more than "
        f"{100 * (MARKED_JUMP - 1):.0f} %.\n\n" + table)
    files = {"csv": str(folder / "landscape.csv"), "md": str(folder / "landscape.md")}
    if figure:
        files["png"] = str(plot(results, folder / "landscape.png", f"{dataset} / {network}"))
    return {"summary": summary, "files": files, "out": str(folder)}


def _mark_truth(ax, true_t: float, low: float, high: float) -> None:
    """The true scalar as a vertical line, and always as a legend entry (a proxy when it lies off this axis)."""
    label = f"true t = {true_t:.4f}"
    if low <= true_t <= high:
        ax.axvline(true_t, color="C3", ls="--", lw=1.2, label=label)
    else:
        ax.plot([], [], color="C3", ls="--", lw=1.2, label=f"{label} (off this range)")


def _mark_switches(ax, switches: Sequence[Dict[str, Any]], low: float, high: float, label: str) -> None:
    """Dotted grey lines where the free class changes and the residual visibly jumps (by more than MARKED_JUMP)."""
    visible = [w for w in switches if low <= w["t"] <= high and max(w["jump"], 1 / w["jump"]) > MARKED_JUMP]
    for index, switch in enumerate(visible):
        ax.axvline(switch["t"], color="0.4", ls=":", lw=1.4, label=label if index == 0 else None)


def draw(results: List[Dict[str, Any]], title: str):
    """One row per network: paper loss (full range), paper loss (zoom on its grid minimum), our residual; all
    against ``t``, each with the true ``t`` in its legend. Returns the matplotlib ``Figure``."""
    fig, axes = new_figure(len(results), 3, figsize=(15, 3.9 * len(results)))
    for row, res in enumerate(results):
        full, zoom, true_t = res["full"], res["zoom"], res["true_t"]
        low, high = sorted((float(full["t"][0]), float(full["t"][-1])))
        ax = axes[row, 0]
        ax.plot(full["t"], full["paper_loss"], color="C0", label="paper loss")
        ax.set(title=f"{res['weights']}: paper loss (eps {res['eps']:.3f})", ylabel="1000 Var(C-1 smallest)")
        _mark_truth(ax, true_t, low, high)
        _mark_switches(ax, res["switches"], low, high, "largest label entry changes class (kink)")
        ax = axes[row, 1]
        ax.plot(zoom["t"], zoom["paper_loss"], color="C0", label="paper loss")
        ax.axhline(0.0, color="0.6", lw=0.8)
        zoom_low, zoom_high = sorted((float(zoom["t"][0]), float(zoom["t"][-1])))
        _mark_truth(ax, true_t, zoom_low, zoom_high)
        ax.set(title=f"zoom on the paper loss's grid minimum (t = {res['zoom_centre']:.4f})")
        ax.ticklabel_format(axis="x", useOffset=False)
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax = axes[row, 2]
        ax.semilogy(full["t"], full["residual"].clamp_min(1e-16), color="C2", label="gradleak residual r(t)")
        ax.set(title="gradleak normalised residual (smoothing)", ylabel="r(t)")
        _mark_truth(ax, true_t, low, high)
        _mark_switches(ax, res["switches"], low, high, "largest entry changes class:\nnormaliser ||P c_S|| jumps")
        for ax in axes[row]:
            ax.set_xlabel("t")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"{title}: label smoothing, against t (h(t) = t * sigma * v)")
    return fig


def plot(results: List[Dict[str, Any]], path: Path, title: str) -> Path:
    """Write :func:`draw` to ``path`` (``landscape.png``)."""
    return save_figure(draw(results, title), path)
