"""Label-recovery speed and success, side by side: exact (ours) vs the paper's L-BFGS and PSO searches.

Every method gets the SAME float32 gradients of real images (foolbox's CIFAR-10 and ImageNet samples) and is
timed on the recovery call alone, and every method but "exact-auto" is told the label format, as the paper's
searches must be. Success is judged by the evaluator: max |label error| < 1e-3 and feature cosine > 0.999.
"exact-head" uses the head's gradient only, like the paper's searches; "exact" is the default pipeline, which also
reads the layer below the head when it can; "exact-auto" is that pipeline detecting the format itself; the
"-unknown-scale" variants recover the same gradients with ``gradient_scale="unknown"`` (label, feature and scale),
and their median time ratio to the known-scale call is printed. Prints a table and writes a CSV.

    python benchmarks/bench_recovery.py --samples 10 --threads 2

``--batched N`` measures throughput instead: N single-example gradients of ResNet18's 10 x 512 head (CIFAR-10,
the protocol's smoothing and mixup labels) recovered by one ``recover_labels`` call and by N ``recover_label``
calls, on the same gradients, side by side in recoveries per second (medians; the single calls are timed on the
first ``--compare`` examples), with the largest label difference between the two and the undetermined fraction.

    python benchmarks/bench_recovery.py --batched 1000 --threads 2

``--device cuda`` runs the networks and every recovery on the GPU (the same code; each timed call ends with a
``torch.cuda.synchronize()``); without a CUDA device it stops with an error.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from tqdm.auto import tqdm

import gradleak
from gradleak.data import load_samples
from gradleak.client import soft_cross_entropy
from gradleak.experiments.common import draw_trials, victim, victim_input, write_rows
from gradleak.models import build_model
from gradleak.recovery.batched import recover_labels

METHODS = {
    "exact": dict(method="exact"),
    "exact-head": dict(method="exact", use_feature_layer=False),
    "exact-auto": dict(method="exact", label_format="auto"),
    "exact-unknown-scale": dict(method="exact", gradient_scale="unknown"),
    "exact-head-unknown-scale": dict(method="exact", use_feature_layer=False, gradient_scale="unknown"),
    "lbfgs": dict(method="lbfgs", use_feature_layer=False),
    "pso": dict(method="pso", use_feature_layer=False),
}
CONFIGS = [  # (name, network, kwargs, dataset, image size, classes)
    ("FCN-4 / CIFAR-10 64px", "fcn4", {}, "cifar10", 64, 10),
    ("LeNet / CIFAR-10", "lenet", {}, "cifar10", None, 10),
    ("ResNet18 / CIFAR-10", "resnet18", {"stem": "cifar"}, "cifar10", None, 10),
    ("ResNet50 / ImageNet 1000x2048 head", "resnet50", {}, "imagenet", 64, 1000),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=10, help="samples per configuration and label format")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (CI machines have 2 cores)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--configs", nargs="+", type=int, default=list(range(len(CONFIGS))),
                        help="indices into the configuration list")
    parser.add_argument("--seed", type=int, default=2023)
    parser.add_argument("--out", default="bench-recovery.csv")
    parser.add_argument("--batched", type=int, metavar="N", help="throughput of N recoveries at once instead")
    parser.add_argument("--compare", type=int, default=200, help="with --batched: examples also run one by one")
    parser.add_argument("--repeats", type=int, default=5, help="with --batched: timed batched calls")
    parser.add_argument("--device", default="cpu", help="where the networks and the recoveries run (cpu, cuda)")
    args = parser.parse_args()
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is available on this machine")
    torch.set_num_threads(args.threads)
    if args.batched:
        batched_throughput(args)
        return
    rows = []
    for index in args.configs:
        title, network, kwargs, dataset, size, num_classes = CONFIGS[index]
        model = build_model(network, num_classes, seed=1, **kwargs).to(args.device)
        images, labels = load_samples(dataset, size=size)
        for label_format in ("smoothing", "mixup"):
            trials = draw_trials(labels, num_classes, label_format, args.samples, args.seed)
            for trial in tqdm(trials, desc=f"{title} {label_format}", leave=False):
                truth = victim(model, images, trial)
                gradients, feature = truth.gradients, truth.feature.double()
                gradleak.recover_from_gradients(model, gradients)  # untimed: the first call after backward warms caches
                for method in args.methods:
                    options = dict(dict(label_format=label_format), **METHODS[method])
                    start = time.perf_counter()
                    result = gradleak.recover_from_gradients(model, gradients, **options)
                    ms = finished(start, args.device) * 1e3
                    error = float((result.label.double().cpu() - truth.label).abs().max())
                    cosine = float(torch.nn.functional.cosine_similarity(result.feature.double().cpu(),
                                                                         feature.cpu(), dim=0))
                    rows.append(dict(config=title, format=label_format, method=method, ms=ms, label_error=error,
                                     feature_cosine=cosine, success=error < 1e-3 and cosine > 0.999))
    write_rows(args.out, rows)
    print(f"\ndevice: {args.device}; torch threads: {args.threads}; {args.samples} samples per configuration and "
          "format; same gradients for every method\n")
    header = f"{'configuration':36} {'format':9} {'method':10} {'median ms':>10} {'success':>8} {'x faster than pso':>18}"
    print(header)
    print("-" * len(header))
    for title in dict.fromkeys(r["config"] for r in rows):
        for label_format in ("smoothing", "mixup"):
            mine = [r for r in rows if r["config"] == title and r["format"] == label_format]
            pso = [r["ms"] for r in mine if r["method"] == "pso"]
            for method in args.methods:
                cell = [r for r in mine if r["method"] == method]
                median = statistics.median(r["ms"] for r in cell)
                success = sum(r["success"] for r in cell) / len(cell)
                ratio = f"{statistics.median(pso) / median:18.1f}" if pso else f"{'-':>18}"
                print(f"{title:36} {label_format:9} {method:10} {median:10.2f} {success:8.1%} {ratio}")
    for known, unknown in (("exact", "exact-unknown-scale"), ("exact-head", "exact-head-unknown-scale")):
        if {known, unknown} <= set(args.methods):
            ratios = [u["ms"] / k["ms"] for k, u in zip((r for r in rows if r["method"] == known),
                                                        (r for r in rows if r["method"] == unknown))]
            print(f"{unknown} / {known}, same gradients: median time ratio {statistics.median(ratios):.2f} "
                  f"(max {max(ratios):.2f}) over {len(ratios)} samples")
    print(f"per-sample rows: {args.out}")


def finished(start: float, device: str) -> float:
    """Seconds since ``start`` once the work queued on ``device`` is done (a CUDA call returns before it is)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def head_gradients_of(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(N, C, d)`` each example's gradient of its own soft cross-entropy with respect to the (bias-free) head's
    weight: autograd, vectorised over the examples (what ``single_example_gradients`` gives, one by one)."""
    with torch.no_grad():
        features = torch.cat([model.features(part) for part in inputs.split(100)])

    def loss(weight: torch.Tensor, feature: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return soft_cross_entropy((feature @ weight.T).unsqueeze(0), label.unsqueeze(0))

    per_example = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))
    return per_example(model.head.weight.detach(), features, labels.to(features.dtype))


def batched_throughput(args: argparse.Namespace) -> None:
    """Recoveries per second, one ``recover_labels`` call against one ``recover_label`` call per example."""
    model = build_model("resnet18", 10, seed=1, stem="cifar").to(args.device)
    images, labels = load_samples("cifar10")
    images = images.to(args.device)
    weight = model.head.weight.detach()
    print(f"ResNet18 / CIFAR-10 head 10 x 512, {args.batched} gradients per batch, device {args.device}, "
          f"torch threads {args.threads}, "
          f"single calls timed on the first {args.compare}\n")
    header = (f"{'labels':9} {'label_format':12} {'batched /s':>10} {'single /s':>10} {'ratio':>7} "
              f"{'undetermined':>12} {'max |label diff|':>17} {'determined differ':>17}")
    print(header)
    print("-" * len(header))
    for kind in ("smoothing", "mixup"):
        trials = draw_trials(labels, 10, kind, args.batched, args.seed)
        inputs = torch.stack([victim_input(images, trial) for trial in trials])
        targets = torch.stack([trial.spec.to_tensor(torch.float32) for trial in trials]).to(args.device)
        grads = head_gradients_of(model, inputs, targets)
        for label_format in (kind, "auto"):
            recover_labels(grads[:10], weight, label_format=label_format)  # untimed: warm-up
            seconds = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                results = recover_labels(grads, weight, label_format=label_format)
                seconds.append(finished(start, args.device))
            single_ms, difference, disagree = [], 0.0, 0
            for i in range(min(args.compare, args.batched)):
                start = time.perf_counter()
                single = gradleak.recover_label(grads[i], weight, label_format=label_format)
                single_ms.append(finished(start, args.device) * 1e3)
                difference = max(difference, float((single.label - results.labels[i]).abs().max()))
                disagree += single.determined != bool(results.determined[i])
            batched_rate = args.batched / statistics.median(seconds)
            single_rate = 1e3 / statistics.median(single_ms)
            undetermined = float((~results.determined).float().mean())
            print(f"{kind:9} {label_format:12} {batched_rate:10.0f} {single_rate:10.0f} "
                  f"{batched_rate / single_rate:6.1f}x {undetermined:12.2%} {difference:17.3g} {disagree:17d}",
                  flush=True)


if __name__ == "__main__":
    main()
