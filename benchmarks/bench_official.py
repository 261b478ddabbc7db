"""Same gradients, two implementations: the paper's official ``label_reco`` against gradleak's exact recovery.

The official code is NOT part of gradleak: pass a checkout of its public repository
(https://github.com/ybwang119/label_recovery) with ``--official PATH``; the script imports its ``recovering.py``
from there. Without ``--official`` it says so and exits 0 (nothing to compare with; gradleak's own speed table is
``benchmarks/bench_recovery.py``).

Protocol, for every (network, label format) cell:

* the victims are built by gradleak: the network (seeded init, or ``--weights NETWORK=PATH``), the bundled
  CIFAR-10 samples, the seeded sampling protocol of the official notebooks (``draw_trials``) and one float32
  single-example gradient per trial;
* both sides get that SAME float32 head weight gradient and the head's weights (not the head's bias gradient,
  which the official code never reads); both are told the label format, as the official code must be;
* official: ``label_recovery.label_reco()`` with the official notebooks' CONFIG (L-BFGS, lr 0.5, bound 100,
  200 iterations, initial scalar 1, coefficient 4 for smoothing and 2 for mixup). Its PSO fallback is not run;
* gradleak: ``gradleak.recover_label(weight_grad, weight, label_format=..., method="exact")``; and, apart, the
  cell's gradients in one ``gradleak.recover_labels`` call (time per sample = the call's median over
  ``--repeats`` / the cell's samples, against the official median), whose labels are compared with the single
  calls';
* only the recovery call is timed, with ``--threads`` torch threads (default 1): gradleak as the median of
  ``--repeats`` calls (default 5) after one untimed call, the official code as the median of
  ``--official-repeats`` calls (default 3) after one untimed call per cell. Both the wall time and the calling
  thread's CPU time are recorded: on a loaded machine the CPU-time ratio is the steadier of the two;
* the evaluator judges both answers against the truth the same way: success is max |label error| < 1e-3.

How the official code is driven (read ``recovering.py``): its constructor builds its own network and image
transforms and its ``setup`` reads images from its dataset folder and computes the gradient itself, so neither is
called. The instance gets, as attributes, what ``setup`` would have stored: the head (a copy of gradleak's
``nn.Linear``, as ``forward_function``), the head weight gradient (``gradient``), the starting point
``recover_init`` = the gradient row of largest |row sum| / coefficient, and, for its messages, the true feature
(``input_ground_truth``) and true scalar (``ground_truth`` = nanmean(feature / recover_init)), as ``setup``
computes them. ``label_reco`` reads those two only after its search has stopped, to choose what to print and the
sign of its return value; the search path, and therefore the time, does not depend on them. Its answer is the
scalar it stopped at; the label is read from that scalar with its own ``_fake_y`` (untimed), and its printed
messages are captured, not shown (their formatting is part of its call and is timed).

torchvision: ``recovering.py`` and its ``metrics.py`` import torchvision at module level but the label-recovery
path never touches it (only the constructor's image transforms, an unused Inception-score class and a version
print do). torchvision is not a gradleak dependency and may be uninstallable (as on the machine these numbers come
from), so when it is missing the import runs against minimal stand-in modules (``torchvision``,
``torchvision.models``, ``torchvision.transforms``) that hold a version string and raise on any other use; they are
removed from ``sys.modules`` again right after the import, as are the official modules' generic top-level names
(``recovering``, ``model``, ``resnet``, ``metrics``). The official import also needs pandas, scikit-opt (``sko``),
scikit-image and Pillow: the benchmark's requirements, not gradleak's.

    python benchmarks/bench_official.py --official /path/to/label_recovery --samples 10
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import importlib
import importlib.util
import io
import math
import statistics
import sys
import time
import types
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

import gradleak
from gradleak.experiments.common import SUCCESS_TOL, draw_trials, markdown_table, setup, victim
from gradleak.head import find_head
from gradleak.metrics import label_error
from gradleak.models import MODELS

OFFICIAL_FORMATS = {"smoothing": "label_smooth", "mixup": "mixup"}   # gradleak's name -> the official CONFIG type
OFFICIAL_COEFFICIENT = {"smoothing": 4, "mixup": 2}                 # the official notebooks' CONFIG['coefficient']
OFFICIAL_MODULE_NAMES = ("recovering", "model", "resnet", "metrics")  # top-level names its files import each other by
DEFAULT_NETWORKS = ("lenet", "resnet18")
DATASET = "cifar10"
CSV_FIELDS = ["network", "weights", "format", "sample", "official_ms", "gradleak_ms", "ratio", "official_cpu_ms",
              "gradleak_cpu_ms", "cpu_ratio", "official_success",
              "gradleak_success", "official_label_error", "gradleak_label_error", "official_scalar", "true_scalar",
              "official_return", "gradleak_determined", "batched_ms", "batched_difference"]


# ----------------------------------------------------------------------------------------------- official import

def _stand_in_module(name: str, **attributes) -> types.ModuleType:
    """A module holding ``attributes`` whose every other attribute raises: any real use fails loudly."""
    module = types.ModuleType(name, f"gradleak benchmark stand-in for {name} (the real one is not installed)")
    module.__dict__.update(attributes)

    def missing(attribute: str):
        if attribute.startswith("__"):  # let import machinery probes (__path__, __spec__ ...) fail normally
            raise AttributeError(attribute)
        raise RuntimeError(f"{name}.{attribute} is a stand-in: torchvision is not installed, and the official "
                           "label-recovery path was not expected to use it")

    module.__getattr__ = missing
    return module


@contextlib.contextmanager
def _torchvision_for_import() -> Iterator[None]:
    """The real torchvision when installed, else stand-ins for exactly what the official import touches."""
    if importlib.util.find_spec("torchvision") is not None:
        yield
        return
    models = _stand_in_module("torchvision.models")
    transforms = _stand_in_module("torchvision.transforms")
    root = _stand_in_module("torchvision", __version__="stand-in", models=models, transforms=transforms)
    stand_ins = {"torchvision": root, "torchvision.models": models, "torchvision.transforms": transforms}
    sys.modules.update(stand_ins)
    try:
        yield
    finally:
        for name, module in stand_ins.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]


def import_official(path: Path) -> type:
    """The official ``label_recovery`` class, imported from the checkout at ``path`` without leaving its modules'
    generic names (``model``, ``metrics`` ...) or the stand-ins in ``sys.modules``."""
    path = Path(path).resolve()
    if not (path / "recovering.py").is_file():
        raise FileNotFoundError(f"{path} has no recovering.py: pass a checkout of github.com/ybwang119/label_recovery")
    previous = {name: sys.modules.pop(name) for name in OFFICIAL_MODULE_NAMES if name in sys.modules}
    sys.path.insert(0, str(path))
    try:
        with _torchvision_for_import(), contextlib.redirect_stdout(io.StringIO()):  # it prints versions on import
            recovering = importlib.import_module("recovering")
        return recovering.label_recovery
    finally:
        sys.path.remove(str(path))
        for name in OFFICIAL_MODULE_NAMES:
            sys.modules.pop(name, None)
        sys.modules.update(previous)


def official_config(label_format: str, network: str) -> Dict[str, object]:
    """The CONFIG of the official notebooks (``label_reco_exp*.ipynb``) for one cell; only the label-recovery keys."""
    return OrderedDict(device=torch.device("cpu"), dataset=DATASET, network=network, opt="lbfgs",
                       type=OFFICIAL_FORMATS[label_format], pretrained=False, lr=0.5, bound=100, iteration=200,
                       initia=1.0, coefficient=OFFICIAL_COEFFICIENT[label_format])


class OfficialAttack:
    """One official ``label_recovery`` instance loaded with one head gradient (see the module docstring)."""

    def __init__(self, label_recovery: type, config: Dict[str, object], head: nn.Linear, weight_grad: torch.Tensor,
                 true_feature: torch.Tensor) -> None:
        # no __init__/setup: they build the official network and read its image files; this sets what they store
        attack = label_recovery.__new__(label_recovery)
        attack.config = config
        attack.device = config["device"]
        attack.classes = weight_grad.shape[0]
        attack.forward_function = copy.deepcopy(head)  # its L-BFGS accumulates grads into the head's weights
        attack.gradient = weight_grad.detach().clone()
        start_row = attack.gradient.sum(dim=1).abs().argmax()
        attack.recover_init = attack.gradient[start_row].clone() / config["coefficient"]
        attack.input_ground_truth = true_feature.detach().to(weight_grad.dtype)
        attack.ground_truth = np.nanmean((attack.input_ground_truth / attack.recover_init).numpy())
        attack.scalar = torch.tensor(config["initia"])
        self.attack = attack
        self.log = io.StringIO()

    def run(self) -> object:
        with contextlib.redirect_stdout(self.log):
            return self.attack.label_reco()

    def answer(self) -> torch.Tensor:
        """The label at the scalar the search stopped at, by the official ``_fake_y`` (what it reports on success)."""
        with torch.no_grad(), contextlib.redirect_stdout(self.log):
            scalar = self.attack.scalar.detach().to(self.attack.recover_init.dtype)
            label, _ = self.attack._fake_y(scalar * self.attack.recover_init)
        return label.detach()


# ----------------------------------------------------------------------------------------------- timing

def _milliseconds(call, repeats: int) -> tuple:
    """(median wall ms, median CPU ms of this thread, over ``repeats`` calls; the last call's result).

    With one torch thread the work runs on the calling thread, so its CPU time is what the call costs even when
    other processes take the core away; the wall time is what a user waits.
    """
    wall, cpu, result = [], [], None
    for _ in range(repeats):
        start_wall, start_cpu = time.perf_counter(), time.thread_time()
        result = call()
        cpu.append((time.thread_time() - start_cpu) * 1e3)
        wall.append((time.perf_counter() - start_wall) * 1e3)
    return statistics.median(wall), statistics.median(cpu), result


def _judge(label: Optional[torch.Tensor], truth: torch.Tensor) -> tuple:
    """(max |label error|, success) by the evaluator; a missing or non-finite answer is a failure."""
    if label is None:
        return math.nan, False
    error = float(label_error(label.detach().to(torch.float64), truth))
    return error, bool(error < SUCCESS_TOL)


def run_cell(label_recovery: type, network: str, weights: str, label_format: str, samples: int, seed: int,
             repeats: int, official_repeats: int) -> List[dict]:
    """Per-sample rows for one (network, format) cell."""
    victims = setup(DATASET, network, weights, seed=seed)
    _, head = find_head(victims.model)
    head_weight_name = next(name for name, p in victims.model.named_parameters() if p is head.weight)
    weight = head.weight.detach()
    bias = None if head.bias is None else head.bias.detach()
    config = official_config(label_format, network)
    rows, gradients, single_labels = [], [], []
    trials = draw_trials(victims.labels, victims.num_classes, label_format, samples, seed)
    for index, trial in enumerate(trials):
        truth = victim(victims.model, victims.images, trial)
        weight_grad = truth.gradients[head_weight_name]  # float32, as the client sends it
        gradients.append(weight_grad)
        official = OfficialAttack(label_recovery, config, head, weight_grad, truth.feature)

        def ours():
            return gradleak.recover_label(weight_grad, weight, bias=bias, label_format=label_format, method="exact")

        if index == 0:  # one untimed call per side and cell: first-call costs (allocations, dispatch) are not timed
            official.run()
        ours()
        official_ms, official_cpu_ms, official_return = _milliseconds(official.run, official_repeats)
        try:
            ours()
            gradleak_ms, gradleak_cpu_ms, result = _milliseconds(ours, repeats)
            gradleak_label, determined = result.label, result.determined
        except (ValueError, RuntimeError):  # gradleak refused the gradient: a failure, and no time to compare
            gradleak_ms = gradleak_cpu_ms = math.nan
            gradleak_label, determined = None, False
        single_labels.append(gradleak_label)
        official_error, official_success = _judge(official.answer(), truth.label)
        gradleak_error, gradleak_success = _judge(gradleak_label, truth.label)
        rows.append(dict(network=network, weights=victims.weights, format=label_format, sample=trial.sample,
                         official_ms=official_ms, gradleak_ms=gradleak_ms, ratio=official_ms / gradleak_ms,
                         official_cpu_ms=official_cpu_ms, gradleak_cpu_ms=gradleak_cpu_ms,
                         cpu_ratio=official_cpu_ms / gradleak_cpu_ms,
                         official_success=official_success, gradleak_success=gradleak_success,
                         official_label_error=official_error, gradleak_label_error=gradleak_error,
                         official_scalar=float(official.attack.scalar.detach()),
                         true_scalar=float(official.attack.ground_truth),
                         official_return=float(official_return), gradleak_determined=determined))

    def together():  # the cell's gradients in one call: its time per sample, and the single calls' answers
        return gradleak.recover_labels(torch.stack(gradients), weight, bias=bias, label_format=label_format,
                                       method="exact")

    together()
    batched_ms, _, results = _milliseconds(together, repeats)
    for row, label, result in zip(rows, single_labels, results):
        row["batched_ms"] = batched_ms / len(rows)
        row["batched_difference"] = math.nan if label is None else float((result.label - label).abs().max())
    return rows


# ----------------------------------------------------------------------------------------------- report

def _spread(values: Sequence[float]) -> tuple:
    """(median, min, max, first quartile, third quartile) of the finite values."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return (math.nan,) * 5
    q1, q3 = np.percentile(finite, [25, 75])
    return statistics.median(finite), min(finite), max(finite), float(q1), float(q3)


def summarize(rows: Sequence[dict]) -> List[dict]:
    """One row per (network, weights, format) cell: median ratio and its spread, median times, success counts."""
    cells = []
    for key in dict.fromkeys((r["network"], r["weights"], r["format"]) for r in rows):
        cell = [r for r in rows if (r["network"], r["weights"], r["format"]) == key]
        median, low, high, q1, q3 = _spread([r["ratio"] for r in cell])
        official_ms = statistics.median(r["official_ms"] for r in cell)
        cells.append(dict(network=key[0], weights=key[1], format=key[2], n=len(cell), official_ms=official_ms,
                          gradleak_ms=_spread([r["gradleak_ms"] for r in cell])[0],
                          median_ratio=median, min_ratio=low, max_ratio=high, q1_ratio=q1, q3_ratio=q3,
                          median_cpu_ratio=_spread([r["cpu_ratio"] for r in cell])[0],
                          batched_ms=cell[0]["batched_ms"],
                          batched_ratio=official_ms / cell[0]["batched_ms"],
                          batched_difference=max(r["batched_difference"] for r in cell),
                          official_successes=sum(r["official_success"] for r in cell),
                          gradleak_successes=sum(r["gradleak_success"] for r in cell)))
    return cells


def report(rows: Sequence[dict], threads: int, samples: int) -> str:
    lines = [f"Same float32 head gradients for both sides; CIFAR-10, {samples} samples per cell, {threads} torch "
             f"thread(s); ratio = official ms / gradleak ms per sample; success: max |label error| < {SUCCESS_TOL:g} "
             "(judged by the evaluator).\n"]
    per_sample = [[r["network"] + ("" if r["weights"] == "untrained" else f" ({r['weights']})"), r["format"],
                   r["sample"], f"{r['official_ms']:.1f}", f"{r['gradleak_ms']:.2f}", f"{r['ratio']:.0f}x",
                   "yes" if r["official_success"] else "no", "yes" if r["gradleak_success"] else "no"]
                  for r in rows]
    lines.append(markdown_table(["network", "format", "sample", "official ms", "gradleak ms", "ratio",
                                 "official success", "gradleak success"], per_sample))
    cells = summarize(rows)
    per_cell = [[c["network"] + ("" if c["weights"] == "untrained" else f" ({c['weights']})"), c["format"], c["n"],
                 f"{c['official_ms']:.1f}", f"{c['gradleak_ms']:.2f}", f"{c['median_ratio']:.0f}x",
                 f"{c['min_ratio']:.0f}-{c['max_ratio']:.0f}x", f"{c['q1_ratio']:.0f}-{c['q3_ratio']:.0f}x",
                 f"{c['median_cpu_ratio']:.0f}x", f"{c['official_successes']}/{c['n']}",
                 f"{c['gradleak_successes']}/{c['n']}", f"{c['batched_ms']:.3f}", f"{c['batched_ratio']:.0f}x",
                 f"{c['batched_difference']:.1g}"] for c in cells]
    lines.append(markdown_table(["network", "format", "n", "official median ms", "gradleak median ms",
                                 "median ratio", "min-max", "IQR", "median CPU-time ratio", "official recovered",
                                 "gradleak recovered", "batched ms per sample", "official / batched",
                                 "batched vs single: largest label difference"], per_cell))
    median, low, high, q1, q3 = _spread([r["ratio"] for r in rows])
    cell_medians = statistics.median(c["median_ratio"] for c in cells)
    lines.append(f"All {len(rows)} samples: median ratio {median:.0f}x (IQR {q1:.0f}-{q3:.0f}x, min-max "
                 f"{low:.0f}-{high:.0f}x; CPU time {_spread([r['cpu_ratio'] for r in rows])[0]:.0f}x); median of "
                 f"the cell medians {cell_medians:.0f}x; recovered: official "
                 f"{sum(r['official_success'] for r in rows)}/{len(rows)}, gradleak "
                 f"{sum(r['gradleak_success'] for r in rows)}/{len(rows)}.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- command line

def _weights(values: Sequence[str]) -> Dict[str, str]:
    parsed = {}
    for value in values:
        network, sep, path = value.partition("=")
        if not sep or network not in MODELS or not path:
            raise argparse.ArgumentTypeError(f"--weights takes NETWORK=CHECKPOINT, got {value!r}")
        parsed[network] = path
    return parsed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--official", type=Path, default=None, metavar="PATH",
                        help="a checkout of github.com/ybwang119/label_recovery (without it: message, exit 0)")
    parser.add_argument("--samples", type=int, default=10, help="samples per network and label format")
    parser.add_argument("--networks", nargs="+", default=list(DEFAULT_NETWORKS), choices=sorted(MODELS),
                        help="gradleak networks for CIFAR-10")
    parser.add_argument("--formats", nargs="+", default=list(OFFICIAL_FORMATS), choices=list(OFFICIAL_FORMATS),
                        help="label formats (the two the official code supports)")
    parser.add_argument("--weights", nargs="+", default=[], metavar="NETWORK=CHECKPOINT",
                        help="a trained checkpoint for a network (default: the seeded untrained network)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for both sides")
    parser.add_argument("--repeats", type=int, default=5, help="timed gradleak calls per sample (median)")
    parser.add_argument("--official-repeats", type=int, default=3, help="timed official calls per sample (median)")
    parser.add_argument("--seed", type=int, default=2023, help="seeds the network initialisation and the trials")
    parser.add_argument("--csv", type=Path, default=None, metavar="OUT", help="write the per-sample rows here")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.official is None:
        print("bench_official: skipped: no --official PATH. Pass a checkout of the paper's official code "
              "(git clone https://github.com/ybwang119/label_recovery) to compare it with gradleak on the same "
              "gradients.")
        return 0
    if min(args.samples, args.threads, args.repeats, args.official_repeats) < 1:
        parser.error("--samples, --threads, --repeats and --official-repeats must be positive")
    try:
        weights = _weights(args.weights)
        label_recovery = import_official(args.official)
    except (argparse.ArgumentTypeError, FileNotFoundError) as error:
        parser.error(str(error))
    torch.set_num_threads(args.threads)
    rows = []
    for network in args.networks:
        for label_format in args.formats:
            rows += run_cell(label_recovery, network, weights.get(network, "untrained"), label_format,
                             args.samples, args.seed, args.repeats, args.official_repeats)
    print(report(rows, args.threads, args.samples))
    if args.csv is not None:
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        print(f"per-sample rows: {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
