"""``gradleak demo``: real CIFAR-10 images, LeNet and ResNet18, label smoothing and mixup, recovered exactly."""
from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import load_samples
from .experiments.common import draw_trials, victim
from .models import build_model
from .recovery import recover_from_gradients

NETWORKS = {"lenet": {}, "resnet18": {"stem": "cifar"}}


@dataclass
class DemoRow:
    """One victim: the truth, what the attacker recovered, and how close it came."""

    network: str
    true_format: str
    true_classes: str
    true_param: float
    recovered_format: str
    recovered_classes: str
    recovered_param: float
    label_error: float
    feature_cosine: float
    determined: bool
    method: str
    ms: float


def _describe(label_format: str, classes, eps: float, lam: Optional[float]) -> tuple:
    """(classes text, the format's parameter: eps for smoothing, lambda of the second class for mixup)."""
    if label_format == "mixup":
        return "+".join(map(str, classes)), float(lam)
    return str(classes[0]), float(eps)


def run_demo(samples: int = 8, seed: int = 2023, out: Optional[Path] = None, networks: Sequence[str] = tuple(NETWORKS),
             progress: bool = True) -> List[DemoRow]:
    """Recover ``samples`` labels per network and format; write ``demo.csv`` / ``demo.json`` under ``out``."""
    images, labels = load_samples("cifar10")
    rows: List[DemoRow] = []
    jobs = [(name, fmt) for name in networks for fmt in ("smoothing", "mixup")]
    bar = tqdm(total=len(jobs) * samples, desc="demo", disable=not progress)
    for name, fmt in jobs:
        model = build_model(name, 10, seed=seed, **NETWORKS[name])
        for trial in draw_trials(labels, 10, fmt, samples, seed):
            truth = victim(model, images, trial)  # the client's upload, and what only the evaluator knows
            start = time.perf_counter()
            result = recover_from_gradients(model, truth.gradients)  # the attacker: parameters + gradients only
            elapsed = (time.perf_counter() - start) * 1e3
            spec = trial.spec
            cosine = float(torch.nn.functional.cosine_similarity(result.feature.double(), truth.feature.double(),
                                                                 dim=0))
            true_classes, true_param = _describe(spec.label_format, spec.classes, spec.eps, spec.lam)
            got_classes, got_param = _describe(result.label_format, result.classes, result.eps, result.lam)
            rows.append(DemoRow(name, spec.label_format, true_classes, true_param, result.label_format, got_classes,
                                got_param, float((result.label.double() - truth.label).abs().max()), cosine,
                                result.determined, result.method, elapsed))
            bar.update()
    bar.close()
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "demo.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(asdict(rows[0])))
            writer.writeheader()
            writer.writerows(asdict(r) for r in rows)
        (out / "demo.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return rows


def format_table(rows: Sequence[DemoRow]) -> str:
    """A fixed-width table of the rows and a per-network summary."""
    head = (f"{'network':9} {'true label':24} {'recovered':24} {'max|err|':>9} {'feat cos':>9} {'ms':>7}  method")
    lines = [head, "-" * len(head)]
    for r in rows:
        name = "eps" if r.true_format == "smoothing" else "lam"
        true = f"{r.true_format[:6]} {r.true_classes} {name}={r.true_param:.4f}"
        name = "eps" if r.recovered_format != "mixup" else "lam"
        got = f"{r.recovered_format[:6]} {r.recovered_classes} {name}={r.recovered_param:.4f}"
        lines.append(f"{r.network:9} {true:24} {got:24} {r.label_error:9.1e} {r.feature_cosine:9.6f} {r.ms:7.1f}  "
                     f"{r.method}{'' if r.determined else ' (undetermined)'}")
    lines.append("")
    for name in dict.fromkeys(r.network for r in rows):
        mine = [r for r in rows if r.network == name]
        ok = sum(r.label_error < 1e-3 and r.feature_cosine > 0.999 and r.recovered_format == r.true_format
                 for r in mine)
        lines.append(f"{name}: {ok}/{len(mine)} recovered (format right, max |label error| < 1e-3, feature cosine "
                     f"> 0.999); median {np.median([r.ms for r in mine]):.1f} ms per sample")
    return "\n".join(lines)
