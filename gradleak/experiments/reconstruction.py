"""Reconstruction experiments: the paper's Figure 3 (FCN-4, analytic vs DLG vs IG) and its label-variant
comparison for gradient matching (recovered vs true vs hard vs DLG's joint label).

Data flow: sample -> victim gradient -> label/feature recovery (attacker, no truth) -> reconstruction ->
metrics against the truth (evaluation only) -> PNG + JSON (+ Markdown/CSV tables).
"""
from __future__ import annotations

import csv
import json
import math
import os
import time
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from .. import data as gl_data
from ..client import single_example_gradients
from ..labels import hard_label, mix_inputs, mixup_label, smooth_label
from ..metrics import label_error, lpips, psnr, ssim
from ..models import build_model
from ..plots import reconstruction_grid
from ..reconstruct.analytic import fully_connected_inversion, linear_stages
from ..reconstruct.matching import METHODS as MATCHING_METHODS, match_gradients, resolve_device

RECONSTRUCTION_METHODS = ("analytic",) + tuple(sorted(MATCHING_METHODS))
LABEL_VARIANTS = ("recovered", "true", "hard", "dlg")
VICTIM_LABEL_FORMATS = ("hard", "smoothing", "mixup")
# input side length each network is run at when the caller does not choose one (None: the dataset's own size)
NETWORK_IMAGE_SIZE = {"fcn4": 64, "lenet": 32, "alexnet": 64, "resnet18": None, "resnet50": 64}


def _jsonable(value):
    """Floats that are not finite become None (strict JSON); tensors become lists; tuples lists."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.detach().cpu().tolist())
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


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
            :data:`NETWORK_IMAGE_SIZE`); init: model initialisation (None: the paper's).
        dtype: of the model and the victim's gradient (float64 for exact analytic inversions).
        tv, lr, restarts, f_scalar: matching options (``f_scalar > 0`` adds the feature term with the recovered
            feature).
        recovery_format: ``label_format`` passed to :func:`gradleak.recover_from_gradients` ("auto": detect).
        matching_options: further keyword arguments of :func:`gradleak.reconstruct.match_gradients` (e.g.
            ``{"line_search": "strong_wolfe"}``, ``{"signed": True}``).
        device: for gradient matching ("auto": CUDA when available).
        progress: tqdm bars; figure: write the PNG; name: file stem (default from the settings).

    Returns:
        ``dict(config=..., victim=..., recovery=..., results={run name: metrics}, files=...)``; metrics have
        psnr, ssim, lpips (None without local LPIPS weights), seconds, and for matching the final loss.
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
        side = size or NETWORK_IMAGE_SIZE.get(network)
        model_kwargs = {}
        if network in ("fcn4", "lenet"):
            model_kwargs.update(image_size=side or 32, channels=channels)
        elif network in ("alexnet", "resnet18", "resnet50"):
            model_kwargs.update(channels=channels)
        model = build_model(network, classes, init=init, seed=seed, **model_kwargs)
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
            extra = {"loss": out.loss, "iterations": len(out.history), "label_used": out.label}
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
            json.dump(_jsonable(report), handle, indent=2)
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
    reports = []
    for sample in samples:
        reports.append(run_reconstruction(
            network, dataset, label_format, [method], label_variants=label_variants, sample=sample,
            seed=seed + sample, iterations=iterations, out_dir=out_dir if figures else None, progress=progress,
            figure=figures, **options))
    summary = {}
    for variant in label_variants:
        key = f"{method}/{variant}"
        psnrs = np.array([r["results"][key]["psnr"] for r in reports], dtype=float)
        ssims = np.array([r["results"][key]["ssim"] for r in reports], dtype=float)
        summary[variant] = {"psnr_mean": float(psnrs.mean()), "psnr_std": float(psnrs.std()),
                            "ssim_mean": float(ssims.mean()), "ssim_std": float(ssims.std()), "n": len(samples),
                            "psnr": psnrs.tolist(), "ssim": ssims.tolist()}
    config = {"network": network, "dataset": dataset, "method": method, "label_format": label_format,
              "samples": samples, "seed": seed, "iterations": iterations,
              "label_variants": list(label_variants),
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
    lines = [f"Gradient matching ({config['method']}) on {config['network']} / {config['dataset']}, "
             f"{config['label_format']} labels, {len(config['samples'])} samples, "
             f"{config['iterations'] or 'default'} iterations per variant, seed {config['seed']}"
             + (f", options {config['options']}." if config.get("options") else "."),
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
        writer.writerow(["sample", "eps", "variant", "psnr", "ssim", "loss", "seconds", "label_error"])
        for report in table["per_sample"]:
            for key, row in report["results"].items():
                writer.writerow([report["victim"]["sample"], report["victim"].get("eps"), row["label"],
                                 row["psnr"], row["ssim"], row.get("loss"), row["seconds"],
                                 report["recovery"]["label_error"]])
    summary = {k: v for k, v in table.items() if k not in ("per_sample", "files")}
    with open(paths["json"], "w") as handle:
        json.dump(_jsonable(summary), handle, indent=2)
    return paths
