"""The paper's label-recovery table (Table 2 style), with the hard-label baselines (Table 1 style) beside it.

For each label format the trials are drawn once with the paper's protocol (:func:`common.draw_trials`), the
victim's gradient is computed once per trial, and EVERY method attacks that same gradient. A trial counts as a
success when the recovered label's largest entry-wise error is below 1e-3; failures are counted, never
re-drawn. Outputs in ``out``:

* ``samples.csv``: one row per (trial, method): metrics, diagnostics, time; appended as it runs, and rows
  already there are skipped on a re-run (resumable);
* ``summary.csv`` / ``summary.md``: accuracy with 95 % Wilson intervals, median errors, feature recovery,
  the count of trials the diagnostics flagged as undetermined, median time and speed relative to PSO.

The trials run ``TRIALS_PER_TASK`` at a time: the exact search on the head alone ("exact-head", "exact-auto")
recovers the task's trials of each format in one :func:`gradleak.recover_labels` call, and each of their rows
gets an equal share of that call's time; the other methods are timed per trial. With ``ray`` the tasks run as
Ray tasks (:func:`.parallel.map_trials`) and ``samples.csv`` is the same file.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .common import (FEATURE_COS_TOL, FEATURE_REL_TOL, METHODS, SUCCESS_TOL, ResumableCSV, Trial, as_float, attack,
                     attack_heads, draw_trials, grade, head_entries, head_only, is_true, markdown_table, median,
                     output_dir, resolve_formats, resolve_methods, shared_setup, victim, wilson_interval)
from .parallel import map_trials

DEFAULT_METHODS = ("exact", "exact-head", "lbfgs", "pso", "idlg")
SAMPLE_FIELDS = ["dataset", "network", "weights", "format", "sample", "method", "success", "label_error",
                 "label_l1", "label_cos", "feature_cos", "feature_rel_error", "feature_success", "determined",
                 "time_ms", "used", "pred_format", "pred_classes", "true_classes", "pred_eps", "true_eps",
                 "pred_lam", "true_lam",
                 "residual", "evaluations", "converged", "images", "message"]
SAMPLE_KEY = ["dataset", "network", "weights", "format", "sample", "method"]
SUMMARY_FIELDS = ["dataset", "network", "weights", "format", "method", "n", "successes", "accuracy", "ci_low",
                  "ci_high", "median_label_error", "max_label_error", "median_label_l1", "feature_recovered",
                  "feature_n", "undetermined", "errors", "median_ms", "speedup_vs", "speedup"]
QUICK_SAMPLES = 6
#: Trials per task (one Ray task, one step of the progress bar): the head-only exact methods recover a task's
#: trials of each format in one recover_labels call.
TRIALS_PER_TASK = 25


def run(*, dataset: str = "cifar10", network: str = "lenet", weights: str = "untrained",
        formats: Union[str, Sequence[str]] = ("smoothing", "mixup"),
        methods: Union[str, Sequence[str]] = DEFAULT_METHODS, samples: Optional[int] = None, seed: int = 2023,
        out: Optional[Union[str, Path]] = None, quick: bool = False, progress: bool = True,
        image_size: Optional[int] = None, init: Optional[str] = None, ray: Optional[str] = None,
        **_ignored) -> Dict[str, Any]:
    """Run the label-recovery experiment and write ``samples.csv``, ``summary.csv`` and ``summary.md``.

    Args:
        dataset: a built-in dataset (``gradleak.data.DATASETS``); trials draw from its bundled images.
        network: a ``gradleak.models.MODELS`` name.
        weights: "untrained" (seeded initialisation, the paper's init unless ``init``) or a checkpoint path
            (:func:`gradleak.training.load_checkpoint`).
        formats: the victim's label formats ("smoothing", "mixup", "hard"); the attacker is told the format
            (except "exact-auto", which detects it).
        methods: names of :data:`common.METHODS`: "exact", "exact-head", "exact-auto", "lbfgs", "pso",
            "pso-quick", and the hard-label baselines "idlg", "yin", "rlg".
        samples: trials per format (default 50; ``quick``: 6).
        seed: seeds the model initialisation, the trials and PSO.
        out: output folder (default ``results/label-recovery``).
        quick: few trials, and "pso" replaced by the reduced-budget "pso-quick" (labelled as such).
        progress: tqdm bar over trials.
        ray: None runs the trials here; "local" spreads them over a local Ray, any other value is a Ray cluster's
            address (:func:`.parallel.map_trials`). ``samples.csv`` gets the same rows in the same order either
            way (``time_ms`` aside).

    Returns:
        ``dict(summary=[row dicts], files={...}, new_rows=int, out=str)``.
    """
    formats = resolve_formats(formats)
    methods = resolve_methods(methods, quick)
    count = (QUICK_SAMPLES if quick else 50) if samples is None else int(samples)
    folder = output_dir(out, "label-recovery")
    setting = {"dataset": dataset, "network": network, "weights": weights, "seed": seed, "image_size": image_size,
               "init": init}
    env = shared_setup(**setting)
    table = ResumableCSV(folder / "samples.csv", SAMPLE_FIELDS, SAMPLE_KEY)
    base = {"dataset": dataset, "network": network, "weights": env.weights}
    jobs = []
    for label_format in formats:
        for trial in draw_trials(env.labels, env.num_classes, label_format, count, seed):
            todo = [m for m in methods if not table.has(**base, format=label_format, sample=trial.sample, method=m)]
            if todo:
                jobs.append((trial, todo))
    new_rows = 0
    tasks = [jobs[start:start + TRIALS_PER_TASK] for start in range(0, len(jobs), TRIALS_PER_TASK)]
    for rows in map_trials(functools.partial(attack_trials, setting=setting), tasks, ray_address=ray,
                           progress=progress, desc=f"label recovery {dataset}/{network}/{env.weights} "
                                                   f"({TRIALS_PER_TASK} trials per step)"):
        table.append(rows)
        new_rows += len(rows)
    summary = summarize(table.rows)
    files = write_summary(summary, folder)
    files["samples"] = str(folder / "samples.csv")
    return {"summary": summary, "files": files, "new_rows": new_rows, "out": str(folder)}


def attack_trials(jobs: Sequence[Tuple[Trial, Sequence[str]]], *, setting: Mapping[str, Any]
                  ) -> List[Dict[str, Any]]:
    """``samples.csv`` rows of a few trials: each trial's victim gradient, attacked by each of its named methods,
    rows in the order of the trials and of their methods.

    The methods that read the head alone with the exact search (:func:`common.head_only`) attack the trials'
    head gradients of each label format together, in one :func:`gradleak.recover_labels` call
    (:func:`common.attack_heads`); the others attack each gradient as it is made (only the head gradients are
    kept).

    Args:
        jobs: ``(trial, method names)`` pairs.
        setting: :func:`common.shared_setup`'s arguments (the network is built once per process from them, here
            or in a Ray worker); its ``seed`` also seeds PSO, per sample.
    """
    env = shared_setup(**setting)
    truths, attempts = [], {}
    together: Dict[Tuple[str, str], List[int]] = defaultdict(list)   # (method, format) -> job indices
    for index, (trial, methods) in enumerate(jobs):
        truth = victim(env.model, env.images, trial)
        for name in methods:
            if head_only(name):
                together[name, trial.label_format].append(index)
            else:
                attempts[index, name] = attack(name, env.model, truth.gradients, trial.label_format,
                                               seed=setting["seed"] + trial.sample)
        # the evaluator needs the label and feature; the head-only methods, still to run, the head's entries
        truths.append(dataclasses.replace(truth, gradients=head_entries(env.model, truth.gradients)))
    for (name, label_format), indices in together.items():
        found = attack_heads(name, env.model, [truths[i].gradients for i in indices], label_format)
        attempts.update({(i, name): attempt for i, attempt in zip(indices, found)})
    rows = []
    for index, (trial, methods) in enumerate(jobs):
        for name in methods:
            attempt, truth = attempts[index, name], truths[index]
            rows.append({"dataset": setting["dataset"], "network": setting["network"], "weights": env.weights,
                         "format": trial.label_format, "sample": trial.sample, "method": name,
                         **grade(attempt, truth), "determined": attempt.determined, "time_ms": attempt.time_ms,
                         "used": attempt.used, "pred_format": attempt.pred_format,
                         "pred_classes": attempt.pred_classes, "true_classes": trial.spec.classes,
                         "pred_eps": attempt.pred_eps, "true_eps": trial.spec.eps, "pred_lam": attempt.pred_lam,
                         "true_lam": trial.spec.lam, "residual": attempt.residual,
                         "evaluations": attempt.evaluations, "converged": attempt.converged,
                         "images": trial.indices, "message": attempt.message})
    return rows


def summarize(rows: Sequence[Dict[str, str]]) -> List[Dict[str, Any]]:
    """Per (dataset, network, weights, format, method): accuracy, Wilson interval, errors, undetermined, speed.

    Speed is relative to "pso" in the same group (``median_ms(pso) / median_ms(method)``: how many times faster),
    or to "pso-quick" when only that ran (the ``speedup_vs`` column says which).
    """
    groups: Dict[tuple, List[Dict[str, str]]] = defaultdict(list)
    for row in rows:
        groups[(row["dataset"], row["network"], row["weights"], row["format"], row["method"])].append(row)
    summary = []
    for key, members in groups.items():
        n = len(members)
        successes = sum(is_true(r["success"]) for r in members)
        low, high = wilson_interval(successes, n)
        errors = [as_float(r["label_error"]) for r in members]
        features = [r for r in members if r["feature_success"] != ""]
        summary.append({
            "dataset": key[0], "network": key[1], "weights": key[2], "format": key[3], "method": key[4],
            "n": n, "successes": successes, "accuracy": successes / n, "ci_low": low, "ci_high": high,
            "median_label_error": median(errors),
            "max_label_error": max((e for e in errors if not math.isnan(e)), default=math.nan),
            "median_label_l1": median([as_float(r["label_l1"]) for r in members]),
            "feature_recovered": sum(is_true(r["feature_success"]) for r in features), "feature_n": len(features),
            "undetermined": sum(r["determined"] == "False" for r in members),
            "errors": sum(r["label_error"] == "nan" for r in members),
            "median_ms": median([as_float(r["time_ms"]) for r in members])})
    by_group = {(s["dataset"], s["network"], s["weights"], s["format"], s["method"]): s for s in summary}
    for s in summary:
        s["speedup_vs"], s["speedup"] = "", math.nan
        for reference in ("pso", "pso-quick"):
            ref = by_group.get((s["dataset"], s["network"], s["weights"], s["format"], reference))
            if ref is not None and s["median_ms"] > 0:
                s["speedup_vs"], s["speedup"] = reference, ref["median_ms"] / s["median_ms"]
                break
    order = {name: i for i, name in enumerate(METHODS)}
    format_order = {name: i for i, name in enumerate(("smoothing", "mixup", "hard"))}
    summary.sort(key=lambda s: (s["dataset"], s["network"], s["weights"], format_order.get(s["format"], 9),
                                order.get(s["method"], 99)))
    return summary


def _fmt(value: float, spec: str) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def summary_markdown(summary: Sequence[Dict[str, Any]]) -> str:
    """The summary as a Markdown table, with the success definition and the method legend."""
    header = ["dataset", "network", "weights", "format", "method", "n", "accuracy", "95 % CI",
              "median max-err", "feature recovered", "undetermined", "errors", "median ms", "× faster than"]
    rows = []
    for s in summary:
        feature = f"{s['feature_recovered']}/{s['feature_n']}" if s["feature_n"] else "–"
        speed = f"{_fmt(s['speedup'], '.1f')} ({s['speedup_vs']})" if s["speedup_vs"] else "–"
        rows.append([s["dataset"], s["network"], s["weights"], s["format"], s["method"], s["n"],
                     f"{100 * s['accuracy']:.1f} %", f"[{100 * s['ci_low']:.1f}, {100 * s['ci_high']:.1f}]",
                     _fmt(s["median_label_error"], ".1e"), feature, s["undetermined"], s["errors"],
                     _fmt(s["median_ms"], ".2f"), speed])
    used = sorted({s["method"] for s in summary}, key=lambda m: list(METHODS).index(m) if m in METHODS else 99)
    legend = "\n".join(f"* `{m}`: {METHODS[m].description}" for m in used if m in METHODS)
    return ("# Label recovery\n\n"
            f"Success: max_i |y_hat_i - y_i| < {SUCCESS_TOL:g} (same gradients for every method, no re-drawing). "
            f"Feature: cosine with the true head input > {FEATURE_COS_TOL} and relative L2 error < "
            f"{FEATURE_REL_TOL:g} (the cosine alone is always 1 for a bias-free head). Undetermined: the attack's own "
            "diagnostics said the gradient does not pin the label down (counted, not hidden). Errors: the attack "
            "raised (counted as failures). 95 % CI: Wilson score interval. Times: attack only, CPU.\n\n"
            + markdown_table(header, rows) + "\nMethods:\n\n" + legend + "\n")


def write_summary(summary: Sequence[Dict[str, Any]], folder: Path) -> Dict[str, str]:
    """Write ``summary.csv`` and ``summary.md`` into ``folder``; returns their paths."""
    csv_path, md_path = folder / "summary.csv", folder / "summary.md"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, SUMMARY_FIELDS)
        writer.writeheader()
        writer.writerows(summary)
    md_path.write_text(summary_markdown(summary))
    return {"summary_csv": str(csv_path), "summary_md": str(md_path)}
