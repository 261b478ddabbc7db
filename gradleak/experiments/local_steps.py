"""Several local steps: label recovery from the update of a client that ran K SGD steps on its one example.

The client (:func:`gradleak.updates_client.sgd_updates`, ``torch.optim.SGD``, no momentum or weight decay)
takes K steps of learning rate ``lr`` on ONE example and sends ``update = new - old = -lr * sum_k g(theta_k)``.
For K = 1 that is ``-lr * g(theta_0)``, a scaled single-example gradient; for K > 1 the gradients along the
trajectory differ, the update is no longer rank one, and recovery degrades with the distance travelled,
about ``K * lr`` (the x-axis of the figure).

The server attacks the update twice (:func:`gradleak.recover_from_update`, ``rank_one_tol=None``, label format
detected):

* ``scale="unknown"``: ``recover_from_update(model, update)``, no learning rate: the update is ``s * g`` for an
  unknown ``s``;
* ``scale="known"``: ``recover_from_update(model, update, lr=lr, local_steps=K)``: the server knows the client's learning
  rate AND its number of local steps (both are FedAvg settings the server itself sends), so it takes
  ``-update / (K * lr)``, the average gradient along the trajectory, as the gradient (``-update / lr`` would be
  off by the factor K, a wrongly scaled gradient for every K > 1).

The evaluator grades against the example's label and its head feature at the weights the server holds
(``theta_0``), and the scale against the first-order truth ``s = -K * lr``. A trial succeeds when the
label's max error is below 1e-3 and the feature's cosine above 0.999 (the label alone is also counted); a
confidently wrong answer is a wrong label reported as determined. Outputs in ``out``:
``local_steps.csv`` (one row per trial, K, lr, scale; resumable), ``local_steps_summary.csv`` / ``.md``
(accuracy with 95 % Wilson intervals, label-only accuracy, median label error, undetermined and confidently
wrong counts, median
rank-one ratio, median drift: how far the K steps moved the example's predicted probabilities; K > 1
steps mix the ``p - y`` of every step, so drift is the scale of the blur on the label) and
``local_steps.png`` (accuracy and median label error against ``K * lr``, per network).

The helpers here (the update attack, its grading, the summaries) are shared with :mod:`.dp`.
"""
from __future__ import annotations

import csv
import functools
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

import torch
from torch import nn

from ..plots import save_figure
from ..updates_client import sgd_updates
from .common import (FEATURE_COS_TOL, SUCCESS_TOL, Attempt, ResumableCSV, Setup, Trial, Victim, as_float,
                     draw_trials, grade, is_true, markdown_table, median, output_dir, resolve_formats, shared_setup,
                     victim, victim_input, wilson_interval)
from .parallel import map_trials

DEFAULT_NETWORKS = ("lenet", "fcn4")
DEFAULT_STEPS = (1, 2, 3, 5, 10)
DEFAULT_LRS = (1e-3, 1e-2, 1e-1)
QUICK_STEPS = (1, 2, 10)
QUICK_LRS = (1e-3, 1e-1)
SCALES = ("known", "unknown")
#: Columns every update attack writes (after the experiment's own keys).
ATTACK_FIELDS = ["scale", "success", "label_success", "label_error", "label_l1", "feature_cos", "feature_rel_error",
                 "determined", "confident_wrong", "true_scale", "est_scale", "scale_error", "rank_one_ratio",
                 "residual", "pred_format", "used", "time_ms", "message"]
FIELDS = (["dataset", "network", "weights", "format", "sample", "steps", "lr", "k_lr", "drift"] + ATTACK_FIELDS)
KEY = ["dataset", "network", "weights", "format", "sample", "steps", "lr", "scale"]
QUICK_SAMPLES = 2


# ----------------------------------------------------------------------------------------------- shared helpers

def resolve_networks(network: Union[str, Sequence[str], None], default: Sequence[str]) -> List[str]:
    """Network names from the CLI's ``--network`` (one name, or several separated by commas) or ``default``."""
    if network is None:
        return list(default)
    names = [n.strip() for n in network.split(",")] if isinstance(network, str) else list(network)
    return list(dict.fromkeys(n for n in names if n))


def check_options(network: Union[str, Sequence[str], None], default: Sequence[str], weights: str,
                  scales: Sequence[str]) -> List[str]:
    """The networks to run (:func:`resolve_networks`), after checking ``weights`` and ``scales``."""
    networks = resolve_networks(network, default)
    if weights not in (None, "untrained") and len(networks) > 1:
        raise ValueError(f"a checkpoint belongs to one network; got weights={weights!r} for {networks}")
    unknown = [s for s in scales if s not in SCALES]
    if unknown:
        raise ValueError(f"scales must be among {SCALES}, got {unknown}")
    return networks


def sweep_networks(table: ResumableCSV, networks: Sequence[str], *, missing: Callable[[Dict[str, Any]], Set[Any]],
                   task: Callable[..., List[Dict[str, Any]]], desc: str, dataset: str, weights: str,
                   formats: Sequence[str], count: int, seed: int, image_size: Optional[int], ray: Optional[str],
                   progress: bool) -> int:
    """Every network's trials through ``task`` (here, or on Ray: :func:`.parallel.map_trials`), their rows
    appended to ``table`` in trial order; returns the number of new rows.

    Per network, ``setting`` holds :func:`common.shared_setup`'s arguments (at the network's paper input size
    unless ``image_size`` says otherwise), and ``task((trial, cells), setting=setting)`` rebuilds the network from
    them wherever it runs. ``cells = missing(fields)`` are the trial's cells not yet in ``table`` (``fields``:
    :func:`trial_fields`); a trial with none is skipped. The trials are :func:`common.draw_trials`' (``count`` per
    format, seeded).
    """
    new_rows = 0
    for name in networks:
        setting = {"dataset": dataset, "network": name, "weights": weights, "seed": seed, "image_size": image_size}
        env = shared_setup(**setting)
        trials = [t for f in formats for t in draw_trials(env.labels, env.num_classes, f, count, seed)]
        jobs = [(trial, cells) for trial in trials if (cells := missing(trial_fields(setting, env, trial)))]
        for rows in map_trials(functools.partial(task, setting=setting), jobs, ray_address=ray, progress=progress,
                               desc=f"{desc} {dataset}/{name}/{env.weights}"):
            table.append(rows)
            new_rows += len(rows)
    return new_rows


def trial_fields(setting: Mapping[str, Any], env: Setup, trial: Trial) -> Dict[str, Any]:
    """The row fields that name a trial: ``dataset, network, weights, format, sample``."""
    return {"dataset": setting["dataset"], "network": setting["network"], "weights": env.weights,
            "format": trial.label_format, "sample": trial.sample}


def prediction_drift(model: nn.Module, update: Mapping[str, torch.Tensor], x: torch.Tensor) -> float:
    """Evaluator: how far the client's steps moved its prediction on its example,
    ``max_i |softmax(z(theta_0 + update))_i - softmax(z(theta_0))_i|`` for the ``(C, H, W)`` input ``x``.

    The label a K-step update gives away is blurred by about this much: the update mixes the ``p - y`` of
    every step along the trajectory.
    """
    from torch.func import functional_call

    with torch.no_grad():
        params = dict(model.named_parameters())
        batch = x.unsqueeze(0).to(next(iter(params.values())))
        before = torch.softmax(model(batch), dim=-1)
        moved = {name: p + update[name] for name, p in params.items() if name in update}
        after = torch.softmax(functional_call(model, moved, (batch,)), dim=-1)
    return float((after - before).abs().max())


def attack_update(model: nn.Module, update: Mapping[str, torch.Tensor], *, lr: Optional[float],
                  local_steps: int = 1, label_format: str = "auto") -> Tuple[Attempt, Dict[str, Any]]:
    """The server's attack on one update: :func:`gradleak.recover_from_update` with ``rank_one_tol=None``.

    Args:
        model: the network at the weights the client started from.
        update: ``{parameter name: new - old}``.
        lr: the learning rate the server assumes (known scale), or None (unknown scale).
        local_steps: the client's local steps K the server assumes with ``lr`` (ignored without it).
        label_format: what the attacker is told ("auto": detected).

    Returns:
        ``(attempt, diagnostics)``: the :class:`common.Attempt` for :func:`common.grade` (label and feature
        None when the attack raised; the message says why), and the result's ``est_scale`` (``s_hat`` with
        ``update = s_hat * g``) and ``rank_one_ratio`` (NaN when it raised).
    """
    from .. import recover_from_update

    start = time.perf_counter()
    try:
        res = recover_from_update(model, update, lr=lr, local_steps=local_steps if lr is not None else 1,
                                  label_format=label_format, rank_one_tol=None)
    except (ValueError, RuntimeError) as error:
        elapsed = (time.perf_counter() - start) * 1e3
        return (Attempt(None, None, elapsed, message=f"{type(error).__name__}: {error}"),
                {"est_scale": math.nan, "rank_one_ratio": math.nan})
    elapsed = (time.perf_counter() - start) * 1e3
    attempt = Attempt(res.label, res.feature, elapsed, determined=res.determined, pred_format=res.label_format,
                      used=res.method, residual=res.residual, message=res.message)
    return attempt, {"est_scale": float(res.gradient_scale), "rank_one_ratio": float(res.rank_one_ratio)}


def grade_update(attempt: Attempt, diagnostics: Mapping[str, Any], truth: Victim, true_scale: float
                 ) -> Dict[str, Any]:
    """Evaluator: the attack's row fields graded against the truth (label, head feature, scale ``s``).

    ``label_success``: max label error < 1e-3; ``success``: that AND feature cosine > 0.999;
    ``confident_wrong``: the attack said ``determined=True`` and the LABEL is wrong (max error >= 1e-3);
    ``scale_error``: ``|s_hat / s - 1|``.
    """
    graded = grade(attempt, truth)
    est = diagnostics["est_scale"]
    label_success = bool(graded["success"])
    return {"success": label_success and graded["feature_cos"] > FEATURE_COS_TOL, "label_success": label_success,
            "label_error": graded["label_error"], "label_l1": graded["label_l1"],
            "feature_cos": graded["feature_cos"], "feature_rel_error": graded["feature_rel_error"],
            "determined": attempt.determined, "confident_wrong": attempt.determined is True and not label_success,
            "true_scale": true_scale, "est_scale": est, "scale_error": abs(est / true_scale - 1.0),
            "rank_one_ratio": diagnostics["rank_one_ratio"], "residual": attempt.residual,
            "pred_format": attempt.pred_format, "used": attempt.used, "time_ms": attempt.time_ms,
            "message": attempt.message}


def summarize_updates(rows: Sequence[Mapping[str, str]], keys: Sequence[str], numeric: Sequence[str] = (),
                      medians: Sequence[str] = ()) -> List[Dict[str, Any]]:
    """Per group of ``keys``: accuracy (Wilson 95 % interval), label-only accuracy, median label error and scale
    error, undetermined / confidently wrong / raised counts, median rank-one ratio and time, and
    ``median_{column}`` for each of the ``medians`` columns.

    ``numeric`` keys are turned into floats (and sort as numbers); the summary is sorted by ``keys``.
    """
    groups: Dict[tuple, List[Mapping[str, str]]] = defaultdict(list)
    for row in rows:
        groups[tuple(row[k] for k in keys)].append(row)
    summary = []
    for key, members in groups.items():
        n = len(members)
        successes = sum(is_true(r["success"]) for r in members)
        low, high = wilson_interval(successes, n)
        entry: Dict[str, Any] = {k: (float(v) if k in numeric else v) for k, v in zip(keys, key)}
        entry.update({"n": n, "successes": successes, "accuracy": successes / n, "ci_low": low, "ci_high": high,
                      "label_accuracy": sum(is_true(r["label_success"]) for r in members) / n,
                      "median_label_error": median([as_float(r["label_error"]) for r in members]),
                      "median_scale_error": median([as_float(r["scale_error"]) for r in members]),
                      "undetermined": sum(r["determined"] == "False" for r in members),
                      "confident_wrong": sum(is_true(r["confident_wrong"]) for r in members),
                      "errors": sum(r["label_error"] == "nan" for r in members),
                      "median_rank_one_ratio": median([as_float(r["rank_one_ratio"]) for r in members]),
                      "median_ms": median([as_float(r["time_ms"]) for r in members])})
        entry.update({f"median_{c}": median([as_float(r[c]) for r in members]) for c in medians})
        summary.append(entry)
    summary.sort(key=lambda s: tuple(s[k] for k in keys))
    return summary


def _fmt(value: Any, spec: str) -> str:
    return "–" if isinstance(value, float) and math.isnan(value) else format(value, spec)


def write_update_results(table: ResumableCSV, stem: str, keys: Sequence[str], numeric: Sequence[str], *, title: str,
                         notes: str, plot_fn: Callable[[Sequence[Mapping[str, Any]], Path], Path], figure: bool,
                         new_rows: int, medians: Sequence[str] = ()) -> Dict[str, Any]:
    """Summarise an update experiment's rows (:func:`summarize_updates` over ``keys``, with the ``medians``) into
    ``{stem}_summary.csv`` and ``{stem}_summary.md`` (``notes``, the shared definitions, the table) beside the
    rows' CSV, and the figure ``{stem}.png`` by ``plot_fn`` when ``figure``.

    Returns:
        ``dict(summary=[...], files={...}, new_rows=new_rows, out=str)``, what the experiments' ``run`` return.
    """
    folder = table.path.parent
    summary = summarize_updates(table.rows, keys, numeric, medians)
    files = {"samples": str(table.path), "summary_csv": str(folder / f"{stem}_summary.csv"),
             "summary_md": str(folder / f"{stem}_summary.md")}
    with open(files["summary_csv"], "w", newline="") as handle:
        writer = csv.DictWriter(handle, list(summary[0]) if summary else list(keys))
        writer.writeheader()
        writer.writerows(summary)
    header = list(keys) + ["n", "accuracy", "95 % CI", "label accuracy", "median max-err", "median abs(s_hat/s - 1)",
                           "undetermined", "confident wrong", "errors", "median rank-one ratio"]
    header += [f"median {c}" for c in medians]
    rows = [[_fmt(s[k], "g") if isinstance(s[k], float) else s[k] for k in keys]
            + [s["n"], f"{100 * s['accuracy']:.1f} %", f"[{100 * s['ci_low']:.1f}, {100 * s['ci_high']:.1f}]",
               f"{100 * s['label_accuracy']:.1f} %", _fmt(s["median_label_error"], ".1e"),
               _fmt(s["median_scale_error"], ".1e"), s["undetermined"], s["confident_wrong"], s["errors"],
               _fmt(s["median_rank_one_ratio"], ".1e")]
            + [_fmt(s[f"median_{c}"], ".1e") for c in medians] for s in summary]
    definitions = (f"Accuracy: max label error < {SUCCESS_TOL:g} and feature cosine > {FEATURE_COS_TOL} (the head "
                   "input at the weights the server holds); label accuracy: the label condition alone. "
                   "Undetermined: the attack said it cannot tell (counted as a failure); confident wrong: "
                   "determined=True and a wrong label; errors: the attack raised. "
                   "Recovery: gradleak.recover_from_update, rank_one_tol=None, label format detected (not told). "
                   "95 % CI: Wilson score interval.")
    Path(files["summary_md"]).write_text(f"# {title}\n\n{notes} {definitions}\n\n" + markdown_table(header, rows))
    if figure and summary:
        files["figure"] = str(plot_fn(summary, folder / f"{stem}.png"))
    return {"summary": summary, "files": files, "new_rows": new_rows, "out": str(folder)}


# ----------------------------------------------------------------------------------------------- the experiment

def run(*, dataset: str = "cifar10", network: Union[str, Sequence[str], None] = None, weights: str = "untrained",
        formats: Union[str, Sequence[str]] = ("smoothing", "mixup"), steps: Optional[Sequence[int]] = None,
        lrs: Optional[Sequence[float]] = None, scales: Sequence[str] = SCALES, samples: Optional[int] = None,
        seed: int = 2023, out: Optional[Union[str, Path]] = None, quick: bool = False, progress: bool = True,
        image_size: Optional[int] = None, figure: bool = True, ray: Optional[str] = None,
        **_ignored) -> Dict[str, Any]:
    """Recovery from K-step SGD updates; writes ``local_steps.csv``, the summaries and ``local_steps.png``.

    Args:
        dataset: a built-in dataset; trials drawn with :func:`common.draw_trials` (seeded, never re-drawn).
        network: a network name, several separated by commas, or None for ``("lenet", "fcn4")``
            (``quick``: ``("lenet",)``). FCN-4 runs on 64x64 inputs unless ``image_size`` is given.
        weights: "untrained" (seeded init) or a checkpoint path (one network only).
        formats: victim label formats; the attacker detects the format.
        steps: the local step counts K (default 1, 2, 3, 5, 10; ``quick``: 1, 2, 10).
        lrs: the learning rates (default 1e-3, 1e-2, 1e-1; ``quick``: 1e-3, 1e-1).
        scales: "known" (the server divides by ``K * lr``) and/or "unknown" (no learning rate).
        samples: trials per format and network (default 10; ``quick``: 2).
        seed: seeds the initialisation and the trials.
        out: output folder (default ``results/local-steps``; resumable).
        quick: the CI preset: LeNet only (unless ``network``), 2 trials per format, fewer K and lr (unless given).
        image_size: input side for every network (None: the dataset's, 64 for FCN-4).
        figure: write the PNG.
        ray: None runs the trials here; "local" or a Ray cluster's address spreads them over Ray
            (:func:`.parallel.map_trials`; the same rows in the same order, ``time_ms`` aside).

    Returns:
        ``dict(summary=[...], files={...}, new_rows=int, out=str)``.
    """
    networks = check_options(network, ("lenet",) if quick else DEFAULT_NETWORKS, weights, scales)
    formats = resolve_formats(formats)
    steps = sorted({int(k) for k in (steps or (QUICK_STEPS if quick else DEFAULT_STEPS))})
    lrs = [float(lr) for lr in (lrs or (QUICK_LRS if quick else DEFAULT_LRS))]
    count = (QUICK_SAMPLES if quick else 10) if samples is None else int(samples)
    folder = output_dir(out, "local-steps")
    table = ResumableCSV(folder / "local_steps.csv", FIELDS, KEY)
    new_rows = sweep_networks(
        table, networks, desc="local steps", dataset=dataset, weights=weights, formats=formats, count=count,
        seed=seed, image_size=image_size, ray=ray, progress=progress,
        missing=lambda where: {(lr, k, s) for lr in lrs for k in steps for s in scales
                               if not table.has(**where, steps=k, lr=repr(lr), scale=s)},
        task=functools.partial(attack_local_steps, lrs=lrs, steps=steps, scales=scales))
    notes = ("A client runs K plain SGD steps (torch.optim.SGD) on its one example and sends new - old weights. "
             "Scale known: the server divides the update by -K*lr; unknown: no learning rate. abs(s_hat/s - 1) "
             "against the first-order s = -K*lr. drift (evaluator only): max_i |p_i after the K steps - p_i "
             "before| on the example, p the softmax prediction.")
    return write_update_results(table, "local_steps", ["dataset", "network", "weights", "format", "scale", "lr",
                                                       "steps", "k_lr"], ("lr", "steps", "k_lr"),
                                title="Label recovery from K local SGD steps", notes=notes, plot_fn=plot,
                                figure=figure, new_rows=new_rows, medians=("drift",))


def attack_local_steps(job: Tuple[Trial, Set[Tuple[float, int, str]]], *, setting: Mapping[str, Any],
                       lrs: Sequence[float], steps: Sequence[int], scales: Sequence[str]) -> List[Dict[str, Any]]:
    """One trial's ``local_steps.csv`` rows: the client's K-step updates for each learning rate, each attacked
    with each scale.

    Args:
        job: ``(trial, missing)``, ``missing`` the ``(lr, K, scale)`` rows still to do (a resumed run skips the
            others).
        setting: :func:`common.shared_setup`'s arguments (the network is built once per process from them).
        lrs, steps, scales: the sweep, in the rows' order.
    """
    trial, missing = job
    env = shared_setup(**setting)
    where = trial_fields(setting, env, trial)
    truth = victim(env.model, env.images, trial)
    x = victim_input(env.images, trial)
    rows = []
    missing_lrs = {lr for lr, _, _ in missing}
    for lr in (lr for lr in lrs if lr in missing_lrs):
        updates = sgd_updates(env.model, x, truth.label, lr=lr, steps=steps)
        for k, update in zip(steps, updates):
            drift = prediction_drift(env.model, update, x)
            for scale in scales:
                if (lr, k, scale) not in missing:
                    continue
                attempt, diagnostics = attack_update(env.model, update, lr=lr if scale == "known" else None,
                                                     local_steps=k)
                rows.append({**where, "steps": k, "lr": lr, "k_lr": k * lr, "drift": drift, "scale": scale,
                             **grade_update(attempt, diagnostics, truth, -k * lr)})
    return rows


def plot_update_curves(summary: Sequence[Mapping[str, Any]], path: Path, *, x: str, line: str,
                       line_label: Callable[[Mapping[str, Any]], str], xlabel: str) -> Path:
    """Accuracy and median label error against ``summary[x]`` (log axis; 0 is drawn a decade left of the
    smallest positive value): one row of panels per (network, format), one colour per value of ``summary[line]``
    (``line_label`` names it), solid lines for the unknown scale, dashed for the known."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((s["network"], s["format"]) for s in summary))
    values = sorted({s[line] for s in summary})
    colours = dict(zip(values, plt.rcParams["axes.prop_cycle"].by_key()["color"] * len(values)))
    positive = [s[x] for s in summary if s[x] > 0]
    floor = min(positive) / 10 if positive else 1.0
    fig, axes = plt.subplots(len(panels), 2, figsize=(11, 3.4 * len(panels)), squeeze=False)
    for row, (name, label_format) in enumerate(panels):
        for scale, style, marker in (("unknown", "-", "o"), ("known", "--", "s")):
            for value in values:
                curve = sorted((s for s in summary if (s["network"], s["format"], s["scale"], s[line])
                                == (name, label_format, scale, value)), key=lambda s: s[x])
                if not curve:
                    continue
                xs = [s[x] or floor for s in curve]
                options = dict(linestyle=style, marker=marker, color=colours[value],
                               label=f"{line_label(curve[0])}, scale {scale}")
                axes[row, 0].plot(xs, [100 * s["accuracy"] for s in curve], **options)
                # a median error of exactly 0 cannot sit on a log axis: drawn at 1e-16
                axes[row, 1].plot(xs, [max(s["median_label_error"], 1e-16) for s in curve], **options)
        axes[row, 0].set(ylabel="accuracy (%)", ylim=(-5, 105),
                         title=f"{name}, {label_format}: max-err < {SUCCESS_TOL:g}, feature cos > {FEATURE_COS_TOL}")
        axes[row, 1].set(yscale="log", ylabel="median max |label error|", title=f"{name}, {label_format}")
        for ax in axes[row]:
            ax.set(xscale="log", xlabel=xlabel)
            if len(positive) < len(summary):   # label the stand-in for 0 as 0
                ticks = [floor] + sorted(set(positive))
                ax.set_xticks(ticks, ["0"] + [f"{t:g}" for t in ticks[1:]])
                ax.minorticks_off()
            ax.grid(True, which="both", alpha=0.3)
        axes[row, 0].legend(fontsize=7)
    return save_figure(fig, path)


def plot(summary: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """``local_steps.png``: accuracy and median label error against ``K * lr``, one colour per learning rate
    (its points are the step counts K), per (network, format); solid: unknown scale, dashed: known."""
    steps = ", ".join(f"{k:g}" for k in sorted({s["steps"] for s in summary}))
    return plot_update_curves(summary, path, x="k_lr", line="lr", line_label=lambda s: f"lr {s['lr']:g}",
                              xlabel=f"K * lr (along a line: K = {steps})")
