"""Noise robustness: label recovery when Gaussian or Laplace noise is added to the WHOLE gradient.

Unlike the official code (noise on one gradient row only, the clean gradient used inside the search), the
noise here is what a DP-style defence sends: every entry of every parameter's gradient gets i.i.d. noise of
standard deviation ``sigma``. ``sigma`` is RELATIVE by default: ``std * RMS(gradient)``, the RMS over every
entry of every parameter tensor of that example's clean gradient (``scale="absolute"`` uses ``std`` as is).
Laplace noise has scale ``sigma / sqrt(2)`` so that both kinds have the same standard deviation.

Recovery uses ``rank_one_tol=None`` (a noisy gradient is not exactly rank one). The same noisy gradient is
attacked by every method; at ``std = 0`` nothing is added and the results equal the clean experiment's.
Outputs: ``noise.csv`` (one row per trial, noise, std, method), ``noise_summary.csv``, ``noise_summary.md`` (the
same, one table) and ``noise.png``.
"""
from __future__ import annotations

import csv
import functools
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .common import (SUCCESS_TOL, ResumableCSV, Trial, as_float, attack, draw_trials, grade, is_true, markdown_table,
                     median, output_dir, resolve_formats, resolve_methods, shared_setup, victim, wilson_interval)
from .parallel import map_trials
from ..plots import curve_styles, new_figure, save_figure

NOISE_KINDS = ("gaussian", "laplace")
DEFAULT_STDS = (0.0, 1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1)
DEFAULT_METHODS = ("exact", "exact-head", "lbfgs", "pso")
LOOSE_TOL = 1e-2
FIELDS = ["dataset", "network", "weights", "format", "sample", "noise", "scale", "std", "sigma", "method",
          "success", "success_loose", "label_error", "label_l1", "label_cos", "feature_cos", "feature_rel_error",
          "determined", "used", "time_ms", "message"]
KEY = ["dataset", "network", "weights", "format", "sample", "noise", "scale", "std", "method"]


def gradient_rms(gradients: Dict[str, torch.Tensor]) -> float:
    """RMS over every entry of every tensor of a gradient dict."""
    total = sum(float(g.detach().double().square().sum()) for g in gradients.values())
    count = sum(g.numel() for g in gradients.values())
    return math.sqrt(total / count)


def add_noise(gradients: Dict[str, torch.Tensor], kind: str, sigma: float, generator: torch.Generator
              ) -> Dict[str, torch.Tensor]:
    """A copy of ``gradients`` with i.i.d. noise of standard deviation ``sigma`` on every entry.

    Args:
        kind: "gaussian" (N(0, sigma^2)) or "laplace" (Laplace(0, sigma / sqrt(2))).
        generator: a CPU generator (the noise is drawn on CPU, in float64, then cast to each tensor's dtype).
    """
    if kind not in NOISE_KINDS:
        raise ValueError(f"noise must be one of {NOISE_KINDS}, got {kind!r}")
    if not (sigma >= 0 and math.isfinite(sigma)):
        raise ValueError(f"the noise standard deviation must be finite and non-negative, got {sigma}")
    if sigma == 0:
        return dict(gradients)
    out = {}
    for name, grad in gradients.items():
        if kind == "gaussian":
            noise = torch.randn(grad.shape, generator=generator, dtype=torch.float64) * sigma
        else:  # Laplace by inverse CDF of a uniform on (-1/2, 1/2)
            u = torch.rand(grad.shape, generator=generator, dtype=torch.float64) - 0.5
            noise = -(sigma / math.sqrt(2.0)) * u.sign() * torch.log1p(-2.0 * u.abs())
        out[name] = grad + noise.to(device=grad.device, dtype=grad.dtype)
    return out


def run(*, dataset: str = "cifar10", network: str = "lenet", weights: str = "untrained",
        formats: Union[str, Sequence[str]] = ("smoothing",), methods: Union[str, Sequence[str]] = DEFAULT_METHODS,
        noises: Sequence[str] = NOISE_KINDS, stds: Sequence[float] = DEFAULT_STDS, scale: str = "relative",
        samples: Optional[int] = None, seed: int = 2023, out: Optional[Union[str, Path]] = None,
        quick: bool = False, progress: bool = True, figure: bool = True, ray: Optional[str] = None,
        **_ignored) -> Dict[str, Any]:
    """Label recovery vs noise level; writes ``noise.csv``, ``noise_summary.csv`` / ``.md`` and ``noise.png``.

    Args:
        formats, methods, samples, seed, quick: as for :func:`label_recovery.run` (same trials for the same
            seed; default 20 samples, quick 4).
        noises: "gaussian" and/or "laplace".
        stds: noise levels; relative to the clean gradient's RMS (``scale="relative"``) or absolute.
        figure: write the PNG.
        ray: None runs the trials here; "local" or a Ray cluster's address spreads them
            (:func:`.parallel.map_trials`): ``noise.csv`` gets the same rows in the same order (``time_ms`` aside).

    Returns:
        ``dict(summary=[...], files={...}, out=str)``.
    """
    if scale not in ("relative", "absolute"):
        raise ValueError(f"scale must be 'relative' or 'absolute', got {scale!r}")
    for kind in noises:
        if kind not in NOISE_KINDS:
            raise ValueError(f"noise must be one of {NOISE_KINDS}, got {kind!r}")
    formats = resolve_formats(formats)
    methods = resolve_methods(methods, quick)
    stds = [float(s) for s in stds]
    count = (4 if quick else 20) if samples is None else int(samples)
    folder = output_dir(out, "noise")
    setting = {"dataset": dataset, "network": network, "weights": weights, "seed": seed}
    env = shared_setup(**setting)
    table = ResumableCSV(folder / "noise.csv", FIELDS, KEY)
    base = {"dataset": dataset, "network": network, "weights": env.weights, "scale": scale}
    jobs = []
    for trial in (t for f in formats for t in draw_trials(env.labels, env.num_classes, f, count, seed)):
        missing = [(k_index, s_index, todo) for k_index, kind in enumerate(noises) for s_index, std in enumerate(stds)
                   for todo in [[m for m in methods if not table.has(**base, format=trial.label_format,
                                                                     sample=trial.sample, noise=kind, std=repr(std),
                                                                     method=m)]] if todo]
        if missing:
            jobs.append((trial, missing))
    task = functools.partial(attack_noisy_trial, setting=setting, noises=tuple(noises), stds=tuple(stds),
                             scale=scale)
    for rows in map_trials(task, jobs, ray_address=ray, progress=progress,
                           desc=f"noise {dataset}/{network}/{env.weights}"):
        table.append(rows)
    summary = summarize(table.rows)
    files = {"samples": str(folder / "noise.csv"), "summary": str(folder / "noise_summary.csv")}
    with open(files["summary"], "w", newline="") as handle:
        writer = csv.DictWriter(handle, list(summary[0]) if summary else ["noise"])
        writer.writeheader()
        writer.writerows(summary)
    files["summary_md"] = str(folder / "noise_summary.md")
    Path(files["summary_md"]).write_text(summary_markdown(summary))
    if figure and summary:
        files["figure"] = str(plot(summary, folder / "noise.png"))
    return {"summary": summary, "files": files, "out": str(folder)}


def attack_noisy_trial(job: Tuple[Trial, Sequence[Tuple[int, int, Sequence[str]]]], *, setting: Mapping[str, Any],
                       noises: Sequence[str], stds: Sequence[float], scale: str) -> List[Dict[str, Any]]:
    """One trial's ``noise.csv`` rows: its victim gradient, noised at each missing level, attacked by each method.

    Args:
        job: ``(trial, [(noise index, std index, method names), ...])``: what is still missing for the trial.
        setting: :func:`common.shared_setup`'s arguments (built once per process, here or in a Ray worker); its
            ``seed`` also seeds the noise (per sample, kind, level and format) and PSO (per sample).
    """
    trial, missing = job
    seed = setting["seed"]
    env = shared_setup(**setting)
    truth = victim(env.model, env.images, trial)
    rows = []
    for k_index, s_index, methods in missing:
        kind, std = noises[k_index], stds[s_index]
        sigma = std * gradient_rms(truth.gradients) if scale == "relative" else std
        generator = torch.Generator().manual_seed(
            int(np.random.SeedSequence([seed, trial.sample, k_index, s_index,
                                        ("smoothing", "mixup", "hard").index(trial.label_format)])
                .generate_state(1)[0]))
        noisy = add_noise(truth.gradients, kind, sigma, generator)
        for name in methods:
            attempt = attack(name, env.model, noisy, trial.label_format, seed=seed + trial.sample, rank_one_tol=None)
            graded = grade(attempt, truth)
            rows.append({"dataset": setting["dataset"], "network": setting["network"], "weights": env.weights,
                         "scale": scale, "format": trial.label_format, "sample": trial.sample, "noise": kind,
                         "std": std, "sigma": sigma, "method": name, **graded,
                         "success_loose": graded["label_error"] < LOOSE_TOL, "determined": attempt.determined,
                         "used": attempt.used, "time_ms": attempt.time_ms, "message": attempt.message})
    return rows


def summarize(rows: Sequence[Dict[str, str]]) -> List[Dict[str, Any]]:
    """Per (dataset, network, weights, format, noise, scale, std, method): accuracy (tol 1e-3, Wilson CI),
    accuracy at the loose tolerance 1e-2, median label error, median feature cosine, undetermined count."""
    groups: Dict[tuple, List[Dict[str, str]]] = defaultdict(list)
    for row in rows:
        groups[tuple(row[k] for k in ("dataset", "network", "weights", "format", "noise", "scale", "std",
                                      "method"))].append(row)
    summary = []
    for key, members in groups.items():
        n = len(members)
        successes = sum(is_true(r["success"]) for r in members)
        low, high = wilson_interval(successes, n)
        summary.append({"dataset": key[0], "network": key[1], "weights": key[2], "format": key[3], "noise": key[4],
                        "scale": key[5], "std": float(key[6]), "method": key[7], "n": n, "successes": successes,
                        "accuracy": successes / n, "ci_low": low, "ci_high": high,
                        "accuracy_loose": sum(is_true(r["success_loose"]) for r in members) / n,
                        "median_label_error": median([as_float(r["label_error"]) for r in members]),
                        "median_feature_rel_error": median([as_float(r["feature_rel_error"]) for r in members]),
                        "undetermined": sum(r["determined"] == "False" for r in members),
                        "median_ms": median([as_float(r["time_ms"]) for r in members])})
    summary.sort(key=lambda s: (s["dataset"], s["network"], s["weights"], s["format"], s["noise"], s["method"],
                                s["std"]))
    return summary


def summary_markdown(summary: Sequence[Dict[str, Any]]) -> str:
    """:func:`summarize`'s rows as one Markdown table: a row per (setting, noise, format, std), a column per method,
    each cell ``accuracy % / median label error`` and, when there are any, the undetermined count (``ku``)."""
    methods = list(dict.fromkeys(s["method"] for s in summary))
    settings = ("dataset", "network", "weights", "noise", "format", "scale", "std")
    cells: Dict[tuple, Dict[str, str]] = defaultdict(dict)
    counts: Dict[tuple, set] = defaultdict(set)
    for s in summary:
        key = tuple(s[k] for k in settings)
        undetermined = f" ({s['undetermined']}u)" if s["undetermined"] else ""
        cells[key][s["method"]] = f"{100 * s['accuracy']:.0f} / {s['median_label_error']:.1e}{undetermined}"
        counts[key].add(s["n"])
    rows = [[*key[:-1], f"{key[-1]:g}", "/".join(str(n) for n in sorted(counts[key]))]
            + [cells[key].get(m, "") for m in methods] for key in sorted(cells)]
    return (f"# Label recovery with noise on the whole gradient\n\nEach cell: accuracy (%, max |label error| < "
            f"{SUCCESS_TOL:g}, the label only) / median max |label error|; \"(ku)\": k answers the method flagged "
            "as undetermined (counted by their label error all the same). std: the noise's standard deviation, "
            "times the example's gradient RMS when the scale is relative.\n\n"
            + markdown_table([*settings, "n", *methods], rows))


def draw(summary: Sequence[Dict[str, Any]]):
    """Accuracy (tol 1e-3) and median label error vs noise std: one row per (noise, format), one curve per method.

    Every method keeps one colour, marker and dash pattern in every panel (:func:`gradleak.plots.curve_styles`),
    so methods whose curves coincide (all at 100 %) stay visible. Returns the matplotlib ``Figure``.
    """
    panels = sorted({(s["noise"], s["format"]) for s in summary})
    styles = curve_styles([s["method"] for s in summary])
    # std 0 cannot sit on a log axis: it is drawn a decade left of the smallest positive std, and labelled 0
    positive = sorted({s["std"] for s in summary if s["std"] > 0})
    zero_at = positive[0] / 10 if positive else 1e-6
    fig, axes = new_figure(len(panels), 2, figsize=(10, 3.3 * len(panels)))
    for row, (kind, label_format) in enumerate(panels):
        mine = [s for s in summary if s["noise"] == kind and s["format"] == label_format]
        for method, style in styles.items():
            curve = sorted((s for s in mine if s["method"] == method), key=lambda s: s["std"])
            if not curve:
                continue
            x = [s["std"] if s["std"] > 0 else zero_at for s in curve]
            axes[row, 0].plot(x, [100 * s["accuracy"] for s in curve], **style)
            # a median error of exactly 0 cannot sit on a log axis either: drawn at 1e-16
            axes[row, 1].plot(x, [max(s["median_label_error"], 1e-16) for s in curve], **style)
        relative = mine[0]["scale"] == "relative"
        axes[row, 0].set(ylabel=f"accuracy (%): max |label error| < {SUCCESS_TOL:g}", ylim=(-5, 105),
                         title=f"{kind} noise, {label_format}: accuracy")
        axes[row, 1].set(yscale="log", ylabel="median max |label error|",
                         title=f"{kind} noise, {label_format}: median label error")
        for ax in axes[row]:
            ax.set(xscale="log", xlabel=f"noise std ({'x gradient RMS' if relative else 'absolute'})")
            if len(positive) < len({s["std"] for s in summary}):
                ticks = [zero_at] + positive
                ax.set_xticks(ticks, ["0"] + [f"{t:g}" for t in positive])
                ax.minorticks_off()
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    return fig


def plot(summary: Sequence[Dict[str, Any]], path: Path) -> Path:
    """Write :func:`draw` to ``path`` (``noise.png``)."""
    return save_figure(draw(summary), path)
