"""Reconstruction experiments: the paper's Figure 3 (FCN-4, analytic vs DLG vs IG) and its label-variant
comparison for gradient matching (recovered vs true vs hard vs DLG's joint label).

Data flow: sample -> victim gradient -> label/feature recovery (attacker, no truth) -> reconstruction ->
metrics against the truth (evaluation only) -> PNG + JSON (+ Markdown/CSV tables).
"""
from __future__ import annotations

import csv
import json
import os
import time
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from .. import data as gl_data
from .._json import strict_json
from ..client import single_example_gradients
from ..labels import hard_label, mix_inputs, mixup_label, smooth_label
from ..metrics import label_error, lpips, psnr, ssim
from ..models import NETWORK_IMAGE_SIZE, build_model, input_options
from ..plots import reconstruction_grid
from ..reconstruct.analytic import fully_connected_inversion, linear_stages
from ..reconstruct.matching import METHODS as MATCHING_METHODS, match_gradients, resolve_device

RECONSTRUCTION_METHODS = ("analytic",) + tuple(sorted(MATCHING_METHODS))
LABEL_VARIANTS = ("recovered", "true", "hard", "dlg")
VICTIM_LABEL_FORMATS = ("hard", "smoothing", "mixup")
# input side length each network is run at when the caller does not choose one (None: the dataset's own size)


def _load_user_image(path: str, size: int, dataset: str, channels: int) -> torch.Tensor:
    """A user image file -> ``(channels, size, size)`` normalised like ``dataset``."""
    from PIL import Image

    if not os.path.isfile(path):
        raise ValueError(f"image file {path!r} does not exist")
    with Image.open(path) as image:
        image = image.convert("RGB" if channels == 3 else "L").resize((size, size), Image.BICUBIC)
        array = np.asarray(image, dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array.copy())
    tensor = tensor.permute(2, 0, 1) if tensor.dim() == 3 else tensor.unsqueeze(0)
    return gl_data.normalize(tensor.unsqueeze(0), dataset)[0]


def _box(dataset: str, channels: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Normalised images of all-0 and all-1 pixels, ``(channels, 1, 1)`` each: the valid input box."""
    zeros = gl_data.normalize(torch.zeros(1, channels, 1, 1), dataset)[0]
    ones = gl_data.normalize(torch.ones(1, channels, 1, 1), dataset)[0]
    return zeros, ones


def _parse_methods(methods: Union[str, Sequence[str]], label_variants: Sequence[str]) -> List[Tuple[str, str]]:
    """``["analytic", "ig"]`` x variants -> ``[("analytic", "recovered"), ("ig", v) ...]``; also accepts
    explicit ``"ig:hard"`` entries."""
    if isinstance(methods, str):
        methods = [methods]
    for variant in label_variants:
        if variant not in LABEL_VARIANTS:
            raise ValueError(f"unknown label variant {variant!r}; valid: {list(LABEL_VARIANTS)}")
    runs: List[Tuple[str, str]] = []
    for entry in methods:
        method, _, variant = str(entry).partition(":")
        if method not in RECONSTRUCTION_METHODS:
            raise ValueError(f"unknown reconstruction method {method!r}; valid: {list(RECONSTRUCTION_METHODS)}")
        if method == "analytic":
            if variant not in ("", "recovered"):
                raise ValueError("the analytic inversion uses the recovered label only")
            runs.append(("analytic", "recovered"))
        elif variant:
            if variant not in LABEL_VARIANTS:
                raise ValueError(f"unknown label variant {variant!r}; valid: {list(LABEL_VARIANTS)}")
            runs.append((method, variant))
        else:
            runs.extend((method, v) for v in label_variants)
    if not runs:
        raise ValueError("no reconstruction method requested")
    return list(dict.fromkeys(runs))


def run_reconstruction(network: Union[str, nn.Module], dataset: str, label_format: str = "smoothing",
                       methods: Union[str, Sequence[str]] = ("analytic",), *,
                       label_variants: Sequence[str] = ("recovered",), sample: int = 0, seed: int = 2023,
                       iterations: Optional[int] = None, out_dir: Optional[str] = None,
                       eps: Optional[float] = None, lam: Optional[float] = None, image: Optional[str] = None,
                       target: Optional[int] = None, num_classes: Optional[int] = None, size: Optional[int] = None,
                       init: Optional[str] = None, dtype: torch.dtype = torch.float32, tv: Optional[float] = None,
                       lr: Optional[float] = None, restarts: int = 1, f_scalar: float = 0.0,
                       recovery_format: str = "auto", matching_options: Optional[Mapping[str, object]] = None,
                       device: Union[str, torch.device, None] = "auto",
                       progress: bool = True, figure: bool = True, name: Optional[str] = None) -> dict:
    """Reconstruct one sample from its gradient with each requested method and label variant.

    Args:
        network: a :data:`gradleak.models.MODELS` name, or a ready model (then ``num_classes`` is read from it).
        dataset: a name of :data:`gradleak.data.DATASETS` ("cifar10", "cifar100", "imagenet", "mnist", ...): the
            built-in samples (:func:`gradleak.data.load_samples`), and the normalisation of a user ``image``.
        label_format: the victim's label: "hard", "smoothing" (``eps`` ~ U(0, 0.5) unless given) or "mixup"
            (with the next sample of another class, ``lam`` ~ U(0, 1) unless given).
        methods: "analytic" (fully connected ReLU networks), "ig" (Inverting Gradients) and/or "dlg" (DLG: L2,
            L-BFGS); matching methods run once per entry of ``label_variants``; "ig:hard" picks one pair.
        label_variants: for matching: "recovered" (ours), "true", "hard" (one-hot of the true label's argmax),
            "dlg" (dummy logits optimised jointly).
        sample: index into the built-in samples; seed: seeds the model, eps/lam and the dummy initialisation (the
            same dummy start for every variant).
        iterations: matching iterations (default: the method's, see :data:`gradleak.reconstruct.METHODS`).
        out_dir: where the PNG and the JSON go (None: nothing written).
        image, target: a user image file and its class (instead of a built-in sample).
        num_classes: C (default: the dataset's); size: image side (default per network, see
            :data:`gradleak.models.NETWORK_IMAGE_SIZE`); init: model initialisation (None: the paper's).
        dtype: of the model and the victim's gradient (float64 for exact analytic inversions).
        tv, lr, restarts, f_scalar: matching options (``f_scalar > 0`` adds the feature term with the recovered
            feature).
        recovery_format: ``label_format`` passed to :func:`gradleak.recover_from_gradients` ("auto": detect).
        matching_options: further keyword arguments of :func:`gradleak.reconstruct.match_gradients` (e.g.
            ``{"line_search": "strong_wolfe"}``, ``{"signed": True}``).
        device: for gradient matching ("auto": CUDA when available).
        progress: tqdm bars; figure: write the PNG; name: file stem (default from the settings).

    Returns:
        ``dict(config=..., victim=..., recovery=..., results={run name: metrics}, files=..., images=...)``;
        metrics have psnr, ssim, lpips (None without local LPIPS weights), seconds, and for matching the final
        loss, the iterations and evaluations made and the line search used; ``images`` holds the true image and
        every reconstruction in display space ([0, 1] pixels): ``dict(truth=(C, H, W), reconstructions={run
        name: (C, H, W)})`` (not written to the JSON).
    """
    from .. import recover_from_gradients  # the package facade (avoids an import cycle at module load)

    info = gl_data.dataset_info(dataset)
    if label_format not in VICTIM_LABEL_FORMATS:
        raise ValueError(f"unknown label format {label_format!r}; valid: {list(VICTIM_LABEL_FORMATS)}")
    runs = _parse_methods(methods, label_variants)
    rng = np.random.default_rng(seed)
    channels = info.channels

    # --- the victim's example
    if isinstance(network, nn.Module):
        model, network_name = network, type(network).__name__
        classes = num_classes or int(getattr(model, "num_classes", 0)) or info.num_classes
        side = size
    else:
        network_name = network
        classes = num_classes or info.num_classes
        side = size or NETWORK_IMAGE_SIZE.get(network) or info.image_size
        model = build_model(network, classes, init=init, seed=seed,
                            **input_options(network, channels=channels, image_size=side))
    model = model.to(dtype).eval()
    if image is not None:
        if side is None:
            side = 32
        x_a = _load_user_image(image, side, dataset, channels)
        class_a = int(target if target is not None else 0)
        images, labels = x_a.unsqueeze(0), torch.tensor([class_a])
        index_a = 0
    else:
        images, labels = gl_data.load_samples(dataset, size=side)
        if not 0 <= sample < len(images):
            raise ValueError(f"sample {sample} is outside the {len(images)} built-in {dataset} samples")
        index_a = sample
        x_a = images[index_a]
        class_a = int(labels[index_a]) % classes if target is None else int(target)
    if not 0 <= class_a < classes:
        raise ValueError(f"target class {class_a} is outside [0, {classes})")
    victim: Dict[str, object] = {"sample": None if image is not None else index_a, "image": image,
                                 "class": class_a, "label_format": label_format}
    if label_format == "smoothing":
        eps = float(rng.uniform(0.0, 0.5)) if eps is None else float(eps)
        true_label = smooth_label(class_a, classes, eps, dtype=dtype)
        x = x_a
        victim["eps"] = eps
    elif label_format == "hard":
        true_label = hard_label(class_a, classes, dtype=dtype)
        x = x_a
    else:
        others = [i for i in range(len(images)) if int(labels[i]) % classes != class_a]
        if not others:
            raise ValueError("mixup needs a second sample of another class and none is available (a user image "
                             "comes alone: use label_format='smoothing' or 'hard' with image=)")
        index_b = min(others, key=lambda i: (i - index_a) % len(images))
        class_b = int(labels[index_b]) % classes
        lam = float(rng.uniform(0.0, 1.0)) if lam is None else float(lam)
        x = mix_inputs(x_a, images[index_b], lam)
        true_label = mixup_label(class_a, class_b, lam, classes, dtype=dtype)
        victim.update(sample_b=index_b, class_b=class_b, lam=lam)
    x = x.to(dtype)
    input_shape = tuple(x.shape)
    gradients = single_example_gradients(model, x, true_label)

    # --- the attacker: label and feature from the gradient alone
    start = time.perf_counter()
    res = recover_from_gradients(model, gradients, label_format=recovery_format)
    recovery_seconds = time.perf_counter() - start
    recovery = {"label_format": res.label_format, "determined": bool(res.determined), "residual": res.residual,
                "label_error": label_error(res.label, true_label), "seconds": recovery_seconds,
                "label": res.label, "true_label": true_label, "message": getattr(res, "message", "")}

    # --- reconstructions
    reconstructions: Dict[str, torch.Tensor] = {}
    results: Dict[str, Dict[str, object]] = {}
    bounds = _box(dataset, channels)
    for method, variant in runs:
        run_name = "analytic" if method == "analytic" else f"{method}/{variant}"
        start = time.perf_counter()
        if method == "analytic":
            linear_stages(model)  # a clear TypeError for networks that are not fully connected
            out = fully_connected_inversion(model, gradients, res, input_shape=input_shape)
            reconstruction = out.input
            extra = {"rank_one_ratio": [layer.rank_one_ratio for layer in out.layers],
                     "usable_rows": [layer.usable_rows for layer in out.layers]}
        else:
            label = {"recovered": res.label, "true": true_label,
                     "hard": hard_label(int(true_label.argmax()), classes, dtype=dtype), "dlg": "dlg"}[variant]
            out = match_gradients(model, gradients, input_shape, label=label, method=method, iterations=iterations,
                                  tv=tv, lr=lr, restarts=restarts, feature=res.feature, f_scalar=f_scalar,
                                  bounds=bounds, seed=seed, device=device, progress=progress,
                                  **dict(matching_options or {}))
            reconstruction = out.input
            extra = {"loss": out.loss, "iterations": len(out.history), "evaluations": out.evaluations,
                     "line_search": out.config.line_search, "label_used": out.label}
        seconds = time.perf_counter() - start
        reconstructions[run_name] = reconstruction.to(torch.float64)
        results[run_name] = {"method": method, "label": variant, "seconds": seconds, **extra}
    truth_display = gl_data.denormalize(x.unsqueeze(0).to(torch.float64), dataset)[0]
    for run_name, reconstruction in reconstructions.items():
        shown = gl_data.denormalize(reconstruction.unsqueeze(0), dataset)[0]
        results[run_name].update(psnr=psnr(shown, truth_display), ssim=ssim(shown, truth_display),
                                 lpips=lpips(shown, truth_display) if channels == 3 else None)

    config = {"network": network_name, "dataset": dataset, "label_format": label_format,
              "runs": [f"{m}/{v}" if m != "analytic" else m for m, v in runs], "seed": seed,
              "iterations": iterations, "num_classes": classes, "input_shape": list(input_shape),
              "dtype": str(dtype).replace("torch.", ""), "tv": tv, "lr": lr, "restarts": restarts,
              "f_scalar": f_scalar, "matching_options": dict(matching_options or {}),
              "device": str(resolve_device(device))}
    report = {"config": config, "victim": victim, "recovery": recovery, "results": results, "files": {}}
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        stem = name or f"{network_name}_{dataset}_{label_format}_{'user' if image else f'sample{index_a}'}"
        if figure:
            title = f"{network_name} / {dataset} / {label_format}" + (
                f" (eps={victim['eps']:.3f})" if "eps" in victim else "")
            report["files"]["figure"] = reconstruction_grid(
                truth_display, {k: gl_data.denormalize(v.unsqueeze(0), dataset)[0]
                                for k, v in reconstructions.items()},
                os.path.join(out_dir, stem + ".png"), title=title)
        report["files"]["json"] = os.path.join(out_dir, stem + ".json")
        with open(report["files"]["json"], "w") as handle:
            json.dump(strict_json(report), handle, indent=2)
    report["images"] = {"truth": truth_display,
                        "reconstructions": {k: gl_data.denormalize(v.unsqueeze(0), dataset)[0]
                                            for k, v in reconstructions.items()}}
    return report


def run_label_variant_table(network: str = "lenet", dataset: str = "cifar10", samples: Iterable[int] = range(8), *,
                            method: str = "ig", label_variants: Sequence[str] = LABEL_VARIANTS,
                            label_format: str = "smoothing", seed: int = 2023, iterations: Optional[int] = None,
                            out_dir: Optional[str] = None, figures: bool = True, progress: bool = True,
                            **options) -> dict:
    """Mean PSNR / SSIM of gradient matching per label variant over several samples (the paper's CNN table).

    Every sample gets its own seed (``seed + sample``: model, eps and dummy start), shared by all its variants,
    so every variant sees the same victims, the same initialisations and the same iteration budget. No sample
    is re-drawn when recovery fails (the official scripts did, which biases their averages); recovery outcomes
    are reported alongside.

    Returns:
        ``dict(config=, per_sample=[run_reconstruction reports], summary={variant: dict(psnr_mean, psnr_std,
        ssim_mean, ssim_std, n)}, files=)``; with ``out_dir`` also writes ``label_variants.md``, ``.csv`` and
        ``.json``.
    """
    samples = list(samples)
    if not samples:
        raise ValueError("samples is empty")
    if method not in MATCHING_METHODS:
        raise ValueError(f"unknown matching method {method!r}; valid: {sorted(MATCHING_METHODS)}")
    reports = []
    for sample in samples:
        start = time.perf_counter()
        report = run_reconstruction(
            network, dataset, label_format, [method], label_variants=label_variants, sample=sample,
            seed=seed + sample, iterations=iterations, out_dir=out_dir if figures else None, progress=progress,
            figure=figures, **options)
        report["seconds"] = time.perf_counter() - start
        reports.append(report)
    summary = {}
    for variant in label_variants:
        key = f"{method}/{variant}"
        psnrs = np.array([r["results"][key]["psnr"] for r in reports], dtype=float)
        ssims = np.array([r["results"][key]["ssim"] for r in reports], dtype=float)
        summary[variant] = {"psnr_mean": float(psnrs.mean()), "psnr_std": float(psnrs.std()),
                            "ssim_mean": float(ssims.mean()), "ssim_std": float(ssims.std()), "n": len(samples),
                            "psnr": psnrs.tolist(), "ssim": ssims.tolist()}
    first_run = reports[0]["results"][f"{method}/{label_variants[0]}"]
    config = {"network": network, "dataset": dataset, "method": method, "label_format": label_format,
              "samples": samples, "seed": seed,
              "iterations": MATCHING_METHODS[method].iterations if iterations is None else int(iterations),
              "optimizer": MATCHING_METHODS[method].optimizer, "line_search": first_run["line_search"],
              "label_variants": list(label_variants),
              "seconds_per_sample": float(np.mean([r["seconds"] for r in reports])),
              "device": reports[0]["config"]["device"], "torch_threads": torch.get_num_threads(),
              "options": {k: v for k, v in options.items() if isinstance(v, (int, float, str, dict, type(None)))}}
    recovery = {"determined": sum(r["recovery"]["determined"] for r in reports),
                "max_label_error": max(r["recovery"]["label_error"] for r in reports)}
    table = {"config": config, "summary": summary, "recovery": recovery, "per_sample": reports, "files": {}}
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        table["files"] = write_label_variant_table(table, out_dir)
    return table


def label_variant_markdown(table: Mapping) -> str:
    """The summary of :func:`run_label_variant_table` as a Markdown table."""
    config, summary = table["config"], table["summary"]
    optimizer = config.get("optimizer", "")
    if optimizer == "lbfgs":
        optimizer = "L-BFGS, " + ("fixed steps" if config.get("line_search") is None
                                  else f"{config['line_search']} line search")
    timing = (f" Mean time per sample (all variants): {config['seconds_per_sample']:.0f} s."
              if config.get("seconds_per_sample") is not None else "")
    lines = [f"Gradient matching ({config['method']}" + (f", {optimizer}" if optimizer else "") + f") on "
             f"{config['network']} / {config['dataset']}, {config['label_format']} labels, "
             f"{len(config['samples'])} samples, {config['iterations'] or 'default'} iterations per variant, "
             f"seed {config['seed']} + sample"
             + (f", options {config['options']}." if config.get("options") else ".") + timing,
             f"Label recovery determined on {table['recovery']['determined']}/{len(config['samples'])} samples; "
             f"largest label error {table['recovery']['max_label_error']:.2e}.", "",
             "| label | PSNR (dB) mean | PSNR std | SSIM mean | SSIM std |", "|---|---|---|---|---|"]
    for variant, row in summary.items():
        lines.append(f"| {variant} | {row['psnr_mean']:.2f} | {row['psnr_std']:.2f} | {row['ssim_mean']:.4f} | "
                     f"{row['ssim_std']:.4f} |")
    lines += ["", "Per sample PSNR (dB):", "",
              "| sample | eps | " + " | ".join(summary) + " |", "|---|---|" + "---|" * len(summary)]
    for index, report in enumerate(table["per_sample"]):
        cells = " | ".join(f"{summary[v]['psnr'][index]:.2f}" for v in summary)
        lines.append(f"| {report['victim']['sample']} | {report['victim'].get('eps', float('nan')):.3f} | {cells} |")
    return "\n".join(lines) + "\n"


def write_label_variant_table(table: Mapping, out_dir: str) -> Dict[str, str]:
    """Write ``label_variants.md``, ``label_variants.csv`` (one row per sample and variant) and
    ``label_variants.json`` into ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {key: os.path.join(out_dir, f"label_variants.{key}") for key in ("md", "csv", "json")}
    with open(paths["md"], "w") as handle:
        handle.write(label_variant_markdown(table))
    with open(paths["csv"], "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sample", "eps", "variant", "psnr", "ssim", "loss", "evaluations", "seconds",
                         "label_error"])
        for report in table["per_sample"]:
            for key, row in report["results"].items():
                writer.writerow([report["victim"]["sample"], report["victim"].get("eps"), row["label"],
                                 row["psnr"], row["ssim"], row.get("loss"), row.get("evaluations"), row["seconds"],
                                 report["recovery"]["label_error"]])
    summary = {k: v for k, v in table.items() if k not in ("per_sample", "files")}
    with open(paths["json"], "w") as handle:
        json.dump(strict_json(summary), handle, indent=2)
    return paths


def label_variant_figure(tables: Mapping[str, Mapping], path: str, *, rows: int = 4) -> str:
    """One grid for :func:`run_label_variants`: a row per sample (the first ``rows`` of the tables), the true
    image, then a column per method and label variant, PSNR / SSIM under every tile."""
    if not tables:
        raise ValueError("no tables to draw")
    first = next(iter(tables.values()))
    shown = min(int(rows), len(first["per_sample"]))
    truth = torch.stack([first["per_sample"][i]["images"]["truth"] for i in range(shown)])
    columns: Dict[str, torch.Tensor] = {}
    for table in tables.values():
        for run_name in table["per_sample"][0]["images"]["reconstructions"]:
            columns[run_name] = torch.stack([table["per_sample"][i]["images"]["reconstructions"][run_name]
                                             for i in range(shown)])
    config = first["config"]
    row_labels = [f"sample {r['victim']['sample']}, eps {r['victim']['eps']:.3f}" if "eps" in r["victim"]
                  else f"sample {r['victim']['sample']}" for r in first["per_sample"][:shown]]
    title = (f"{config['network']} / {config['dataset']} / {config['label_format']} labels: "
             "gradient matching with each label")
    return reconstruction_grid(truth, columns, path, title=title, row_labels=row_labels)


# the README's table: untrained LeNet, the bundled CIFAR-10 images, label smoothing, DLG and Inverting Gradients
LABEL_VARIANT_METHODS = ("dlg", "ig")
LABEL_VARIANT_SAMPLES = 20
QUICK_LABEL_VARIANT_SAMPLES = 2
QUICK_LABEL_VARIANT_ITERATIONS = 2


def run_label_variants(*, dataset: str = "cifar10", network: str = "lenet", samples: Optional[int] = None,
                       seed: int = 2023, out: Optional[str] = None, quick: bool = False, progress: bool = True,
                       weights: Optional[str] = None, methods: Union[str, Sequence[str]] = LABEL_VARIANT_METHODS,
                       variants: Sequence[str] = LABEL_VARIANTS, iterations: Optional[int] = None,
                       image_size: Optional[int] = None, figure_rows: int = 4, device: Union[str, None] = "auto",
                       **_ignored) -> Dict[str, object]:
    """``gradleak experiment label-variants``: the README's label-variant table, one per matching method.

    Samples ``0 .. samples-1`` of the bundled images, each with seed ``seed + sample`` (network, eps and the dummy
    start, shared by all its variants), label smoothing, untrained network; see :func:`run_label_variant_table`.

    Args:
        dataset, network: the bundled samples and the (untrained) victim network.
        samples: how many samples (default 20; ``quick``: 2).
        seed: base seed; out: output folder (default ``results/label-variants``).
        quick: the CI preset: 2 samples and 2 iterations per variant (unless ``samples`` / ``iterations``).
        progress: tqdm bars.
        weights: only None or "untrained" (the table is made on untrained networks).
        methods: matching methods ("dlg", "ig"), one table each.
        variants: labels: "recovered", "true", "hard", "dlg" (see :data:`LABEL_VARIANTS`).
        iterations: per variant (default: each method's own, see :data:`gradleak.reconstruct.METHODS`).
        image_size: input side (default per network, :data:`gradleak.models.NETWORK_IMAGE_SIZE`).
        figure_rows: samples shown in the figure.

    Writes ``<out>/<method>/label_variants.md``, ``.csv`` and ``.json`` per method and one figure,
    ``<out>/label_variants.png`` (the first ``figure_rows`` samples, every method and variant).

    Returns:
        ``dict(out=, figure=, tables={method: table}, "<method>/<variant>"="PSNR mean (SSIM mean), n" ...)``.
    """
    from .common import output_dir

    if weights not in (None, "untrained"):
        raise ValueError(f"label-variants runs on untrained networks (the README's table); got weights={weights!r}")
    methods = [methods] if isinstance(methods, str) else list(methods)
    for method in methods:
        if method not in MATCHING_METHODS:
            raise ValueError(f"unknown matching method {method!r}; valid: {sorted(MATCHING_METHODS)}")
    if not methods:
        raise ValueError("no matching method requested")
    variants = [variants] if isinstance(variants, str) else list(variants)
    count = (QUICK_LABEL_VARIANT_SAMPLES if quick else LABEL_VARIANT_SAMPLES) if samples is None else int(samples)
    if count < 1:
        raise ValueError(f"samples must be at least 1, got {count}")
    if iterations is None and quick:
        iterations = QUICK_LABEL_VARIANT_ITERATIONS
    folder = output_dir(out, "label-variants")
    options: Dict[str, object] = {}  # only the settings that differ from run_reconstruction's defaults
    if image_size is not None:
        options["size"] = int(image_size)
    if device not in (None, "auto"):
        options["device"] = device
    tables = {}
    for method in methods:
        tables[method] = run_label_variant_table(
            network, dataset, range(count), method=method, label_variants=variants, label_format="smoothing",
            seed=seed, iterations=iterations, out_dir=str(folder / method), figures=False, progress=progress,
            **options)
    figure = label_variant_figure(tables, str(folder / "label_variants.png"), rows=figure_rows)
    result: Dict[str, object] = {"out": str(folder), "figure": figure, "tables": tables}
    for method, table in tables.items():
        for variant, row in table["summary"].items():
            result[f"{method}/{variant}"] = (f"PSNR {row['psnr_mean']:.2f} dB (SSIM {row['ssim_mean']:.4f}), "
                                             f"n={row['n']}")
    return result
