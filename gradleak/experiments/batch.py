"""Batch label recovery against the batch size: :func:`gradleak.recover_batch` beside iLRG, LLG, LLG*, Yin and
iDLG (:mod:`gradleak.batch.baselines`), every method on the same gradients.

A trial draws ``B`` distinct bundled images (with replacement only when ``B`` exceeds the bundle: a repeated image
repeats a feature, which no split can tell apart) and their own labels, builds the batch's targets in one
format, and computes the gradient of the mean soft-target cross-entropy of an untrained network with a head bias
(iLRG's setting). Formats:

* ``hard``: one-hot labels;
* ``smoothing``: one eps for the batch, drawn from U(0.01, 0.3);
* ``mixup``: the batch mixed with a permutation of itself (one lam ~ U(0, 1) per batch, inputs and labels): its
  class mass equals the unmixed counts, so a batch-level answer cannot tell it from a hard batch;
* ``mixup-pairs``: every example mixes its own label with a random other class with its own lam ~ U(0, 1): the
  class mass is not on any count lattice.

Graded by the evaluator alone: counts exact (the examples per dominant class; for ``mixup-pairs`` there are no
counts), eps within 1e-3, class mass within 1e-3 B (max-abs), the examples (when the batch was split: every label
within 1e-3 and every feature at cosine above 0.999 after pairing them with the true ones), and the diagnostics
(determined, and determined while any of these is wrong, or counts reported as pinned while they are wrong: a
"confident wrong" answer). Outputs in ``out``:
``samples.csv`` (one row per trial and method, resumable), ``summary.csv``/``summary.md`` and ``batch.png``.
"""
from __future__ import annotations

import argparse
import functools
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..client import soft_cross_entropy
from ..data import DATASETS, load_samples
from ..models import NETWORK_IMAGE_SIZE, build_model, input_options
from .common import (EXPERIMENT_IMAGE_SIZE, ResumableCSV, as_float, is_true, markdown_table, median, output_dir,
                     setup, wilson_interval)
from .parallel import map_trials

BATCH_FORMATS = ("hard", "smoothing", "mixup", "mixup-pairs")
BATCH_METHODS = ("gradleak", "ilrg", "llg", "llg*", "yin", "idlg")
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
QUICK_SIZES = (1, 4, 16)
EPS_RANGE = (0.01, 0.3)
SAMPLE_FIELDS = ["dataset", "network", "init", "format", "batch_size", "sample", "method", "counts_exact",
                 "classes_exact", "examples_success", "eps_error", "mass_error", "mass_within", "determined",
                 "counts_determined", "confident_wrong", "true_eps", "pred_eps", "time_ms", "message"]
SAMPLE_KEY = ["dataset", "network", "init", "format", "batch_size", "sample", "method"]
SUMMARY_FIELDS = ["dataset", "network", "init", "format", "batch_size", "method", "n", "count_accuracy",
                  "count_ci_low", "count_ci_high", "classes_accuracy", "examples_success", "eps_within", "mass_within",
                  "determined", "confident_wrong", "median_eps_error", "median_mass_error", "median_ms", "errors"]


def _targets(labels: torch.Tensor, num_classes: int, label_format: str, rng: np.random.RandomState,
             dtype: torch.dtype = torch.float32):
    """``(targets (B, C), input mixing (B,) permutation and weights or None, eps or None)``, in ``dtype``: targets
    built in a narrower type than the gradient's sum to one only to that type's rounding (Theorem 1)."""
    size = labels.shape[0]
    one_hot = torch.nn.functional.one_hot(labels, num_classes).to(dtype)
    if label_format == "hard":
        return one_hot, None, 0.0
    if label_format == "smoothing":
        eps = float(rng.uniform(*EPS_RANGE))
        return one_hot * (1 - eps) + eps / num_classes, None, eps
    lam = torch.tensor(rng.uniform(0, 1, size=1 if label_format == "mixup" else size), dtype=dtype)
    if label_format == "mixup":
        partner = torch.as_tensor(rng.permutation(size))
        lam = lam.expand(size)
        other = one_hot[partner]
    else:
        shift = torch.as_tensor(rng.randint(1, num_classes, size=size))
        other = torch.nn.functional.one_hot((labels + shift) % num_classes, num_classes).to(dtype)
        partner = None
    return lam[:, None] * one_hot + (1 - lam[:, None]) * other, (partner, lam), None


def batch_rng(seed: int, label_format: str, size: int, sample: int) -> np.random.RandomState:
    """The random stream of one batch (its images, labels, eps and mixing), from ``(seed, format, B, sample)``
    alone: the same batch wherever and in whatever order it is drawn."""
    return np.random.RandomState([seed, BATCH_FORMATS.index(label_format), size, sample])


def victim_batch(model, images, all_labels, num_classes, label_format, size, rng):
    """One batch: its gradients (the attacker's view) and its truth (the evaluator's), in the model's dtype."""
    count, dtype = images.shape[0], model.head.weight.dtype
    index = torch.as_tensor(rng.permutation(count)[:size] if size <= count else rng.randint(0, count, size=size))
    x, labels = images[index].to(dtype), all_labels[index]
    targets, mixing, eps = _targets(labels, num_classes, label_format, rng, dtype)
    if mixing is not None and mixing[0] is not None:
        partner, lam = mixing
        x = lam[:, None, None, None] * x + (1 - lam[:, None, None, None]) * x[partner]
    seen = {}
    hook = model.head.register_forward_hook(lambda module, inputs, output: seen.update(features=inputs[0].detach()))
    try:
        model.zero_grad(set_to_none=True)
        soft_cross_entropy(model(x), targets).backward()
    finally:
        hook.remove()
    gradients = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    counts = None if label_format == "mixup-pairs" else torch.bincount(targets.argmax(-1), minlength=num_classes)
    return gradients, dict(mass=targets.double().sum(0), counts=counts, eps=eps, labels=targets,
                           features=seen["features"])


def attack(method: str, model, gradients, size: int, input_shape) -> Dict[str, Any]:
    """One method's answer: ``counts``, ``classes``, ``mass``, ``eps``, ``examples``, ``determined``,
    ``counts_determined``, ``message``."""
    from ..batch.api import recover_batch
    from ..batch.baselines import BATCH_BASELINES

    if method == "gradleak":
        result = recover_batch(model, gradients, batch_size=size)
        classes = None if result.counts is None else tuple(result.counts.nonzero().flatten().tolist())
        return dict(counts=result.counts, classes=classes, mass=result.class_mass, examples=result.examples,
                    eps=result.eps, determined=result.determined, counts_determined=result.counts_determined,
                    message="; ".join(filter(None, (result.message, result.split_message))))
    options = {"input_shape": input_shape} if method == "llg*" else {}
    answer = BATCH_BASELINES[method](model, gradients, size, **options)
    return dict(counts=answer.counts, classes=answer.classes,
                mass=None if answer.counts is None else answer.counts.double(), eps=None, determined="",
                counts_determined="", message="")


def grade(answer: Dict[str, Any], truth: Dict[str, Any], size: int, counts_given: bool) -> Dict[str, Any]:
    """The evaluator's marks; a method that never gives counts (iDLG) is marked on the present classes only."""
    present = None if truth["counts"] is None else tuple(truth["counts"].nonzero().flatten().tolist())
    counts_exact = "" if present is None or not counts_given else (
        answer["counts"] is not None and torch.equal(answer["counts"].cpu(), truth["counts"]))
    classes_exact = "" if present is None else answer["classes"] == present
    examples = answer.get("examples")
    examples_success = _examples_success(examples, truth) if examples else ""
    eps_error = "" if truth["eps"] is None or answer["eps"] is None else abs(answer["eps"] - truth["eps"])
    mass_error = "" if answer["mass"] is None else float((answer["mass"].cpu() - truth["mass"]).abs().max())
    mass_within = "" if mass_error == "" else mass_error <= 1e-3 * size
    # a confident wrong answer is a wrong claim: "no counts" (None) claims nothing, and only loses count accuracy
    counts_wrong = answer["counts"] is not None and counts_exact is False
    right = (not counts_wrong and (eps_error == "" or eps_error <= 1e-3) and mass_within is not False
             and examples_success is not False)
    determined = answer["determined"]
    # counts reported as pinned are a claim of their own, even where the rest of the answer is not determined
    claimed_wrong = (determined and not right) or (answer["counts_determined"] is True and counts_wrong)
    return dict(counts_exact=counts_exact, classes_exact=classes_exact, examples_success=examples_success,
                eps_error=eps_error, mass_error=mass_error, mass_within=mass_within,
                determined=determined, counts_determined=answer["counts_determined"],
                confident_wrong="" if determined == "" else bool(claimed_wrong),
                true_eps=truth["eps"], pred_eps=answer["eps"], message=answer["message"])


def _examples_success(examples, truth: Dict[str, Any]) -> bool:
    """Whether the recovered examples are the batch's, in some order: every label within 1e-3 (max-abs) and every
    feature at cosine above 0.999 of the true example it is paired with. Pairs are taken greedily, closest first
    (label distance plus ``1 - cosine``), each true example once."""
    labels = torch.stack([e.label.detach().double().cpu() for e in examples])
    features = torch.stack([e.feature.detach().double().cpu().flatten() for e in examples])
    true_labels, true_features = truth["labels"].double(), truth["features"].double().flatten(1)
    if labels.shape != true_labels.shape or features.shape != true_features.shape:
        return False
    distance = (labels[:, None] - true_labels[None]).abs().amax(-1)
    cosine = torch.nn.functional.normalize(features, dim=1) @ torch.nn.functional.normalize(true_features, dim=1).T
    cost = distance + (1 - cosine)
    for _ in range(len(examples)):
        found, true = divmod(int(cost.argmin()), cost.shape[1])
        if not (distance[found, true] < 1e-3 and cosine[found, true] > 0.999):
            return False
        cost[found, :], cost[:, true] = math.inf, math.inf
    return True


def run(*, dataset: str = "cifar10", network: str = "lenet", weights: str = "untrained",
        init: Optional[str] = "default", formats: Union[str, Sequence[str]] = BATCH_FORMATS,
        methods: Union[str, Sequence[str]] = BATCH_METHODS,
        batch_sizes: Optional[Sequence[int]] = None, samples: Optional[int] = None, seed: int = 2023,
        out: Optional[Union[str, Path]] = None, quick: bool = False, progress: bool = True,
        image_size: Optional[int] = None, ray: Optional[str] = None, **_ignored) -> Dict[str, Any]:
    """Run the batch experiment and write ``samples.csv``, ``summary.csv``, ``summary.md`` and ``batch.png``.

    Args:
        dataset, network: a built-in dataset and a ``gradleak.models.MODELS`` network, built untrained with a
            head bias (``init``: "default" is PyTorch's, as in iLRG's experiments; "paper" the paper's).
        weights: "untrained", or a checkpoint (``gradleak experiment train --head-bias``) of ``network`` for
            ``dataset``; its init is reported as "trained".
        formats: victim label formats, of :data:`BATCH_FORMATS`.
        methods: of :data:`BATCH_METHODS` ("gradleak" is :func:`gradleak.recover_batch`).
        batch_sizes: B values (default :data:`BATCH_SIZES`; ``quick``: :data:`QUICK_SIZES`).
        samples: batches per (format, B) (default 20; ``quick``: 3).
        seed: seeds the network and every batch (each batch its own seed from ``(seed, format, B, sample)``).
        ray: None runs the batches here; "local" spreads them over a local Ray, any other value is a Ray
            cluster's address (:func:`.parallel.map_trials`, one batch per task). ``samples.csv`` gets the same
            rows in the same order either way (``time_ms`` aside).
    """
    formats = [formats] if isinstance(formats, str) else list(formats)
    methods = [methods] if isinstance(methods, str) else list(methods)
    for name, given, known in (("format", formats, BATCH_FORMATS), ("method", methods, BATCH_METHODS)):
        unknown = [g for g in given if g not in known]
        if unknown:
            raise ValueError(f"unknown batch {name}(s) {unknown}; choose from {known}")
    sizes = list(batch_sizes or (QUICK_SIZES if quick else BATCH_SIZES))
    samples = samples or (3 if quick else 20)
    setting = dict(dataset=dataset, network=network, weights=weights, init=init, seed=seed, image_size=image_size)
    init_name = _victim_setup(**setting)[3]
    folder = output_dir(out, f"batch-{dataset}-{network}")
    table = ResumableCSV(folder / "samples.csv", SAMPLE_FIELDS, SAMPLE_KEY)
    base = dict(dataset=dataset, network=network, init=init_name)
    jobs = []
    for label_format, size, sample in ((f, b, s) for f in formats for b in sizes for s in range(samples)):
        todo = [m for m in methods if not table.has(**base, format=label_format, batch_size=size, sample=sample,
                                                      method=m)]
        if todo:
            jobs.append((label_format, size, sample, todo))
    for rows in map_trials(functools.partial(batch_rows, setting=setting), jobs, ray_address=ray,
                           progress=progress, desc=f"batch {network}"):
        table.append(rows)
    summary = summarize(table.rows)
    _write_summary(folder, summary)
    plot(summary, folder / "batch.png", title=f"{network} ({init_name}{'' if init_name == 'trained' else ' init'}, "
                                               f"head bias), {dataset}")
    return dict(out=str(folder), summary=summary)


def batch_rows(job: Tuple[str, int, int, Sequence[str]], *, setting: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """``samples.csv`` rows of one batch ``job = (format, B, sample, methods)``: its victim gradient (seeded by
    ``(seed, format, B, sample)``) attacked and graded for each method, in the order of ``methods``.

    Args:
        setting: :func:`victim_model`'s arguments (the network is built once per process from them, here or in
            a Ray worker).
    """
    label_format, size, sample, methods = job
    model, images, labels, init_name = _victim_setup(**setting)
    gradients, truth = victim_batch(model, images, labels, DATASETS[setting["dataset"]].num_classes, label_format,
                                    size, batch_rng(setting["seed"], label_format, size, sample))
    rows = []
    for method in methods:
        start = time.perf_counter()
        try:
            answer = attack(method, model, gradients, size, tuple(images.shape[1:]))
            graded = grade(answer, truth, size, counts_given=method != "idlg")
        except ValueError as error:  # a baseline outside its setting (e.g. Yin with B > C): a failure
            failed = False if truth["counts"] is not None else ""
            graded = dict(counts_exact=failed, classes_exact=failed, message=str(error))
        rows.append(dict(dataset=setting["dataset"], network=setting["network"], init=init_name,
                         format=label_format, batch_size=size, sample=sample, method=method,
                         time_ms=1e3 * (time.perf_counter() - start), **graded))
    return rows


@functools.lru_cache(maxsize=2)
def _victim_setup(dataset: str, network: str, weights: Optional[str], init: Optional[str], seed: int,
                  image_size: Optional[int]) -> Tuple[torch.nn.Module, torch.Tensor, torch.Tensor, str]:
    """``(model, images, labels, init name)``, built once per process (see :func:`victim_model`)."""
    model, side, init_name = victim_model(dataset, network, weights, init, seed, image_size)
    images, labels = load_samples(dataset, size=side)
    return model, images, labels, init_name


def add_batch_options(parser: argparse.ArgumentParser, *, network: str, batch_sizes: Sequence[int]) -> None:
    """The options that pick this experiment's batches, for the scripts that draw them again (``benchmarks/``):
    ``--dataset --network --init --batch-sizes --samples --seed --threads``, defaults as given."""
    parser.add_argument("--dataset", default="cifar10", choices=sorted(DATASETS))
    parser.add_argument("--network", default=network)
    parser.add_argument("--init", default="default", choices=["default", "paper"])
    parser.add_argument("--batch-sizes", dest="batch_sizes", nargs="+", type=int, default=list(batch_sizes))
    parser.add_argument("--samples", type=int, default=5, help="batches per format and B")
    parser.add_argument("--seed", type=int, default=2023, help="the experiment's seed")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")


def victim_model(dataset: str, network: str, weights: Optional[str] = "untrained", init: Optional[str] = "default",
                 seed: int = 2023, image_size: Optional[int] = None) -> Tuple[torch.nn.Module, int, str]:
    """The experiment's network: ``(model, image side, init name)`` (see :func:`run`)."""
    info = DATASETS[dataset]
    if weights in (None, "untrained"):
        side = image_size or NETWORK_IMAGE_SIZE.get(network) or EXPERIMENT_IMAGE_SIZE.get(dataset) or info.image_size
        model = build_model(network, info.num_classes, head_bias=True, init=init, seed=seed,
                            **input_options(network, channels=info.channels, image_size=side))
        return model, side, init or "paper"
    model = setup(dataset, network, weights).model
    return model, model.checkpoint_info["image_size"], "trained"


def _rate(rows: List[Dict[str, str]], column: str) -> Any:
    graded = [is_true(r[column]) for r in rows if r[column] != ""]
    return round(sum(graded) / len(graded), 3) if graded else ""


def summarize(rows: Sequence[Dict[str, str]]) -> List[Dict[str, Any]]:
    """One row per (dataset, network, init, format, B, method) of ``samples.csv`` rows."""
    groups: Dict[tuple, List[Dict[str, str]]] = defaultdict(list)
    for row in rows:
        groups[tuple(row[k] for k in SUMMARY_FIELDS[:6])].append(row)
    out = []
    for key, group in sorted(groups.items(), key=lambda item: (item[0][:4], int(item[0][4]),
                                                               BATCH_METHODS.index(item[0][5]))):
        counted = [r for r in group if r["counts_exact"] != ""]
        exact = sum(is_true(r["counts_exact"]) for r in counted)
        low, high = wilson_interval(exact, len(counted)) if counted else ("", "")
        errors = lambda column: [as_float(r[column]) for r in group if r[column] != ""]  # noqa: E731
        out.append(dict(zip(SUMMARY_FIELDS[:6], key), n=len(group),
                        count_accuracy=round(exact / len(counted), 3) if counted else "",
                        count_ci_low=low if low == "" else round(low, 3),
                        count_ci_high=high if high == "" else round(high, 3),
                        classes_accuracy=_rate(group, "classes_exact"),
                        examples_success=_rate(group, "examples_success"),
                        eps_within=(round(sum(e <= 1e-3 for e in errors("eps_error")) / len(errors("eps_error")), 3)
                                    if errors("eps_error") else ""),
                        mass_within=_rate(group, "mass_within"), determined=_rate(group, "determined"),
                        confident_wrong=sum(is_true(r["confident_wrong"]) for r in group),
                        median_eps_error=median(errors("eps_error")) if errors("eps_error") else "",
                        median_mass_error=median(errors("mass_error")) if errors("mass_error") else "",
                        median_ms=median([as_float(r["time_ms"]) for r in group]),
                        errors=sum(1 for r in group if r["message"] and r["method"] != "gradleak")))
    return out


def _write_summary(folder: Path, summary: List[Dict[str, Any]]) -> None:
    import csv

    with (folder / "summary.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, SUMMARY_FIELDS)
        writer.writeheader()
        writer.writerows(summary)
    header = ["format", "B", "method", "n", "counts exact", "classes exact", "examples recovered", "eps within 1e-3",
              "mass within 1e-3 B", "determined", "confident wrong", "median ms"]
    rows = [[r["format"], r["batch_size"], r["method"], r["n"], r["count_accuracy"], r["classes_accuracy"],
             r["examples_success"], r["eps_within"], r["mass_within"], r["determined"], r["confident_wrong"],
             "" if r["median_ms"] == "" else f"{float(r['median_ms']):.1f}"] for r in summary]
    (folder / "summary.md").write_text(markdown_table(header, rows))


def plot(summary: Sequence[Dict[str, Any]], path: Path, *, title: str = "") -> Path:
    """Count accuracy of every method against B (top row), and gradleak's eps, class-mass and "determined"
    rates (bottom row), one column per label format."""
    from ..plots import curve_styles, new_figure, save_figure

    formats = list(dict.fromkeys(r["format"] for r in summary))
    sizes = [int(r["batch_size"]) for r in summary]
    methods = [m for m in BATCH_METHODS if any(r["method"] == m for r in summary)]
    styles = curve_styles(methods)
    ours = curve_styles(["eps within 1e-3", "mass within 1e-3 B", "determined", "examples recovered"])
    figure, axes = new_figure(2, len(formats), figsize=(4.2 * len(formats), 7.0))
    for column, label_format in enumerate(formats):
        mine = [r for r in summary if r["format"] == label_format]
        top, bottom = axes[0, column], axes[1, column]
        for method in methods:
            points = [(int(r["batch_size"]), float(r["count_accuracy"])) for r in mine
                      if r["method"] == method and r["count_accuracy"] != ""]
            if points:
                top.plot(*zip(*points), **styles[method])
        for name, column_name in (("eps within 1e-3", "eps_within"), ("mass within 1e-3 B", "mass_within"),
                                  ("determined", "determined"), ("examples recovered", "examples_success")):
            points = [(int(r["batch_size"]), float(r[column_name])) for r in mine
                      if r["method"] == "gradleak" and r[column_name] != ""]
            if points:
                bottom.plot(*zip(*points), **ours[name])
        top.set_title(f"{label_format}: counts exact")
        bottom.set_title(f"{label_format}: gradleak")
        for axis in (top, bottom):
            axis.set_xscale("log", base=2)
            axis.set_xlim(min(sizes) / 1.4, max(sizes) * 1.4)
            axis.set_ylim(-0.05, 1.05)
            axis.set_xlabel("batch size B")
            axis.grid(alpha=0.3)
        top.set_ylabel("fraction of batches")
        bottom.set_ylabel("fraction of batches")
        if top.lines:
            top.legend(fontsize=7)
        else:  # mixup pairs: an example's two classes may weigh the same, so no method counts them
            top.text(0.5, 0.5, "no counts: examples have\nno dominant class", ha="center", va="center",
                     transform=top.transAxes)
        if bottom.lines:
            bottom.legend(fontsize=7)
    if title:
        figure.suptitle(title)
    return save_figure(figure, path)
